"""MoE discovery against every MoE fixture: what DeepSpeed wrote (facts.json) and damaged copies."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, MOE, ckpt, facts

from dsckpt.discover.layout import open_checkpoint
from dsckpt.discover.moe import MoeLayer, global_target

MOE_DIR = FIXTURES / "moe"
READABLE = MOE


@pytest.mark.parametrize("name", READABLE)
def test_moe_layout_matches_what_deepspeed_wrote(name: str) -> None:
    f = facts("moe", name)
    layout = open_checkpoint(ckpt("moe", name))
    assert layout.findings == ()
    assert layout.moe is not None
    moe = layout.moe
    assert moe.autoep == (f["kind"] == "autoep")
    assert layout.dp == f["dp"] and layout.zero_stage == f["zero_stage"]
    assert len(moe.layers) == len(f["moe_layers"])
    for layer, want in zip(moe.layers, f["moe_layers"], strict=True):
        assert layer.ordinal == want["moe_layer_id"]
        assert layer.module == want["module"]
        assert layer.num_experts == want["num_experts"]
        assert layer.ep_size == want["ep_size"]
        assert layer.edp_size == want["expert_dp_size"]
        assert layer.n_local == want["experts_per_rank"]
        assert layer.group_name == want["expert_group"]
        assert [list(p) for p in layer.placement()] == [
            want["experts_by_ep_rank"][str(r)] for r in range(layer.ep_size)
        ]
        for e in range(layer.num_experts):
            if f["zero_stage"] < 3:  # AutoEP ZeRO-3 writes no expert files
                assert "global_step3/" + layer.files[e] == want["expert_file"][str(e)]
            assert layer.writer_rank(e) == want["expert_file_written_by_rank"][str(e)]
            assert list(layer.ranks_holding(e)) == want["ranks_holding_expert"][str(e)]
        dp = len(want["ep_rank_of_rank"])
        assert [layer.ep_rank_of(d) for d in range(dp)] == want["ep_rank_of_rank"]
        assert [layer.edp_rank_of(d) for d in range(dp)] == want["expert_dp_rank_of_rank"]
    # Every consolidated key of model.state_dict(), experts under global ids
    assert sorted(layout.model_keys) == sorted(f["state_dict_keys"])
    shapes = {t.name: list(t.shape) for t in layout.tensors}
    assert shapes == f["state_dict_shapes"]
    dtypes = {t.name: t.dtype for t in layout.tensors}
    if f["dtype"] == "fp32":
        assert dtypes == f["state_dict_dtypes"]
    else:  # the saved module (and expert files) hold the parameters in bf16
        trainable = {t.name for t in layout.tensors if t.kind == "trainable"}
        assert {dtypes[n] for n in trainable} == {"bfloat16"}


@pytest.mark.parametrize("name", [n for n in MOE if facts("moe", n)["zero_stage"] in (1, 2)])
def test_expert_groups_and_their_files(name: str) -> None:
    """Expert groups: partition_count = EDP, file d holds EP rank d % ep's experts, local id l
    is global (d % ep) * n_local + l, and the EDP group of EP rank R is files R, R + ep, ..."""
    f = facts("moe", name)
    layout = open_checkpoint(ckpt("moe", name))
    moe = layout.moe
    assert moe is not None
    groups = {g["index"]: g for g in f["optimizer_groups"]}
    assert sorted(g.index for g in moe.groups) == sorted(i for i, g in groups.items() if g["moe"])
    sources = layout.zero_sources[0]
    for group in moe.groups:
        want = groups[group.index]
        assert group.name == want["name"]
        assert group.edp_size == want["partition_count"]
        assert sources.groups[group.index].dp == group.edp_size
        assert group.ep_size * group.edp_size == layout.dp
        assert group.file_index == tuple([group.index] * layout.dp)
    by_module = {layer.module: layer for layer in moe.layers}
    for file_name, held in f["optimizer_file_experts"].items():
        d = int(file_name.split("zero_pp_rank_")[1].split("_")[0])
        for module, experts in held["experts"].items():
            layer = by_module[module]
            assert [layer.global_expert(d, local) for local in range(layer.n_local)] == experts
            group = next(g for g in moe.groups if layer.ordinal in g.layers)
            ep_rank = group.ep_rank_of(d)
            assert d in group.files_of(ep_rank)
            assert group.files_of(ep_rank)[group.edp_rank_of(d)] == d
            assert list(held["expert_partition"][module]) == [group.edp_rank_of(d), group.edp_size]
    # Every expert key of the model comes from exactly one (EP rank, local parameter) per
    # element range, and together they cover it.
    covered: dict[str, int] = {}
    for p in moe.params:
        covered[p.name] = covered.get(p.name, 0) + p.flat.numel
    expert_keys = set(f["expert_keys"])
    assert set(covered) == expert_keys
    for key in expert_keys:
        numel = 1
        for s in f["state_dict_shapes"][key]:
            numel *= s
        assert covered[key] == numel


def test_zero0_reads_expp_files() -> None:
    layout = open_checkpoint(ckpt("moe", "z0-fp32-ep2-dp2"))
    assert layout.kind == "plain" and layout.moe is not None
    assert layout.moe.expp_files == (
        "expp_rank_0_mp_rank_00_optim_states.pt",
        "expp_rank_1_mp_rank_00_optim_states.pt",
    )
    assert layout.moe.groups == ()
    expert = next(t for t in layout.tensors if "deepspeed_experts.3" in t.name)
    assert "layer_0_expert_3_mp_rank_00_model_states.pt" in expert.placement


def test_autoep_router_alias() -> None:
    layout = open_checkpoint(ckpt("moe", "autoep-z2-fp32-ep2-dp2"))
    tied = {t.name: t.alias_of for t in layout.tensors if t.kind == "tied"}
    assert tied == {
        "model.layers.0.mlp.gate.gate.weight": "model.layers.0.mlp.router.gate.weight",
        "model.layers.1.mlp.gate.gate.weight": "model.layers.1.mlp.router.gate.weight",
    }


def test_global_target_arithmetic() -> None:
    native = MoeLayer(0, "moe1", 8, 4, 1, "ep_size_4", False, (), ())
    assert global_target(
        native, "moe1.deepspeed_moe.experts.deepspeed_experts.1.up.weight", (5, 8), 3
    ) == ("moe1.deepspeed_moe.experts.deepspeed_experts.7.up.weight", (5, 8), 0)
    # a local id beyond n_local, another module: not this layer's
    assert (
        global_target(native, "moe1.deepspeed_moe.experts.deepspeed_experts.2.w", (1,), 0) is None
    )
    assert (
        global_target(native, "moe2.deepspeed_moe.experts.deepspeed_experts.0.w", (1,), 0) is None
    )
    autoep = MoeLayer(0, "m.mlp", 4, 2, 1, "ep_size_2", True, (), ())
    assert global_target(autoep, "m.mlp.experts.w2", (2, 3, 5), 1) == (
        "m.mlp.experts.w2",
        (4, 3, 5),
        30,
    )
    assert global_target(autoep, "m.mlp.experts.w2", (3, 3, 5), 1) is None


# --- damaged copies -----------------------------------------------------------------------------


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(ckpt("moe", name), dest)
    return dest


def _codes(layout: Any) -> list[str]:
    return [f.code for f in layout.findings if f.level == "error"]


def test_missing_expert_file_is_an_error(tmp_path: Path) -> None:
    root = _copy(tmp_path, "z2-fp32-ep2-dp2")
    (root / "global_step3" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    layout = open_checkpoint(root, partial=True)
    assert "missing-expert-file" in _codes(layout)
    message = next(f.message for f in layout.findings if f.code == "missing-expert-file")
    assert "layer_1_expert_2_mp_rank_00_model_states.pt is missing" in message


def test_extra_expert_file_is_an_error(tmp_path: Path) -> None:
    root = _copy(tmp_path, "z2-fp32-ep2-dp2")
    tag = root / "global_step3"
    shutil.copy(
        tag / "layer_1_expert_2_mp_rank_00_model_states.pt",
        tag / "layer_1_expert_7_mp_rank_00_model_states.pt",
    )
    assert "stale-expert-file" in _codes(open_checkpoint(root, partial=True))


def test_expert_file_with_another_experts_keys_is_an_error(tmp_path: Path) -> None:
    root = _copy(tmp_path, "z2-fp32-ep2-dp2")
    tag = root / "global_step3"
    shutil.copy(
        tag / "layer_0_expert_1_mp_rank_00_model_states.pt",
        tag / "layer_0_expert_2_mp_rank_00_model_states.pt",
    )
    assert "expert-mismatch" in _codes(open_checkpoint(root, partial=True))


def test_expert_files_without_moe_model_are_an_error(tmp_path: Path) -> None:
    dense = FIXTURES / "zero"
    name = sorted(p.parent.name for p in dense.glob("*/facts.json"))[0]
    root = tmp_path / "dense"
    shutil.copytree(dense / name / "ckpt", root)
    tag = next(p for p in root.iterdir() if p.is_dir())
    shutil.copy(
        ckpt("moe", "z2-fp32-ep2-dp2")
        / "global_step3"
        / "layer_0_expert_0_mp_rank_00_model_states.pt",
        tag,
    )
    assert "stale-expert-file" in _codes(open_checkpoint(root, partial=True))


def _permute_groups(path: Path, order: list[int]) -> None:
    """Rewrite an optimizer file with its groups in ``order`` (as an unseeded run may save)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    sd = torch.load(path, weights_only=False)
    osd = sd["optimizer_state_dict"]
    for key in (
        "single_partition_of_fp32_groups",
        "group_paddings",
        "param_alignment_paddings",
        "partition_count",
        "param_slice_mappings",
    ):
        osd[key] = [osd[key][h] for h in order]
    base = osd["base_optimizer_state"]
    groups = [base["param_groups"][h] for h in order]
    state = {}
    for new, h in enumerate(order):
        groups[new] = {**groups[new], "params": [new]}
        state[new] = base["state"][h]
    base["param_groups"], base["state"] = groups, state
    torch.save(sd, path)


@pytest.mark.deepspeed
def test_expert_group_order_may_differ_between_files(tmp_path: Path) -> None:
    """FORMAT-NOTES "Hazard": rank 1 ordered its expert groups differently; groups are matched
    by name and the parameters they list, and the values stay exact."""
    torch = pytest.importorskip("torch")
    root = _copy(tmp_path, "z2-fp32-ep2x4-dp4-mixed")
    _permute_groups(
        root / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", [0, 1, 3, 2, 5, 4]
    )
    layout = open_checkpoint(root)
    assert layout.findings == ()
    assert layout.moe is not None
    assert {g.index: g.file_index[1] for g in layout.moe.groups} == {2: 3, 3: 2, 4: 5, 5: 4}
    assert {g.index: g.file_index[0] for g in layout.moe.groups} == {2: 2, 3: 3, 4: 4, 5: 5}
    from safetensors.torch import load_file

    from dsckpt.api.consolidation import consolidate

    out = tmp_path / "m.safetensors"
    consolidate(root, out, optimizer=True)
    ref = torch.load(MOE_DIR / "z2-fp32-ep2x4-dp4-mixed" / "ref_live.pt", weights_only=True)
    got = load_file(out)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # the moments too: rank 1's state is looked up at its own group positions
    live = torch.load(MOE_DIR / "z2-fp32-ep2x4-dp4-mixed" / "ref_live_optim.pt", weights_only=True)
    state = load_file(tmp_path / "m.optimizer.safetensors")
    for param, saved in live.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[f"{param}.{key}"], saved[key]), (param, key)


@pytest.mark.deepspeed
def test_expert_group_of_another_run_is_an_error(tmp_path: Path) -> None:
    root = _copy(tmp_path, "z2-fp32-ep2x4-dp4-mixed")
    # rank 1's ep_size_2 and ep_size_4 groups renamed away: nothing matches
    torch = pytest.importorskip("torch")
    path = root / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sd = torch.load(path, weights_only=False)
    for g in sd["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][2:]:
        g["name"] = "ep_size_8"
    torch.save(sd, path)
    layout = open_checkpoint(root, partial=True)
    assert "expert-group-mismatch" in _codes(layout)


def test_autoep_zero3_expert_sub_group() -> None:
    """AutoEP ZeRO-3: the expert sub-group is partitioned over its EDP ranks
    (ds_zero_partition_groups), each rank's flat tensor holding its local experts."""
    layout = open_checkpoint(ckpt("moe", "autoep-z3-fp32-ep2-dp2"))
    assert layout.findings == () and layout.kind == "zero3" and layout.moe is not None
    (group,) = layout.moe.groups
    assert (group.index, group.name, group.ep_size, group.edp_size) == (2, "ep_size_2", 2, 1)
    assert [group.files_of(r) for r in range(2)] == [(0,), (1,)]
    sources = layout.zero_sources[0]
    count, flats = sources.zero3_experts[2]
    assert count == 1 and sum(f.numel for f in flats) == 4608  # 2 layers x 3 x 2 experts x 384
    assert all(p.sub_group != 2 for p in sources.zero3.params)


def _edit_optim(path: Path, edit: Any) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    sd = torch.load(path, weights_only=False)
    edit(sd["optimizer_state_dict"])
    torch.save(sd, path)


def test_zero3_partition_group_that_disagrees_is_an_error(tmp_path: Path) -> None:
    root = _copy(tmp_path, "autoep-z3-fp32-ep2-dp2")

    def swap(osd: dict[str, Any]) -> None:
        osd["ds_zero_partition_groups"][2]["partition_ranks"] = [0]

    _edit_optim(root / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", swap)
    layout = open_checkpoint(root, partial=True)
    assert "expert-group-mismatch" in _codes(layout)


def test_native_moe_with_zero3_is_refused(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    root = _copy(tmp_path, "autoep-z3-fp32-ep2-dp2")
    for model in (root / "global_step3").glob("*_model_states.pt"):
        sd = torch.load(model, weights_only=False)
        sd["ds_autoep_layers"] = None
        torch.save(sd, model)
    layout = open_checkpoint(root, partial=True)
    first = next(f for f in layout.findings if f.level == "error")
    assert first.code == "unsupported-moe" and "ZeRO-3" in first.message


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_an_expert_file_that_is_not_a_regular_file_is_refused(
    cli, tmp_path: Path, kind: str
) -> None:
    """Expert files are rank files: opened only when regular, refused in one line otherwise,
    without blocking on a FIFO."""
    import os

    root = _copy(tmp_path, "z2-fp32-ep2-dp2")
    path = root / "global_step3" / "layer_1_expert_2_mp_rank_00_model_states.pt"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    result = cli("to-fp32", root, tmp_path / "out.safetensors")
    assert result.exit_code == 1
    assert path.name in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_damaged_expert_file_is_an_error(cli, tmp_path: Path) -> None:
    root = _copy(tmp_path, "z2-fp32-ep2-dp2")
    path = root / "global_step3" / "layer_0_expert_1_mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:200])
    layout = open_checkpoint(root, partial=True)
    assert "corrupt-file" in _codes(layout)
    result = cli("to-fp32", root, tmp_path / "out.safetensors")
    assert result.exit_code == 1 and path.name in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_pipeline_with_moe_is_refused(tmp_path: Path) -> None:
    """A pipeline whose model states record MoE layers: refused naming what is missing."""
    torch = pytest.importorskip("torch")
    pipe = FIXTURES / "pipe"
    name = sorted(p.parent.name for p in pipe.glob("*/facts.json"))[0]
    root = tmp_path / "pipe"
    shutil.copytree(pipe / name / "ckpt", root)
    tag = next(p for p in root.iterdir() if p.is_dir())
    for model in tag.glob("mp_rank_*_model_states.pt"):
        sd = torch.load(model, weights_only=False)
        sd["num_experts"] = [4]
        torch.save(sd, model)
    layout = open_checkpoint(root, partial=True)
    first = next(f for f in layout.findings if f.level == "error")
    assert first.code == "unsupported-moe" and "pipeline + MoE" in first.message
