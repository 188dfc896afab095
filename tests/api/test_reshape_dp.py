"""`dsckpt reshape --dp`: plans on plain integers, and real DeepSpeed checkpoints reshaped.

The checks on fixtures, for every ZeRO fixture:
  * to the same size: every tensor and every value of every file comes back exactly;
  * to other sizes: `to-fp32` of the result equals that of the input bit for bit, the Adam moments
    read back from the new partitions equal the live engine's, and reshaping back restores the
    input files;
  * against DeepSpeed's own checkpoints of the same run at the target size (same seed and data,
    saved natively): every piece of bookkeeping is equal and every tensor has the same shape;
  * no two optimizer-state tensors share a storage (DeepSpeed updates them in place).
Then the command: one-line errors that write nothing, the dry run, --force, a failure midway,
and the docs' examples. Resuming with real DeepSpeed is in test_reshape_resume.py.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import FIXTURES, ZERO, ckpt, facts
from typer.testing import CliRunner

from dsckpt.api.reshaping import reshape
from dsckpt.discover import zero
from dsckpt.errors import UsageError
from dsckpt.plan.zero_reshape import (
    Partition,
    Run,
    SourceFacts,
    SourceGroup,
    alignment_paddings,
    plan_from_facts,
    round_robin_order,
    slice_mapping,
    zero3_sub_groups,
)
from dsckpt.plan.zero_source import plan_reshape

RESHAPABLE = [n for n in ZERO if facts("zero", n)["zero_stage"] > 0]

# --------------------------------------------------------------------------------------------
# Plans on integers
# --------------------------------------------------------------------------------------------


def _group(
    *numels: int, partition_size: int, param_group: int = 0, pads: tuple[int, ...] | None = None
) -> SourceGroup:
    return SourceGroup(
        params=tuple((f"p{i}", (n,)) for i, n in enumerate(numels)),
        param_group=param_group,
        partition_size=partition_size,
        alignment_paddings=pads,
    )


def test_zero12_plan_2_to_3_by_hand() -> None:
    # 91 + 35 + 35 = 161 elements: padded to 164 at DP 2 (82 each), to 162 at DP 3 (54 each).
    facts = SourceFacts(kind="zero", stage=2, dp=2, groups=(_group(91, 35, 35, partition_size=82),))
    plan = plan_from_facts(facts, 3)
    parts = plan.groups[0].partitions
    assert [p.numel for p in parts] == [54, 54, 54]
    assert parts[0].runs == (Run(0, 0, 0, 54, 0),)
    assert parts[1].runs == (Run(0, 0, 54, 28, 0), Run(1, 0, 0, 26, 28))
    assert parts[2].runs == (Run(1, 0, 26, 53, 0),)
    assert plan.group_paddings == ((0,), (0,), (1,))
    # param_slice_mappings: (name, numel, start) of each parameter overlapping the rank's slice.
    assert plan.slice_mappings[1][0] == (("p0", 37, 0), ("p1", 17, 37))
    assert plan.slice_mappings[2][0] == (("p1", 18, 0), ("p2", 35, 18))


def test_bf16_optimizer_records_total_padding_on_the_last_rank() -> None:
    # 10 elements at DP 4: padded to 16, partitions of 4; the last rank is all padding.
    facts = SourceFacts(
        kind="bf16_optimizer", stage=1, dp=1, groups=(_group(5, 5, partition_size=10),)
    )
    plan = plan_from_facts(facts, 4)
    assert [p.numel for p in plan.groups[0].partitions] == [4, 4, 4, 4]
    assert plan.group_paddings == ((0,), (0,), (0,), (6,))
    zero_plan = plan_from_facts(SourceFacts(kind="zero", stage=2, dp=1, groups=facts.groups), 4)
    assert zero_plan.group_paddings == ((0,), (0,), (2,), (4,))
    assert zero_plan.groups[0].partitions[3].runs == ()


def test_round_robin_order_and_its_inverse() -> None:
    assert round_robin_order(5, 2) == [0, 2, 4, 1, 3]
    assert round_robin_order(3, 4) == [0, 1, 2]
    assert round_robin_order(4, 1) == [0, 1, 2, 3]
    # Saved at DP 2 in round-robin order p0 p2 p4 p1 p3; at DP 3 the order is p0 p3 p1 p4 p2.
    saved = ("p0", "p2", "p4", "p1", "p3")
    facts = SourceFacts(
        kind="zero",
        stage=2,
        dp=2,
        round_robin=True,
        groups=(
            SourceGroup(
                params=tuple((n, (int(n[1]) + 1,)) for n in saved), param_group=0, partition_size=8
            ),
        ),
    )
    plan = plan_from_facts(facts, 3)
    assert [n for n, _ in plan.groups[0].params] == ["p0", "p3", "p1", "p4", "p2"]
    assert plan.params_reordered


def test_alignment_paddings() -> None:
    assert alignment_paddings([3, 5, 8, 1], 4) == [1, 3, 0, 0]
    assert alignment_paddings([3, 5], 1) == [0, 0]


def test_slice_mapping_takes_running_offsets_without_alignment() -> None:
    assert slice_mapping(["a", "b", "c"], [4, 0, 6], None, 1, 5) == (("c", 5, 0),)
    assert slice_mapping(["a", "b"], [4, 6], [0, 6], 0, 6) == (("a", 4, 0),)


def test_zero3_sub_groups_follow_sub_group_size() -> None:
    assert zero3_sub_groups([91, 35, 35], 3, 20) == [[0], [1, 2]]
    assert zero3_sub_groups([91, 35, 35], 1, 20) == [[0], [1], [2]]
    assert zero3_sub_groups([91, 35, 35], 4, 20) == [[0], [1, 2]]
    assert zero3_sub_groups([91, 35, 35], 2, 10**9) == [[0, 1, 2]]


def test_zero3_plan_by_hand() -> None:
    # One parameter of 7 elements: pieces of 4 at DP 2 (rank 1 pads 1), of 3 at DP 3 (rank 2
    # pads 2).
    facts = SourceFacts(
        kind="zero3",
        stage=3,
        dp=2,
        groups=(SourceGroup(params=(("w", (7,)),), param_group=0),),
        param_order=("w",),
    )
    plan = plan_from_facts(facts, 3)
    parts = plan.groups[0].partitions
    assert parts[0] == Partition(0, 3, (Run(0, 0, 0, 3, 0),), 0)
    assert parts[1] == Partition(1, 3, (Run(0, 0, 3, 1, 0), Run(1, 0, 0, 2, 1)), 0)
    assert parts[2] == Partition(2, 3, (Run(1, 0, 2, 1, 0),), 2)
    # The partitions are a rule, read as a sequence of target ranks.
    assert list(parts) == [parts[0], parts[1], parts[-1]] and len(parts) == 3
    with pytest.raises(IndexError):
        parts[3]


def test_dp_below_one_is_a_usage_error() -> None:
    facts = SourceFacts(kind="zero", stage=1, dp=2, groups=(_group(4, partition_size=2),))
    with pytest.raises(UsageError, match="at least 1"):
        plan_from_facts(facts, 0)


def _simulate(facts: SourceFacts, dp: int) -> tuple[list[list[list[Any]]], list[list[list[Any]]]]:
    """Source partitions filled with element labels, and the target partitions the plan builds."""
    src: list[list[list[Any]]] = []  # [rank][group] -> labels
    expected: list[list[list[Any]]] = []
    if facts.kind == "zero3":
        for rank in range(facts.dp):
            src.append([])
            for g in facts.groups:
                flat: list[Any] = []
                for name, shape in g.params:
                    c = zero.zero3_partition_numel(zero.numel(shape), facts.dp)
                    flat += [
                        (name, rank * c + i) if rank * c + i < zero.numel(shape) else None
                        for i in range(c)
                    ]
                src[rank].append(flat)
    else:
        for rank in range(facts.dp):
            src.append([])
            for g in facts.groups:
                pads = g.alignment_paddings or (0,) * len(g.params)
                flat = []
                for (name, shape), pad in zip(g.params, pads, strict=True):
                    flat += [(name, i) for i in range(zero.numel(shape))] + [None] * pad
                flat += [None] * (g.partition_size * facts.dp - len(flat))
                src[rank].append(flat[rank * g.partition_size : (rank + 1) * g.partition_size])
    plan = plan_from_facts(facts, dp)
    got = [[[None] * g.partitions[r].numel for g in plan.groups] for r in range(dp)]
    for g in plan.groups:
        for part in g.partitions:
            for run in part.runs:
                got[part.rank][g.index][run.dst_start : run.dst_start + run.length] = src[
                    run.src_rank
                ][run.src_index][run.src_start : run.src_start + run.length]
    for rank in range(dp):
        expected.append([])
        for g in plan.groups:
            flat = []
            if facts.kind == "zero3":
                for name, shape in g.params:
                    c = zero.zero3_partition_numel(zero.numel(shape), dp)
                    flat += [
                        (name, rank * c + i) if rank * c + i < zero.numel(shape) else None
                        for i in range(c)
                    ]
            else:
                pads = g.alignment_paddings or (0,) * len(g.params)
                full: list[Any] = []
                for (name, shape), pad in zip(g.params, pads, strict=True):
                    full += [(name, i) for i in range(zero.numel(shape))] + [None] * pad
                size = g.partitions[rank].numel
                full += [None] * (size * dp - len(full))
                flat = full[rank * size : (rank + 1) * size]
            expected[rank].append(flat)
    return got, expected


@pytest.mark.parametrize(("src_dp", "dst_dp"), list(itertools.product([1, 2, 3, 4, 5], repeat=2)))
def test_every_element_lands_where_deepspeed_expects_it(src_dp: int, dst_dp: int) -> None:
    numels = [91, 35, 35, 13, 5, 5, 5, 7, 1, 2]
    for kind, rr, align in (
        ("zero", False, 1),
        ("zero", True, 1),
        ("zero", True, 4),
        ("bf16_optimizer", False, 1),
    ):
        order = round_robin_order(len(numels), src_dp) if rr else list(range(len(numels)))
        params = [(f"p{i}", (numels[i],)) for i in order]
        pads = alignment_paddings([numels[i] for i in order], align)
        data = sum(numels) + sum(pads)
        group = SourceGroup(
            params=tuple(params),
            param_group=0,
            partition_size=zero.zero12_partition_size(data, src_dp),
            alignment_paddings=tuple(pads) if kind == "zero" else None,
        )
        f = SourceFacts(
            kind=kind, stage=2, dp=src_dp, groups=(group,), round_robin=rr, param_alignment=align
        )
        got, expected = _simulate(f, dst_dp)
        assert got == expected, (kind, rr, align)
    members_of = ((0, [(0, 91), (1, 35), (2, 35)]), (1, [(3, 13), (4, 5), (5, 7)]))
    groups = tuple(
        SourceGroup(params=tuple((f"g{g}p{i}", (n,)) for i, n in members), param_group=g)
        for g, members in members_of
    )
    for sub_group_size in (10**9, 20):
        # Source sub-groups as DeepSpeed cuts them at the source size.
        cut = []
        for g in groups:
            for members in zero3_sub_groups(
                [zero.numel(s) for _, s in g.params], src_dp, sub_group_size
            ):
                cut.append(
                    SourceGroup(
                        params=tuple(g.params[i] for i in members), param_group=g.param_group
                    )
                )
        f = SourceFacts(
            kind="zero3", stage=3, dp=src_dp, groups=tuple(cut), sub_group_size=sub_group_size
        )
        got, expected = _simulate(f, dst_dp)
        if src_dp == dst_dp:  # the padding is copied too, so compare the data only
            got = [
                [[x if x is not None and x[1] < _numel(x[0]) else None for x in t] for t in r]
                for r in got
            ]
        assert got == expected, sub_group_size


def _numel(name: str) -> int:
    return {"g0p0": 91, "g0p1": 35, "g0p2": 35, "g1p3": 13, "g1p4": 5, "g1p5": 7}[name]


# --------------------------------------------------------------------------------------------
# Real checkpoints
# --------------------------------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a: Any, b: Any, where: str = "", rtol: float | None = None) -> None:
    """Recursive equality: tensors by dtype, shape, value (exact; within rtol if given; not
    compared if rtol is inf), flags and attributes; everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, type(a), a.requires_grad) == (
            b.dtype,
            b.shape,
            type(b),
            b.requires_grad,
        ), where
        assert vars(a) == vars(b), where
        if rtol is None:
            # Bytes, not values: ZeRO-3 padding is uninitialised memory and may hold NaN.
            assert torch.equal(_bytes(a), _bytes(b)), where
        elif rtol != float("inf"):
            assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=rtol), where
        return
    if isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            _same(a[k], b[k], f"{where}/{k}", rtol)
        assert getattr(a, "__dict__", {}) == getattr(b, "__dict__", {}), where
        return
    if type(a) in (list, tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]", rtol)
        return
    if hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        _same(vars(a), vars(b), f"{where}.__dict__", rtol)
        return
    assert a == b, (where, a, b)


def _files(tag_dir: Path) -> list[str]:
    return sorted(p.name for p in tag_dir.iterdir())


def _load(path: Path) -> Any:
    pytest.importorskip("deepspeed")  # DeepSpeed's classes for the full unpickle
    return torch.load(path, weights_only=False)


def _digest(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


_CACHE: dict[tuple[str, int], Path] = {}


@pytest.fixture(scope="module")
def reshaped(tmp_path_factory: pytest.TempPathFactory):
    """``reshaped(name, dp)``: the fixture reshaped to ``dp``, made once per module."""
    base = tmp_path_factory.mktemp("reshaped")

    def get(name: str, dp: int) -> Path:
        key = (name, dp)
        if key not in _CACHE:
            out = base / f"{name}-dp{dp}"
            reshape(ckpt("zero", name), out, dp=dp)
            _CACHE[key] = out
        return _CACHE[key]

    return get


@pytest.mark.parametrize("name", RESHAPABLE)
def test_same_dp_reproduces_every_tensor_exactly(reshaped, name: str) -> None:
    f = facts("zero", name)
    before = _digest(ckpt("zero", name))
    out = reshaped(name, f["dp"])
    assert _digest(ckpt("zero", name)) == before  # the input is never modified
    src, dst = ckpt("zero", name) / f["tag"], out / f["tag"]
    assert (out / "latest").read_text() == f["tag"]
    assert _files(src) == _files(dst)
    for file in _files(src):
        _same(_load(src / file), _load(dst / file), file)


def _targets(dp: int) -> list[int]:
    return sorted({1, dp + 1, 3 if dp != 3 else 2} - {dp})


CROSS = [(n, d) for n in RESHAPABLE for d in _targets(facts("zero", n)["dp"])]


def _fp32(path: Path) -> OrderedDict[str, torch.Tensor]:
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.execute.executor import iter_tensors
    from dsckpt.plan.consolidation import plan_consolidation

    return OrderedDict(iter_tensors(plan_consolidation(open_checkpoint(path))))


def _moments(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full exp_avg / exp_avg_sq per trainable parameter, read back from the partitions."""
    from dsckpt.discover.layout import open_checkpoint

    layout = open_checkpoint(path)
    sources = layout.zero_sources[0]
    optim = {f.dp: f for f in layout.files if f.role.value == "optim_states"}
    states = {}
    for d, f in optim.items():
        osd = _load(layout.dir / f.name)["optimizer_state_dict"]
        states[d] = osd["optimizer_state_dict" if sources.zero3 else "base_optimizer_state"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    params = (
        sources.zero3.params
        if sources.zero3
        else [(g, p) for g, grp in enumerate(sources.groups) for p in grp.params]
    )
    for item in params:
        if sources.zero3:
            param, pieces = item, sources.zero3.pieces(item)
        else:
            g, param = item
            pieces = [
                zero.Piece(p.rank, g, p.src_start, p.length, p.dst_start)
                for p in sources.groups[g].pieces(param)
            ]
        out[param.name] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            full = torch.empty(param.numel)
            for p in pieces:
                st = states[p.rank]
                index = (
                    p.sub_group if sources.zero3 else st["param_groups"][p.sub_group]["params"][0]
                )
                full[p.dst_start : p.dst_start + p.length] = st["state"][index][key][
                    p.src_start : p.src_start + p.length
                ]
            out[param.name][key] = full.view(param.shape)
    return out


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_other_dp_keeps_weights_and_optimizer_state(reshaped, name: str, dp: int) -> None:
    from dsckpt.discover.layout import open_checkpoint

    out = reshaped(name, dp)
    layout = open_checkpoint(out)
    assert not layout.errors, layout.errors
    assert layout.dp == dp and layout.iteration == facts("zero", name)["global_steps"]
    # to-fp32 of the result equals to-fp32 of the input, bit for bit.
    ours, theirs = _fp32(out), _fp32(ckpt("zero", name))
    if facts("zero", name)["round_robin_gradients"]:  # the flat order follows the DP size
        assert sorted(ours) == sorted(theirs)
    else:
        assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key
    # Adam's moments from the new partitions are the live engine's. Under round_robin_gradients
    # DeepSpeed's live view (safe_get_full_optimizer_state) reads wrong offsets, so there the
    # truth is the input files' own partitions.
    if facts("zero", name)["round_robin_gradients"]:
        live = _moments(ckpt("zero", name))
    else:
        live = torch.load(FIXTURES / "zero" / name / "ref_live_optim.pt", weights_only=True)
    moments = _moments(out)
    assert moments.keys() == live.keys()
    for param, state in live.items():
        for key, value in state.items():
            assert torch.equal(moments[param][key], value), (param, key)


def _state_storages_distinct(path: Path) -> None:
    """Every optimizer-state tensor has a storage of its own: DeepSpeed updates them in place
    (``step += 1``), so two entries sharing one would be advanced twice per step."""
    for file in path.glob("*/*optim_states.pt"):
        osd = _load(file)["optimizer_state_dict"]
        base = osd.get("optimizer_state_dict") or osd["base_optimizer_state"]
        ptrs = [
            t.untyped_storage().data_ptr()
            for entry in base["state"].values()
            for t in entry.values()
            if isinstance(t, torch.Tensor)
        ]
        assert len(ptrs) == len(set(ptrs)), file.name


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_optimizer_state_tensors_do_not_share_storage(reshaped, name: str, dp: int) -> None:
    _state_storages_distinct(reshaped(name, dp))


@pytest.mark.parametrize(("name", "dp"), CROSS, ids=[f"{n}-to{d}" for n, d in CROSS])
def test_reshaping_back_restores_the_input(reshaped, tmp_path: Path, name: str, dp: int) -> None:
    f = facts("zero", name)
    back = tmp_path / "back"
    reshape(reshaped(name, dp), back, dp=f["dp"])
    src, dst = ckpt("zero", name) / f["tag"], back / f["tag"]
    assert _files(src) == _files(dst)
    shapes = None
    if f["zero_stage"] == 3:
        shapes = _load(src / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    for file in _files(src):
        a, b = _load(src / file), _load(dst / file)
        if shapes is not None and file.endswith(".pt"):
            # DeepSpeed leaves uninitialised memory in ZeRO-3 padding; a reshape writes zeros.
            _clear_zero3_padding(
                a, int(re.search(r"zero_pp_rank_(\d+)_", file).group(1)), f["dp"], shapes
            )
        _same(a, b, file)


def _clear_zero3_padding(sd: dict[str, Any], rank: int, dp: int, param_shapes: Any) -> None:
    def data(n: int) -> tuple[int, int]:
        c = zero.zero3_partition_numel(n, dp)
        return max(0, min(c, n - rank * c)), c

    for name, t in (sd.get("frozen_param_fragments") or {}).items():
        t.data.view(-1)[data(sd["frozen_param_shapes"][name].numel())[0] :] = 0
    osd = sd.get("optimizer_state_dict")
    if osd is None:
        return
    for s, shapes in enumerate(param_shapes):
        tensors = [osd["fp32_flat_groups"][s]] + [
            v for v in osd["optimizer_state_dict"]["state"][s].values() if v.dim() == 1
        ]
        offset = 0
        for shape in shapes.values():
            held, c = data(shape.numel())
            for t in tensors:
                t.data[offset + held : offset + c] = 0
            offset += c


# The same run (seed, data, config) saved natively by DeepSpeed at two sizes.
NATIVE = [
    ("z1-fp32-dp2", "z1-fp32-dp3"),
    ("z1-fp32-dp3", "z1-fp32-dp2"),
    ("z2-fp32-dp2", "z2-fp32-dp4"),
    ("z2-fp32-dp4", "z2-fp32-dp1"),
    ("z2-fp32-dp1", "z2-fp32-dp2"),
    ("z2-bf16-dp2", "z2-bf16-dp3"),
    ("z2-bf16-dp3", "z2-bf16-dp2"),
    ("z1-bf16-dp2", "z1-bf16-dp3"),
    ("z1-bf16-dp3", "z1-bf16-dp2"),
    ("z3-fp32-dp2", "z3-fp32-dp4"),
    ("z3-fp32-dp4", "z3-fp32-dp2"),
]


@pytest.mark.parametrize(("name", "native"), NATIVE, ids=[f"{a}-as-{b}" for a, b in NATIVE])
def test_result_is_what_deepspeed_saves_at_that_size(reshaped, name: str, native: str) -> None:
    """Same files, keys, bookkeeping (paddings, slice mappings, partition counts, sub-groups,
    param_shapes, ds_id, loss scaler, ...) and tensor shapes as DeepSpeed's own save at the
    target size. Values come from two runs that differ only in DP size: fp32 agrees to 1e-3;
    bf16 runs drift apart more, so there only shapes and dtypes are compared. `ds_config` is the
    run's config (micro-batch size per GPU differs) and is kept from the input by design."""
    f, n = facts("zero", name), facts("zero", native)
    out = reshaped(name, n["dp"])
    nat, got = ckpt("zero", native) / n["tag"], out / f["tag"]
    assert _files(nat) == _files(got)
    shapes = None
    if n["zero_stage"] == 3:
        shapes = _load(nat / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    for file in _files(nat):
        a, b = _load(nat / file), _load(got / file)
        if shapes is not None:
            _clear_zero3_padding(
                a, int(re.search(r"zero_pp_rank_(\d+)_", file).group(1)), n["dp"], shapes
            )
        a.pop("ds_config"), b.pop("ds_config")
        _same(a, b, file, rtol=1e-3 if n["dtype"] == "fp32" else float("inf"))


@pytest.mark.parametrize("name", RESHAPABLE)
def test_deepspeed_zero_to_fp32_reads_the_result(reshaped, name: str) -> None:
    f = facts("zero", name)
    if not f["ref_deepspeed"]:
        pytest.skip(
            f"DeepSpeed's converter refuses this checkpoint: {f['ref_deepspeed_missing_reason']}"
        )
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    dp = _targets(f["dp"])[-1]
    ours = get_fp32_state_dict_from_zero_checkpoint(str(reshaped(name, dp)))
    ref = torch.load(FIXTURES / "zero" / name / "ref_deepspeed.pt", weights_only=True)
    assert sorted(ours) == sorted(ref)
    if not f["round_robin_gradients"]:  # otherwise the order follows the DP size
        assert list(ours) == list(ref)
    for key, value in ref.items():
        assert torch.equal(value, ours[key]), key


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _noop() -> None:
    """Test app root."""


@pytest.fixture
def run_reshape(monkeypatch: pytest.MonkeyPatch):
    """Run `dsckpt reshape ARGS` in-process (fixed width, no colour): through the real app once
    the command is registered there, through a local app with the same error mapping until then."""
    from dsckpt.cli import app as app_module
    from dsckpt.cli import reshape_cmd

    monkeypatch.setenv("DSCKPT_WIDTH", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("DSCKPT_DEBUG", raising=False)
    app = app_module.app
    if not any(c.name == "reshape" for c in app.registered_commands):
        app = typer.Typer(
            cls=app_module._Group, pretty_exceptions_enable=False, rich_markup_mode=None
        )
        app.callback()(_noop)
        app.command("reshape")(reshape_cmd.reshape)
    runner = CliRunner()

    def run(*args: str | Path):
        return runner.invoke(app, ["reshape", *(str(a) for a in args)])

    return run


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


def test_cli_writes_a_save_dir_deepspeed_loads(run_reshape, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_reshape(ckpt("zero", "z2-fp32-dp2"), out, "--dp", "3", "-q")
    assert result.exit_code == 0, result.output
    assert "from DP 2 to DP 3" in result.stdout
    assert (out / "latest").read_text() == "global_step3"
    assert _files(out / "global_step3") == ["mp_rank_00_model_states.pt"] + [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(3)
    ]
    assert _siblings(out) == ["out"]  # no temporary directory left beside it


def test_cli_dry_run_shows_the_plan_and_writes_nothing(run_reshape, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_reshape(ckpt("zero", "z2-fp32-dp2"), out, "--dp", "3", "--dry-run")
    assert result.exit_code == 0, result.output
    for text in (
        "ZeRO-2: DP 2 -> 3",
        "group 1",
        "r0[0:54]->0",
        "r0[54:82]->0 r1[0:26]->28",
        "nothing written",
    ):
        assert text in result.stdout, text
    assert not tmp_path.joinpath("out").exists() and _siblings(out) == []


def _universal(tmp: Path) -> Path:
    root = tmp / "universal"
    (root / "global_step1" / "zero" / "fc1.weight").mkdir(parents=True)
    (root / "latest").write_text("global_step1")
    return root


def _mixed(tmp: Path) -> Path:
    root = tmp / "mixed"
    shutil.copytree(ckpt("zero", "z2-fp32-dp2"), root)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copyfile(
        ckpt("zero", "z2-fp32-dp4") / "global_step3" / name, root / "global_step3" / name
    )
    return root


def _missing(tmp: Path) -> Path:
    root = tmp / "missing"
    shutil.copytree(ckpt("zero", "z3-fp32-dp2"), root)
    (root / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return root


def _sub_group_size_not_a_number(tmp: Path) -> Path:
    # A ds_config whose ZeRO-3 sub_group_size is no number (was a ValueError traceback).
    root = tmp / "sub-group-size"
    shutil.copytree(ckpt("zero", "z3-fp32-dp2"), root)
    for path in sorted((root / "global_step3").glob("*model_states.pt")):
        sd = torch.load(path, weights_only=True)
        sd["ds_config"]["zero_optimization"]["sub_group_size"] = "auto"
        torch.save(sd, path)
    return root


def _with_zero_config(tmp: Path, name: str, **options: Any) -> Path:
    """A copy of fixture ``name`` whose saved ds_config has ``options`` in zero_optimization."""
    root = tmp / name
    shutil.copytree(ckpt("zero", name), root)
    for path in sorted(root.glob("global_step*/*model_states.pt")):
        sd = torch.load(path, weights_only=True)
        sd["ds_config"]["zero_optimization"].update(options)
        torch.save(sd, path)
    return root


@pytest.mark.parametrize("value", ["false", "no", "0", 0])
def test_a_false_written_as_text_is_false_as_deepspeed_reads_it(tmp_path: Path, value: Any) -> None:
    # DeepSpeed's config model reads "false" (and "no", "0", 0) as False; bool("false") is
    # True. At DP 4 the groups of 3, 3 and 2 parameters are in the same order with or without
    # round robin, so nothing refused it: at DP 2 the plan re-ordered them for a round robin
    # the run never used.
    name = "z2-fp32-dp4-padrank"
    src = _with_zero_config(tmp_path, name, round_robin_gradients=value)
    _, plan = plan_reshape(src, 2)
    assert not plan.params_reordered
    assert plan == plan_reshape(ckpt("zero", name), 2)[1]
    _, plan = plan_reshape(
        _with_zero_config(tmp_path / "yes", name, round_robin_gradients="yes"), 2
    )
    assert plan.params_reordered


def _round_robin_maybe(tmp: Path) -> Path:
    return _with_zero_config(tmp, "z2-fp32-dp4-padrank", round_robin_gradients="maybe")


BAD = {
    "dp-zero": (lambda t: ckpt("zero", "z2-fp32-dp2"), ["--dp", "0"], "must be at least 1"),
    "dp-negative": (lambda t: ckpt("zero", "z2-fp32-dp2"), ["--dp", "-2"], "must be at least 1"),
    "missing-rank": (_missing, ["--dp", "3"], "is missing"),
    "mixed-ranks": (_mixed, ["--dp", "3"], "partition_count"),
    # Pipeline / tensor-parallel checkpoints now go to dsckpt.plan.pipeline_reshape (its own tests).
    "stage-0": (lambda t: ckpt("zero", "z0-fp32-dp2"), ["--dp", "1"], "stage 0"),
    "universal": (_universal, ["--dp", "2"], "universal"),
    "round-robin-maybe": (
        _round_robin_maybe,
        ["--dp", "2"],
        "zero_optimization.round_robin_gradients is 'maybe', which DeepSpeed does not read",
    ),
    "sub-group-size": (
        _sub_group_size_not_a_number,
        ["--dp", "3"],
        "zero_optimization.sub_group_size is 'auto', not a whole number",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(run_reshape, tmp_path: Path, case: str) -> None:
    make, args, text = BAD[case]
    src = make(tmp_path)
    before = _digest(src)
    out = tmp_path / "out"
    result = run_reshape(src, out, *args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], result.stderr
    assert not out.exists() and not any(n.startswith(".out") for n in _siblings(out))
    assert _digest(src) == before


def test_output_must_not_touch_the_input(run_reshape, tmp_path: Path) -> None:
    root = tmp_path / "runs" / "ckpt"
    shutil.copytree(ckpt("zero", "z2-fp32-dp2"), root)
    before = _digest(root)
    # root/resharded (beside the tag directory) is allowed: tests/execute/test_output_safety.py
    for out, text in (
        (root, "is the checkpoint"),
        (root / "latest", "would replace"),
        (root / "global_step3" / "x", "inside the tag directory"),
        (tmp_path / "runs", "contains"),
        (tmp_path, "contains"),
    ):
        result = run_reshape(root, out, "--dp", "3", "--force")
        assert result.exit_code == 1 and text in result.stderr, (out, result.output)
    assert _digest(root) == before


def test_existing_out_needs_force(run_reshape, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_reshape(ckpt("zero", "z2-fp32-dp2"), out, "--dp", "3")
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run_reshape(ckpt("zero", "z2-fp32-dp2"), out, "--dp", "3", "--force", "-q")
    assert result.exit_code == 0, result.output
    # --force replaces `latest` and the tag directory only: the user's file is kept
    assert sorted(p.name for p in out.iterdir()) == ["global_step3", "keep.txt", "latest"]
    assert _siblings(out) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_midway_leaves_nothing_behind(
    run_reshape, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, existing: bool
) -> None:
    from dsckpt.errors import OutputError
    from dsckpt.execute import executor as module

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    real, calls = module.write_file, []

    def failing(file, path, *args):  # the disk fills up on the third file
        calls.append(path)
        if len(calls) == 3:
            raise OutputError(f"{path} cannot be written: No space left on device")
        real(file, path, *args)

    monkeypatch.setattr(module, "write_file", failing)
    result = run_reshape(ckpt("zero", "z3-fp32-dp2"), out, "--dp", "3", "--force", "-q")
    assert result.exit_code == 1 and "No space left" in result.stderr
    assert _siblings(out) == (["out"] if existing else [])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_tag_option_and_tag_directory_input(run_reshape, tmp_path: Path) -> None:
    src = ckpt("zero", "z1-fp32-dp2")
    for i, args in enumerate(([src, "--tag", "global_step3"], [src / "global_step3"])):
        out = tmp_path / f"out{i}"
        result = run_reshape(args[0], out, "--dp", "1", "-q", *args[1:])
        assert result.exit_code == 0, result.output
        assert (out / "latest").read_text() == "global_step3"


def test_files_beside_the_rank_files_are_carried_over(run_reshape, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ckpt("zero", "z2-fp32-dp2"), src)
    (src / "global_step3" / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script\n")
    result = run_reshape(src, tmp_path / "out", "--dp", "1", "-q")
    assert result.exit_code == 0, result.output
    copied = tmp_path / "out" / "global_step3" / "zero_to_fp32.py"
    assert copied.read_text() == "# DeepSpeed's recovery script\n"


def test_a_flat_order_the_config_does_not_explain_is_refused(run_reshape, tmp_path: Path) -> None:
    """A round-robin checkpoint whose saved config lost the flag: the group order recorded in
    param_slice_mappings contradicts the flat order, and reshaping would misplace parameters."""
    src = tmp_path / "src"
    shutil.copytree(ckpt("zero", "z2-fp32-dp2-roundrobin"), src)
    model = src / "global_step3" / "mp_rank_00_model_states.pt"
    sd = _load(model)
    del sd["ds_config"]["zero_optimization"]["round_robin_gradients"]
    torch.save(sd, model)
    result = run_reshape(src, tmp_path / "out", "--dp", "3")
    assert result.exit_code == 1 and "misplace" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Streaming: what the writer holds and what it keeps
# --------------------------------------------------------------------------------------------


def _storage_groups(obj: Any) -> list[list[str]]:
    """Paths of the non-empty tensors, grouped by the storage they share."""
    found: dict[int, list[str]] = {}

    def walk(x: Any, path: str) -> None:
        if isinstance(x, torch.Tensor):
            if x.numel():
                found.setdefault(x.untyped_storage().data_ptr(), []).append(path)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}/{k}")
        elif type(x) in (list, tuple):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    walk(obj, "")
    return sorted(sorted(g) for g in found.values())


@pytest.mark.parametrize("name", RESHAPABLE)
def test_tensors_sharing_a_storage_still_share_one(reshaped, name: str) -> None:
    """Tied weights and views into one buffer come back as one storage, as DeepSpeed saved them
    (the same-size reshape compares values; this compares the sharing)."""
    f = facts("zero", name)
    src, dst = ckpt("zero", name) / f["tag"], reshaped(name, f["dp"]) / f["tag"]
    for file in _files(src):
        if file.endswith(".pt"):
            assert _storage_groups(_load(dst / file)) == _storage_groups(_load(src / file)), file


@pytest.mark.parametrize("name", ["z2-fp32-dp2", "z3-fp32-dp2", "z1-bf16-dp2"])
def test_the_writer_holds_no_tensor_data(name: str, tmp_path: Path) -> None:
    """Every tensor of every structure the writer builds is a meta tensor standing for file
    ranges: memory does not follow the model size."""
    from dsckpt.execute.formats.deepspeed_files import ZeroRankFiles
    from dsckpt.plan.zero_source import plan_reshape

    source, plan = plan_reshape(ckpt("zero", name), 3)
    writer = ZeroRankFiles(source, plan)
    with writer.stack:
        for file, build in writer._jobs():
            obj = build()
            tensors = _flat_tensors(obj)
            assert tensors, file
            for t in tensors:
                assert t.device.type == "meta", file
                assert writer.lazy.ranges(t.untyped_storage()) is not None, file


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    if type(obj) in (list, tuple):
        return [t for v in obj for t in _flat_tensors(v)]
    return []


def test_open_source_takes_an_open_layout() -> None:
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.plan.zero_source import open_source

    layout = open_checkpoint(ckpt("zero", "z2-fp32-dp2"))
    assert open_source(layout).facts == open_source(ckpt("zero", "z2-fp32-dp2")).facts
