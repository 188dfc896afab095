"""Tests for dsckpt.plan.maps: integers only, except the tests marked as comparing with DeepSpeed.

The DeepSpeed comparisons import DeepSpeed inside the test (a test-only dependency) and skip when
it is absent. The pipeline-partition comparison runs DeepSpeed's real
``PipelineModule._partition_layers`` (with its real ``_count_layer_params``,
``_find_layer_type``, ``partition_uniform`` and ``partition_balanced``) on real ``LayerSpec``s and
modules, bound to a PipelineModule whose constructor is skipped: the constructor needs a process
group of ``num_stages`` ranks, which one test process cannot provide, and it only sets the few
attributes the partitioner reads (supplied here, with a real DeepSpeed topology).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from dsckpt.plan import maps
from dsckpt.plan.maps import MapError, Piece, Topology

DEGREES = range(1, 9)


# --------------------------------------------------------------------------------------------
# Topology and ranks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2", None])
def test_topology_rejects_bad_degrees(bad: object) -> None:
    with pytest.raises(MapError):
        Topology(pp=bad, tp=1, dp=1)  # type: ignore[arg-type]
    with pytest.raises(MapError):
        Topology(pp=1, tp=bad, dp=1)  # type: ignore[arg-type]
    with pytest.raises(MapError):
        Topology(pp=1, tp=1, dp=bad)  # type: ignore[arg-type]


def test_topology_is_frozen_and_hashable() -> None:
    topo = Topology(pp=2, tp=2, dp=3)
    with pytest.raises(AttributeError):
        topo.pp = 4  # type: ignore[misc]
    assert {topo, Topology(2, 2, 3)} == {topo}
    assert topo.world_size == 12
    assert topo.mp_world_size == 4


def test_rank_round_trips_for_every_shape() -> None:
    for pp, tp, dp in itertools.product(DEGREES, DEGREES, DEGREES):
        topo = Topology(pp=pp, tp=tp, dp=dp)
        seen = []
        for stage, d, t in itertools.product(range(pp), range(dp), range(tp)):
            rank = topo.global_rank(stage, d, t)
            assert topo.coord(rank) == maps.RankCoord(stage, d, t)
            seen.append(rank)
        # Enumerating (pipe, data, model) with model fastest gives 0, 1, 2, ... in order.
        assert seen == list(range(topo.world_size))
        mps = [topo.mp_rank(s, t) for s in range(pp) for t in range(tp)]
        assert mps == list(range(pp * tp))
        assert all(
            topo.mp_coord(topo.mp_rank(s, t)) == (s, t) for s in range(pp) for t in range(tp)
        )
        files = sorted(
            topo.zero_file_index(s, t, d)
            for s, t, d in itertools.product(range(pp), range(tp), range(dp))
        )
        assert files == list(range(topo.world_size))


def test_rank_formula_examples() -> None:
    topo = Topology(pp=4, tp=2, dp=2)
    assert topo.global_rank(stage=1, dp_rank=1, tp_rank=0) == 6
    assert topo.coord(13) == maps.RankCoord(stage=3, dp_rank=0, tp_rank=1)
    assert topo.mp_rank(stage=3, tp_rank=1) == 7
    # DeepSpeed's file order: dp-major, then mp_rank.
    assert topo.zero_file_index(stage=0, tp_rank=0, dp_rank=1) == 8


def test_rank_arguments_are_bounds_checked() -> None:
    topo = Topology(pp=2, tp=2, dp=2)
    for call in (
        lambda: topo.global_rank(2, 0, 0),
        lambda: topo.global_rank(0, 2, 0),
        lambda: topo.global_rank(0, 0, -1),
        lambda: topo.coord(8),
        lambda: topo.mp_rank(0, 2),
        lambda: topo.mp_coord(4),
    ):
        with pytest.raises(MapError):
            call()


# --------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------


def _g(*groups: list[int]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(g) for g in groups)


def test_megatron_documented_16_gpu_example() -> None:
    # Megatron-LM's initialize_model_parallel docstring: 16 GPUs, TP 2, PP 4.
    groups = maps.megatron_groups(16, tp=2, pp=4)
    assert groups.data == _g([0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15])
    assert groups.tensor == _g([0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15])
    assert groups.pipeline == _g([0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15])
    assert groups.model == _g([0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15])
    assert maps.deepspeed_groups(Topology(pp=4, tp=2, dp=2)) == groups


# The calls at the bottom of DeepSpeed's reshape_meg_2d.py: get_mpu_ranks(tp, pp, dp). Its
# returned lists are (TP groups, "PP" groups, DP groups), where "PP" is really the model-parallel
# groups. Expected values worked out from Megatron's construction.
MPU_EXAMPLES = {
    (2, 2, 2): (
        _g([0, 1], [2, 3], [4, 5], [6, 7]),
        _g([0, 1, 4, 5], [2, 3, 6, 7]),
        _g([0, 2], [1, 3], [4, 6], [5, 7]),
    ),
    (4, 2, 1): (
        _g([0, 1, 2, 3], [4, 5, 6, 7]),
        _g([0, 1, 2, 3, 4, 5, 6, 7]),
        _g([0], [1], [2], [3], [4], [5], [6], [7]),
    ),
    (2, 4, 1): (
        _g([0, 1], [2, 3], [4, 5], [6, 7]),
        _g([0, 1, 2, 3, 4, 5, 6, 7]),
        _g([0], [1], [2], [3], [4], [5], [6], [7]),
    ),
    (1, 1, 8): (
        _g([0], [1], [2], [3], [4], [5], [6], [7]),
        _g([0], [1], [2], [3], [4], [5], [6], [7]),
        _g([0, 1, 2, 3, 4, 5, 6, 7]),
    ),
}


@pytest.mark.parametrize("shape", sorted(MPU_EXAMPLES))
def test_deepspeed_get_mpu_ranks_examples(shape: tuple[int, int, int]) -> None:
    tp, pp, dp = shape
    groups = maps.megatron_groups(tp * pp * dp, tp=tp, pp=pp)
    assert (groups.tensor, groups.model, groups.data) == MPU_EXAMPLES[shape]
    assert maps.deepspeed_groups(Topology(pp=pp, tp=tp, dp=dp)) == groups


def _assert_partition(groups: tuple[tuple[int, ...], ...], world: int, size: int) -> None:
    flat = [r for g in groups for r in g]
    assert sorted(flat) == list(range(world))
    assert all(len(g) == size for g in groups)


def test_groups_partition_ranks_and_agree_for_every_shape() -> None:
    for pp, tp, dp in itertools.product(DEGREES, DEGREES, DEGREES):
        topo = Topology(pp=pp, tp=tp, dp=dp)
        world = topo.world_size
        mg = maps.megatron_groups(world, tp=tp, pp=pp)
        assert maps.deepspeed_groups(topo) == mg
        _assert_partition(mg.tensor, world, tp)
        _assert_partition(mg.pipeline, world, pp)
        _assert_partition(mg.data, world, dp)
        _assert_partition(mg.model, world, pp * tp)
        for g in mg.tensor:  # same stage and replica, tp ranks 0..tp-1 in order
            coords = [topo.coord(r) for r in g]
            assert [c.tp_rank for c in coords] == list(range(tp))
            assert len({(c.stage, c.dp_rank) for c in coords}) == 1
        for g in mg.pipeline:
            coords = [topo.coord(r) for r in g]
            assert [c.stage for c in coords] == list(range(pp))
            assert len({(c.dp_rank, c.tp_rank) for c in coords}) == 1
        for g in mg.data:
            coords = [topo.coord(r) for r in g]
            assert [c.dp_rank for c in coords] == list(range(dp))
            assert len({(c.stage, c.tp_rank) for c in coords}) == 1
        for d, g in enumerate(mg.model):  # a process's index in its model group is its mp_rank
            for index, r in enumerate(g):
                c = topo.coord(r)
                assert c.dp_rank == d
                assert topo.mp_rank(c.stage, c.tp_rank) == index


def test_megatron_groups_rejects_indivisible_world() -> None:
    with pytest.raises(MapError, match="not divisible"):
        maps.megatron_groups(10, tp=4, pp=1)


def test_groups_match_deepspeed_topology_and_get_mpu_ranks(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.checkpoint.reshape_meg_2d import get_mpu_ranks
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    for pp, tp, dp in itertools.product(range(1, 5), range(1, 5), range(1, 5)):
        topo = Topology(pp=pp, tp=tp, dp=dp)
        ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        for c, rank in ds.mapping.items():  # get_coord is a linear scan; the mapping is the same
            assert topo.coord(rank) == maps.RankCoord(c.pipe, c.data, c.model)
        ours = maps.deepspeed_groups(topo)
        assert ours.tensor == _g(*ds.get_axis_comm_lists("model"))
        assert ours.pipeline == _g(*ds.get_axis_comm_lists("pipe"))
        assert ours.data == _g(*ds.get_axis_comm_lists("data"))
        assert ours.model == _g(*(sorted(ds.get_axis_list("data", d)) for d in range(dp)))
        tp_lists, model_lists, dp_lists = get_mpu_ranks(tp_size=tp, pp_size=pp, dp_size=dp)
        assert (ours.tensor, ours.model, ours.data) == (
            _g(*tp_lists),
            _g(*model_lists),
            _g(*dp_lists),
        )
    capsys.readouterr()  # get_mpu_ranks prints


# --------------------------------------------------------------------------------------------
# Pipeline partitioning
# --------------------------------------------------------------------------------------------


def test_partition_uniform_examples() -> None:
    assert maps.partition_uniform(10, 4) == [0, 3, 6, 8, 10]
    assert maps.partition_uniform(8, 4) == [0, 2, 4, 6, 8]
    assert maps.partition_uniform(4, 4) == [0, 1, 2, 3, 4]
    # More stages than layers: DeepSpeed leaves the trailing stages empty instead of failing.
    assert maps.partition_uniform(2, 5) == [0, 1, 2, 2, 2, 2]
    assert maps.partition_uniform(0, 3) == [0, 0, 0, 0]
    with pytest.raises(MapError):
        maps.partition_uniform(3, 0)


def test_partition_uniform_properties() -> None:
    for n in range(0, 40):
        for m in range(1, 12):
            parts = maps.partition_uniform(n, m)
            sizes = [b - a for a, b in itertools.pairwise(parts)]
            assert parts[0] == 0 and parts[-1] == n and len(parts) == m + 1
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)  # the extra layers go to the first stages


UNBALANCED = [5, 4, 8, 13, 6, 18, 1, 15]


def test_partition_balanced_examples() -> None:
    assert maps.partition_balanced([1, 1, 1, 1], 2) == [0, 2, 4]
    assert maps.partition_balanced([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    assert maps.partition_balanced([0, 1, 1, 1, 1, 0], 2) == [0, 3, 6]
    assert maps.partition_balanced([3, 3], 3) == [0, 1, 2, 2]
    # DeepSpeed's programme minimises neither the largest stage ([0, 1, 2, 4] would give 9, not
    # 10) nor, always, the spread ([0, 2, 3, 5, 6, 8] would give 19 - 8 = 11, not 18 - 6 = 12).
    # Its choice is what the checkpoint holds, so it is reproduced, not "improved".
    assert maps.partition_balanced([1, 9, 2, 3], 3) == [0, 2, 3, 4]
    assert maps.partition_balanced(UNBALANCED, 5) == [0, 3, 4, 5, 6, 8]
    with pytest.raises(MapError):
        maps.partition_balanced([1, -1, 2], 2)


def test_partition_layers_dispatch_and_errors() -> None:
    types = [
        "EmbeddingPipe",
        None,
        "ParallelTransformerLayerPipe",
        "ParallelTransformerLayerPipe",
        "<lambda>",
        "MixedFusedLayerNorm",
    ]
    assert maps.partition_layers("UNIFORM", 2, num_layers=6) == [0, 3, 6]
    assert maps.partition_layers("Type:Transformer", 2, layer_types=types) == [0, 3, 6]
    assert maps.partition_layers("type:transformer|embedding", 3, layer_types=types) == (
        maps.partition_balanced([1, 0, 1, 1, 0, 0], 3)
    )
    # Only the text between the first two colons is the pattern, as in DeepSpeed.
    assert maps.partition_layers("type:norm:ignored", 2, layer_types=types) == (
        maps.partition_balanced([0, 0, 0, 0, 0, 1], 2)
    )
    assert maps.partition_layers("parameters", 2, param_counts=[10, 0, 5, 5, 0, 1]) == (
        maps.partition_balanced([10, 0, 5, 5, 0, 1], 2)
    )
    with pytest.raises(MapError, match="matches none"):
        maps.partition_layers("type:attention", 2, layer_types=types)
    with pytest.raises(MapError, match="not one DeepSpeed implements"):
        maps.partition_layers("profile", 2, num_layers=6)
    with pytest.raises(MapError, match="needs param_counts"):
        maps.partition_layers("parameters", 2, num_layers=6)
    with pytest.raises(MapError, match="inconsistent"):
        maps.partition_layers("uniform", 2, num_layers=5, layer_types=types)
    with pytest.raises(MapError, match="invalid regex"):
        maps.partition_layers("type:(", 2, layer_types=types)


def test_layer_stage_and_stage_layers() -> None:
    parts = [0, 3, 3, 5]
    assert maps.layer_stage(parts) == [0, 0, 0, 2, 2]
    assert maps.stage_layers(parts, 1) == range(3, 3)
    assert maps.stage_layers(parts, 2) == range(3, 5)
    for bad in ([], [0], [1, 2], [0, 2, 1]):
        with pytest.raises(MapError):
            maps.layer_stage(bad)


def test_partition_functions_match_deepspeed_utils() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import utils as ds_utils

    rng = random.Random(1234)
    for n in range(0, 14):
        for m in range(1, 9):
            assert maps.partition_uniform(n, m) == ds_utils.partition_uniform(n, m)
    cases = []
    for _ in range(150):
        n = rng.randint(0, 18)
        m = rng.randint(1, 7)
        kind = rng.choice(["small", "binary", "params", "zeros"])
        if kind == "small":
            w = [rng.randint(0, 5) for _ in range(n)]
        elif kind == "binary":
            w = [rng.randint(0, 1) for _ in range(n)]
        elif kind == "params":
            w = [rng.choice([0, 1024, 4096, 1 << 20, 3 << 20, 12 << 20]) for _ in range(n)]
        else:
            w = [0] * n
        cases.append((w, m))
    # Exact float64 behaviour past 2**53 (prefix sums that numpy rounds).
    cases.append(([2**53 + 1, 1, 1, 2**53 + 3, 5], 2))
    cases += [([1, 9, 2, 3], 3), (UNBALANCED, 5)]
    for w, m in cases:
        expected = [int(x) for x in ds_utils.partition_balanced(w, m)]
        assert maps.partition_balanced(w, m) == expected, (w, m)


def test_partition_layers_matches_real_pipeline_module(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("deepspeed")
    import functools

    import torch
    from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    hidden = 4

    class EmbeddingPipe(torch.nn.Embedding):
        pass

    class ParallelTransformerLayerPipe(torch.nn.Module):
        def __init__(self, h: int, mult: int = 4) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(h, 3 * h)
            self.mlp = torch.nn.Linear(h, mult * h)

    class MixedFusedLayerNorm(torch.nn.LayerNorm):
        pass

    class FrozenHead(torch.nn.Module):
        def __init__(self, h: int) -> None:
            super().__init__()
            self.frozen = torch.nn.Linear(h, h)
            self.frozen.requires_grad_(False)
            self.live = torch.nn.Parameter(torch.zeros(3))

    def _to_float16(x: object) -> object:
        return x

    def _scale(x: object, factor: int) -> object:
        return x

    def build_specs(num_blocks: int, mults: list[int]) -> tuple[list[object], list[int], list]:
        # Shaped like Megatron-DeepSpeed's GPT specs: functions, lambdas, tied embeddings.
        specs: list[object] = [
            _to_float16,
            TiedLayerSpec("embed", EmbeddingPipe, 11, hidden),
            lambda x: x,
        ]
        specs += [
            LayerSpec(ParallelTransformerLayerPipe, hidden, mults[i % len(mults)])
            for i in range(num_blocks)
        ]
        specs += [
            lambda x: x,
            LayerSpec(MixedFusedLayerNorm, hidden),
            TiedLayerSpec("embed", EmbeddingPipe, 11, hidden),
            functools.partial(_scale, factor=2),  # no __name__: DeepSpeed never matches it
            FrozenHead(hidden),
        ]
        counts, names = [], []
        for spec in specs:
            if isinstance(spec, LayerSpec):
                module = spec.build()
                names.append(spec.typename.__name__)
            elif isinstance(spec, torch.nn.Module):
                module = spec
                names.append(type(spec).__name__)
            else:
                module = None
                names.append(getattr(spec, "__name__", None))
            counts.append(
                0
                if module is None
                else sum(p.numel() for p in module.parameters() if p.requires_grad)
            )
        return specs, counts, names

    def deepspeed_parts(specs: list[object], stages: int, method: str) -> list[int]:
        module = PipelineModule.__new__(PipelineModule)
        torch.nn.Module.__init__(module)
        module.num_stages = stages
        module._topo = PipeDataParallelTopology(num_pp=stages, num_dp=1)
        module.global_rank = 0
        module.loss_fn = None
        module._layer_specs = list(specs)
        module._partition_layers(method=method)
        return [int(x) for x in module.parts]

    methods = [
        "uniform",
        "parameters",
        "type:transformer",
        "type:Transformer|embedding",
        "TYPE:norm|head",
        "type:^_to",
    ]
    checked = 0
    for num_blocks, mults in [(1, [4]), (2, [4]), (3, [4, 1]), (5, [2, 4, 8]), (8, [4])]:
        specs, counts, names = build_specs(num_blocks, mults)
        for stages in sorted({1, 2, 3, 4, 5, len(specs) - 1, len(specs), len(specs) + 2}):
            for method in methods:
                expected = deepspeed_parts(specs, stages, method)
                got = maps.partition_layers(
                    method,
                    stages,
                    num_layers=len(specs),
                    param_counts=counts,
                    layer_types=names,
                )
                assert got == expected, (num_blocks, stages, method)
                checked += 1
    assert checked > 100
    capsys.readouterr()  # DeepSpeed prints the partition on rank 0


# --------------------------------------------------------------------------------------------
# Interval overlaps and TP splits
# --------------------------------------------------------------------------------------------


def _apply(pieces: tuple[Piece, ...], sources: list[list[int]], length: int) -> list[int]:
    out: list[int | None] = [None] * length
    for p in pieces:
        assert p.length > 0
        for i in range(p.length):
            assert out[p.dst_start + i] is None, "pieces overlap in the target"
            out[p.dst_start + i] = sources[p.src][p.src_start + i]
    assert None not in out, "pieces leave a hole in the target"
    return out  # type: ignore[return-value]


def test_overlap_pieces_tile_both_sides() -> None:
    rng = random.Random(7)
    for _ in range(300):
        total = rng.randint(0, 30)

        def bounds(k: int, total: int = total) -> list[int]:
            cuts = sorted(rng.randint(0, total) for _ in range(k - 1))
            return [0, *cuts, total]

        src, dst = bounds(rng.randint(1, 6)), bounds(rng.randint(1, 6))
        full = list(range(total))
        src_parts = [full[a:b] for a, b in itertools.pairwise(src)]
        result = maps.overlap_pieces(src, dst)
        used = [0] * total
        for d, pieces in enumerate(result):
            a, b = dst[d], dst[d + 1]
            assert _apply(pieces, src_parts, b - a) == full[a:b]
            for p in pieces:
                for i in range(p.length):
                    used[src[p.src] + p.src_start + i] += 1
        assert used == [1] * total  # every source element is used exactly once
    with pytest.raises(MapError, match="different totals"):
        maps.overlap_pieces([0, 4], [0, 5])


def _local_slices(full: list[int], blocks: tuple[int, ...], degree: int) -> list[list[int]]:
    """Independent reference: rank r holds the r-th even chunk of every block, in block order."""
    slices: list[list[int]] = [[] for _ in range(degree)]
    offset = 0
    for size in blocks:
        step = size // degree
        for r in range(degree):
            slices[r] += full[offset + r * step : offset + (r + 1) * step]
        offset += size
    return slices


def test_reshard_dim_tiles_for_many_shapes() -> None:
    layouts: list[tuple[object, int]] = [(1, 1), (2, 1), (3, 1), (1, 3), (2, 2), ("gqa", 2)]
    checked = 0
    for (blocks, unit), a, b in itertools.product(layouts, DEGREES, DEGREES):
        lcm = math.lcm(a, b)
        for mult in (1, 2):
            if blocks == "gqa":  # Q of 4 units per KV unit, uneven block sizes
                spec: object = [4 * lcm * unit * mult, lcm * unit * mult, lcm * unit * mult]
            else:
                spec = blocks
            k = 3 if blocks == "gqa" else int(blocks)  # type: ignore[call-overload]
            size = sum(spec) if isinstance(spec, list) else k * lcm * unit * mult
            r = maps.reshard_dim(size, a, b, blocks=spec, unit=unit)  # type: ignore[arg-type]
            full = list(range(size))
            src = _local_slices(full, r.blocks, a)
            dst = _local_slices(full, r.blocks, b)
            assert r.src_local_size == len(src[0]) and r.dst_local_size == len(dst[0])
            assert len(r.pieces) == b
            used = {(s, i): 0 for s in range(a) for i in range(len(src[0]))}
            for d in range(b):
                assert _apply(r.pieces[d], src, len(dst[d])) == dst[d]
                for p in r.pieces[d]:
                    assert p.length % unit == 0 and p.src_start % unit == 0
                    for i in range(p.length):
                        used[(p.src, p.src_start + i)] += 1
            assert set(used.values()) == {1}
            checked += 1
    assert checked == len(layouts) * 64 * 2


def test_reshard_dim_examples() -> None:
    # 2 -> 3 on a dimension of 12: each target rank takes 4 of the 6 elements per source rank.
    r = maps.reshard_dim(12, 2, 3)
    assert r.pieces == (
        (Piece(0, 0, 4, 0),),
        (Piece(0, 4, 2, 0), Piece(1, 0, 2, 2)),
        (Piece(1, 2, 4, 0),),
    )
    # An unchanged degree is one piece per rank, even for a fused dimension.
    assert maps.reshard_dim(12, 2, 2, blocks=2).pieces == (
        (Piece(0, 0, 6, 0),),
        (Piece(1, 0, 6, 0),),
    )
    # Splitting a full gated-MLP weight [gate; up] (each 6) over 2 ranks: [gate_r; up_r].
    assert maps.reshard_dim(12, 1, 2, blocks=2).pieces == (
        (Piece(0, 0, 3, 0), Piece(0, 6, 3, 3)),
        (Piece(0, 3, 3, 0), Piece(0, 9, 3, 3)),
    )
    # Merging 2 gated ranks back into the full weight.
    assert maps.reshard_dim(12, 2, 1, blocks=2).pieces == (
        (Piece(0, 0, 3, 0), Piece(1, 0, 3, 3), Piece(0, 3, 3, 6), Piece(1, 3, 3, 9)),
    )
    assert maps.reshard_dim(0, 2, 4).pieces == ((), (), (), ())
    assert Piece(3, 0, 1, 0).src_rank == 3


def test_reshard_dim_errors_name_possible_degrees() -> None:
    with pytest.raises(MapError, match=r"across 3 target ranks: possible degrees are 1, 2, 5, 10$"):
        maps.reshard_dim(10, 2, 3)
    with pytest.raises(MapError, match=r"across 4 source ranks: possible degrees are 1, 2$"):
        maps.reshard_dim(12, 4, 1, blocks=2, unit=3)  # 2 heads of 3 rows per block
    with pytest.raises(MapError, match="block sizes"):
        maps.reshard_dim(12, 1, 1, blocks=[5, 5])
    with pytest.raises(MapError, match="equal blocks"):
        maps.reshard_dim(10, 1, 1, blocks=3)
    with pytest.raises(MapError, match="units of 4"):
        maps.reshard_dim(12, 1, 1, unit=4, blocks=[6, 6])
    with pytest.raises(MapError, match=r"any divisor of 720720"):
        maps.even_bounds(720720, 17)
    assert maps.possible_degrees(24, blocks=2) == [1, 2, 3, 4, 6, 12]
    assert maps.possible_degrees(96, blocks=1, unit=12, limit=4) == [1, 2, 4]
    assert maps.even_bounds(12, 3) == [0, 4, 8, 12]


# --------------------------------------------------------------------------------------------
# 2D and 3D maps
# --------------------------------------------------------------------------------------------


def _mp_ranks(target: maps.ModelTarget) -> list[int]:
    return [s.mp_rank for s in target.sources]


def test_deepspeed_reshape_example_2x2_to_1x1() -> None:
    # reshape_meg_2d.py: reshape([2,2,1],[1,1,1]), "easy" (args are tp, pp, dp).
    # DeepSpeed's 2D map for it: {"0,0": [0, 1, 2, 3]}.
    m = maps.map_2d(2, 2, 1, 1, src_parts=[0, 3, 6], dst_parts=[0, 6])
    assert len(m.targets) == 1
    assert _mp_ranks(m.target(0, 0)) == [0, 1, 2, 3]
    assert m.target(0, 0).layer_src_stage == (0, 0, 0, 1, 1, 1)


def test_deepspeed_reshape_example_4x4_to_2x2() -> None:
    # reshape([4,4,1],[2,2,1]): tp 4 -> 2, pp 4 -> 2, with 8 layers partitioned uniformly.
    src_parts = maps.partition_uniform(8, 4)
    dst_parts = maps.partition_uniform(8, 2)
    m = maps.map_2d(4, 4, 2, 2, src_parts=src_parts, dst_parts=dst_parts)
    assert {(t.stage, t.tp_rank): _mp_ranks(t) for t in m.targets} == {
        (0, 0): [0, 1, 4, 5],
        (0, 1): [2, 3, 6, 7],
        (1, 0): [8, 9, 12, 13],
        (1, 1): [10, 11, 14, 15],
    }
    assert m.target(1, 1).tp_pieces == (Piece(2, 0, 1, 0), Piece(3, 0, 1, 1))
    assert m.tp_unit == 4


def test_deepspeed_reshape_example_expansion_2x4x2_to_8x32x1() -> None:
    # reshape([2,4,2],[8,32,1]): DeepSpeed cannot expand; here tp 2 -> 8 and pp 4 -> 32 work.
    src = Topology(pp=4, tp=2, dp=2)
    dst = Topology(pp=32, tp=8, dp=1)
    m = maps.map_3d(
        src, dst, src_parts=maps.partition_uniform(32, 4), dst_parts=maps.partition_uniform(32, 32)
    )
    assert len(m.targets) == 256
    for t in m.targets:
        src_stage, src_tp = t.stage // 8, t.tp_rank // 4
        assert [(s.stage, s.tp_rank) for s in t.model.sources] == [(src_stage, src_tp)]
        assert t.model.layers == range(t.stage, t.stage + 1)
        (piece,) = t.model.tp_pieces  # a quarter of one source slice
        assert piece == Piece(src_tp, t.tp_rank % 4, 1, 0)
        assert [z.dp_rank for z in t.zero_sources] == [0, 1]
        assert {z.mp_rank for z in t.zero_sources} == {src_stage * 2 + src_tp}


def test_map_2d_regrouping_unaligned_stages() -> None:
    # 10 layers: uniform over 4 stages is [0,3,6,8,10]; uniform over 2 is [0,5,10], so the
    # target stage 1 needs the tail of source stage 1 as well as stages 2 and 3.
    m = maps.map_2d(4, 1, 2, 1, src_parts=[0, 3, 6, 8, 10], dst_parts=[0, 5, 10])
    t0, t1 = m.targets
    assert t0.src_stages == (0, 1) and t1.src_stages == (1, 2, 3)
    assert t1.stage_pieces == (Piece(1, 2, 1, 0), Piece(2, 0, 2, 1), Piece(3, 0, 2, 3))
    assert t1.layer_src_stage == (1, 2, 2, 3, 3)
    # Growing pp with more stages than layers leaves empty stages with no sources.
    m = maps.map_2d(1, 2, 4, 3, src_parts=[0, 2], dst_parts=maps.partition_uniform(2, 4))
    assert [len(t.sources) for t in m.targets] == [1, 2, 1] * 2 + [0, 0, 0] * 2
    assert m.target(1, 1).tp_pieces == (Piece(0, 2, 1, 0), Piece(1, 0, 1, 1))


def test_map_2d_properties_for_many_shapes() -> None:
    for sp, st, dp_, dt in itertools.product(range(1, 5), range(1, 5), range(1, 5), range(1, 5)):
        layers = 7
        m = maps.map_2d(
            sp,
            st,
            dp_,
            dt,
            src_parts=maps.partition_uniform(layers, sp),
            dst_parts=maps.partition_uniform(layers, dp_),
        )
        assert [t.mp_rank for t in m.targets] == list(range(dp_ * dt))
        owner = maps.layer_stage(m.src_parts)
        seen_layers = []
        for t in m.targets:
            assert t.layer_src_stage == tuple(owner[x] for x in t.layers)
            assert sum(p.length for p in t.tp_pieces) == m.tp_unit // dt
            expected = sorted({(owner[x], p.src) for x in t.layers for p in t.tp_pieces})
            assert [(s.stage, s.tp_rank) for s in t.sources] == expected
            if t.tp_rank == 0:
                seen_layers += list(t.layers)
        assert seen_layers == list(range(layers))


def test_map_2d_rejects_mismatched_partitions() -> None:
    with pytest.raises(MapError, match="covers 6 layers but target covers 7"):
        maps.map_2d(2, 1, 1, 1, src_parts=[0, 3, 6], dst_parts=[0, 7])
    with pytest.raises(MapError, match="src_pp is 3"):
        maps.map_2d(3, 1, 1, 1, src_parts=[0, 3, 6], dst_parts=[0, 6])


def test_map_3d_zero_sources() -> None:
    src, dst = Topology(pp=2, tp=2, dp=2), Topology(pp=1, tp=1, dp=4)
    m = maps.map_3d(src, dst, src_parts=[0, 2, 4], dst_parts=[0, 4])
    assert [t.rank for t in m.targets] == [0, 1, 2, 3]
    for t in m.targets:
        assert [(z.mp_rank, z.dp_rank) for z in t.zero_sources] == [
            (mp, d) for mp in range(4) for d in range(2)
        ]
        assert [z.file_index for z in t.zero_sources] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert m.target(stage=0, dp_rank=3, tp_rank=0).rank == 3


def test_map_2d_and_3d_match_deepspeed_reshape_where_it_applies() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.checkpoint.reshape_3d_utils import model_3d_desc
    from deepspeed.checkpoint.reshape_meg_2d import reshape_meg_2d_parallel

    def divisors(n: int) -> list[int]:
        return [d for d in range(1, n + 1) if n % d == 0]

    for sp, st in itertools.product(range(1, 7), range(1, 7)):
        for dp_, dt in itertools.product(divisors(sp), divisors(st)):
            # DeepSpeed merges consecutive stages, i.e. the target parts are every r-th source
            # boundary; that is when its grouping and this one mean the same thing.
            src_parts = maps.partition_uniform(3 * sp, sp)
            dst_parts = src_parts[:: sp // dp_]
            ours = maps.map_2d(sp, st, dp_, dt, src_parts=src_parts, dst_parts=dst_parts)
            theirs = reshape_meg_2d_parallel(sp, st, dp_, dt)
            for t in ours.targets:
                assert _mp_ranks(t) == theirs.get_data(t.stage, t.tp_rank), (sp, st, dp_, dt)

    for sp, st, sd in itertools.product(range(1, 5), range(1, 4), range(1, 5)):
        for dp_, dt, dd in itertools.product(divisors(sp), divisors(st), divisors(sd)):
            src_parts = maps.partition_uniform(2 * sp, sp)
            src, dst = Topology(sp, st, sd), Topology(dp_, dt, dd)
            ours3 = maps.map_3d(src, dst, src_parts=src_parts, dst_parts=src_parts[:: sp // dp_])
            theirs3 = model_3d_desc(sp, st, sd).reshape(model_3d_desc(dp_, dt, dd))
            for stage, tp_rank in itertools.product(range(dp_), range(dt)):
                files = [z.file_index for z in ours3.target(stage, 0, tp_rank).zero_sources]
                # Same files feed each (stage, tp); DeepSpeed deals them to target dp ranks in
                # equal consecutive runs of this same order (exact when it has one target dp).
                chunk = len(files) // dd
                for d in range(dd):
                    assert theirs3[d].get_data(stage, tp_rank) == files[d * chunk : (d + 1) * chunk]
                    assert ours3.target(stage, d, tp_rank).zero_sources == (
                        ours3.target(stage, 0, tp_rank).zero_sources
                    )


# --------------------------------------------------------------------------------------------
# Vocabulary padding
# --------------------------------------------------------------------------------------------


def test_padded_vocab_size() -> None:
    # GPT-2's 50257 tokens with Megatron's default --make-vocab-size-divisible-by 128.
    assert [maps.padded_vocab_size(50257, 128, tp) for tp in (1, 2, 4, 8)] == [
        50304,
        50432,
        50688,
        51200,
    ]
    # BLOOM: 250680 tokens at TP 4 gives its 250880-row embedding.
    assert maps.padded_vocab_size(250680, 128, 4) == 250880
    assert maps.padded_vocab_size(512, 128, 4) == 512  # already a multiple: unchanged
    assert maps.padded_vocab_size(0, 128, 2) == 0
    for v, div, tp in itertools.product(range(0, 300, 7), (1, 8, 128), DEGREES):
        p = maps.padded_vocab_size(v, div, tp)
        assert p % (div * tp) == 0 and v <= p < v + div * tp
    with pytest.raises(MapError):
        maps.padded_vocab_size(100, 0, 1)


def test_vocab_ranges() -> None:
    assert maps.vocab_ranges(50432, 2) == ((0, 25216), (25216, 50432))
    assert maps.vocab_ranges(8, 1) == ((0, 8),)
    with pytest.raises(MapError, match="possible degrees"):
        maps.vocab_ranges(50257, 2)


def test_reshard_vocab_tiles_real_rows_and_pads_the_rest() -> None:
    for orig, div, a, b in itertools.product((1, 5, 37, 64), (1, 4, 16), range(1, 6), range(1, 6)):
        sp, dp_ = maps.padded_vocab_size(orig, div, a), maps.padded_vocab_size(orig, div, b)
        r = maps.reshard_vocab(orig, sp, a, dp_, b)
        full = list(range(orig)) + [-1] * (max(sp, dp_) - orig)  # -1: padding rows
        src = [full[s:e] for s, e in maps.vocab_ranges(sp, a)]
        for d, (s, e) in enumerate(maps.vocab_ranges(dp_, b)):
            real = max(0, min(e, orig) - s)
            assert _apply(r.pieces[d], src, real) == full[s : s + real]
            assert r.padding[d] == (real, (e - s) - real)
    r = maps.reshard_vocab(50257, 50304, 1, 50432, 2)
    assert r.pieces == ((Piece(0, 0, 25216, 0),), (Piece(0, 25216, 25041, 0),))
    assert r.padding == ((25216, 0), (25041, 175))
    with pytest.raises(MapError, match="smaller than the vocabulary"):
        maps.reshard_vocab(100, 96, 1, 128, 1)
