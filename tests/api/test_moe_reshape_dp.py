"""`dsckpt reshape --dp` on the real MoE fixtures (ZeRO-1/2, native and AutoEP; EP kept).

For every ZeRO-1/2 MoE fixture and target sizes that keep DP a multiple of every EP size:
  * `to-fp32` of the result is the live engine's fp32 master (ref_live.pt) bit for bit, in the
    same key order as `to-fp32` of the input;
  * Adam's moments read back from the new partitions (each EP rank's expert buffer joined over
    its new expert-data-parallel group) are the live engine's (ref_live_optim.pt);
  * the expert files are copied byte for byte; reshaping back restores every value of every
    file; a reshape to the same size reproduces them;
  * the bookkeeping DeepSpeed checks is that of the new size (partition_count per group,
    dp_world_size, AutoEP's expert_data_parallel_world_size).
Then the refusals (one line, nothing written) and the dry run. Resuming in real DeepSpeed is in
test_moe_reshape_resume.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_reshape_dp import _same

from dsckpt.api.reshaping import reshape
from dsckpt.discover.layout import open_checkpoint
from dsckpt.discover.moe import global_target

MOE = Path(__file__).parents[1] / "fixtures" / "moe"

# fixture -> target sizes (shrink and grow; EP 1 to odd sizes; mixed EP 2 and 4 to 8)
TARGETS: dict[str, tuple[int, ...]] = {
    "z1-fp32-ep2-dp4": (2, 6),
    "z1-bf16-ep2-dp2": (4,),
    "z2-bf16-ep2-dp2": (4, 6),
    "z2-fp32-ep1-dp2": (1, 3),
    "z2-fp32-ep2-dp2": (4,),
    "z2-fp32-ep2-dp4-residual": (2,),
    "z2-fp32-ep2x4-dp4-mixed": (8,),
    "z2-fp32-ep4-dp4-top2": (8,),
    "autoep-z2-fp32-ep2-dp2": (4,),
    "autoep-z2-bf16-ep2-dp4": (2,),
}
CROSS = [(n, dp) for n, sizes in TARGETS.items() for dp in sizes]


def _facts(name: str) -> dict[str, Any]:
    return json.loads((MOE / name / "facts.json").read_text())


def _ckpt(name: str) -> Path:
    return MOE / name / "ckpt"


def test_every_zero12_moe_fixture_is_covered() -> None:
    zero12 = {
        p.parent.name
        for p in MOE.glob("*/facts.json")
        if _facts(p.parent.name)["zero_stage"] in (1, 2)
    }
    assert zero12 == set(TARGETS)


_CACHE: dict[tuple[str, int], Path] = {}


@pytest.fixture(scope="module")
def reshaped(tmp_path_factory: pytest.TempPathFactory):
    """``reshaped(name, dp)``: the fixture reshaped to ``dp``, made once per module."""
    base = tmp_path_factory.mktemp("moe-reshaped")

    def get(name: str, dp: int) -> Path:
        if (name, dp) not in _CACHE:
            out = base / f"{name}-dp{dp}"
            reshape(_ckpt(name), out, dp=dp)
            _CACHE[(name, dp)] = out
        return _CACHE[(name, dp)]

    return get


def _load(path: Path) -> Any:
    pytest.importorskip("deepspeed")  # DeepSpeed's classes for the full unpickle
    return torch.load(path, weights_only=False)


def _fp32(path: Path) -> dict[str, torch.Tensor]:
    from dsckpt.execute.executor import iter_tensors
    from dsckpt.plan.consolidation import plan_consolidation

    return dict(iter_tensors(plan_consolidation(open_checkpoint(path))))


def _moments(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full exp_avg / exp_avg_sq per trainable parameter, read back from the rank files.

    Group ``g`` of file ``d`` is EDP rank ``d // ep``'s slice of EP rank ``d % ep``'s flat buffer
    (``ep = dp / partition_count[g]``); the slices are joined in EDP order and cut by
    ``param_shapes[g]`` (local names); expert names go global as discovery maps them."""
    layout = open_checkpoint(path)
    model = _load(layout.dir / "mp_rank_00_model_states.pt")
    files = sorted((f for f in layout.files if f.role.value == "optim_states"), key=lambda f: f.dp)
    osds = [_load(layout.dir / f.name)["optimizer_state_dict"] for f in files]
    dp = len(osds)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g, shapes in enumerate(model["param_shapes"]):
        count = osds[0]["partition_count"][g]
        ep = dp // count
        assert not any((osds[0].get("param_alignment_paddings") or [[]] * (g + 1))[g])
        for ep_rank in range(ep):
            for key in ("exp_avg", "exp_avg_sq"):
                parts = []
                for k in range(count):
                    base = osds[ep_rank + k * ep]["base_optimizer_state"]
                    (index,) = base["param_groups"][g]["params"]
                    parts.append(base["state"][index][key])
                flat = torch.cat(parts)
                offset = 0
                for name, shape in shapes.items():
                    n = math.prod(shape)
                    value = flat[offset : offset + n].view(shape)
                    offset += n
                    layer = layout.moe.layer_of(name) if layout.moe else None
                    target = global_target(layer, name, tuple(shape), ep_rank) if layer else None
                    if target is None:
                        out.setdefault(name, {})[key] = value
                        continue
                    full_name, full_shape, start = target
                    whole = out.setdefault(full_name, {}).setdefault(
                        key, torch.zeros(full_shape, dtype=value.dtype)
                    )
                    whole.view(-1)[start : start + n] = value.reshape(-1)
    return out


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_reshaped_masters_and_moments_are_the_live_engines(reshaped, name: str, dp: int) -> None:
    out = reshaped(name, dp)
    layout = open_checkpoint(out)
    assert layout.dp == dp and layout.moe is not None and not layout.errors
    assert layout.moe.ep_sizes == open_checkpoint(_ckpt(name)).moe.ep_sizes
    assert_live_engines(out, name, same_order=True)


def assert_expert_files_copied(src: Path, dst: Path) -> None:
    """The expert weight files of tag directory ``dst`` are ``src``'s, byte for byte."""
    experts = sorted(p.name for p in src.glob("layer_*_expert_*"))
    assert experts and experts == sorted(p.name for p in dst.glob("layer_*_expert_*"))
    for file in experts:
        assert (src / file).read_bytes() == (dst / file).read_bytes(), file


def assert_live_engines(out: Path, name: str, same_order: bool) -> None:
    """``out``'s fp32 masters (to-fp32) are the input's and the live engine's (ref_live.pt) bit for
    bit, its Adam moments the live engine's (ref_live_optim.pt); with ``same_order`` the keys
    also come in the input's order."""
    ours, theirs = _fp32(out), _fp32(_ckpt(name))
    assert (list(ours) == list(theirs)) if same_order else (set(ours) == set(theirs))
    live = torch.load(MOE / name / "ref_live.pt", weights_only=True)
    assert set(ours) == set(live)
    for key, value in live.items():
        # Frozen weights are live in the model dtype; to-fp32 widens them exactly.
        assert torch.equal(theirs[key], ours[key]) and theirs[key].dtype == ours[key].dtype, key
        assert value.dtype in (ours[key].dtype, torch.bfloat16), key
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key
    moments = _moments(out)
    live_optim = torch.load(MOE / name / "ref_live_optim.pt", weights_only=True)
    assert moments.keys() == live_optim.keys()
    for param, state in live_optim.items():
        for key, value in state.items():
            assert torch.equal(moments[param][key], value), (param, key)


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_bookkeeping_is_the_new_sizes(reshaped, name: str, dp: int) -> None:
    f = _facts(name)
    src, dst = _ckpt(name) / f["tag"], reshaped(name, dp) / f["tag"]
    assert_expert_files_copied(src, dst)
    model = _load(dst / "mp_rank_00_model_states.pt")
    assert model["dp_world_size"] == dp
    source_groups = {g["index"]: g for g in _expert_group_facts(name)}
    saved = _load(src / Path(next(src.glob("*zero_pp_rank_0_*"))).name)["optimizer_state_dict"]
    for d in range(dp):
        osd = _load(next(dst.glob(f"*zero_pp_rank_{d}_*")))["optimizer_state_dict"]
        counts = [
            dp // (f["dp"] // c) if g in source_groups else dp
            for g, c in enumerate(saved["partition_count"])
        ]
        assert osd["partition_count"] == counts
    for layers in (
        model.get("ds_autoep_layers"),
        (model.get("universal_checkpoint_info") or {}).get("ds_autoep_layers"),
    ):
        for layer in layers or ():
            assert layer["expert_data_parallel_world_size"] == dp // layer["ep_size"]


def _expert_group_facts(name: str) -> list[dict[str, Any]]:
    groups = _facts(name)["optimizer_groups"]
    return [{"index": i, **g} for i, g in enumerate(groups) if g.get("moe")]


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_reshaping_back_restores_every_file(reshaped, tmp_path: Path, name: str, dp: int) -> None:
    f = _facts(name)
    back = tmp_path / "back"
    reshape(reshaped(name, dp), back, dp=f["dp"])
    src, dst = _ckpt(name) / f["tag"], back / f["tag"]
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in dst.iterdir())
    for file in sorted(p.name for p in src.iterdir()):
        _same(_load(src / file), _load(dst / file), file)


@pytest.mark.parametrize("name", list(TARGETS))
def test_same_dp_reproduces_every_file(reshaped, name: str) -> None:
    f = _facts(name)
    src, dst = _ckpt(name) / f["tag"], reshaped(name, f["dp"]) / f["tag"]
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in dst.iterdir())
    for file in sorted(p.name for p in src.iterdir()):
        _same(_load(src / file), _load(dst / file), file)


# --- refusals and the dry run ---------------------------------------------------------------


def _one_error(result: Any) -> str:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("name", "dp", "ep"),
    [("z2-fp32-ep2-dp2", 3, 2), ("z1-fp32-ep2-dp4", 1, 2), ("z2-fp32-ep2x4-dp4-mixed", 6, 4)],
)
def test_dp_not_a_multiple_of_ep_is_refused(
    cli, tmp_path: Path, name: str, dp: int, ep: int
) -> None:
    out = tmp_path / "out"
    error = _one_error(cli("reshape", _ckpt(name), out, "--dp", str(dp)))
    assert f"DeepSpeed requires DP to be a multiple of the expert-parallel size {ep}" in error
    assert "expert parallelism stays as saved" in error
    assert not out.exists()


def test_zero0_moe_is_refused_as_nothing_to_reshape(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    error = _one_error(cli("reshape", _ckpt("z0-fp32-ep2-dp2"), out, "--dp", "4"))
    assert "stage 0" in error and "do not depend on the DP size" in error
    assert not out.exists()


def test_autoep_zero3_is_refused(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    error = _one_error(cli("reshape", _ckpt("autoep-z3-fp32-ep2-dp2"), out, "--dp", "4"))
    assert "ZeRO-3" in error and "ds_zero_partition_groups" in error
    assert not out.exists()


def test_tp_or_pp_on_a_moe_checkpoint_is_refused(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    error = _one_error(cli("reshape", _ckpt("z2-fp32-ep2-dp2"), out, "--tp", "2"))
    assert "only --dp" in error
    assert not out.exists()


def test_dry_run_json_plans_every_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("reshape", _ckpt("z2-fp32-ep2-dp2"), out, "--dp", "4", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert not out.exists() and report["dry_run"] and report["target"]["dp"] == 4
    planned = {f["name"]: f for f in report["plan"]["files"]}
    tag = "global_step3"
    for d in range(4):
        assert f"{tag}/zero_pp_rank_{d}_mp_rank_00_optim_states.pt" in planned
    experts = [n for n in planned if "_expert_" in n]
    assert len(experts) == 8
    for name in experts:  # whole-file copies of the source's expert files
        (op,) = planned[name]["ops"]
        assert op["op"] == "copy" and op["offset"] == 0 and op["nbytes"] == planned[name]["size"]
        assert op["source"].endswith(name.partition("/")[2])


def test_dry_run_table_names_the_expert_groups(cli, tmp_path: Path) -> None:
    result = cli("reshape", _ckpt("z1-fp32-ep2-dp4"), tmp_path / "out", "--dp", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    # EP rank 0's experts come from files 0 and 2 (its EDP group), EP rank 1's from 1 and 3.
    assert "r0[0:384]->0 r2[0:384]->384" in result.stdout
    assert "r1[0:384]->0 r3[0:384]->384" in result.stdout
    assert "ep_size_2, EP 2" in result.stdout


def _permute_groups(file: Path, perm: list[int]) -> None:
    """Rewrite one rank file with its optimizer groups in another order (group ``i`` of the new
    file is group ``perm[i]`` of the old), as a run whose processes iterated the expert group
    names in different orders saves them (FORMAT-NOTES: "Hazard seen in a real run")."""
    sd = _load(file)
    osd = sd["optimizer_state_dict"]
    for key, value in osd.items():
        if isinstance(value, list) and len(value) == len(perm):
            osd[key] = [value[p] for p in perm]
    base = osd["base_optimizer_state"]
    groups, state = base["param_groups"], base["state"]
    base["param_groups"], base["state"] = [], {}
    for i, p in enumerate(perm):
        (old,) = groups[p]["params"]
        base["param_groups"].append({**groups[p], "params": [i]})
        base["state"][i] = state[old]
    torch.save(sd, file)


def test_expert_groups_saved_in_another_order_in_one_file(reshaped, tmp_path: Path) -> None:
    """Each source file's groups are read where that file has them (discovery matched them by
    name and parameters); the result is the same as from the checkpoint saved in one order."""
    name = "z2-fp32-ep2x4-dp4-mixed"
    tag = _facts(name)["tag"]
    permuted = tmp_path / "permuted"
    shutil.copytree(_ckpt(name), permuted)
    _permute_groups(
        permuted / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", [0, 1, 3, 2, 5, 4]
    )
    assert open_checkpoint(permuted).moe.groups[0].file_index == (2, 3, 2, 2)
    out = tmp_path / "out"
    reshape(permuted, out, dp=8)
    expected = reshaped(name, 8) / tag
    for file in sorted(p.name for p in expected.iterdir()):
        _same(_load(expected / file), _load(out / tag / file), file)


def test_pipeline_with_moe_is_refused(cli, tmp_path: Path) -> None:
    """A pipeline checkpoint whose model states record experts: nothing maps experts onto
    pipeline stages, so reshape refuses it rather than drop them (no real fixture: DeepSpeed's
    pipeline engine saves MoE layers only through Megatron-DeepSpeed)."""
    src = Path(__file__).parents[1] / "fixtures" / "pipe" / "p2t1d2-z1-fp32" / "ckpt"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    tag = (ckpt / "latest").read_text()
    for model in sorted((ckpt / tag).glob("mp_rank_*_model_states.pt")):
        sd = _load(model)
        sd["num_experts"] = [4]
        torch.save(sd, model)
    out = tmp_path / "out"
    error = _one_error(cli("reshape", ckpt, out, "--dp", "1"))
    assert "pipeline + MoE" in error and "not supported" in error
    assert not out.exists()


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_verify_finds_the_reshaped_checkpoint_equal(cli, reshaped, name: str, dp: int) -> None:
    """`dsckpt verify` compares weights, optimizer state per parameter and counters whatever
    the topology: the input and its reshape hold the same training state."""
    result = cli("verify", _ckpt(name), reshaped(name, dp))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("equal: "), result.stdout


def test_verify_tells_a_misplaced_expert_state(cli, reshaped, tmp_path: Path) -> None:
    """The check above can fail: EP ranks 0 and 1 trading their expert moments (a reshape that
    took an expert group's partition from the wrong EP rank's files) is found."""
    name, tag = "z2-fp32-ep2-dp2", _facts("z2-fp32-ep2-dp2")["tag"]
    broken = tmp_path / "broken"
    shutil.copytree(reshaped(name, 4), broken)
    files = [broken / tag / f"zero_pp_rank_{d}_mp_rank_00_optim_states.pt" for d in (0, 1)]
    sds = [_load(f) for f in files]
    bases = [sd["optimizer_state_dict"]["base_optimizer_state"] for sd in sds]
    for g, group in enumerate(bases[0]["param_groups"]):
        if group.get("moe"):
            a, b = bases[0]["state"][g], bases[1]["state"][g]
            a["exp_avg"], b["exp_avg"] = b["exp_avg"], a["exp_avg"]
    for f, sd in zip(files, sds, strict=True):
        torch.save(sd, f)
    result = cli("verify", _ckpt(name), broken)
    assert result.exit_code == 1, result.output
    assert "exp_avg of moe1.deepspeed_moe.experts.deepspeed_experts." in result.output
