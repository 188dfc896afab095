"""`inspect` and `show-map` on MoE checkpoints: the expert placement, in Rich and JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import MOE, ckpt, facts

READABLE = MOE


@pytest.mark.parametrize("name", READABLE)
def test_inspect_json_reports_the_moe_layout(cli, name: str) -> None:
    f = facts("moe", name)
    result = cli("inspect", ckpt("moe", name), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    moe = data["moe"]
    assert moe["autoep"] == (f["kind"] == "autoep")
    for layer, want in zip(moe["layers"], f["moe_layers"], strict=True):
        assert layer["module"] == want["module"]
        assert layer["num_experts"] == want["num_experts"]
        assert layer["ep_size"] == want["ep_size"]
        assert layer["expert_dp_size"] == want["expert_dp_size"]
        assert layer["experts_by_ep_rank"] == [
            want["experts_by_ep_rank"][str(r)] for r in range(want["ep_size"])
        ]
        if f["zero_stage"] == 3:  # AutoEP ZeRO-3 writes no expert files
            assert layer["expert_files"] == []
            continue
        assert ["global_step3/" + x for x in layer["expert_files"]] == [
            want["expert_file"][str(e)] for e in range(want["num_experts"])
        ]
    expert_files = [x for x in data["files"] if x["role"] == "expert_model_states"]
    assert len(expert_files) == (
        sum(x["num_experts"] for x in f["moe_layers"]) if f["zero_stage"] < 3 else 0
    )
    assert all(x["expert"] is not None for x in expert_files)
    if f["zero_stage"] in (1, 2):
        moe_groups = [g for g in f["optimizer_groups"] if g["moe"]]
        assert [g["group"] for g in moe["expert_groups"]] == [g["index"] for g in moe_groups]
        assert [g["expert_dp_size"] for g in moe["expert_groups"]] == [
            g["partition_count"] for g in moe_groups
        ]


def test_inspect_rich_shows_layers_and_placement(cli) -> None:
    result = cli("inspect", ckpt("moe", "z2-fp32-ep2x4-dp4-mixed"))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2 DeepSpeed MoE layers of 4 experts; EP 2 x EDP 2, EP 4 x EDP 1" in out
    assert "MoE layers" in out and "Experts by expert-parallel rank" in out
    rows = [line for line in out.splitlines() if line.startswith("│ 2  │ 1 ")]
    assert rows and "1,3" in rows[0] and "0: 2,3" in rows[0] and "zero_pp_rank_1,3" in rows[0]


def test_inspect_autoep(cli) -> None:
    result = cli("inspect", ckpt("moe", "autoep-z2-bf16-ep2-dp4"))
    assert result.exit_code == 0, result.output
    assert "2 AutoEP layers" in result.stdout and "model.layers.1.mlp" in result.stdout


def test_inspect_missing_expert_file_exits_1(cli, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(ckpt("moe", "z2-fp32-ep2-dp2"), root)
    (root / "global_step3" / "layer_0_expert_3_mp_rank_00_model_states.pt").unlink()
    result = cli("inspect", root)
    assert result.exit_code == 1
    assert "layer_0_expert_3_mp_rank_00_model_states.pt is missing" in result.output
    assert "Experts by expert-parallel rank" in result.stdout  # the rest is still shown


def test_show_map_places_experts(cli) -> None:
    result = cli("show-map", ckpt("moe", "z2-fp32-ep4-dp4-top2"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [layer["experts_by_ep_rank"] for layer in data["moe"]["layers"]] == [
        [[0], [1], [2], [3]]
    ] * 2
    text = cli("show-map", ckpt("moe", "z2-fp32-ep4-dp4-top2")).stdout
    assert "Experts by expert-parallel rank" in text


def test_show_map_dp_target_sources(cli) -> None:
    """EP 2 x EDP 2 (DP 4) -> DP 2: expert partitions of EP rank R come from files R and
    R + 2 only; dense groups from any two neighbours."""
    result = cli("show-map", ckpt("moe", "z1-fp32-ep2-dp4"), "--dp", "2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["targets"][0]["dp_sources"] == [[0, 1], [2, 3]]
    for group in data["expert_targets"]:
        assert group["expert_dp_size"] == 1
        assert group["dp_sources"] == [[0, 2], [1, 3]]
    grow = json.loads(cli("show-map", ckpt("moe", "z2-fp32-ep2-dp2"), "--dp", "4", "--json").stdout)
    for group in grow["expert_targets"]:
        assert group["expert_dp_size"] == 2
        assert group["dp_sources"] == [[0], [1], [0], [1]]
    text = cli("show-map", ckpt("moe", "z1-fp32-ep2-dp4"), "--dp", "2").stdout
    assert "Expert groups at DP 2 (EP unchanged)" in text


@pytest.mark.parametrize("dp", ["3", "2"])
def test_show_map_dp_must_be_a_multiple_of_ep(cli, dp: str) -> None:
    result = cli("show-map", ckpt("moe", "z2-fp32-ep4-dp4-top2"), "--dp", dp)
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.count("\n") == 0 and f"--dp {dp}" in line and "multiple" in line, line


@pytest.mark.parametrize(
    ("name", "dp", "what"),
    [
        ("z1-fp32-ep2-dp4", "2", "ZeRO-1 MoE (expert parallelism 2 kept)"),
        ("z2-fp32-ep2x4-dp4-mixed", "8", "ZeRO-2 MoE (expert parallelism 2, 4 kept)"),
    ],
)
def test_reshape_dry_run_title_says_moe_as_the_result_line_does(
    cli, tmp_path: Path, name: str, dp: str, what: str
) -> None:
    result = cli("reshape", ckpt("moe", name), tmp_path / "out", "--dp", dp, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].rstrip() == f"{what}: DP {facts('moe', name)['dp']} -> {dp}"
    assert f"dry run: {what} DP " in lines[-1] and not (tmp_path / "out").exists()
