"""`dsckpt show-map`: source and target maps, JSON, readability at scale, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ckpt, facts
from rich.console import Console

from dsckpt.discover.files import RankFile, Role
from dsckpt.discover.layout import Layout, TensorEntry
from dsckpt.plan.topology_map import topology_map
from dsckpt.render import map_report


def test_source_map_matches_the_files(cli) -> None:
    f = facts("pipe", "p2t2d2-z1-fp32")
    result = cli("show-map", ckpt("pipe", "p2t2d2-z1-fp32"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"]["pp"] == f["pp"] and data["source"]["tp"] == f["tp"]
    # Stage 1 starts where DeepSpeed's partition put it; the trailing parameter-free layers and
    # the tied copy leave no file, so the last boundary is the last layer with a file + 1.
    assert data["source"]["stage_parts"][:2] == f["parts"][:2]
    ranks = {(r["stage"], r["tp"]): r for r in data["ranks"]}
    assert ranks[(1, 1)]["model_file"] == "mp_rank_03_model_states.pt"
    assert ranks[(1, 1)]["optim_files"] == [
        "zero_pp_rank_0_mp_rank_03_optim_states.pt",
        "zero_pp_rank_1_mp_rank_03_optim_states.pt",
    ]
    stage_of = {int(s): layers for s, layers in f["stage_layers"].items()}
    for (stage, _), row in ranks.items():
        assert set(row["layers"]) <= set(stage_of[stage])


def test_target_map_grows_tp_and_moves_layers(cli) -> None:
    result = cli("show-map", ckpt("pipe", "p2t1d1-z1-fp32"), "--tp", "2", "--pp", "3", "--json")
    data = json.loads(result.stdout)
    assert data["target"]["tp_unit"] == 2
    targets = {(t["stage"], t["tp"]): t for t in data["targets"]}
    assert len(targets) == 6
    # Growing TP 1 -> 2: target rank r takes half r of the source's only rank.
    for (_, tp), t in targets.items():
        assert t["tp_pieces"] == [{"src_tp": 0, "src_start": tp, "length": 1, "dst_start": 0}]
    layers = [layer for s in range(3) for layer in targets[(s, 0)]["layers"]]
    assert layers == list(range(data["source"]["stage_parts"][-1]))
    # The stage split `reshape` would use, over the layer specs the files show (the tied LM
    # head after the final norm), counting parameters at the target TP.
    assert data["target"]["stage_parts"] == [0, 3, 4, 7]
    assert data["target"]["layer_specs"] == "?,embed@?,?*4,embed@?"
    assert data["target"]["layer_specs_inferred"] is True


def test_dp_map_of_a_zero_checkpoint(cli) -> None:
    result = cli("show-map", ckpt("zero", "z2-fp32-dp4-padrank"), "--dp", "3", "--json")
    assert result.exit_code == 0, result.output
    dp_sources = json.loads(result.stdout)["targets"][0]["dp_sources"]
    assert len(dp_sources) == 3
    covered = sorted({s for srcs in dp_sources for s in srcs})
    assert covered[0] == 0 and all(srcs == sorted(srcs) for srcs in dp_sources)


def test_refusals(cli) -> None:
    for args, needle in [
        (["--pp", "99"], "at most"),
        (["--tp", "0"], "must be at least 1"),
        (["--tp", "4"], "possible degrees are 1, 2"),
    ]:
        result = cli("show-map", ckpt("pipe", "p2t2d1-z1-fp32"), *args)
        assert result.exit_code == 1 and needle in result.stderr, result.output
    result = cli("show-map", ckpt("zero", "z2-fp32-dp2"), "--tp", "2")
    assert result.exit_code == 1 and "only --dp" in result.stderr


def _synthetic_layout(pp: int, tp: int, dp: int, layers: int) -> Layout:
    """A 3D layout built in memory: what discovery would return for a large run's file names."""
    files = []
    per_stage = layers // pp
    for stage in range(pp):
        for t in range(tp):
            mp = stage * tp + t
            files.append(RankFile(f"mp_rank_{mp:02d}_model_states.pt", Role.MODEL, 0, mp=mp))
            files += [
                RankFile(
                    f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt", Role.OPTIM, 0, mp=mp, dp=d
                )
                for d in range(dp)
            ]
    for layer in range(layers):
        files += [
            RankFile(
                f"layer_{layer:02d}-model_{t:02d}-model_states.pt", Role.LAYER, 0, layer=layer, tp=t
            )
            for t in range(tp)
        ]
    tensors = [
        TensorEntry(f"{layer}.mlp.dense_h_to_4h.weight", (64, 16), "float32", "trainable", "")
        for layer in range(layers)
    ]
    return Layout(
        root=Path("big"),
        tag=None,
        dir=Path("big"),
        kind="pipeline",
        zero_stage=1,
        optimizer="zero",
        pp=pp,
        tp=tp,
        dp=dp,
        param_dtype="bfloat16",
        master_dtype="float32",
        iteration=1,
        ds_version="0.19.8",
        files=tuple(files),
        tensors=tuple(tensors),
        findings=(),
        stage_parts=tuple(range(0, layers + 1, per_stage)),
    )


def test_a_64_layer_tp8_pp8_map_reads_at_100_columns() -> None:
    tmap = topology_map(_synthetic_layout(pp=8, tp=8, dp=8, layers=64), tp=4, pp=4, dp=2)
    console = Console(width=100, record=True, no_color=True)
    console.print(map_report(tmap))
    text = console.export_text()
    lines = text.splitlines()
    assert len(lines) < 50  # one row per stage, not 4,096 rank rows
    assert max(len(line) for line in lines) <= 100
    assert "mp_rank_56..63" in text and "8 per TP rank" in text
