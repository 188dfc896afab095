"""`dsckpt reshape --ep M` on the real native MoE fixtures: another expert-parallel size.

DeepSpeed keys the expert weight files by global expert id, so they are copied unchanged; each
rank's optimizer file changes: at EP M, EP rank e holds global experts ``e * E/M + i`` as local
experts ``i`` (tests/plan/test_moe_reshape.py has the arithmetic). For each case:
  * `to-fp32` of the result is the live engine's fp32 master (ref_live.pt) bit for bit, and
    Adam's moments read back from the new partitions are the live engine's (ref_live_optim.pt):
    both are keyed by parameter, so they must come back identical whatever the EP size;
  * discovery reads the result at the new EP (placement, expert groups ``ep_size_M``);
  * the expert files are the input's, byte for byte; reshaping back to the saved EP and DP
    restores every value of every file; `verify` finds the result equal to the input.
Then the refusals (one line, nothing written) and the dry run. Resuming in real DeepSpeed is in
test_moe_reshape_resume.py (``EP_CASES``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_moe_reshape_dp import (
    _ckpt,
    _facts,
    _load,
    _one_error,
    assert_expert_files_copied,
    assert_live_engines,
)
from test_reshape_dp import _same

from dsckpt.api.reshaping import reshape
from dsckpt.discover.layout import open_checkpoint

FIXTURES = Path(__file__).parents[1] / "fixtures"
MOE = FIXTURES / "moe"

# (fixture, target DP, target EP): EP 2 -> 1 and 4, 4 -> 2 and 1, 1 -> 2 and 4; ZeRO-1 and 2,
# fp32, bf16, BF16_Optimizer, top-2 gating, a residual MoE; DP kept, shrunk and grown.
CASES = [
    ("z2-fp32-ep2-dp2", 2, 1),
    ("z2-fp32-ep2-dp2", 4, 4),
    ("z1-fp32-ep2-dp4", 4, 1),
    ("z1-fp32-ep2-dp4", 4, 4),
    ("z1-fp32-ep2-dp4", 3, 1),
    ("z2-fp32-ep4-dp4-top2", 2, 2),
    ("z2-fp32-ep4-dp4-top2", 2, 1),
    ("z2-fp32-ep1-dp2", 4, 2),
    ("z2-fp32-ep1-dp2", 4, 4),
    ("z2-bf16-ep2-dp2", 4, 4),
    ("z2-bf16-ep2-dp2", 2, 1),
    ("z1-bf16-ep2-dp2", 2, 1),
    ("z1-bf16-ep2-dp2", 4, 4),
    ("z2-fp32-ep2-dp4-residual", 2, 1),
    ("z2-fp32-ep2-dp4-residual", 4, 4),
]
IDS = [f"{n}-to-dp{d}-ep{e}" for n, d, e in CASES]

_CACHE: dict[tuple[str, int, int], Path] = {}


@pytest.fixture(scope="module")
def reshaped(tmp_path_factory: pytest.TempPathFactory):
    """``reshaped(name, dp, ep)``: the fixture reshaped to DP ``dp`` and EP ``ep``, once."""
    base = tmp_path_factory.mktemp("moe-ep")

    def get(name: str, dp: int, ep: int) -> Path:
        if (name, dp, ep) not in _CACHE:
            out = base / f"{name}-dp{dp}-ep{ep}"
            reshape(_ckpt(name), out, dp=dp, ep=ep)
            _CACHE[(name, dp, ep)] = out
        return _CACHE[(name, dp, ep)]

    return get


@pytest.mark.parametrize(("name", "dp", "ep"), CASES, ids=IDS)
def test_masters_and_moments_are_the_live_engines(reshaped, name: str, dp: int, ep: int) -> None:
    out = reshaped(name, dp, ep)
    layout = open_checkpoint(out)
    assert layout.dp == dp and layout.moe is not None and not layout.errors
    assert layout.moe.ep_sizes == (ep,)
    assert {g.name for g in layout.moe.groups} == {f"ep_size_{ep}"}
    n_local = layout.moe.layers[0].num_experts // ep
    assert layout.moe.layers[0].placement()[-1] == tuple(range((ep - 1) * n_local, ep * n_local))
    # The key order follows the expert groups' flat order, which is the new EP's (the order of
    # to-fp32 on DeepSpeed's own save at that EP); the keys and values are the same.
    assert_live_engines(out, name, same_order=False)


@pytest.mark.parametrize(("name", "dp", "ep"), CASES, ids=IDS)
def test_bookkeeping_is_the_new_eps(reshaped, name: str, dp: int, ep: int) -> None:
    f = _facts(name)
    src, dst = _ckpt(name) / f["tag"], reshaped(name, dp, ep) / f["tag"]
    assert_expert_files_copied(src, dst)
    model = _load(dst / "mp_rank_00_model_states.pt")
    assert model["dp_world_size"] == dp
    num_experts = model["num_experts"][0]
    for shapes in model["param_shapes"]:
        ids = {int(n.split("deepspeed_experts.")[1].split(".")[0]) for n in shapes if "expert" in n}
        assert not ids or ids == set(range(num_experts // ep))  # rank 0's local experts
    for d in range(dp):
        osd = _load(next(dst.glob(f"*zero_pp_rank_{d}_*")))["optimizer_state_dict"]
        groups = osd["base_optimizer_state"]["param_groups"]
        moe = [g.get("moe", False) for g in groups]
        assert [g["name"] for g, m in zip(groups, moe, strict=True) if m] == [f"ep_size_{ep}"] * 2
        assert osd["partition_count"] == [dp // ep if m else dp for m in moe]


@pytest.mark.parametrize(("name", "dp", "ep"), CASES, ids=IDS)
def test_reshaping_back_restores_every_file(
    reshaped, tmp_path: Path, name: str, dp: int, ep: int
) -> None:
    f = _facts(name)
    back = tmp_path / "back"
    reshape(reshaped(name, dp, ep), back, dp=f["dp"], ep=f["ep_sizes"][0])
    src, dst = _ckpt(name) / f["tag"], back / f["tag"]
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in dst.iterdir())
    for file in sorted(p.name for p in src.iterdir()):
        _same(_load(src / file), _load(dst / file), file)


@pytest.mark.parametrize(("name", "dp", "ep"), CASES, ids=IDS)
def test_reshaping_back_writes_the_bytes_of_a_reshape_that_kept_the_ep(
    reshaped, tmp_path: Path, name: str, dp: int, ep: int
) -> None:
    """Byte for byte, pickle memo included: the expert groups' names are one string object and
    every parameter's shape its own, as in DeepSpeed's files (the --ep writer once wrote the
    name once per group and one shape for all local experts' same-shaped parameters)."""
    f = _facts(name)
    saved_dp, saved_ep = f["dp"], f["ep_sizes"][0]
    back = tmp_path / "back"
    reshape(reshaped(name, dp, ep), back, dp=saved_dp, ep=saved_ep)
    kept = reshaped(name, saved_dp, saved_ep) / f["tag"]
    for file in sorted(p.name for p in kept.iterdir()):
        assert (back / f["tag"] / file).read_bytes() == (kept / file).read_bytes(), file


@pytest.mark.parametrize(("name", "dp", "ep"), CASES[:4], ids=IDS[:4])
def test_verify_finds_the_result_equal(cli, reshaped, name: str, dp: int, ep: int) -> None:
    result = cli("verify", _ckpt(name), reshaped(name, dp, ep))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("equal: "), result.stdout


def test_verify_tells_experts_in_the_wrong_order(cli, reshaped, tmp_path: Path) -> None:
    """The checks above can fail: an EP 4 -> 2 result whose expert groups hold the right values
    in EP-rank order (layer 0 expert 0, layer 1 expert 0, ...) instead of module order."""
    import shutil

    name, tag = "z2-fp32-ep4-dp4-top2", _facts("z2-fp32-ep4-dp4-top2")["tag"]
    broken = tmp_path / "broken"
    shutil.copytree(reshaped(name, 2, 2), broken)
    for file in sorted((broken / tag).glob("zero_pp_rank_*_optim_states.pt")):
        sd = _load(file)
        osd = sd["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for g, group in enumerate(base["param_groups"]):
            if group.get("moe"):
                (index,) = group["params"]
                for t in [
                    osd["single_partition_of_fp32_groups"][g],
                    base["state"][index]["exp_avg"],
                ]:
                    blocks = t.detach().view(4, -1).clone()
                    t.detach().view(4, -1).copy_(blocks[[0, 2, 1, 3]])
        torch.save(sd, file)
    result = cli("verify", _ckpt(name), broken)
    assert result.exit_code == 1, result.output
    assert "moe1.deepspeed_moe.experts.deepspeed_experts." in result.output


def test_ep_alone_keeps_the_dp_size(reshaped, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = reshape(_ckpt("z1-fp32-ep2-dp4"), out, ep=1)
    assert result.plan.dp == 4 and result.plan.ep_sizes == (1,)
    assert "MoE (expert parallelism 2 -> 1)" in result.summary()
    for file in sorted((out / "global_step3").iterdir()):
        expected = reshaped("z1-fp32-ep2-dp4", 4, 1) / "global_step3" / file.name
        assert file.read_bytes() == expected.read_bytes(), file.name


def test_the_same_ep_is_the_reshape_without_ep(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    reshape(_ckpt("z2-fp32-ep2-dp2"), a, dp=4, ep=2)
    result = reshape(_ckpt("z2-fp32-ep2-dp2"), b, dp=4)
    assert "expert parallelism 2 kept" in result.summary()
    for file in sorted((a / "global_step3").iterdir()):
        assert file.read_bytes() == (b / "global_step3" / file.name).read_bytes(), file.name


# --- refusals and the dry run ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ckpt", "args", "message"),
    [
        (
            MOE / "z2-fp32-ep4-dp4-top2" / "ckpt",
            ["--ep", "3"],
            "--ep 3: MoE layer moe1 has 4 experts, which 3 expert-parallel ranks cannot share "
            "equally (DeepSpeed requires num_experts to be a multiple of ep_size)",
        ),
        (
            MOE / "z2-fp32-ep2-dp2" / "ckpt",
            ["--dp", "2", "--ep", "4"],
            "--dp 2: DeepSpeed requires DP to be a multiple of the expert-parallel size 4 "
            "(--ep 4; choose a multiple of 4)",
        ),
        (
            MOE / "z2-fp32-ep2x4-dp4-mixed" / "ckpt",
            ["--dp", "4", "--ep", "2"],
            "--ep 2: the MoE layers use expert-parallel sizes 2 and 4, one optimizer group each",
        ),
        (
            MOE / "autoep-z2-fp32-ep2-dp2" / "ckpt",
            ["--ep", "1"],
            "--ep 1: AutoEP checkpoints keep their expert parallelism",
        ),
        (
            MOE / "z0-fp32-ep2-dp2" / "ckpt",
            ["--ep", "1"],
            "is a ZeRO stage 0 MoE checkpoint: its optimizer is saved whole per expert-parallel "
            "rank",
        ),
        (
            FIXTURES / "zero" / "z3-fp32-dp2" / "ckpt",
            ["--ep", "1"],
            "--ep 1: a ZeRO-3 checkpoint's expert parallelism cannot change",
        ),
        (
            FIXTURES / "zero" / "z2-fp32-dp2" / "ckpt",
            ["--dp", "4", "--ep", "1"],
            "--ep 1: the checkpoint has no mixture-of-experts layers",
        ),
        (
            FIXTURES / "pipe" / "p2t1d2-z1-fp32" / "ckpt",
            ["--ep", "1"],
            "is a pipeline checkpoint; --ep applies to native mixture-of-experts ZeRO-1/2",
        ),
        (
            FIXTURES / "universal" / "u-z1-fp32-dp2" / "ckpt",
            ["--dp", "2", "--ep", "1"],
            "is a universal checkpoint; --ep applies to native mixture-of-experts ZeRO-1/2",
        ),
        (MOE / "z2-fp32-ep2-dp2" / "ckpt", ["--ep", "0"], "--ep 0: the expert-parallel size"),
    ],
    ids=[
        "experts",
        "dp",
        "mixed",
        "autoep",
        "zero0",
        "zero3",
        "dense",
        "pipeline",
        "universal",
        "zero",
    ],  # fmt: skip
)
def test_refusals_name_the_rule(
    cli, tmp_path: Path, ckpt: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    error = _one_error(cli("reshape", ckpt, out, *args))
    assert message in error, error
    assert not out.exists()


def test_dry_run_json_says_the_ep_change_and_plans_every_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ckpt = _ckpt("z2-fp32-ep4-dp4-top2")
    result = cli("reshape", ckpt, out, "--dp", "2", "--ep", "2", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    assert not out.exists() and report["dry_run"] and report["target"]["dp"] == 2
    assert report["expert_parallel"] == {"source": [4], "target": [2]}
    planned = {f["name"]: f for f in report["plan"]["files"]}
    for d in range(2):
        assert f"global_step3/zero_pp_rank_{d}_mp_rank_00_optim_states.pt" in planned
    assert "global_step3/zero_pp_rank_2_mp_rank_00_optim_states.pt" not in planned
    experts = [n for n in planned if "_expert_" in n]
    assert len(experts) == 8
    for name in experts:  # whole-file copies of the source's expert files
        (op,) = planned[name]["ops"]
        assert op["op"] == "copy" and op["offset"] == 0 and op["nbytes"] == planned[name]["size"]
    kept = cli("reshape", ckpt, out, "--dp", "4", "--dry-run", "--json")
    assert "expert_parallel" not in json.loads(kept.stdout)


def test_dry_run_table_shows_each_new_ep_rank_taking_two_source_ep_ranks(
    cli, tmp_path: Path
) -> None:
    ckpt = _ckpt("z2-fp32-ep4-dp4-top2")
    result = cli("reshape", ckpt, tmp_path / "out", "--dp", "2", "--ep", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "ZeRO-2 MoE (expert parallelism 4 -> 2): DP 4 -> 2" in result.stdout
    assert "ep_size_2, EP 2" in result.stdout
    assert "r0[0:192]->0 r1[0:192]->192" in result.stdout
    assert "expert parallelism 4 -> 2" in result.stdout


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("z1-fp32-ep2-dp4", True),
        ("z2-fp32-ep2x4-dp4-mixed", False),
        ("autoep-z2-fp32-ep2-dp2", False),
    ],
)
def test_a_dp_that_needs_another_ep_points_at_ep_where_it_applies(
    cli, tmp_path: Path, name: str, hint: bool
) -> None:
    """The story --ep is for: DP 3 cannot hold EP 2. The refusal says --ep would change it only
    where --ep applies (not for mixed EP sizes or AutoEP, which --ep refuses)."""
    error = _one_error(cli("reshape", _ckpt(name), tmp_path / "out", "--dp", "3"))
    assert "expert parallelism stays as saved" in error
    assert ("unless reshape --ep changes it" in error) is hint, error
