"""`reshape` on pipeline checkpoints, without DeepSpeed: layer specs, the written bookkeeping.

The proofs with real DeepSpeed (resume, exact copies, `to-fp32` equality, the stage split against
`PipelineModule`) are in test_reshape_3d_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsckpt.api.reshaping import reshape
from dsckpt.discover.layout import open_checkpoint
from dsckpt.errors import UsageError
from dsckpt.io.load import load_mapped
from dsckpt.plan.pipeline_reshape import (
    LayerSpec,
    format_layer_specs,
    infer_layer_specs,
    open_pipeline,
    parse_layer_specs,
    plan_pipeline,
)

PIPE = Path(__file__).parents[1] / "fixtures" / "pipe"
REAL_SPECS = (
    "_token_ids,embed@EmbeddingPipe,TransformerLayerPipe*3,FinalNormPipe,embed@EmbeddingPipe,"
    "_logits_to_fp32"
)


def layout(name: str):
    return open_checkpoint(PIPE / name / "ckpt")


def test_layer_specs_parse_and_format_round_trip() -> None:
    specs = parse_layer_specs(REAL_SPECS)
    assert len(specs) == 8
    assert specs[1] == LayerSpec("EmbeddingPipe", "embed") == specs[6]
    assert specs[2:5] == (LayerSpec("TransformerLayerPipe"),) * 3
    assert format_layer_specs(specs) == REAL_SPECS
    with pytest.raises(UsageError, match="not TYPE, KEY@TYPE"):
        parse_layer_specs("embed@EmbeddingPipe,,Transformer")


@pytest.mark.parametrize("name", ["p2t2d1-z1-fp32", "p1t2d2-z1-fp32", "p2t1d2-z1-fp32"])
def test_inferred_specs_place_the_tied_head_after_the_final_norm(name: str) -> None:
    # Layer 0 and 7 are functions: 0 shows as a gap before layer 1's file, 7 leaves no trace.
    specs = infer_layer_specs(open_pipeline(layout(name)))
    assert format_layer_specs(specs) == "?,embed@?,?*4,embed@?"


def test_parameters_split_counts_at_the_target_tp() -> None:
    plan = plan_pipeline(layout("p2t2d1-z1-fp32"), tp=1, layer_specs=REAL_SPECS)
    # tp=1 sizes: embedding 52x6 + 4x6, transformer layer 510, final norm 12.
    assert plan.layer_counts() == [0, 336, 510, 510, 510, 12, 336, 0]
    assert plan.dst_parts == (0, 4, 8)  # what the fixtures' PipelineModule chose at PP 2
    at_tp2 = plan_pipeline(layout("p2t1d1-z1-fp32"), tp=2, layer_specs=REAL_SPECS)
    assert at_tp2.layer_counts()[1] == 28 * 6 + 4 * 6  # the vocabulary padded for TP 2, halved


def test_given_specs_must_agree_with_the_files() -> None:
    lay = layout("p2t2d1-z1-fp32")
    with pytest.raises(UsageError, match="layer 1 is EmbeddingPipe but its layer file says it"):
        plan_pipeline(lay, pp=1, layer_specs="_token_ids,EmbeddingPipe,T*3,Norm,EmbeddingPipe")
    with pytest.raises(UsageError, match="lists 3 layers, but the checkpoint has a file for"):
        plan_pipeline(lay, pp=1, layer_specs="f,embed@E,T")
    with pytest.raises(UsageError, match="needs the model's layer spec list"):
        plan_pipeline(lay, pp=1, partition_method="uniform")


def test_tp_change_rewrites_degrees_vocab_padding_and_param_shapes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = reshape(PIPE / "p2t2d1-z1-fp32" / "ckpt", out, tp=1, pp=1, dp=2)
    assert result.written and result.dst_parts == (0, 7)
    tag = out / "global_step3"
    assert (out / "latest").read_text() == "global_step3"
    assert sorted(p.name for p in tag.iterdir()) == [
        *(f"layer_{i:02d}-model_00-model_states.pt" for i in range(1, 6)),
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    model = load_mapped(tag / "mp_rank_00_model_states.pt")
    assert (model["dp_world_size"], model["mp_world_size"]) == (2, 1)
    assert model["checkpoint_parallel_dimensions"] == {"pp_degree": 1, "tp_degree": 1}
    args = model["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 1)
    assert (args.data_parallel_size, args.padded_vocab_size) == (2, 52)
    assert model["checkpoint_info"]["padded_vocab_size"] == 52
    shapes = model["param_shapes"]
    assert list(shapes[0])[:2] == [
        "tied_modules.embed.word_embeddings.weight",
        "tied_modules.embed.position_embeddings.weight",
    ]
    assert shapes[0]["tied_modules.embed.word_embeddings.weight"] == torch.Size([52, 6])
    assert shapes[0]["2.self_attention.query_key_value.weight"] == torch.Size([18, 6])
    # Both tied uses now live on the one stage: the module appears once.
    assert sum(n.startswith("tied_modules.") for g in shapes for n in g) == 2
    # The merged embedding: 50 real rows from both TP ranks' files, then zero padding.
    merged = load_mapped(tag / "layer_01-model_00-model_states.pt")["word_embeddings.weight"]
    src = PIPE / "p2t2d1-z1-fp32" / "ckpt" / "global_step3"
    halves = [
        load_mapped(src / f"layer_01-model_{r:02d}-model_states.pt")["word_embeddings.weight"]
        for r in range(2)
    ]
    assert torch.equal(merged[:28], halves[0]) and torch.equal(merged[28:50], halves[1][:22])
    assert not merged[50:].any()
    optim = [
        load_mapped(tag / f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        for d in range(2)
    ]
    assert [o["partition_count"] for o in optim] == [[2, 2], [2, 2]]
    data = [sum(s.numel() for s in g.values()) for g in shapes]
    for g, numel in enumerate(data):
        size = -(-numel // 4) * 2  # padded to a multiple of 2 * dp, cut in two
        assert [o["group_paddings"][g] for o in optim] == [0, 2 * size - numel]
        moments = [o["base_optimizer_state"]["state"][g]["exp_avg"] for o in optim]
        assert [m.numel() for m in moments] == [size, size]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    result = reshape(PIPE / "p2t1d2-z1-fp32" / "ckpt", tmp_path / "out", tp=2, pp=1, dry_run=True)
    assert not result.written and not (tmp_path / "out").exists()
    assert "dry run: PP 2 x TP 1 x DP 2 -> PP 1 x TP 2 x DP 2" in result.summary()


@pytest.mark.parametrize("shift", [1, -1])
def test_a_pipeline_group_with_alignment_padding_is_refused(shift: int) -> None:
    """Each parameter of a ZeRO-1 group must start where the one before it ends; a gap (what
    DeepSpeed's parameter alignment would leave) or an overlap is refused, not re-created."""
    import dataclasses

    from dsckpt.errors import UnsupportedLayout

    source = layout("p2t2d1-z1-fp32")
    assert open_pipeline(source).params  # as saved: no padding
    mp = min(source.zero_sources)
    group = source.zero_sources[mp].groups[0]
    moved = (
        *group.params[:2],
        dataclasses.replace(group.params[2], offset=group.params[2].offset + shift),
        *group.params[3:],
    )
    groups = (dataclasses.replace(group, params=moved), *source.zero_sources[mp].groups[1:])
    sources = {
        **source.zero_sources,
        mp: dataclasses.replace(source.zero_sources[mp], groups=groups),
    }
    with pytest.raises(UnsupportedLayout, match="parameter_alignment padding"):
        open_pipeline(dataclasses.replace(source, zero_sources=sources))
