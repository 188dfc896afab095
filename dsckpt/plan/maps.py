"""Rank, layer and slice arithmetic for DeepSpeed / Megatron-DeepSpeed checkpoints.

Everything here is pure integer arithmetic on plain data: no torch, no DeepSpeed, no I/O. The
functions answer the questions a reshape plan is built from:

* which global rank, data-parallel rank and ``mp_rank`` a (stage, dp, tp) coordinate has, and the
  process groups Megatron and DeepSpeed build from the same three degrees;
* which layers a pipeline stage owns, computed exactly as DeepSpeed's
  ``PipelineModule._partition_layers`` does for ``uniform``, ``parameters`` and ``type:REGEX``;
* which element ranges of which source tensor-parallel slices make up each target slice when a
  dimension is re-split from one TP degree to another (growing, shrinking or neither divisible by
  the other), including fused dimensions made of several sub-blocks;
* which source model-state and ZeRO files feed each target file in a 2D (pp, tp) or 3D
  (pp, tp, dp) reshape;
* Megatron's vocabulary padding.

Conventions used throughout:

* Global ranks follow DeepSpeed's ``PipeModelDataParallelTopology`` (axes ``pipe, data, model``,
  model fastest): ``rank = (stage * dp + dp_rank) * tp + tp_rank``. Megatron's
  ``initialize_model_parallel`` numbers ranks the same way (tensor groups are consecutive ranks,
  pipeline groups are strided by ``world / pp``), and Megatron-DeepSpeed builds its DeepSpeed
  topology from Megatron's degrees, so one formula serves both.
* ``mp_rank = stage * tp + tp_rank`` is the ``MM`` of ``mp_rank_MM_model_states.pt`` and
  ``zero_pp_rank_D_mp_rank_MM_optim_states.pt`` (where ``D`` is the data-parallel rank).
* Intervals are half-open ``[start, stop)``; offsets count elements along one dimension.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from dsckpt.errors import MapError, UsageError

__all__ = [
    "MapError",
    "Topology",
    "RankCoord",
    "ParallelGroups",
    "megatron_groups",
    "deepspeed_groups",
    "partition_uniform",
    "partition_balanced",
    "partition_layers",
    "layer_stage",
    "stage_layers",
    "Piece",
    "overlap_pieces",
    "even_bounds",
    "possible_degrees",
    "DimReshard",
    "reshard_dim",
    "ModelSource",
    "ModelTarget",
    "Reshape2D",
    "map_2d",
    "ZeroSource",
    "RankTarget",
    "Reshape3D",
    "map_3d",
    "padded_vocab_size",
    "vocab_ranges",
    "VocabReshard",
    "reshard_vocab",
]


_DEGREE_NAMES = {
    "dp": "data-parallel",
    "tp": "tensor-parallel",
    "pp": "pipeline-parallel",
    "ep": "expert-parallel",
}


def check_degrees(**degrees: int | None) -> None:
    """Refuse a target degree below 1 from the command line (``--dp 0``), naming its flag: the
    one check of every front door (reshape, show-map, the reshape planners). ``None`` means the
    degree is kept."""
    for name, value in degrees.items():
        if value is not None and value < 1:
            what = _DEGREE_NAMES.get(name, name)
            raise UsageError(f"--{name} {value}: the {what} size must be at least 1")


def _check_positive(name: str, value: int) -> None:
    # bool is an int subclass; Topology(pp=True, ...) is a bug, not a degree of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MapError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise MapError(f"{name} must be >= 1, got {value}")


def _check_index(name: str, value: int, bound: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise MapError(f"{name} must be an int in [0, {bound}), got {value!r}")


# --------------------------------------------------------------------------------------------
# Topology and rank conventions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankCoord:
    """The coordinate of one process: pipeline stage, data-parallel rank, tensor-parallel rank."""

    stage: int
    dp_rank: int
    tp_rank: int


@dataclass(frozen=True)
class Topology:
    """Pipeline, tensor and data parallel degrees of one run.

    Attributes:
        pp: Number of pipeline stages.
        tp: Tensor-parallel degree (DeepSpeed calls this axis ``model``).
        dp: Data-parallel degree.
    """

    pp: int
    tp: int
    dp: int

    def __post_init__(self) -> None:
        _check_positive("pp", self.pp)
        _check_positive("tp", self.tp)
        _check_positive("dp", self.dp)

    @property
    def world_size(self) -> int:
        """Total number of processes, ``pp * tp * dp``."""
        return self.pp * self.tp * self.dp

    @property
    def mp_world_size(self) -> int:
        """Number of model-parallel ranks, ``pp * tp``: DeepSpeed's ``mp_world_size``."""
        return self.pp * self.tp

    def global_rank(self, stage: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank of a coordinate, as DeepSpeed's ``PipeModelDataParallelTopology`` numbers it.

        Args:
            stage: Pipeline stage, ``0 <= stage < pp``.
            dp_rank: Data-parallel rank, ``0 <= dp_rank < dp``.
            tp_rank: Tensor-parallel rank, ``0 <= tp_rank < tp``.

        Returns:
            ``(stage * dp + dp_rank) * tp + tp_rank``.
        """
        _check_index("stage", stage, self.pp)
        _check_index("dp_rank", dp_rank, self.dp)
        _check_index("tp_rank", tp_rank, self.tp)
        return (stage * self.dp + dp_rank) * self.tp + tp_rank

    def coord(self, rank: int) -> RankCoord:
        """Inverse of :meth:`global_rank`.

        Args:
            rank: Global rank, ``0 <= rank < world_size``.

        Returns:
            The (stage, dp_rank, tp_rank) coordinate of ``rank``.
        """
        _check_index("rank", rank, self.world_size)
        rest, tp_rank = divmod(rank, self.tp)
        stage, dp_rank = divmod(rest, self.dp)
        return RankCoord(stage=stage, dp_rank=dp_rank, tp_rank=tp_rank)

    def mp_rank(self, stage: int, tp_rank: int) -> int:
        """Model-parallel rank ``stage * tp + tp_rank``, the ``MM`` in ``mp_rank_MM_*`` file names.

        It equals DeepSpeed's model-parallel rank (the index of a process within the sorted ranks
        sharing its data-parallel rank), which is why the checkpoint files are named by it.

        Args:
            stage: Pipeline stage.
            tp_rank: Tensor-parallel rank.

        Returns:
            The model-parallel rank.
        """
        _check_index("stage", stage, self.pp)
        _check_index("tp_rank", tp_rank, self.tp)
        return stage * self.tp + tp_rank

    def mp_coord(self, mp_rank: int) -> tuple[int, int]:
        """Inverse of :meth:`mp_rank`.

        Args:
            mp_rank: Model-parallel rank, ``0 <= mp_rank < pp * tp``.

        Returns:
            ``(stage, tp_rank)``.
        """
        _check_index("mp_rank", mp_rank, self.mp_world_size)
        stage, tp_rank = divmod(mp_rank, self.tp)
        return stage, tp_rank

    def zero_file_index(self, stage: int, tp_rank: int, dp_rank: int) -> int:
        """Position of a ZeRO optimizer file in DeepSpeed's sorted file list.

        DeepSpeed's checkpoint tools sort ``zero_pp_rank_D_mp_rank_MM`` files by ``(D, MM)``, so
        the index is ``dp_rank * pp * tp + mp_rank``; its reshape maps are lists of these indices.

        Args:
            stage: Pipeline stage.
            tp_rank: Tensor-parallel rank.
            dp_rank: Data-parallel rank.

        Returns:
            The file's index in ``(dp_rank, mp_rank)`` order.
        """
        _check_index("dp_rank", dp_rank, self.dp)
        return dp_rank * self.mp_world_size + self.mp_rank(stage, tp_rank)


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups as lists of global ranks, in the order their builder creates them.

    Attributes:
        tensor: Tensor-parallel groups (ranks that hold slices of the same layers).
        pipeline: Pipeline groups (one rank per stage).
        data: Data-parallel groups (replicas of the same (stage, tp) slice).
        model: Model-parallel groups (every stage and tp rank of one data-parallel replica);
            a process's index in its group is its ``mp_rank``.
    """

    tensor: tuple[tuple[int, ...], ...]
    pipeline: tuple[tuple[int, ...], ...]
    data: tuple[tuple[int, ...], ...]
    model: tuple[tuple[int, ...], ...]


def megatron_groups(world_size: int, tp: int, pp: int) -> ParallelGroups:
    """The process groups Megatron-LM's ``initialize_model_parallel`` builds.

    Megatron documents, for 16 GPUs with TP 2 and PP 4: 8 tensor groups ``[0,1], [2,3], ...``,
    4 pipeline groups ``[0,4,8,12], [1,5,9,13], ...`` and 8 data groups ``[0,2], [1,3], [4,6],
    ...``. The groups are built here the way Megatron builds them (by strides over rank ranges,
    not from a coordinate formula), so comparing them with :func:`deepspeed_groups` is a real
    check that the two numberings agree. They do, for every shape: Megatron-DeepSpeed passes
    DeepSpeed a ``PipeModelDataParallelTopology`` built from these same degrees.

    Note that DeepSpeed's ``reshape_meg_2d.get_mpu_ranks`` (a copy of this construction) labels
    its second list "PP", but it holds the *model*-parallel groups (``model`` here), not the
    pipeline groups.

    Args:
        world_size: Total number of processes.
        tp: Tensor-parallel degree.
        pp: Pipeline degree.

    Returns:
        The tensor, pipeline, data and model-parallel groups.

    Raises:
        MapError: If a degree is not positive or ``tp * pp`` does not divide ``world_size``.
    """
    _check_positive("world_size", world_size)
    _check_positive("tp", tp)
    _check_positive("pp", pp)
    if world_size % (tp * pp):
        raise MapError(
            f"world size {world_size} is not divisible by tp * pp = {tp} * {pp} = {tp * pp}"
        )
    dp = world_size // (tp * pp)
    per_stage = world_size // pp  # ranks in one pipeline stage (Megatron's num_pipeline groups)

    data: list[tuple[int, ...]] = []
    for stage in range(pp):
        start, stop = stage * per_stage, (stage + 1) * per_stage
        for j in range(tp):
            data.append(tuple(range(start + j, stop, tp)))
    # Megatron forms the model-parallel group of replica i from the i-th member of every data group.
    model = tuple(tuple(group[i] for group in data) for i in range(dp))
    tensor = tuple(tuple(range(i * tp, (i + 1) * tp)) for i in range(world_size // tp))
    pipeline = tuple(tuple(range(i, world_size, per_stage)) for i in range(per_stage))
    return ParallelGroups(tensor=tensor, pipeline=pipeline, data=tuple(data), model=model)


def deepspeed_groups(topo: Topology) -> ParallelGroups:
    """The process groups DeepSpeed's pipeline grid builds from its topology.

    ``tensor``, ``pipeline`` and ``data`` are ``get_axis_comm_lists`` of the ``model``, ``pipe``
    and ``data`` axes (ranks differing only along that axis, the other axes enumerated in axis
    order ``pipe, data, model``); ``model`` is each data-parallel replica's sorted rank list (the
    grid's ``ds_model_proc_group``). The result equals :func:`megatron_groups` for the same degrees,
    in content and order.

    Args:
        topo: The topology.

    Returns:
        The tensor, pipeline, data and model-parallel groups.
    """
    pp, tp, dp = topo.pp, topo.tp, topo.dp
    rank = topo.global_rank
    tensor = tuple(tuple(rank(s, d, t) for t in range(tp)) for s in range(pp) for d in range(dp))
    pipeline = tuple(tuple(rank(s, d, t) for s in range(pp)) for d in range(dp) for t in range(tp))
    data = tuple(tuple(rank(s, d, t) for d in range(dp)) for s in range(pp) for t in range(tp))
    model = tuple(
        tuple(sorted(rank(s, d, t) for s in range(pp) for t in range(tp))) for d in range(dp)
    )
    return ParallelGroups(tensor=tensor, pipeline=pipeline, data=data, model=model)


# --------------------------------------------------------------------------------------------
# Pipeline layer partitioning (DeepSpeed's PipelineModule._partition_layers)
# --------------------------------------------------------------------------------------------


def _check_parts(parts: Sequence[int], name: str = "parts") -> None:
    if len(parts) < 2:
        raise MapError(f"{name} must have at least 2 boundaries (one stage), got {list(parts)}")
    if parts[0] != 0:
        raise MapError(f"{name} must start at 0, got {list(parts)}")
    if any(b < a for a, b in pairwise(parts)):
        raise MapError(f"{name} must be non-decreasing, got {list(parts)}")


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Split ``num_items`` layers into ``num_parts`` contiguous stages as evenly as possible.

    Same result as DeepSpeed's ``runtime.utils.partition_uniform``: each stage gets
    ``num_items // num_parts`` layers and the first ``num_items % num_parts`` stages one more.
    With fewer layers than stages, stage ``i < num_items`` gets layer ``i`` and the remaining
    stages are empty (DeepSpeed does not reject this).

    Args:
        num_items: Number of layers, ``>= 0``.
        num_parts: Number of stages, ``>= 1``.

    Returns:
        Boundaries ``parts`` of length ``num_parts + 1``: stage ``s`` owns
        ``[parts[s], parts[s + 1])``.
    """
    _check_positive("num_parts", num_parts)
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise MapError(f"num_items must be an int >= 0, got {num_items!r}")
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, extra = divmod(num_items, num_parts)
    return [p * chunk + min(p, extra) for p in range(num_parts + 1)]


def partition_balanced(weights: Sequence[int], num_parts: int) -> list[int]:
    """Split weighted layers into contiguous stages the way DeepSpeed's ``partition_balanced`` does.

    DeepSpeed runs a dynamic programme over (first ``i`` layers, ``j`` stages) that keeps, for each
    cell, the split point whose stages have the smallest spread ``max(stage weight) - min(stage
    weight)``, extending the max/min of the best ``(k, j - 1)`` cell. Ties go to the *last* split
    point examined (it compares with ``>=``). Because only one (max, min) pair is kept per cell,
    the result is neither always the smallest spread nor the smallest largest stage (weights
    ``[1, 9, 2, 3]`` in 3 stages give ``[0, 2, 3, 4]``, stages 10/2/3, where 1/9/5 exists). The
    same programme, tie-break and float64 arithmetic are therefore reproduced here rather than an
    optimal algorithm: a "better" split would not match the checkpoint's real layout. With no
    more layers than stages it falls back to :func:`partition_uniform`.

    Args:
        weights: Per-layer weights (trainable parameter counts, or 0/1 for ``type:``), ``>= 0``.
        num_parts: Number of stages, ``>= 1``.

    Returns:
        Boundaries of length ``num_parts + 1``.

    Raises:
        MapError: If ``num_parts < 1`` or a weight is negative.
    """
    _check_positive("num_parts", num_parts)
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise MapError(f"layer weights must be ints >= 0, got {w!r}")
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)

    inf = math.inf
    # DeepSpeed keeps prefix sums in a float64 array; Python floats are the same IEEE doubles, so
    # converting the exact integer sums with float() reproduces its rounding for huge counts too.
    prefix = [0.0] * (n + 1)
    running = 0
    for i, w in enumerate(weights, start=1):
        running += w
        prefix[i] = float(running)

    # cost/hi/lo[i][j]: best spread, and its max and min stage weight, for i layers in j stages.
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    hi = [[inf] * (m + 1) for _ in range(n + 1)]
    lo = [[inf] * (m + 1) for _ in range(n + 1)]
    split = [[0] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    hi[0][0] = 0.0  # lo[0][0] stays inf in DeepSpeed too: min() with it is a no-op
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            # Only cells (k, j-1) that hold j-1 non-empty stages are finite. In DeepSpeed the
            # infinite ones give an infinite cost that every finite candidate overwrites (for
            # j >= 2 they come first; for j == 1 they come after k == 0 and lose the >= test),
            # so skipping them changes nothing and saves a factor of the loop.
            ks = range(0, 1) if j == 1 else range(j - 1, i)
            c_best, h_best, l_best, k_best = cost[i][j], hi[i][j], lo[i][j], split[i][j]
            for k in ks:
                seg = prefix[i] - prefix[k]
                h = max(hi[k][j - 1], seg)
                low = min(lo[k][j - 1], seg)
                c = h - low
                if c_best >= c:
                    c_best, h_best, l_best, k_best = c, h, low, k
            cost[i][j], hi[i][j], lo[i][j], split[i][j] = c_best, h_best, l_best, k_best

    parts = [n]
    for j in range(m, 0, -1):
        parts.append(split[parts[-1]][j])
    parts.reverse()
    return parts


def partition_layers(
    method: str,
    num_stages: int,
    *,
    num_layers: int | None = None,
    param_counts: Sequence[int] | None = None,
    layer_types: Sequence[str | None] | None = None,
) -> list[int]:
    """Stage boundaries exactly as DeepSpeed's ``PipelineModule._partition_layers`` computes them.

    The method string is handled as DeepSpeed handles it: lower-cased first, then

    * ``uniform``: :func:`partition_uniform` over the layer count;
    * ``parameters``: :func:`partition_balanced` over ``param_counts``, the number of
      *trainable* parameters of each layer as built on one rank (so TP-local sizes, and 0 for
      frozen or parameter-free layers; a tied layer counts at each of its positions);
    * ``type:REGEX``: :func:`partition_balanced` over weights 1 for layers whose class name
      matches ``REGEX`` (``re.search``, case-insensitive) and 0 otherwise. Only the text between
      the first and second ``:`` is the pattern, and it has been lower-cased with the method
      (so ``\\W`` becomes ``\\w``): both are DeepSpeed's behaviour, kept on purpose.

    Layers are DeepSpeed's layer specs in order (the index in ``layer_NN-model_TT`` file names),
    including parameter-free ones such as Megatron-DeepSpeed's lambdas. With more stages than
    layers DeepSpeed does not fail: trailing stages are empty, and so they are here.

    Args:
        method: ``"uniform"``, ``"parameters"`` or ``"type:REGEX"`` (any case).
        num_stages: Number of pipeline stages.
        num_layers: Number of layer specs; may be omitted when another argument gives it.
        param_counts: Trainable parameter count per layer (needed for ``parameters``).
        layer_types: Class name per layer (``LayerSpec.typename.__name__``, the module's class
            name, or a function's ``__name__``); ``None`` for a spec with no name, which DeepSpeed
            never matches (needed for ``type:``).

    Returns:
        Boundaries of length ``num_stages + 1``.

    Raises:
        MapError: For an unknown method or ``profile`` (DeepSpeed raises ``NotImplementedError``),
            a ``type:`` pattern that matches no layer (DeepSpeed raises ``RuntimeError``), an
            invalid regex, missing inputs or inconsistent lengths.
    """
    _check_positive("num_stages", num_stages)
    lengths = {
        name: n
        for name, n in (
            ("num_layers", num_layers),
            ("len(param_counts)", None if param_counts is None else len(param_counts)),
            ("len(layer_types)", None if layer_types is None else len(layer_types)),
        )
        if n is not None
    }
    if len(set(lengths.values())) > 1:
        raise MapError(f"inconsistent layer counts: {lengths}")
    count = next(iter(lengths.values()), None)

    lowered = method.lower()
    if lowered == "uniform":
        if count is None:
            raise MapError("partition method 'uniform' needs num_layers")
        return partition_uniform(count, num_stages)
    if lowered == "parameters":
        if param_counts is None:
            raise MapError("partition method 'parameters' needs param_counts (one per layer)")
        return partition_balanced(list(param_counts), num_stages)
    if lowered.startswith("type:"):
        if layer_types is None:
            raise MapError(f"partition method {method!r} needs layer_types (one per layer)")
        pattern = lowered.split(":")[1]
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise MapError(
                f"partition method {method!r}: invalid regex {pattern!r}: {exc}"
            ) from None
        weights = [int(t is not None and regex.search(t) is not None) for t in layer_types]
        if not any(weights):
            raise MapError(
                f"partition method {method!r}: regex {pattern!r} matches none of the layer types "
                f"{sorted({t for t in layer_types if t is not None})}"
            )
        return partition_balanced(weights, num_stages)
    raise MapError(
        f"partition method {method!r} is not one DeepSpeed implements: use 'uniform', "
        "'parameters' or 'type:REGEX'"
    )


def layer_stage(parts: Sequence[int]) -> list[int]:
    """Stage of every layer.

    Args:
        parts: Stage boundaries (as returned by :func:`partition_layers`).

    Returns:
        ``result[layer] = stage``, of length ``parts[-1]``.
    """
    _check_parts(parts)
    return [s for s in range(len(parts) - 1) for _ in range(parts[s], parts[s + 1])]


def stage_layers(parts: Sequence[int], stage: int) -> range:
    """Layers owned by one stage.

    Args:
        parts: Stage boundaries.
        stage: Stage index.

    Returns:
        ``range(parts[stage], parts[stage + 1])``.
    """
    _check_parts(parts)
    _check_index("stage", stage, len(parts) - 1)
    return range(parts[stage], parts[stage + 1])


# --------------------------------------------------------------------------------------------
# Interval overlaps and even splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One contiguous run copied from a source part into a target part.

    Attributes:
        src: Index of the source part (a TP rank, a pipeline stage, a DP rank ...).
        src_start: Offset of the run inside the source part.
        length: Number of elements (or layers) in the run, ``> 0``.
        dst_start: Offset of the run inside the target part.
    """

    src: int
    src_start: int
    length: int
    dst_start: int

    @property
    def src_rank(self) -> int:
        """Alias of :attr:`src` for tensor-parallel pieces."""
        return self.src


def overlap_pieces(
    src_bounds: Sequence[int], dst_bounds: Sequence[int]
) -> tuple[tuple[Piece, ...], ...]:
    """Pieces of source parts that make up each target part, for two partitions of one range.

    The building block of every map here: TP slices (even bounds), pipeline stages (layer parts)
    and ZeRO flat partitions (bounds from the flat-group sizes) all reduce to it.

    Args:
        src_bounds: Non-decreasing boundaries of the source parts, from 0 to the total.
        dst_bounds: Non-decreasing boundaries of the target parts, from 0 to the same total.

    Returns:
        For each target part, its pieces in target order; they tile the target part exactly.
        Empty source parts never appear; an empty target part has no pieces.

    Raises:
        MapError: If a boundary list is malformed or the totals differ.
    """
    _check_parts(src_bounds, "src_bounds")
    _check_parts(dst_bounds, "dst_bounds")
    if src_bounds[-1] != dst_bounds[-1]:
        raise MapError(
            f"source and target cover different totals: {src_bounds[-1]} != {dst_bounds[-1]}"
        )
    result: list[tuple[Piece, ...]] = []
    for d in range(len(dst_bounds) - 1):
        start, stop = dst_bounds[d], dst_bounds[d + 1]
        pieces: list[Piece] = []
        pos = start
        while pos < stop:
            # The last source part whose start is <= pos holds pos (skips empty parts).
            s = bisect_right(src_bounds, pos) - 1
            end = min(stop, src_bounds[s + 1])
            pieces.append(Piece(s, pos - src_bounds[s], end - pos, pos - start))
            pos = end
        result.append(tuple(pieces))
    return tuple(result)


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for i in range(1, math.isqrt(n) + 1):
        if n % i == 0:
            small.append(i)
            if i != n // i:
                large.append(n // i)
    return small + large[::-1]


def _normalise_blocks(size: int, blocks: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(blocks, int):
        _check_positive("blocks", blocks)  # also rejects True/False
        if size % blocks:
            raise MapError(f"dimension of size {size} cannot hold {blocks} equal blocks")
        return (size // blocks,) * blocks
    sizes = tuple(blocks)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in sizes):
        raise MapError(f"blocks must be a positive count or a list of sizes >= 0, got {blocks!r}")
    if sum(sizes) != size:
        raise MapError(f"block sizes {list(sizes)} sum to {sum(sizes)}, not the dimension {size}")
    return sizes


def _units_gcd(size: int, blocks: tuple[int, ...], unit: int) -> int:
    for b in blocks:
        if b % unit:
            raise MapError(
                f"block of size {b} (of a dimension of {size}) is not a whole number of "
                f"units of {unit}"
            )
    return math.gcd(*(b // unit for b in blocks))


def possible_degrees(
    size: int, *, blocks: int | Sequence[int] = 1, unit: int = 1, limit: int | None = None
) -> list[int]:
    """Tensor-parallel degrees that split a dimension evenly.

    Args:
        size: Length of the full (unsplit) dimension.
        blocks: Number of equal sub-blocks, or their sizes (see :func:`reshard_dim`).
        unit: Elements that must stay together (see :func:`reshard_dim`).
        limit: If given, only degrees ``<= limit``.

    Returns:
        Every degree ``d`` such that each block is ``d`` equal whole-unit slices, ascending.
    """
    _check_positive("size", size)
    _check_positive("unit", unit)
    g = _units_gcd(size, _normalise_blocks(size, blocks), unit)  # >= 1 since size >= 1
    return [d for d in _divisors(g) if limit is None or d <= limit]


def _check_degree(size: int, blocks: tuple[int, ...], unit: int, degree: int, what: str) -> None:
    g = _units_gcd(size, blocks, unit)
    if g % degree == 0:
        return
    divisors = _divisors(g)
    shown = [d for d in divisors if d <= 128]
    listed = ", ".join(map(str, shown))
    if len(shown) < len(divisors):
        listed += f", ... (any divisor of {g})"
    layout = f"size {size}"
    if len(blocks) > 1:
        layout += f" made of blocks {list(blocks)}"
    if unit > 1:
        layout += f" in units of {unit}"
    raise MapError(
        f"cannot split a dimension of {layout} evenly across {degree} {what}ranks: "
        f"possible degrees are {listed}"
    )


def even_bounds(size: int, degree: int, *, unit: int = 1) -> list[int]:
    """Boundaries of an even split of ``size`` elements into ``degree`` whole-unit slices.

    Args:
        size: Length of the dimension.
        degree: Number of slices.
        unit: Elements that must stay in one slice (e.g. one attention head's rows).

    Returns:
        ``[0, size/degree, 2*size/degree, ..., size]``.

    Raises:
        MapError: If the split is not even, naming the degrees that would be.
    """
    _check_positive("degree", degree)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise MapError(f"size must be an int >= 0, got {size!r}")
    _check_positive("unit", unit)
    _check_degree(size, (size,), unit, degree, "")
    step = size // degree
    return [i * step for i in range(degree + 1)]


@dataclass(frozen=True)
class DimReshard:
    """How one tensor dimension is re-split from ``src_degree`` to ``dst_degree`` ranks.

    Attributes:
        size: Length of the full (unsplit) dimension.
        src_degree: Source TP degree.
        dst_degree: Target TP degree.
        blocks: Sizes of the sub-blocks the full dimension is made of (one block if not fused).
        unit: Elements that always stay together.
        pieces: ``pieces[dst_rank]``: the runs, with offsets local to the source and target
            slices along the dimension, that tile that target rank's slice in order.
    """

    size: int
    src_degree: int
    dst_degree: int
    blocks: tuple[int, ...]
    unit: int
    pieces: tuple[tuple[Piece, ...], ...]

    @property
    def src_local_size(self) -> int:
        """Length of the dimension on each source rank."""
        return self.size // self.src_degree

    @property
    def dst_local_size(self) -> int:
        """Length of the dimension on each target rank."""
        return self.size // self.dst_degree


def _block_layout(blocks: tuple[int, ...], degree: int) -> list[int]:
    """Boundaries, in full-dimension order, of the (block, rank) chunks of a blocked split."""
    bounds = [0]
    for b in blocks:
        step = b // degree
        base = bounds[-1]
        bounds.extend(base + step * (r + 1) for r in range(degree))
    return bounds


def reshard_dim(
    size: int,
    src_degree: int,
    dst_degree: int,
    *,
    blocks: int | Sequence[int] = 1,
    unit: int = 1,
) -> DimReshard:
    """Pieces that turn ``src_degree`` even slices of a dimension into ``dst_degree`` slices.

    The full dimension is a concatenation of sub-blocks (``blocks``), and *each block* is split
    evenly across the ranks; rank ``r``'s local slice is the concatenation of the ``r``-th chunk
    of every block, in block order. Chunks are whole multiples of ``unit`` elements.

    * Plain column/row-parallel weight, vocabulary: ``blocks=1, unit=1``.
    * Gated MLP ``dense_h_to_4h`` whose full weight is ``[gate; up]`` and whose rank ``r`` holds
      ``[gate_r; up_r]``: ``blocks=2``.
    * Fused ``[Q; K; V]`` with whole heads per rank: ``blocks=3, unit=head_dim`` (or block sizes
      ``[q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]`` for grouped queries).
    * Megatron's per-head interleaved QKV (rows ``[q_h0, k_h0, v_h0, q_h1, ...]``), where each
      rank holds whole heads: ``blocks=1, unit=3 * head_dim``; with grouped-query attention the
      unit is one query group's rows.

    Growing, shrinking and degrees that do not divide each other (2 -> 3 when each block is a
    multiple of 6 units) all work: each target chunk is cut from the source chunks it overlaps.
    Pieces that are contiguous in both source and target slices are merged, so an unchanged
    degree yields one piece per rank.

    Args:
        size: Length of the full dimension.
        src_degree: Source TP degree (1 to split a full tensor).
        dst_degree: Target TP degree (1 to merge into a full tensor).
        blocks: Number of equal sub-blocks, or the list of their sizes.
        unit: Elements that must stay together.

    Returns:
        The reshard, with ``pieces[dst_rank]`` in target order.

    Raises:
        MapError: If a block cannot be split evenly at either degree; the message lists the
            degrees that would work.
    """
    _check_positive("src_degree", src_degree)
    _check_positive("dst_degree", dst_degree)
    _check_positive("unit", unit)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise MapError(f"size must be an int >= 0, got {size!r}")
    sizes = _normalise_blocks(size, blocks)
    _check_degree(size, sizes, unit, src_degree, "source ")
    _check_degree(size, sizes, unit, dst_degree, "target ")

    # Chunk (block b, rank r) sits at full-dimension offset _block_layout[b*degree + r]; it lands
    # at local offset sum(block sizes before b) / degree in rank r's slice.
    src_layout = _block_layout(sizes, src_degree)
    dst_layout = _block_layout(sizes, dst_degree)
    src_local = [0]
    for b in sizes:
        src_local.append(src_local[-1] + b // src_degree)
    dst_local = [0]
    for b in sizes:
        dst_local.append(dst_local[-1] + b // dst_degree)

    chunk_pieces = overlap_pieces(src_layout, dst_layout)
    per_rank: list[list[Piece]] = [[] for _ in range(dst_degree)]
    for b in range(len(sizes)):  # block order is the order within each local slice
        for r in range(dst_degree):
            for p in chunk_pieces[b * dst_degree + r]:
                src_block, src_rank = divmod(p.src, src_degree)
                piece = Piece(
                    src=src_rank,
                    src_start=src_local[src_block] + p.src_start,
                    length=p.length,
                    dst_start=dst_local[b] + p.dst_start,
                )
                out = per_rank[r]
                last = out[-1] if out else None
                if (
                    last is not None
                    and last.src == piece.src
                    and last.src_start + last.length == piece.src_start
                    and last.dst_start + last.length == piece.dst_start
                ):
                    out[-1] = Piece(
                        last.src, last.src_start, last.length + piece.length, last.dst_start
                    )
                else:
                    out.append(piece)
    return DimReshard(
        size=size,
        src_degree=src_degree,
        dst_degree=dst_degree,
        blocks=sizes,
        unit=unit,
        pieces=tuple(tuple(p) for p in per_rank),
    )


# --------------------------------------------------------------------------------------------
# 2D (pp, tp) and 3D (pp, tp, dp) reshape maps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A source model-state file: ``mp_rank_{mp_rank:02d}_model_states.pt`` of (stage, tp_rank)."""

    stage: int
    tp_rank: int
    mp_rank: int


@dataclass(frozen=True)
class ModelTarget:
    """What one target (stage, tp_rank) is made of.

    Attributes:
        stage: Target pipeline stage.
        tp_rank: Target tensor-parallel rank.
        mp_rank: Target model-parallel rank (its file name's ``MM``).
        layers: Global layer indices the target stage owns.
        layer_src_stage: Source stage of each layer in ``layers``, in the same order.
        stage_pieces: The same as runs of layers: ``Piece.src`` is a source stage, offsets are
            layer counts from the start of the source and target stages.
        tp_pieces: TP slice pieces in units of ``Reshape2D.tp_unit`` (``Piece.src`` is a source
            TP rank): for a tensor split evenly along a dimension of length ``n`` multiply
            offsets and lengths by ``n / tp_unit``; use :func:`reshard_dim` for fused dimensions.
        sources: Every source file that feeds this target: the source stages of its layers
            times the source TP ranks of its pieces, by ``mp_rank``. Empty if it owns no layers.
    """

    stage: int
    tp_rank: int
    mp_rank: int
    layers: range
    layer_src_stage: tuple[int, ...]
    stage_pieces: tuple[Piece, ...]
    tp_pieces: tuple[Piece, ...]
    sources: tuple[ModelSource, ...]

    @property
    def src_stages(self) -> tuple[int, ...]:
        """Source stages feeding this target, ascending."""
        return tuple(p.src for p in self.stage_pieces)

    @property
    def src_tp_ranks(self) -> tuple[int, ...]:
        """Source TP ranks feeding this target, ascending."""
        return tuple(p.src for p in self.tp_pieces)


@dataclass(frozen=True)
class Reshape2D:
    """A (pp, tp) -> (pp', tp') model-parallel reshape: one :class:`ModelTarget` per target file.

    Attributes:
        src_pp: Source pipeline degree.
        src_tp: Source tensor-parallel degree.
        dst_pp: Target pipeline degree.
        dst_tp: Target tensor-parallel degree.
        src_parts: Source stage boundaries over the layers.
        dst_parts: Target stage boundaries over the same layers.
        tp_unit: ``lcm(src_tp, dst_tp)``: the number of equal units TP pieces are counted in.
        targets: Indexed by target ``mp_rank`` (``stage * dst_tp + tp_rank``).
    """

    src_pp: int
    src_tp: int
    dst_pp: int
    dst_tp: int
    src_parts: tuple[int, ...]
    dst_parts: tuple[int, ...]
    tp_unit: int
    targets: tuple[ModelTarget, ...]

    def target(self, stage: int, tp_rank: int) -> ModelTarget:
        """The target of (stage, tp_rank) in the new layout."""
        _check_index("stage", stage, self.dst_pp)
        _check_index("tp_rank", tp_rank, self.dst_tp)
        return self.targets[stage * self.dst_tp + tp_rank]


def map_2d(
    src_pp: int,
    src_tp: int,
    dst_pp: int,
    dst_tp: int,
    *,
    src_parts: Sequence[int],
    dst_parts: Sequence[int],
) -> Reshape2D:
    """Which source model-state files feed each target (stage', tp') in a pp/tp reshape.

    Unlike DeepSpeed's ``reshape_meg_2d_parallel`` (which only shrinks, by whole factors, and
    merges consecutive stages without looking at layers), this works from the layer partitions,
    so it grows, shrinks, and re-partitions stages that do not align (the target partition may
    come from another method). Where the target stages are unions of consecutive source stages
    and the TP degree shrinks by a factor, it gives DeepSpeed's grouping.

    Layers are stage-local in neither layout: layer ``l`` lives in ``layer_{l:02d}-model_*``
    files in both. Tied modules (embeddings shared by the first and last stage) are outside this
    arithmetic: the checkpoint keeps the authoritative copy on stage 0.

    Args:
        src_pp: Source pipeline degree.
        src_tp: Source TP degree.
        dst_pp: Target pipeline degree.
        dst_tp: Target TP degree.
        src_parts: Source stage boundaries (length ``src_pp + 1``).
        dst_parts: Target stage boundaries (length ``dst_pp + 1``) over the same layer count.

    Returns:
        The 2D map.

    Raises:
        MapError: If degrees or partitions are invalid or cover different layer counts.
    """
    for name, value in (
        ("src_pp", src_pp),
        ("src_tp", src_tp),
        ("dst_pp", dst_pp),
        ("dst_tp", dst_tp),
    ):
        _check_positive(name, value)
    _check_parts(src_parts, "src_parts")
    _check_parts(dst_parts, "dst_parts")
    if len(src_parts) != src_pp + 1:
        raise MapError(f"src_parts has {len(src_parts) - 1} stages but src_pp is {src_pp}")
    if len(dst_parts) != dst_pp + 1:
        raise MapError(f"dst_parts has {len(dst_parts) - 1} stages but dst_pp is {dst_pp}")
    if src_parts[-1] != dst_parts[-1]:
        raise MapError(
            f"source partition covers {src_parts[-1]} layers but target covers {dst_parts[-1]}"
        )

    owner = layer_stage(src_parts)
    stage_pieces = overlap_pieces(src_parts, dst_parts)
    tp_unit = math.lcm(src_tp, dst_tp)
    tp_pieces = reshard_dim(tp_unit, src_tp, dst_tp).pieces

    targets = []
    for stage in range(dst_pp):
        layers = range(dst_parts[stage], dst_parts[stage + 1])
        src_stages = [p.src for p in stage_pieces[stage]]
        for tp_rank in range(dst_tp):
            sources = tuple(
                ModelSource(stage=s, tp_rank=t, mp_rank=s * src_tp + t)
                for s in src_stages
                for t in (p.src for p in tp_pieces[tp_rank])
            )
            targets.append(
                ModelTarget(
                    stage=stage,
                    tp_rank=tp_rank,
                    mp_rank=stage * dst_tp + tp_rank,
                    layers=layers,
                    layer_src_stage=tuple(owner[layer] for layer in layers),
                    stage_pieces=stage_pieces[stage],
                    tp_pieces=tp_pieces[tp_rank],
                    sources=sources,
                )
            )
    return Reshape2D(
        src_pp=src_pp,
        src_tp=src_tp,
        dst_pp=dst_pp,
        dst_tp=dst_tp,
        src_parts=tuple(src_parts),
        dst_parts=tuple(dst_parts),
        tp_unit=tp_unit,
        targets=tuple(targets),
    )


@dataclass(frozen=True)
class ZeroSource:
    """A source ZeRO optimizer file ``[bf16_]zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_*``.

    Attributes:
        stage: Source pipeline stage.
        tp_rank: Source TP rank.
        dp_rank: Source data-parallel rank (the ``pp_rank`` of the file name).
        mp_rank: Source model-parallel rank.
        file_index: Position in DeepSpeed's ``(dp_rank, mp_rank)`` sorted file list.
    """

    stage: int
    tp_rank: int
    dp_rank: int
    mp_rank: int
    file_index: int


@dataclass(frozen=True)
class RankTarget:
    """What one target rank (stage, dp_rank, tp_rank) is made of.

    Attributes:
        rank: Target global rank.
        stage: Target stage.
        dp_rank: Target data-parallel rank.
        tp_rank: Target TP rank.
        mp_rank: Target model-parallel rank.
        model: The (stage, tp_rank) model-state map this rank's optimizer partition belongs to.
        zero_sources: Source ZeRO files that can hold part of this rank's partition: every
            data-parallel rank of every source file in ``model.sources``, by ``mp_rank`` then
            ``dp_rank``. ZeRO-1/2 re-partitions one flat buffer per parameter group (padded to
            a data-dependent multiple), so which of them overlap a given target partition
            depends on the flat-group sizes from ``param_shapes``: feed the two flat layouts'
            boundaries to :func:`overlap_pieces` for the exact element ranges.
    """

    rank: int
    stage: int
    dp_rank: int
    tp_rank: int
    mp_rank: int
    model: ModelTarget
    zero_sources: tuple[ZeroSource, ...]


@dataclass(frozen=True)
class Reshape3D:
    """A (pp, tp, dp) -> (pp', tp', dp') reshape.

    Attributes:
        src: Source topology.
        dst: Target topology.
        model_map: The 2D map of the model-state files.
        targets: One entry per target global rank, indexed by rank.
    """

    src: Topology
    dst: Topology
    model_map: Reshape2D
    targets: tuple[RankTarget, ...]

    def target(self, stage: int, dp_rank: int, tp_rank: int) -> RankTarget:
        """The target of one (stage, dp_rank, tp_rank) coordinate."""
        return self.targets[self.dst.global_rank(stage, dp_rank, tp_rank)]


def map_3d(
    src: Topology, dst: Topology, *, src_parts: Sequence[int], dst_parts: Sequence[int]
) -> Reshape3D:
    """The 2D model map extended with the data-parallel axis (ZeRO optimizer files).

    Any of pp, tp and dp may grow or shrink. See :class:`RankTarget` for what the ZeRO sources
    mean and why the exact ranges need the flat-group sizes.

    Args:
        src: Source topology.
        dst: Target topology.
        src_parts: Source stage boundaries.
        dst_parts: Target stage boundaries over the same layers.

    Returns:
        The 3D map.
    """
    model_map = map_2d(src.pp, src.tp, dst.pp, dst.tp, src_parts=src_parts, dst_parts=dst_parts)
    targets = []
    for rank in range(dst.world_size):
        c = dst.coord(rank)
        model = model_map.target(c.stage, c.tp_rank)
        zero = tuple(
            ZeroSource(
                stage=m.stage,
                tp_rank=m.tp_rank,
                dp_rank=d,
                mp_rank=m.mp_rank,
                file_index=src.zero_file_index(m.stage, m.tp_rank, d),
            )
            for m in model.sources
            for d in range(src.dp)
        )
        targets.append(
            RankTarget(
                rank=rank,
                stage=c.stage,
                dp_rank=c.dp_rank,
                tp_rank=c.tp_rank,
                mp_rank=model.mp_rank,
                model=model,
                zero_sources=zero,
            )
        )
    return Reshape3D(src=src, dst=dst, model_map=model_map, targets=tuple(targets))


# --------------------------------------------------------------------------------------------
# Megatron vocabulary padding
# --------------------------------------------------------------------------------------------


def padded_vocab_size(orig_vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Vocabulary size after Megatron's padding.

    Megatron's ``_vocab_size_with_padding`` rounds the tokenizer's vocabulary up to the next
    multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size`` (default 128 * tp),
    so the padded size, and hence the embedding's shape, depends on the TP degree: GPT-2's 50257
    becomes 50304 at TP 1 and 50432 at TP 2.

    Args:
        orig_vocab_size: Tokenizer vocabulary size, ``>= 0``.
        make_vocab_size_divisible_by: Megatron's ``--make-vocab-size-divisible-by``.
        tp: Tensor-parallel degree.

    Returns:
        The padded vocabulary size.
    """
    if isinstance(orig_vocab_size, bool) or not isinstance(orig_vocab_size, int):
        raise MapError(f"orig_vocab_size must be an int, got {orig_vocab_size!r}")
    if orig_vocab_size < 0:
        raise MapError(f"orig_vocab_size must be >= 0, got {orig_vocab_size}")
    _check_positive("make_vocab_size_divisible_by", make_vocab_size_divisible_by)
    _check_positive("tp", tp)
    multiple = make_vocab_size_divisible_by * tp
    return -(-orig_vocab_size // multiple) * multiple


def vocab_ranges(padded_vocab: int, tp: int) -> tuple[tuple[int, int], ...]:
    """Vocabulary rows ``[start, stop)`` held by each TP rank, as Megatron's ``VocabUtility``.

    Args:
        padded_vocab: Padded vocabulary size (must be divisible by ``tp``, as Megatron asserts).
        tp: Tensor-parallel degree.

    Returns:
        ``ranges[tp_rank] = (tp_rank * V/tp, (tp_rank + 1) * V/tp)``.
    """
    bounds = even_bounds(padded_vocab, tp)
    return tuple((bounds[r], bounds[r + 1]) for r in range(tp))


@dataclass(frozen=True)
class VocabReshard:
    """Re-splitting a padded vocabulary dimension to a new TP degree (and padded size).

    Attributes:
        orig_vocab_size: Real tokens; rows at and past it are padding.
        src_padded: Source padded size.
        src_tp: Source TP degree.
        dst_padded: Target padded size.
        dst_tp: Target TP degree.
        pieces: ``pieces[dst_rank]``: runs of real rows, offsets local to source/target slices.
        padding: ``padding[dst_rank] = (local_start, length)`` of the rows to zero-fill (padding
            carries no trained values: Megatron never produces those tokens, and DeepSpeed's
            universal checkpoint likewise drops it and pads the target with zeros).
    """

    orig_vocab_size: int
    src_padded: int
    src_tp: int
    dst_padded: int
    dst_tp: int
    pieces: tuple[tuple[Piece, ...], ...]
    padding: tuple[tuple[int, int], ...]


def reshard_vocab(
    orig_vocab_size: int, src_padded: int, src_tp: int, dst_padded: int, dst_tp: int
) -> VocabReshard:
    """Pieces for a vocabulary-parallel tensor (embedding, output layer) across TP and padding.

    Args:
        orig_vocab_size: Real vocabulary size.
        src_padded: Padded size in the source checkpoint.
        src_tp: Source TP degree.
        dst_padded: Padded size wanted in the target (e.g. :func:`padded_vocab_size` at ``dst_tp``).
        dst_tp: Target TP degree.

    Returns:
        Per target rank, the real rows to copy and the padding rows to fill.

    Raises:
        MapError: If a padded size is smaller than the vocabulary or not divisible by its degree.
    """
    for name, padded in (("src_padded", src_padded), ("dst_padded", dst_padded)):
        if padded < orig_vocab_size:
            raise MapError(f"{name} {padded} is smaller than the vocabulary {orig_vocab_size}")
    src_bounds = [min(b, orig_vocab_size) for b in even_bounds(src_padded, src_tp)]
    dst_full = even_bounds(dst_padded, dst_tp)
    dst_bounds = [min(b, orig_vocab_size) for b in dst_full]
    pieces = overlap_pieces(src_bounds, dst_bounds)
    # Real rows end at orig_vocab_size; a rank lying wholly past it is all padding.
    pad_starts = [max(dst_full[r], min(dst_full[r + 1], orig_vocab_size)) for r in range(dst_tp)]
    padding = tuple(
        (pad_starts[r] - dst_full[r], dst_full[r + 1] - pad_starts[r]) for r in range(dst_tp)
    )
    return VocabReshard(
        orig_vocab_size=orig_vocab_size,
        src_padded=src_padded,
        src_tp=src_tp,
        dst_padded=dst_padded,
        dst_tp=dst_tp,
        pieces=pieces,
        padding=padding,
    )
