"""Property tests of the pure partition arithmetic: for any sizes and degrees, partitioning,
un-partitioning and re-partitioning give back the same elements.

The fixtures pin the arithmetic to what real DeepSpeed wrote for a few shapes; these tests cover
the shapes and degrees no fixture has (a parameter spanning many ranks, ranks holding only
padding, degrees that do not divide each other). Values are element indices, so a misplaced
element shows where it came from.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from dsckpt.discover import zero
from dsckpt.plan import maps, zero_reshape

SHAPE = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
SHAPES = st.lists(SHAPE, min_size=1, max_size=6)
DEGREE = st.integers(1, 12)
settings.register_profile("dsckpt", max_examples=200, deadline=None)
settings.load_profile("dsckpt")


def _named(shapes: list[tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"p{i}", shape) for i, shape in enumerate(shapes)]


Ranks = list[list[list[int]]]  # [rank][sub-group] -> the rank's flat tensor


def _partition_zero12(flat: list[int], group: zero.Zero12Group) -> Ranks:
    """What each rank saves: its slice of the flat buffer, padded with -1 to the partition size
    (one flat tensor per rank: ZeRO-1/2 groups have no sub-groups)."""
    padded = flat + [-1] * (group.padded_numel - len(flat))
    size = group.partition_size
    return [[padded[r * size : (r + 1) * size]] for r in range(group.dp)]


def _gather(group: zero.Zero12Group | zero.Zero3Layout, param, ranks: Ranks) -> list[int]:
    """Un-partition: the parameter's elements, put together from its pieces."""
    out: list[int | None] = [None] * param.numel
    for piece in group.pieces(param):
        src = ranks[piece.rank][piece.sub_group]
        for i in range(piece.length):
            assert out[piece.dst_start + i] is None, "two pieces write one element"
            out[piece.dst_start + i] = src[piece.src_start + i]
    assert None not in out, "an element no piece covers"
    return out  # type: ignore[return-value]


@given(SHAPES, DEGREE, st.data())
def test_zero12_partition_round_trip(shapes, dp, data) -> None:
    pads = data.draw(st.lists(st.integers(0, 3), min_size=len(shapes), max_size=len(shapes)))
    pads[-1] = 0  # DeepSpeed pads after every parameter but the last
    group = zero.zero12_group(_named(shapes), dp, alignment_paddings=pads)
    assert group.padded_numel >= group.data_numel
    assert group.padded_numel % (zero.NCCL_START_ALIGNMENT_FACTOR * dp) == 0
    flat = list(range(group.data_numel))
    ranks = _partition_zero12(flat, group)
    for param in group.params:
        expected = flat[param.offset : param.offset + param.numel]
        assert _gather(group, param, ranks) == expected
    for rank in range(dp):
        assert ranks[rank][0].count(-1) == group.tail_padding(rank)


@given(SHAPES, DEGREE, DEGREE)
def test_zero12_repartition_keeps_every_element(shapes, dp, new_dp) -> None:
    """Consolidate from ``dp`` ranks, partition again for ``new_dp``, consolidate again."""
    old = zero.zero12_group(_named(shapes), dp)
    old_ranks = _partition_zero12(list(range(old.data_numel)), old)
    params = [_gather(old, p, old_ranks) for p in old.params]
    new = zero.zero12_group(_named(shapes), new_dp)
    new_ranks = _partition_zero12([x for p in params for x in p], new)
    assert [_gather(new, p, new_ranks) for p in new.params] == params


@given(st.lists(SHAPES, min_size=1, max_size=3), DEGREE)
def test_zero3_partition_round_trip(sub_groups, dp) -> None:
    layout = zero.zero3_layout([_named(s) for s in sub_groups], dp)
    ranks: Ranks = [[[] for _ in sub_groups] for _ in range(dp)]
    params = {}
    start = 0
    for param in layout.params:  # each parameter is padded to dp * ceil(numel / dp) and split
        values = list(range(start, start + param.numel))
        start += param.numel
        params[param] = values
        per_rank = zero.zero3_partition_numel(param.numel, dp)
        padded = values + [-1] * (per_rank * dp - param.numel)
        for r in range(dp):
            assert len(ranks[r][param.sub_group]) == param.offset
            ranks[r][param.sub_group].extend(padded[r * per_rank : (r + 1) * per_rank])
    for r in range(dp):
        assert [len(flat) for flat in ranks[r]] == list(layout.sub_group_numels)
    for param, values in params.items():
        assert _gather(layout, param, ranks) == values


@st.composite
def _dimension(draw):
    src, dst = draw(DEGREE), draw(DEGREE)
    n_blocks = draw(st.integers(1, 3))
    step = math.lcm(src, dst)
    blocks = [step * draw(st.integers(1, 3)) for _ in range(n_blocks)]
    return src, dst, blocks


def _split(full: list[int], blocks: list[int], degree: int) -> list[list[int]]:
    """Megatron's slices of a fused dimension: rank r holds the r-th chunk of every block."""
    out: list[list[int]] = [[] for _ in range(degree)]
    start = 0
    for size in blocks:
        chunk = size // degree
        for r in range(degree):
            out[r].extend(full[start + r * chunk : start + (r + 1) * chunk])
        start += size
    return out


@given(_dimension())
def test_tp_reshard_is_the_split_at_the_new_degree(dim) -> None:
    src, dst, blocks = dim
    full = list(range(sum(blocks)))
    source = _split(full, blocks, src)
    plan = maps.reshard_dim(sum(blocks), src, dst, blocks=blocks if len(blocks) > 1 else 1)
    rebuilt = []
    for pieces in plan.pieces:
        local: list[int] = []
        for piece in pieces:
            assert piece.dst_start == len(local), "pieces tile the target slice in order"
            local.extend(source[piece.src][piece.src_start : piece.src_start + piece.length])
        rebuilt.append(local)
    assert rebuilt == _split(full, blocks, dst)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), DEGREE, DEGREE)
def test_zero3_reshape_rule_gives_each_rank_its_pieces(numels, src_dp, dst_dp) -> None:
    """A ZeRO-3 sub-group's partitions at ``dst_dp`` (the rule form the writer asks rank by
    rank) fill every target rank's tensor with its ``ceil(numel/dst_dp)`` piece of each
    parameter, element by element from the source ranks' tensors, and count the rest as padding.
    At an unchanged size the tensors come back whole, padding included."""
    src: list[list[object]] = [[] for _ in range(src_dp)]
    pieces = []
    for i, n in enumerate(numels):
        c = zero.zero3_partition_numel(n, src_dp)
        pieces.append((n, 0, len(src[0])))
        for r in range(src_dp):
            src[r].extend((i, e) if e < n else ("pad", r, e) for e in range(r * c, (r + 1) * c))
    parts = zero_reshape.Zero3Partitions(src_dp, dst_dp, tuple(pieces))
    assert len(parts) == dst_dp
    for rank, part in enumerate(parts):
        got: list[object] = [None] * part.numel
        for run in part.runs:
            assert run.src_index == 0
            for k in range(run.length):
                assert got[run.dst_start + k] is None, "two runs write one element"
                got[run.dst_start + k] = src[run.src_rank][run.src_start + k]
        want: list[object] = []
        for i, n in enumerate(numels):
            c = zero.zero3_partition_numel(n, dst_dp)
            want.extend((i, e) if e < n else None for e in range(rank * c, (rank + 1) * c))
        if src_dp == dst_dp:
            assert got == src[rank]
        else:
            assert got == want
        assert part.padding == sum(1 for w in want if w is None)
