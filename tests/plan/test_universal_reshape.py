"""Universal -> native ZeRO planning (dsckpt.plan.universal_reshape), with plain integers.

A universal checkpoint holds every parameter whole, one file per state. The planner reuses the
native planner over a source whose every flat group sits whole on one virtual rank, then cuts
the runs at parameter boundaries. These tests rebuild every target partition element by element
from the plan and compare it with DeepSpeed's layout rules written out independently: each
target rank's slice of the flat buffer (ZeRO-1/2: ``param_shapes`` order at the target size,
alignment pads, ``2*dp`` padding; ZeRO-3: each parameter's ``ceil(numel/dp)`` piece).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from dsckpt.discover import zero
from dsckpt.plan.universal_reshape import plan_universal
from dsckpt.plan.zero_reshape import (
    SourceFacts,
    SourceGroup,
    alignment_paddings,
    round_robin_order,
)

SHAPES = {"a": (13, 7), "b": (5,), "c": (7, 5), "d": (1,), "e": (3, 3), "f": (11,)}


def _source(
    kind: str,
    dp: int,
    groups: list[list[str]],
    owners: list[int] | None = None,
    **facts_args: object,
) -> SimpleNamespace:
    """What plan_universal reads of a UniversalSource: the facts and the parameters' order.
    ``owners``: each group's optimizer group (ZeRO-3 sub-groups; default: its own index)."""
    made = []
    for g, names in enumerate(groups):
        params = tuple((n, SHAPES[n]) for n in names)
        numels = [zero.numel(s) for _, s in params]
        align = facts_args.get("param_alignment", 1)
        pads = tuple(alignment_paddings(numels, align)) if align != 1 else None
        data = sum(numels) + sum(pads or ())
        made.append(SourceGroup(params, owners[g] if owners else g, max(data, 1), pads))
    facts = SourceFacts(kind=kind, stage=3 if kind == "zero3" else 2, dp=dp, groups=tuple(made),
                        **facts_args)  # fmt: skip
    return SimpleNamespace(facts=facts, params=tuple(n for names in groups for n in names))


def _rebuilt(plan, params):  # type: ignore[no-untyped-def]
    """Per (group, rank): the target partition as (parameter, element) per position, None for
    the zeros no run covers."""
    out = {}
    for group in plan.groups:
        for part in group.partitions:
            cells = [None] * part.numel
            for run in part.runs:
                assert run.src_rank == 0
                for i in range(run.length):
                    assert cells[run.dst_start + i] is None, "a position written twice"
                    cells[run.dst_start + i] = (params[run.src_index], run.src_start + i)
            out[group.index, part.rank] = cells
    return out


def _zero12_expected(order: list[str], dp: int, align: int) -> list[list[object]]:
    """DeepSpeed's flat buffer for one group at ``dp``: the parameters in ``order`` with the
    alignment pads, zero-padded to a multiple of 2*dp, cut into dp equal slices."""
    flat: list[object] = []
    numels = [zero.numel(SHAPES[n]) for n in order]
    pads = alignment_paddings(numels, align) if align != 1 else [0] * len(order)
    for n, count, pad in zip(order, numels, pads, strict=True):
        flat += [(n, i) for i in range(count)] + [None] * pad
    size = math.ceil(len(flat) / (2 * dp)) * 2
    flat += [None] * (size * dp - len(flat))
    return [flat[r * size : (r + 1) * size] for r in range(dp)]


@pytest.mark.parametrize("dst", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("src", [1, 2, 3])
@pytest.mark.parametrize("variant", ["plain", "round_robin", "aligned"])
def test_zero12_partitions_hold_each_element_where_deepspeed_puts_it(
    src: int, dst: int, variant: str
) -> None:
    groups = [["a", "b", "c"], ["d", "e", "f"]]
    args: dict[str, object] = {}
    if variant == "round_robin":
        args["round_robin"] = True
        # param_shapes at the source size records the round-robin order of that size
        groups = [[g[i] for i in round_robin_order(len(g), src)] for g in groups]
    if variant == "aligned":
        args["param_alignment"] = 4
    source = _source("zero", src, groups, **args)
    plan = plan_universal(source, dst)  # type: ignore[arg-type]
    cells = _rebuilt(plan, source.params)
    for g, names in enumerate([["a", "b", "c"], ["d", "e", "f"]]):
        order = [names[i] for i in round_robin_order(3, dst)] if variant == "round_robin" else names
        assert [n for n, _ in plan.groups[g].params] == order
        for r, expected in enumerate(
            _zero12_expected(order, dst, 4 if variant == "aligned" else 1)
        ):
            assert cells[g, r] == expected, (g, r)
    assert plan.source_dp == src and plan.dp == dst
    assert plan.run_sources == source.params


@pytest.mark.parametrize("dst", [1, 2, 3, 4, 7])
def test_zero3_pieces_are_each_parameters_ceil_slice(dst: int) -> None:
    # Two optimizer groups; sub_group_size small enough to cut sub-groups at every size.
    source = _source(
        "zero3", 2, [["a", "b"], ["c"], ["d", "e", "f"]], owners=[0, 0, 1], sub_group_size=40
    )
    plan = plan_universal(source, dst)  # type: ignore[arg-type]
    cells = _rebuilt(plan, source.params)
    seen = set()
    for group in plan.groups:
        for part in group.partitions:
            expected: list[object] = []
            for name, shape in group.params:
                n = zero.numel(shape)
                c = math.ceil(n / dst)
                lo = part.rank * c
                expected += [(name, i) if i < n else None for i in range(lo, lo + c)]
                seen.add(name)
            assert cells[group.index, part.rank] == expected
    assert seen == set(source.params)
    # the sub-groups are DeepSpeed's at the target size: optimizer groups never mix
    assert {g.param_group for g in plan.groups if "c" in dict(g.params)} == {0}
    assert all(dict(g.params).keys() <= {"d", "e", "f"} for g in plan.groups if g.param_group == 1)


def test_a_run_crossing_parameters_is_cut_at_their_boundaries() -> None:
    source = _source("zero", 2, [["a", "b", "c"]])
    plan = plan_universal(source, 3)  # type: ignore[arg-type]
    # 91 + 5 + 35 = 131 elements over 3 ranks of 44: rank 2's slice [88, 132) starts in `a`
    # (elements 0..90) and ends in the padding, so it reads a[88:91], b[0:5], c[0:35].
    runs = plan.groups[0].partitions[2].runs
    assert [(source.params[r.src_index], r.src_start, r.length, r.dst_start) for r in runs] == [
        ("a", 88, 3, 0),
        ("b", 0, 5, 3),
        ("c", 0, 35, 8),
    ]
