"""`reshape --dp` of MoE ZeRO-1/2 checkpoints: the plan on plain integers, and its refusals.

DeepSpeed partitions an expert group (EP size ``ep``) over the ``dp / ep`` ranks of each
expert-data-parallel group: EP rank ``e``'s local experts live in DP ranks ``e, e + ep, ...``
(tests/fixtures/moe/FORMAT-NOTES.md). A reshape keeps ``ep`` and re-splits each EP rank's buffer
over the new expert-data-parallel size; dense groups are re-split over every rank as before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsckpt.discover import zero
from dsckpt.discover.layout import open_checkpoint
from dsckpt.discover.moe import (
    ExpertGroup,
    ExpertParam,
    MoeLayer,
    MoeLayout,
    global_target,
    native_expert_name,
)
from dsckpt.discover.zero import FlatParam
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout, UsageError
from dsckpt.plan.zero_reshape import (
    Run,
    SourceFacts,
    SourceGroup,
    plan_from_facts,
)
from dsckpt.plan.zero_source import _expert_groups


def _group(*numels: int, partition_size: int, ep: int = 1, g: int = 0) -> SourceGroup:
    return SourceGroup(
        params=tuple((f"g{g}.p{i}", (n,)) for i, n in enumerate(numels)),
        param_group=g,
        partition_size=partition_size,
        ep=ep,
        label=f"ep_size_{ep}" if ep > 1 else "",
    )


def _facts(dp: int, *groups: SourceGroup, kind: str = "zero", **kw: object) -> SourceFacts:
    return SourceFacts(kind=kind, stage=2, dp=dp, groups=groups, **kw)  # type: ignore[arg-type]


def test_shrink_joins_each_ep_ranks_halves_from_its_expert_data_parallel_group() -> None:
    # EP 2 at DP 4: EDP 2; 10 + 6 = 16 elements, 8 per partition. DP 2: EDP 1, 16 in one.
    # EP rank 0's buffer is in files 0 and 2, EP rank 1's in files 1 and 3.
    plan = plan_from_facts(_facts(4, _group(10, 6, partition_size=8, ep=2)), 2)
    parts = plan.groups[0].partitions
    assert [p.numel for p in parts] == [16, 16]
    assert parts[0].runs == (Run(0, 0, 0, 8, 0), Run(2, 0, 0, 8, 8))
    assert parts[1].runs == (Run(1, 0, 0, 8, 0), Run(3, 0, 0, 8, 8))
    assert plan.groups[0].partition_count(2) == 1
    assert plan.group_paddings == ((0,), (0,))
    assert plan.slice_mappings[1][0] == (("g0.p0", 10, 0), ("g0.p1", 6, 10))
    assert plan.ep_sizes == (2,)


def test_grow_splits_each_ep_ranks_buffer_over_the_new_expert_data_parallel_group() -> None:
    # EP 2 at DP 2: EDP 1; 10 + 7 = 17 elements in 18. DP 4: EDP 2, partitions of 10: DP ranks
    # 0 and 1 take the first 10 of EP ranks 0 and 1, ranks 2 and 3 the other 7 (+3 padding).
    plan = plan_from_facts(_facts(2, _group(10, 7, partition_size=18, ep=2)), 4)
    parts = plan.groups[0].partitions
    assert [p.numel for p in parts] == [10] * 4
    assert parts[0].runs == (Run(0, 0, 0, 10, 0),)
    assert parts[1].runs == (Run(1, 0, 0, 10, 0),)
    assert parts[2].runs == (Run(0, 0, 10, 7, 0),)
    assert parts[3].runs == (Run(1, 0, 10, 7, 0),)
    assert [p.padding for p in parts] == [0, 0, 3, 3]
    assert [pad[0] for pad in plan.group_paddings] == [0, 0, 3, 3]
    assert plan.slice_mappings[0][0] == (("g0.p0", 10, 0),)
    assert plan.slice_mappings[3][0] == (("g0.p1", 7, 0),)


def test_dense_and_expert_groups_side_by_side() -> None:
    # The dense group splits over all 4 ranks, the expert group over EDP 2.
    facts = _facts(2, _group(24, partition_size=12, g=0), _group(12, partition_size=12, ep=2, g=1))
    plan = plan_from_facts(facts, 4)
    dense, experts = plan.groups
    assert [p.runs for p in dense.partitions] == [
        (Run(0, 0, 0, 6, 0),),
        (Run(0, 0, 6, 6, 0),),
        (Run(1, 0, 0, 6, 0),),
        (Run(1, 0, 6, 6, 0),),
    ]
    assert [p.runs for p in experts.partitions] == [
        (Run(0, 1, 0, 6, 0),),
        (Run(1, 1, 0, 6, 0),),
        (Run(0, 1, 6, 6, 0),),
        (Run(1, 1, 6, 6, 0),),
    ]
    assert [g.partition_count(4) for g in plan.groups] == [4, 2]
    assert "ep_size_2, EP 2" in plan.rows()[4][0]


def test_bf16_optimizer_records_the_padding_on_each_expert_groups_last_rank() -> None:
    # 10 elements at EDP 4 (DP 8, EP 2): 16 in partitions of 4. ZeRO records each rank's own
    # tail padding; BF16_Optimizer the total (6) on the last EDP rank (DP ranks 6 and 7).
    zero = plan_from_facts(_facts(2, _group(10, partition_size=10, ep=2)), 8)
    assert [p[0] for p in zero.group_paddings] == [0, 0, 0, 0, 2, 2, 4, 4]
    bf16 = plan_from_facts(_facts(2, _group(10, partition_size=10, ep=2), kind="bf16_optimizer"), 8)
    assert [p[0] for p in bf16.group_paddings] == [0, 0, 0, 0, 0, 0, 6, 6]
    assert [p.padding for p in bf16.groups[0].partitions] == [0, 0, 0, 0, 2, 2, 4, 4]


def test_ep_1_expert_groups_split_like_dense_ones() -> None:
    dense = plan_from_facts(_facts(2, _group(17, partition_size=10)), 3)
    expert = plan_from_facts(
        _facts(2, SourceGroup((("g0.p0", (17,)),), 0, 10, ep=1, label="ep_size_1")), 3
    )
    assert expert.groups[0].partitions == dense.groups[0].partitions
    assert expert.group_paddings == dense.group_paddings
    assert expert.ep_sizes == (1,) and dense.ep_sizes == ()


def test_every_element_lands_once_and_in_its_ep_ranks_files() -> None:
    # Mixed EP sizes (2 and 4) from DP 4 to DP 8 and back: each target element comes from one
    # source element of the same EP rank, and nothing is read twice.
    facts = _facts(
        4,
        _group(30, partition_size=8, g=0),
        _group(26, partition_size=14, ep=2, g=1),
        _group(13, partition_size=14, ep=4, g=2),
    )
    for dp in (8, 4, 12):
        plan = plan_from_facts(facts, dp)
        for group in plan.groups:
            seen: set[tuple[int, int]] = set()
            for part in group.partitions:
                for run in part.runs:
                    assert run.src_rank % group.ep == part.rank % group.ep
                    cells = {(run.src_rank, run.src_start + i) for i in range(run.length)}
                    assert not cells & seen
                    seen |= cells
            numel = sum(n for _, (n,) in group.params)
            assert len(seen) == numel * group.ep


@pytest.mark.parametrize(("dp", "ep"), [(3, 2), (2, 4), (6, 4), (1, 2)])
def test_dp_must_stay_a_multiple_of_every_ep_size(dp: int, ep: int) -> None:
    facts = _facts(4, _group(8, partition_size=2), _group(8, partition_size=8 // (4 // ep), ep=ep))
    with pytest.raises(UnsupportedLayout) as err:
        plan_from_facts(facts, dp)
    message = str(err.value)
    assert f"DeepSpeed requires DP to be a multiple of the expert-parallel size {ep}" in message
    assert "expert parallelism stays" in message and "\n" not in message


def test_round_robin_with_expert_groups_is_refused() -> None:
    facts = _facts(2, _group(8, partition_size=8, ep=2), round_robin=True)
    with pytest.raises(UnsupportedLayout, match="round_robin_gradients with mixture-of-experts"):
        plan_from_facts(facts, 4)


# --- the expert groups as discovery records them --------------------------------------------

MOE = Path(__file__).parents[1] / "fixtures" / "moe"


def test_expert_groups_come_from_the_moe_record() -> None:
    layout = open_checkpoint(MOE / "z2-fp32-ep2x4-dp4-mixed" / "ckpt")
    got = _expert_groups(layout, len(layout.zero_sources[0].groups))
    assert got == [(1, ""), (1, ""), (2, "ep_size_2"), (4, "ep_size_4")] * 1 + [
        (2, "ep_size_2"),
        (4, "ep_size_4"),
    ]
    layout = open_checkpoint(MOE / "z2-fp32-ep1-dp2" / "ckpt")
    assert _expert_groups(layout, 4) == [(1, ""), (1, ""), (1, "ep_size_1"), (1, "ep_size_1")]


def test_a_group_partitioned_unlike_its_record_is_an_error() -> None:
    # Without the MoE record the expert groups (partition_count 2 at DP 4) would be read as
    # dense groups split over 4 ranks: refused, never planned.
    layout = open_checkpoint(MOE / "z1-fp32-ep2-dp4" / "ckpt")
    with pytest.raises(InconsistentCheckpoint, match="group 2 is partitioned over 2 ranks at DP 4"):
        _expert_groups(dataclasses.replace(layout, moe=None), 4)


# --- any sizes: the plan moves every element of every EP rank's buffer where DeepSpeed wants it

EP = st.sampled_from([1, 2, 3, 4])
NUMELS = st.lists(st.integers(1, 40), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(ep=EP, src_k=st.integers(1, 4), dst_k=st.integers(1, 4), numels=NUMELS)
def test_any_sizes_place_each_ep_ranks_elements_as_deepspeed_partitions_them(
    ep: int, src_k: int, dst_k: int, numels: list[int]
) -> None:
    """Element ``i`` of EP rank ``e``'s flat buffer lives, at ``k`` EDP ranks with partitions of
    ``P``, in DP rank ``e + (i // P) * ep`` at offset ``i % P``: the plan from ``src_k`` to
    ``dst_k`` EDP ranks must read each target element from exactly that source element, and
    leave only DeepSpeed's tail padding unwritten."""
    data = sum(numels)
    src_size = zero.zero12_partition_size(data, src_k)
    group = _group(*numels, partition_size=src_size, ep=ep)
    plan = plan_from_facts(_facts(src_k * ep, group), dst_k * ep)
    dst_size = zero.zero12_partition_size(data, dst_k)
    (target,) = plan.groups
    assert target.partition_count(dst_k * ep) == dst_k
    for part in target.partitions:
        e, k = part.rank % ep, part.rank // ep
        assert part.numel == dst_size
        written = set()
        for run in part.runs:
            for j in range(run.length):
                i = k * dst_size + run.dst_start + j  # the element of EP rank e's buffer
                assert i < data
                assert run.src_rank == e + (i // src_size) * ep
                assert run.src_start + j == i % src_size
                written.add(run.dst_start + j)
        held = max(0, min(dst_size, data - k * dst_size))
        assert written == set(range(held))
        assert part.padding == dst_size - held


# --- a change of expert parallelism (reshape --ep) --------------------------------------------
#
# DeepSpeed (moe/experts.py, engine.py load_moe_state_dict): at EP M, EP rank e holds global
# experts e * E/M + i as local experts i; an expert group's flat buffer lists, layer by layer and
# local expert by local expert, each expert's parameters. The facts below are built the way
# discovery records a native MoE checkpoint (MoeLayout: layers, expert groups, and the global
# key of every EP rank's local parameter).

REST = (("up.weight", (3, 2)), ("down.weight", (2, 3)))


def _moe_facts(
    dp: int,
    ep: int,
    experts: int = 4,
    modules: tuple[str, ...] = ("moe1", "moe2"),
    rest: tuple[tuple[str, tuple[int, ...]], ...] = REST,
    kind: str = "zero",
) -> SourceFacts:
    """A dense group (10 elements) and one expert group at EP ``ep`` on ``dp`` ranks."""
    n_local = experts // ep
    layers = tuple(
        MoeLayer(
            ordinal=i,
            module=m,
            num_experts=experts,
            ep_size=ep,
            edp_size=dp // ep,
            group_name=f"ep_size_{ep}",
            autoep=False,
            files=(),
            keys=(),
        )
        for i, m in enumerate(modules)
    )
    local = [
        (native_expert_name(m, i, r), shape)
        for m in modules
        for i in range(n_local)
        for r, shape in rest
    ]
    offsets = [0]
    for _, shape in local:
        offsets.append(offsets[-1] + zero.numel(shape))
    params = tuple(
        ExpertParam(
            group=1,
            ep_rank=e,
            layer=next(layer.ordinal for layer in layers if name.startswith(layer.module + ".")),
            flat=FlatParam(name, shape, offsets[k]),
            name=global_target(
                next(layer for layer in layers if name.startswith(layer.module + ".")),
                name,
                shape,
                e,
            )[0],  # type: ignore[index]
            shape=shape,
            dst_start=0,
        )
        for e in range(ep)
        for k, (name, shape) in enumerate(local)
    )
    group = ExpertGroup(1, f"ep_size_{ep}", ep, dp // ep, tuple(range(len(modules))), (1,) * dp)
    moe = MoeLayout(autoep=False, layers=layers, groups=(group,), params=params)
    data = offsets[-1]
    return SourceFacts(
        kind=kind,
        stage=2,
        dp=dp,
        groups=(
            SourceGroup((("dense", (10,)),), 0, zero.zero12_partition_size(10, dp)),
            SourceGroup(
                tuple(local),
                1,
                zero.zero12_partition_size(data, dp // ep),
                ep=ep,
                label=f"ep_size_{ep}",
            ),
        ),
        moe=moe,
    )


def test_ep_2_to_1_joins_both_ep_ranks_experts_layer_by_layer() -> None:
    # EP 2 at DP 2 (EDP 1): file 0 holds experts 0-1 of each layer, file 1 experts 2-3, each
    # [moe1 e0, moe1 e1, moe2 e0, moe2 e1] in blocks of 12. EP 1 at DP 2 (EDP 2): one buffer of
    # moe1 e0..e3 then moe2 e0..e3 (96 elements), 48 per rank.
    plan = plan_from_facts(_moe_facts(2, 2), 2, ep=1)
    experts = plan.groups[1]
    assert experts.ep == 1 and experts.label == "ep_size_1" and experts.partition_count(2) == 2
    assert [p.runs for p in experts.partitions] == [
        (Run(0, 1, 0, 24, 0), Run(1, 1, 0, 24, 24)),  # moe1 experts 0-1, then 2-3
        (Run(0, 1, 24, 24, 0), Run(1, 1, 24, 24, 24)),  # moe2 experts 0-1, then 2-3
    ]
    assert [n for n, _ in experts.params][:4] == [
        "moe1.deepspeed_moe.experts.deepspeed_experts.0.up.weight",
        "moe1.deepspeed_moe.experts.deepspeed_experts.0.down.weight",
        "moe1.deepspeed_moe.experts.deepspeed_experts.1.up.weight",
        "moe1.deepspeed_moe.experts.deepspeed_experts.1.down.weight",
    ]
    assert len(experts.params) == 16
    assert plan.slice_mappings[1][1][0] == (
        "moe2.deepspeed_moe.experts.deepspeed_experts.0.up.weight",
        6,
        0,
    )
    assert plan.params_reordered  # param_shapes gets the new local names
    assert (plan.source_ep_sizes, plan.ep_sizes) == ((2,), (1,))
    # The dense group is planned as without --ep.
    assert plan.groups[0] == plan_from_facts(_moe_facts(2, 2), 2).groups[0]


def test_ep_4_to_2_while_shrinking_takes_each_new_ep_ranks_experts_from_two_files() -> None:
    # EP 4 at DP 4: file d holds expert d of each layer. EP 2 at DP 2: rank 0 holds experts 0-1
    # of moe1 (files 0, 1), then of moe2 (files 0, 1).
    plan = plan_from_facts(_moe_facts(4, 4), 2, ep=2)
    parts = plan.groups[1].partitions
    assert parts[0].runs == (
        Run(0, 1, 0, 12, 0),
        Run(1, 1, 0, 12, 12),
        Run(0, 1, 12, 12, 24),
        Run(1, 1, 12, 12, 36),
    )
    assert parts[1].runs == (
        Run(2, 1, 0, 12, 0),
        Run(3, 1, 0, 12, 12),
        Run(2, 1, 12, 12, 24),
        Run(3, 1, 12, 12, 36),
    )


def test_ep_kept_is_the_plan_without_ep() -> None:
    facts = _moe_facts(4, 2)
    assert plan_from_facts(facts, 2, ep=2) == plan_from_facts(facts, 2)


def test_ep_change_records_bf16_optimizer_padding_on_the_last_edp_rank() -> None:
    # One layer of 2 experts of 5 elements: EP 2 -> 1 at DP 4 (EDP 4): 10 elements in 16,
    # partitions of 4; BF16_Optimizer records the total padding (6) on the last rank.
    facts = _moe_facts(
        2, 2, experts=2, modules=("moe1",), rest=(("w", (5,)),), kind="bf16_optimizer"
    )
    plan = plan_from_facts(facts, 4, ep=1)
    assert [p.padding for p in plan.groups[1].partitions] == [0, 0, 2, 4]
    assert [p[1] for p in plan.group_paddings] == [0, 0, 0, 6]


@pytest.mark.parametrize(
    ("dp", "ep", "message"),
    [
        (2, 3, "--ep 3: MoE layer moe1 has 4 experts, which 3 expert-parallel ranks cannot share"),
        (
            2,
            4,
            "--dp 2: DeepSpeed requires DP to be a multiple of the expert-parallel size 4 "
            "(--ep 4; choose a multiple of 4)",
        ),  # fmt: skip
        (3, 1, None),  # EP 1: any DP
    ],
)
def test_ep_change_rules(dp: int, ep: int, message: str | None) -> None:
    facts = _moe_facts(2, 2)
    if message is None:
        plan_from_facts(facts, dp, ep=ep)
        return
    with pytest.raises(UnsupportedLayout) as err:
        plan_from_facts(facts, dp, ep=ep)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ep_change_refusals_name_the_rule() -> None:
    facts = _moe_facts(2, 2)
    dense = dataclasses.replace(facts, groups=facts.groups[:1], moe=None)
    with pytest.raises(UnsupportedLayout, match="--ep 1: the checkpoint has no mixture-of-experts"):
        plan_from_facts(dense, 2, ep=1)
    assert facts.moe is not None
    autoep = dataclasses.replace(facts, moe=dataclasses.replace(facts.moe, autoep=True))
    with pytest.raises(UnsupportedLayout, match="--ep 1: AutoEP checkpoints keep"):
        plan_from_facts(autoep, 2, ep=1)
    mixed = dataclasses.replace(
        facts, groups=(*facts.groups, dataclasses.replace(facts.groups[1], ep=1))
    )
    with pytest.raises(UnsupportedLayout, match="expert-parallel sizes 1 and 2"):
        plan_from_facts(mixed, 2, ep=1)
    zero3 = dataclasses.replace(facts, kind="zero3", stage=3)
    with pytest.raises(UnsupportedLayout, match="--ep 1: a ZeRO-3 checkpoint"):
        plan_from_facts(zero3, 2, ep=1)
    with pytest.raises(UsageError, match="--ep 0: the expert-parallel size must be at least 1"):
        plan_from_facts(facts, 2, ep=0)


def test_an_expert_group_not_in_module_order_is_refused() -> None:
    facts = _moe_facts(2, 2)
    group = facts.groups[1]
    shuffled = dataclasses.replace(
        group, params=(group.params[2], *group.params[:2], *group.params[3:])
    )
    facts = dataclasses.replace(facts, groups=(facts.groups[0], shuffled))
    with pytest.raises(UnsupportedLayout, match="does not list its parameters layer by layer"):
        plan_from_facts(facts, 2, ep=1)


def test_a_global_expert_no_file_holds_is_an_error() -> None:
    facts = _moe_facts(2, 2)
    assert facts.moe is not None
    missing = facts.moe.params[-1].name
    moe = dataclasses.replace(facts.moe, params=facts.moe.params[:-1])
    with pytest.raises(InconsistentCheckpoint, match=f"no EP rank's files hold {missing}"):
        plan_from_facts(dataclasses.replace(facts, moe=moe), 2, ep=1)


@settings(max_examples=150, deadline=None)
@given(
    experts=st.sampled_from([1, 2, 4, 6, 8]),
    layers=st.integers(1, 2),
    src=st.tuples(st.integers(1, 8), st.integers(1, 3)),
    dst=st.tuples(st.integers(1, 8), st.integers(1, 3)),
    widths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
)
def test_any_ep_change_reads_each_element_from_its_global_experts_source(
    experts: int,
    layers: int,
    src: tuple[int, int],
    dst: tuple[int, int],
    widths: list[int],
) -> None:
    """Element ``j`` of target EP rank ``e``'s local expert ``i`` (layer, parameter) is element
    ``j`` of global expert ``G = e * E/M + i``: in source EP rank ``G // n_s``'s buffer, at that
    rank's local expert ``G % n_s``'s offset, which lives in DP rank ``R + (pos // P) * ep_s`` at
    ``pos % P``. Only DeepSpeed's tail padding is left unwritten."""
    ep_s, ep_t = src[0], dst[0]
    if experts % ep_s or experts % ep_t:
        return
    dp_s, dp_t = ep_s * src[1], ep_t * dst[1]
    modules = tuple(f"moe{i}" for i in range(layers))
    rest = tuple((f"p{k}.weight", (w,)) for k, w in enumerate(widths))
    facts = _moe_facts(dp_s, ep_s, experts, modules, rest)
    plan = plan_from_facts(facts, dp_t, ep=ep_t)
    size = sum(widths)

    def offset(module: int, local: int, n_local: int) -> int:
        return (module * n_local + local) * size

    n_s, n_t = experts // ep_s, experts // ep_t
    src_size = facts.groups[1].partition_size
    target = plan.groups[1]
    dst_size = target.partitions[0].numel
    data = layers * n_t * size
    assert dst_size == zero.zero12_partition_size(data, dp_t // ep_t)
    for part in target.partitions:
        e, k = part.rank % ep_t, part.rank // ep_t
        written = set()
        for run in part.runs:
            for j in range(run.length):
                pos = k * dst_size + run.dst_start + j  # in target EP rank e's buffer
                module, inner = divmod(pos, n_t * size)
                local, within = divmod(inner, size)
                g = e * n_t + local
                src_pos = offset(module, g % n_s, n_s) + within
                assert run.src_rank == g // n_s + (src_pos // src_size) * ep_s
                assert run.src_start + j == src_pos % src_size
                written.add(run.dst_start + j)
        held = max(0, min(dst_size, data - k * dst_size))
        assert written == set(range(held))
        assert part.padding == dst_size - held


def test_a_module_path_holding_deepspeed_moe_plans_like_any_other() -> None:
    # A MoE layer under a container attribute named deepspeed_moe: its keys read
    # net.deepspeed_moe.mlp.deepspeed_moe.experts...; the layer is found by its whole path (the
    # plan once cut the name at the first ".deepspeed_moe." and failed with a KeyError).
    odd = plan_from_facts(_moe_facts(2, 2, modules=("net.deepspeed_moe.mlp",)), 4, ep=1)
    plain = plan_from_facts(_moe_facts(2, 2, modules=("mlp",)), 4, ep=1)
    assert odd.groups[1].partitions == plain.groups[1].partitions
    assert odd.groups[1].params[0][0] == (
        "net.deepspeed_moe.mlp.deepspeed_moe.experts.deepspeed_experts.0.up.weight"
    )


def test_ep_change_of_a_round_robin_ep_1_checkpoint_is_refused() -> None:
    # Saved at EP 1 on one rank, round robin leaves the expert group in module order, so the
    # saved-layout checks pass; at EP 2 on DP 4 DeepSpeed round-robins each EP rank's 4
    # parameters over its 2 EDP ranks (0.up, 1.up, 0.down, 1.down), which the re-grouping does
    # not do: it wrote them in module order.
    facts = dataclasses.replace(_moe_facts(1, 1, modules=("moe1",)), round_robin=True)
    with pytest.raises(UnsupportedLayout, match="round_robin_gradients with mixture-of-experts"):
        plan_from_facts(facts, 4, ep=2)
    plan_from_facts(facts, 4)  # EP 1 kept: round robin over all 4 ranks, as for a dense group
