"""Reshape a ZeRO checkpoint to another data-parallel size, as if DeepSpeed had saved it there.

Three layers, as everywhere in dsckpt:

* **Facts** (:class:`SourceFacts`): what the saved partitioning is, in plain integers and names,
  read from the rank files' metadata (no tensor data).
* **Plan** (:func:`plan_from_facts`, pure, no I/O): for every target rank and every flat group
  (ZeRO-1/2 optimizer group, ZeRO-3 sub-group) which source ranks and element ranges make its
  partition (:class:`Run`; ZeRO-3 keeps them as the rule that derives them per rank,
  :class:`Zero3Partitions`), plus the bookkeeping DeepSpeed records for the new size
  (``group_paddings``, ``param_slice_mappings``, ZeRO-3 sub-groups and ``param_shapes``).
* **Source** (:mod:`dsckpt.plan.zero_source`): opens the checkpoint and reads the facts;
  :func:`~dsckpt.plan.zero_source.plan_reshape` is both steps.
* **Files**: :class:`~dsckpt.execute.formats.deepspeed_files.ZeroRankFiles` turns the plan
  into a write plan (every rank file's pickle and zip records, and the byte ranges of the source
  files its partitions are made of), which the one executor writes under a temporary name and
  renames at the end (:func:`dsckpt.api.reshaping.reshape_zero`). Memory does not follow the
  model size.

DeepSpeed's rules for a size ``N`` (read from its source, checked on real checkpoints):

* ZeRO-1/2 and BF16_Optimizer: a group's flat buffer (parameters in ``param_shapes`` order, with
  ``parameter_alignment`` pads) is zero-padded to a multiple of ``2*N``; rank ``r`` owns
  ``[r*P, (r+1)*P)``. Optimizer state (``exp_avg``, ...) is saved with the full ``P``. ZeRO saves
  the fp32 slice without its tail padding and records it per rank in ``group_paddings``;
  BF16_Optimizer saves it whole and records the total padding on the last rank only.
  ``round_robin_gradients`` reorders each group's parameters by ``i % N``, so the order changes
  with ``N``: it is undone with the source size and redone with the target size.
* Mixture of experts (ZeRO-1/2): an expert group of expert-parallel size ``ep`` holds each EP
  rank's local experts, split as above over that EP rank's expert-data-parallel group, the
  ``N / ep`` DP ranks ``e, e + ep, ...`` (``partition_count`` ``N / ep``), so ``N`` must be a
  multiple of ``ep``. The per-expert weight files are keyed by global expert id and do not
  change. At another expert-parallel size ``M`` (native MoE, one EP size), EP rank ``e`` holds
  global experts ``e * E/M ..`` under local ids ``0 .. E/M - 1``: each EP rank's buffer is
  re-assembled from the source EP ranks' buffers (:func:`_plan_expert_regroup`), the group is
  named ``ep_size_M`` and the local names in ``param_shapes`` and the slice mappings change.
* ZeRO-3: every parameter is split on its own into ``ceil(numel/N)`` pieces; a rank's flat tensor
  per sub-group concatenates its pieces. Sub-groups are cut from each optimizer group where the
  running sum of piece sizes reaches ``sub_group_size``, so they too depend on ``N``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from dsckpt.discover import zero
from dsckpt.discover.moe import NATIVE_EXPERT, MoeLayout, global_target, native_expert_name
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.plan.maps import check_degrees
from dsckpt.sizes import human_bytes

# DeepSpeed's default `zero_optimization.sub_group_size`.
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000

# ---------------------------------------------------------------------------------------------
# Facts and plan: plain data, no torch
# ---------------------------------------------------------------------------------------------

Shape = tuple[int, ...]


@dataclass(frozen=True)
class SourceGroup:
    """One saved flat group: a ZeRO-1/2 optimizer group or a ZeRO-3 sub-group.

    ``params`` are ``(name, shape)`` in flat order (``param_shapes[g]``). ``partition_size`` is the
    per-rank slice (ZeRO-1/2, BF16_Optimizer; padding included). ``ds_id`` is the ZeRO-3 flat
    tensor's ``ds_id`` attribute, kept so an unchanged sub-group is written back as it was.
    """

    params: tuple[tuple[str, Shape], ...]
    param_group: int
    partition_size: int = 0
    alignment_paddings: tuple[int, ...] | None = None
    ds_id: str | None = None
    # MoE expert groups (ZeRO-1/2): the expert-parallel size of the group's experts. Each EP
    # rank's flat buffer (its local experts) is partitioned over its expert-data-parallel group
    # (DP ranks ``e, e + ep, e + 2 ep, ...``), so ``partition_count`` is ``dp / ep``. 1: a dense
    # group, partitioned over every DP rank.
    ep: int = 1
    label: str = ""  # the expert group's name (``ep_size_2``), for people


@dataclass(frozen=True)
class SourceFacts:
    """What the saved partitioning is, as DeepSpeed defines it (inputs of the pure planner).

    Args:
        kind: ``"zero"`` (DeepSpeedZeroOptimizer, ZeRO-1/2), ``"bf16_optimizer"`` or ``"zero3"``.
        dp: the data-parallel size the checkpoint was saved at.
        groups: the flat groups, in saved order.
        round_robin: ZeRO-1/2 ``round_robin_gradients`` (flat order depends on the DP size).
        param_alignment: ZeRO-1/2 ``parameter_alignment`` in elements (1 when off).
        sub_group_size: ZeRO-3 ``sub_group_size``.
        frozen: ZeRO-3 frozen parameters ``(name, shape)``: their fragments are re-split too.
        param_order: ZeRO-3 parameter names in module order (for the ``ds_id`` bookkeeping).
        moe: discovery's mixture-of-experts record (``Layout.moe``): which global expert each
            EP rank's local expert parameter is, for a change of expert parallelism.
    """

    kind: str
    stage: int
    dp: int
    groups: tuple[SourceGroup, ...]
    round_robin: bool = False
    param_alignment: int = 1
    sub_group_size: int = DEFAULT_SUB_GROUP_SIZE
    frozen: tuple[tuple[str, Shape], ...] = ()
    param_order: tuple[str, ...] = ()
    moe: MoeLayout | None = None


@dataclass(frozen=True)
class Run:
    """``length`` elements from ``src_start`` of source rank ``src_rank``'s flat tensor
    ``src_index`` (group, sub-group, or frozen parameter) go to ``dst_start`` of the target."""

    src_rank: int
    src_index: int
    src_start: int
    length: int
    dst_start: int


@dataclass(frozen=True)
class Partition:
    """One target tensor: its length, how much of it is DeepSpeed's padding, and the runs
    that fill it. Elements no run covers are written as zeros.

    At an unchanged size ZeRO-3 runs also cover the padding: DeepSpeed leaves uninitialised
    memory there, and copying it keeps a same-size reshape bit-identical to its input.
    """

    rank: int
    numel: int
    runs: tuple[Run, ...]
    padding: int = 0

    @property
    def read_numel(self) -> int:
        return sum(r.length for r in self.runs)


@dataclass(frozen=True)
class TargetGroup:
    """One flat group at the target size, with one :class:`Partition` per target rank."""

    index: int
    param_group: int
    params: tuple[tuple[str, Shape], ...]  # flat order at the target size (param_shapes[index])
    partitions: Sequence[Partition]  # a tuple, or ZeRO-3's rule (Zero3Partitions)
    sources: tuple[int, ...]  # source group indices the data comes from
    alignment_paddings: tuple[int, ...] | None = None  # ZeRO-1/2 param_alignment_paddings
    ds_id: str | None = None  # ZeRO-3 flat tensor bookkeeping
    ep: int = 1  # MoE expert group: its expert-parallel size (see SourceGroup.ep)
    label: str = ""

    def partition_count(self, dp: int) -> int:
        """Ranks the group is partitioned over at ``dp`` DP ranks (DeepSpeed's
        ``partition_count[g]``): every DP rank, or an expert group's expert-data-parallel size."""
        return dp // self.ep


@dataclass(frozen=True)
class FrozenFragments:
    """A ZeRO-3 frozen parameter's per-rank fragments at the target size."""

    name: str
    shape: Shape
    partitions: Sequence[Partition]


@dataclass(frozen=True)
class ReshapePlan:
    """Everything the output files hold that depends on the DP size.

    ``group_paddings[rank][group]`` and ``slice_mappings[rank][group]`` (``(name, numel, start)``
    triples, DeepSpeed's ``param_slice_mappings``) are for ZeRO-1/2 and BF16_Optimizer only.
    """

    kind: str
    stage: int
    source_dp: int
    dp: int
    groups: tuple[TargetGroup, ...]
    frozen: tuple[FrozenFragments, ...] = ()
    group_paddings: tuple[tuple[int, ...], ...] = ()
    slice_mappings: tuple[tuple[tuple[tuple[str, int, int], ...], ...], ...] = ()
    params_reordered: bool = False  # ZeRO-1/2 round robin: param_shapes order changes
    # MoE: the expert-parallel sizes (one per EP size in use, ascending) at the target, and as
    # saved when a reshape changed them (``--ep``; empty: kept).
    ep_sizes: tuple[int, ...] = ()
    source_ep_sizes: tuple[int, ...] = ()
    # From a universal checkpoint, runs read parameters' own files: src_index names one of these.
    run_sources: tuple[str, ...] = ()

    @property
    def param_groups(self) -> int:
        return max((g.param_group for g in self.groups), default=-1) + 1

    def rows(self) -> list[tuple[str, int, int, int, str]]:
        """``(group, target rank, elements, padding, sources)`` for a table; sources read like
        ``r0[82:164]->0``: source rank 0, its elements 82..163, placed from element 0."""
        rows = []
        for group in self.groups:
            label = (
                f"sub-group {group.index} (group {group.param_group})"
                if self.kind == "zero3"
                else f"group {group.index}"
            )
            if group.ep > 1 or group.label:
                label += f" ({group.label or 'experts'}, EP {group.ep})"
            for part in group.partitions:
                runs = describe_runs(part.runs, names=self.run_sources)
                rows.append((label, part.rank, part.numel, part.padding, runs))
        return rows


def describe_runs(runs: Sequence[Run], limit: int = 4, names: Sequence[str] = ()) -> str:
    """``r0[82:164]->0`` per run (source rank, its elements, where they go), or with ``names``
    (a universal source: one file per parameter) ``fc1.weight[0:35]->9``."""
    if not runs:
        return "(all padding)"
    shown = [
        f"{names[r.src_index] if names else f'r{r.src_rank}'}"
        f"[{r.src_start}:{r.src_start + r.length}]->{r.dst_start}"
        for r in runs[:limit]
    ]
    more = f" +{len(runs) - limit} more" if len(runs) > limit else ""
    return " ".join(shown) + more


def round_robin_order(count: int, dp: int) -> list[int]:
    """DeepSpeed's ``round_robin_gradients`` order: flat position -> original parameter index."""
    return [i for j in range(min(count, dp)) for i in range(j, count, dp)]


def group_order(flat_names: Sequence[str], dp: int, round_robin: bool) -> list[str]:
    """The group's own parameter order (DeepSpeed's ``bit16_groups``) from the flat order saved
    at ``dp`` ranks: the same, or with ``round_robin_gradients`` undone."""
    if not round_robin:
        return list(flat_names)
    original = [""] * len(flat_names)
    for pos, index in enumerate(round_robin_order(len(flat_names), dp)):
        original[index] = flat_names[pos]
    return original


def alignment_paddings(numels: Sequence[int], alignment: int) -> list[int]:
    """Pads after each parameter (none after the last) so every start is a multiple of
    ``alignment`` (DeepSpeed's ``param_alignment_paddings``)."""
    pads = []
    offset = 0
    for i, n in enumerate(numels):
        offset += n
        pad = 0 if i == len(numels) - 1 else (-offset) % alignment
        pads.append(pad)
        offset += pad
    return pads


def _offsets(numels: Sequence[int], pads: Sequence[int]) -> tuple[list[int], int]:
    offsets, offset = [], 0
    for n, pad in zip(numels, pads, strict=True):
        offsets.append(offset)
        offset += n + pad
    return offsets, offset - (pads[-1] if pads else 0)


def split_segments(
    segments: Iterable[tuple[int, int, int, int]], src_size: int, dst_size: int, dst_ranks: int
) -> list[list[Run]]:
    """Cut ``(src_index, src_offset, dst_offset, length)`` segments of a flat index space at the
    source and target partition boundaries; returns the runs of each target rank, merged where
    they continue each other."""
    per_rank: list[list[Run]] = [[] for _ in range(dst_ranks)]
    for src_index, src_offset, dst_offset, length in segments:
        done = 0
        while done < length:
            src_rank, src_inner = divmod(src_offset + done, src_size)
            dst_rank, dst_inner = divmod(dst_offset + done, dst_size)
            n = min(length - done, src_size - src_inner, dst_size - dst_inner)
            _append(per_rank[dst_rank], Run(src_rank, src_index, src_inner, n, dst_inner))
            done += n
    return [sorted(runs, key=lambda r: r.dst_start) for runs in per_rank]


def _append(runs: list[Run], run: Run) -> None:
    if runs:
        last = runs[-1]
        if (
            last.src_rank == run.src_rank
            and last.src_index == run.src_index
            and last.src_start + last.length == run.src_start
            and last.dst_start + last.length == run.dst_start
        ):
            runs[-1] = Run(
                last.src_rank,
                last.src_index,
                last.src_start,
                last.length + run.length,
                last.dst_start,
            )
            return
    runs.append(run)


def slice_mapping(
    names: Sequence[str],
    numels: Sequence[int],
    offsets: Sequence[int] | None,
    rank: int,
    partition_size: int,
) -> tuple[tuple[str, int, int], ...]:
    """DeepSpeed's ``param_slice_mappings`` entry of one group on one rank.

    Parameters go in their group order; ``offsets`` are their flat offsets when the group has
    alignment padding, otherwise DeepSpeed takes running sums in group order (which is what it
    records even under ``round_robin_gradients``, and so do we).
    """
    return slice_mappings(names, numels, offsets, rank + 1, partition_size)[rank]


def slice_mappings(
    names: Sequence[str],
    numels: Sequence[int],
    offsets: Sequence[int] | None,
    dp: int,
    partition_size: int,
) -> list[tuple[tuple[str, int, int], ...]]:
    """:func:`slice_mapping` of every rank below ``dp`` in one pass over the parameters: each
    parameter's ranks come from integer division (linear in ranks + parameters, where asking
    each rank in turn walks every parameter for every rank)."""
    per_rank: list[list[tuple[str, int, int]]] = [[] for _ in range(dp)]
    running = 0
    for i, (name, n) in enumerate(zip(names, numels, strict=True)):
        off = offsets[i] if offsets is not None else running
        running += n
        if not n or partition_size <= 0:
            continue
        # The ranks whose [r * size, (r + 1) * size) the parameter's [off, off + n) overlaps.
        first, last = off // partition_size, min((off + n - 1) // partition_size, dp - 1)
        for rank in range(max(first, 0), last + 1):
            start = rank * partition_size
            lo = max(off, start)
            per_rank[rank].append((name, min(off + n, start + partition_size) - lo, lo - start))
    return [tuple(out) for out in per_rank]


def zero12_group_paddings(
    data_numel: int, total_numel: int, partition_size: int, dp: int, kind: str
) -> list[int]:
    """``group_paddings[g]`` per rank: ZeRO's tail padding inside each rank's slice, or
    BF16_Optimizer's total padding recorded on the last rank only."""
    if kind == "bf16_optimizer":
        return [0] * (dp - 1) + [partition_size * dp - total_numel]
    return [
        partition_size - max(0, min(partition_size, data_numel - r * partition_size))
        for r in range(dp)
    ]


def zero3_sub_groups(numels: Sequence[int], dp: int, sub_group_size: int) -> list[list[int]]:
    """Split one optimizer group (parameter numels in order) into ZeRO-3 sub-groups at ``dp``."""
    parts = [zero.zero3_partition_numel(n, dp) for n in numels]
    if sub_group_size >= sum(parts):
        return [list(range(len(parts)))]
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, p in enumerate(parts):
        current.append(i)
        size += p
        if size >= sub_group_size or i == len(parts) - 1:
            groups.append(current)
            current, size = [], 0
    return groups


def _zero3_runs(
    numel: int, src_dp: int, dst_dp: int, dst_rank: int, src_index: int, base: int, dst_offset: int
) -> list[Run]:
    """Runs giving target rank ``dst_rank`` its ``ceil(numel/dst_dp)`` piece of one parameter.

    The parameter's piece starts at element ``base`` of flat tensor ``src_index`` on every source
    rank. At an unchanged size the piece is copied whole, padding included.
    """
    src_c = zero.zero3_partition_numel(numel, src_dp)
    dst_c = zero.zero3_partition_numel(numel, dst_dp)
    lo = dst_rank * dst_c
    hi = (dst_rank + 1) * dst_c if src_dp == dst_dp else min(numel, (dst_rank + 1) * dst_c)
    runs = []
    e = lo
    while e < hi:
        src_rank, inner = divmod(e, src_c)
        n = min(hi - e, src_c - inner)
        runs.append(Run(src_rank, src_index, base + inner, n, dst_offset + e - lo))
        e += n
    return runs


@dataclass(frozen=True)
class Zero3Partitions(Sequence[Partition]):
    """A ZeRO-3 sub-group's partitions at ``dp`` ranks, kept as the rule that makes them.

    Every target rank's tensor concatenates its ``ceil(numel/dp)`` piece of each parameter, so
    the partitions are fully described by the parameters (``pieces``: numel, source sub-group,
    offset of the parameter's piece in every source rank's tensor). Listing each rank's runs
    would hold ranks x parameters runs (10 million at 512 ranks x 20,000 parameters); a rank's
    :class:`Partition` is derived when asked for (the writer asks once per rank file), in time
    proportional to the parameters that rank holds elements of.
    """

    src_dp: int
    dp: int
    pieces: tuple[tuple[int, int, int], ...]

    def __len__(self) -> int:
        return self.dp

    @cached_property
    def _cut(self) -> tuple[list[int], list[int], list[int], list[int], int]:
        """Per parameter its piece at ``dp`` and where the piece starts in a rank's tensor, how
        many ranks hold elements of it (``ceil(numel/piece)``, the rest hold padding), and the
        parameters by that count, most first; then the tensor's length."""
        piece = [zero.zero3_partition_numel(n, self.dp) for n, _, _ in self.pieces]
        starts, total = [], 0
        for p in piece:
            starts.append(total)
            total += p
        holding = [-(-n // p) if p else 0 for (n, _, _), p in zip(self.pieces, piece, strict=True)]
        widest = sorted(range(len(piece)), key=lambda i: -holding[i])
        return piece, starts, holding, widest, total

    def __getitem__(self, rank: int) -> Partition:  # type: ignore[override]
        if not isinstance(rank, int):
            raise TypeError("ZeRO-3 partitions are indexed by target rank")
        if rank < 0:
            rank += self.dp
        if not 0 <= rank < self.dp:
            raise IndexError(rank)
        piece, starts, holding, widest, total = self._cut
        # A rank past a parameter's end holds padding only (most ranks, for the small parameters
        # of a large DP): only the parameters it holds elements of have runs. At an unchanged
        # size the pieces are copied whole, padding included, so every parameter has one.
        found: list[Run] = []
        held = 0
        for i in range(len(piece)) if self.src_dp == self.dp else widest:
            if holding[i] <= rank and self.src_dp != self.dp:
                break
            n, sub, base = self.pieces[i]
            held += max(0, min(piece[i], n - rank * piece[i]))
            found.extend(_zero3_runs(n, self.src_dp, self.dp, rank, sub, base, starts[i]))
        runs: list[Run] = []
        for run in sorted(found, key=lambda r: r.dst_start):
            _append(runs, run)
        return Partition(rank, total, tuple(runs), total - held)


def plan_from_facts(facts: SourceFacts, dp: int, ep: int | None = None) -> ReshapePlan:
    """The reshape plan to ``dp`` data-parallel ranks (pure: integers in, integers out), with
    every MoE expert group at expert-parallel size ``ep`` (None: as saved).

    Raises:
        UsageError: ``dp`` or ``ep`` below 1.
        UnsupportedLayout: the saved layout does not follow DeepSpeed's rules as understood here
            (so a reshape could not be trusted), or ``ep`` cannot be applied to it.
    """
    check_degrees(dp=dp, ep=ep)
    if facts.kind == "zero3":
        if ep is not None:
            raise UnsupportedLayout(
                f"--ep {ep}: a ZeRO-3 checkpoint's expert parallelism cannot change (native MoE "
                "does not run with ZeRO-3; AutoEP ZeRO-3 is not reshaped); --ep applies to "
                "native MoE ZeRO-1/2 checkpoints"
            )
        return _plan_zero3(facts, dp)
    return _plan_zero12(facts, dp, ep)


def saved_ep_sizes(facts: SourceFacts) -> tuple[int, ...]:
    """The expert-parallel sizes the expert groups were saved at, ascending (empty: dense)."""
    return tuple(sorted({g.ep for g in facts.groups if g.ep > 1 or g.label}))


def check_expert_parallel(facts: SourceFacts, dp: int, ep: int | None = None) -> None:
    """DeepSpeed builds an expert group's expert-data-parallel group from ``dp / ep`` ranks: a
    target DP that is not a multiple of every expert group's EP size cannot hold the experts.
    With ``ep`` (a change of expert parallelism), the rules that change must allow it."""
    saved = saved_ep_sizes(facts)
    if ep is not None and saved != (ep,):
        _check_ep_change(facts, ep, saved)
    for size in saved if ep is None else (ep,):
        if dp % size:
            kept = f"--ep {ep}" if ep is not None else "expert parallelism stays as saved"
            if ep is None and len(saved) == 1 and facts.moe is not None and not facts.moe.autoep:
                kept += " unless reshape --ep changes it"
            raise UnsupportedLayout(
                f"--dp {dp}: DeepSpeed requires DP to be a multiple of the expert-parallel size "
                f"{size} ({kept}; choose a multiple of {size})"
            )
    # Saved at EP 1, an expert group's round robin is over every DP rank; --ep M > 1 would
    # need it over dp / M ranks, which the expert re-grouping does not do either.
    if facts.round_robin and any(size > 1 for size in (*saved, ep or 1)):
        raise UnsupportedLayout(
            "round_robin_gradients with mixture-of-experts groups: the expert groups' flat order "
            "depends on the expert-data-parallel size, which reshape does not handle"
        )


def _check_ep_change(facts: SourceFacts, ep: int, saved: Sequence[int]) -> None:
    """What a change of expert parallelism to ``ep`` needs: native MoE layers sharing one EP
    size, each with a number of experts ``ep`` divides (DeepSpeed's own rule)."""
    moe = facts.moe
    if not saved or moe is None:
        raise UnsupportedLayout(
            f"--ep {ep}: the checkpoint has no mixture-of-experts layers (no expert-parallel "
            "size to change)"
        )
    if moe.autoep:
        raise UnsupportedLayout(
            f"--ep {ep}: AutoEP checkpoints keep their expert parallelism (their per-layer "
            "metadata, ds_autoep_layers, records the placement); --ep applies to native MoE"
        )
    if len(saved) > 1:
        sizes = " and ".join(str(e) for e in saved)
        raise UnsupportedLayout(
            f"--ep {ep}: the MoE layers use expert-parallel sizes {sizes}, one optimizer group "
            "each; --ep sets the one size all MoE layers share, so it applies only to models "
            "whose layers share one (moving them to one size would merge optimizer groups)"
        )
    for layer in moe.layers:
        if layer.num_experts % ep:
            raise UnsupportedLayout(
                f"--ep {ep}: MoE layer {layer.module} has {layer.num_experts} experts, which "
                f"{ep} expert-parallel ranks cannot share equally (DeepSpeed requires "
                "num_experts to be a multiple of ep_size)"
            )


def _plan_zero12(facts: SourceFacts, dp: int, ep_target: int | None = None) -> ReshapePlan:
    check_expert_parallel(facts, dp, ep_target)
    groups = []
    paddings_by_group = []
    mappings_by_group = []
    reordered = False
    for g, src in enumerate(facts.groups):
        is_expert = src.ep > 1 or bool(src.label)
        if is_expert and ep_target is not None and ep_target != src.ep:
            target, recorded_paddings, target_mappings = _plan_expert_regroup(
                facts, g, dp, ep_target
            )
            groups.append(target)
            paddings_by_group.append(recorded_paddings)
            mappings_by_group.append(target_mappings)
            reordered = True  # the local expert names in param_shapes change
            continue
        # A dense group is partitioned over all DP ranks; an expert group (EP size ep) over the
        # dp / ep ranks of each expert-data-parallel group: EP rank e's buffer lives in DP ranks
        # e, e + ep, ... (DeepSpeed's default topology: EDP groups stride by ep). The arithmetic
        # below runs over one such group's partitions; every EP rank's group splits alike.
        ep = src.ep
        src_count, dst_count = facts.dp // ep, dp // ep
        names = [n for n, _ in src.params]
        shapes = dict(src.params)
        numels = [zero.numel(s) for s in shapes.values()]
        count = len(names)
        src_pads = [0] * count if src.alignment_paddings is None else list(src.alignment_paddings)
        # The group's own order (DeepSpeed's bit16_groups): undo the source's round robin.
        original = group_order(names, src_count, facts.round_robin)
        if facts.round_robin:
            dst_names = [original[i] for i in round_robin_order(count, dst_count)]
        else:
            dst_names = names
        dst_numels = [zero.numel(shapes[n]) for n in dst_names]
        if dst_names == names:
            dst_pads = src_pads
        else:
            reordered = True
            if alignment_paddings(numels, facts.param_alignment) != src_pads:
                raise UnsupportedLayout(
                    f"group {g}: param_alignment_paddings {src_pads} do not follow DeepSpeed's "
                    f"parameter_alignment rule ({facts.param_alignment} elements), so the group "
                    "cannot be re-ordered for round_robin_gradients at another DP size"
                )
            dst_pads = alignment_paddings(dst_numels, facts.param_alignment)
        src_offsets, src_data = _offsets(numels, src_pads)
        dst_offsets, dst_data = _offsets(dst_numels, dst_pads)
        dst_size = zero.zero12_partition_size(dst_data, dst_count)
        if dst_names == names:
            # Same flat order: the whole data range (alignment pads included) moves as one.
            segments: list[tuple[int, int, int, int]] = [(g, 0, 0, src_data)] if src_data else []
        else:
            src_at = dict(zip(names, src_offsets, strict=True))
            dst_at = dict(zip(dst_names, dst_offsets, strict=True))
            segments = [
                (g, src_at[n], dst_at[n], zero.numel(shapes[n]))
                for n in names
                if zero.numel(shapes[n])
            ]
        # Runs per partition of one (expert-)data-parallel group, source partitions numbered
        # within the group too.
        per_part = split_segments(segments, src.partition_size, dst_size, dst_count)
        tails = zero12_group_paddings(dst_data, sum(numels), dst_size, dst_count, "zero")
        recorded = zero12_group_paddings(dst_data, sum(numels), dst_size, dst_count, facts.kind)
        # param_slice_mappings walk the group's own order; true offsets only with alignment pads.
        offsets = None
        if any(dst_pads):
            at = dict(zip(dst_names, dst_offsets, strict=True))
            offsets = [at[n] for n in original]
        mappings = slice_mappings(
            original, [zero.numel(shapes[n]) for n in original], offsets, dst_count, dst_size
        )
        partitions: list[Partition] = []
        group_paddings: list[int] = []
        group_mappings: list[tuple[tuple[str, int, int], ...]] = []
        for rank in range(dp):
            ep_rank, part = rank % ep, rank // ep
            runs = (
                tuple(per_part[part])
                if ep == 1
                else tuple(
                    Run(ep_rank + r.src_rank * ep, r.src_index, r.src_start, r.length, r.dst_start)
                    for r in per_part[part]
                )
            )
            partitions.append(Partition(rank, dst_size, runs, tails[part]))
            group_paddings.append(recorded[part])
            group_mappings.append(mappings[part])
        groups.append(
            TargetGroup(
                index=g,
                param_group=g,
                params=tuple((n, shapes[n]) for n in dst_names),
                partitions=tuple(partitions),
                sources=(g,),
                alignment_paddings=tuple(dst_pads) if src.alignment_paddings is not None else None,
                ep=ep,
                label=src.label,
            )
        )
        paddings_by_group.append(group_paddings)
        mappings_by_group.append(group_mappings)
    return ReshapePlan(
        kind=facts.kind,
        stage=facts.stage,
        source_dp=facts.dp,
        dp=dp,
        groups=tuple(groups),
        group_paddings=tuple(tuple(p[r] for p in paddings_by_group) for r in range(dp)),
        slice_mappings=tuple(tuple(m[r] for m in mappings_by_group) for r in range(dp)),
        params_reordered=reordered,
        ep_sizes=tuple(sorted({g.ep for g in groups if g.ep > 1 or g.label})),
        source_ep_sizes=saved_ep_sizes(facts)
        if ep_target is not None and saved_ep_sizes(facts) != (ep_target,)
        else (),
    )


def _plan_expert_regroup(
    facts: SourceFacts, g: int, dp: int, ep: int
) -> tuple[TargetGroup, list[int], list[tuple[tuple[str, int, int], ...]]]:
    """Expert group ``g`` at expert-parallel size ``ep``: the target group, and per target DP
    rank its recorded padding and slice mapping.

    DeepSpeed (``moe/experts.py``, ``engine.py`` ``load_moe_state_dict``): EP rank ``e`` at EP
    ``M`` holds global experts ``e * E/M + i`` as local experts ``i``; an expert group's flat
    buffer lists its parameters in module order (layer by layer, local expert by local expert,
    each expert's parameters in their own order). The saved order must follow that rule at the
    saved EP size, or the order at ``M`` could only be guessed. Each target parameter's values
    are those of the same global expert parameter, found through discovery's record of which
    global key every source EP rank's local parameter is (``MoeLayout.params``); it sits in
    that EP rank's buffer, partitioned over its expert-data-parallel group (DP ranks ``R, R +
    ep_saved, ...``), and goes to target EP rank ``e``'s buffer, partitioned over DP ranks
    ``e, e + M, ...``.
    """
    src = facts.groups[g]
    moe = facts.moe
    assert moe is not None  # _check_ep_change
    names = [n for n, _ in src.params]
    shapes = dict(src.params)
    numels = [zero.numel(s) for s in shapes.values()]
    src_pads = [0] * len(names) if src.alignment_paddings is None else list(src.alignment_paddings)
    if alignment_paddings(numels, facts.param_alignment) != src_pads:
        raise UnsupportedLayout(
            f"group {g}: param_alignment_paddings {src_pads} do not follow DeepSpeed's "
            f"parameter_alignment rule ({facts.param_alignment} elements), so the expert group "
            "cannot be laid out at another expert-parallel size"
        )
    src_offsets, _ = _offsets(numels, src_pads)
    src_at = dict(zip(names, src_offsets, strict=True))
    layers = {layer.module: layer for layer in moe.layers}
    # Module by module (in group order), each expert's parameters (rest, shape) in their order.
    per_module: dict[str, list[tuple[str, Shape]]] = {}
    for name in names:
        found = NATIVE_EXPERT.match(name)
        if found is None or found["module"] not in layers:
            raise UnsupportedLayout(
                f"expert group {g} ({src.label}) lists {name}, not a native MoE expert "
                "parameter: its place at another expert-parallel size is unknown"
            )
        if int(found["id"]) == 0:
            per_module.setdefault(found["module"], []).append((found["rest"], shapes[name]))

    def flat_order(local_count: Callable[[str], int]) -> list[tuple[str, str, Shape]]:
        """(module, name, shape) in buffer order: the module kept, not parsed back from the
        name (a module path may itself hold ``.deepspeed_moe.``)."""
        return [
            (module, native_expert_name(module, i, rest), shape)
            for module, rests in per_module.items()
            for i in range(local_count(module))
            for rest, shape in rests
        ]

    saved_order = flat_order(lambda m: layers[m].num_experts // src.ep)
    if [(n, s) for _, n, s in saved_order] != list(src.params):
        raise UnsupportedLayout(
            f"expert group {g} ({src.label}) does not list its parameters layer by layer and "
            "local expert by local expert (module order): its order at another expert-parallel "
            "size would be a guess"
        )
    dst_order = flat_order(lambda m: layers[m].num_experts // ep)
    dst_params = [(n, s) for _, n, s in dst_order]
    dst_numels = [zero.numel(s) for _, s in dst_params]
    dst_pads = alignment_paddings(dst_numels, facts.param_alignment)
    dst_offsets, dst_data = _offsets(dst_numels, dst_pads)
    src_count, dst_count = facts.dp // src.ep, dp // ep
    dst_size = zero.zero12_partition_size(dst_data, dst_count)
    # Discovery's record: global key -> (source EP rank, local name) of group g.
    where = {p.name: (p.ep_rank, p.flat.name) for p in moe.params if p.group == g}
    at_target = {
        module: replace(layers[module], ep_size=ep, edp_size=dp // ep) for module in per_module
    }
    runs_by_rank: list[list[Run]] = [[] for _ in range(dp)]
    for e in range(ep):
        by_source: dict[int, list[tuple[int, int, int, int]]] = {}
        for (module, name, shape), dst_offset in zip(dst_order, dst_offsets, strict=True):
            layer = at_target[module]
            target = global_target(layer, name, shape, e)
            held = where.get(target[0]) if target is not None else None
            if held is None:
                raise InconsistentCheckpoint(
                    f"expert group {g} ({src.label}): no EP rank's files hold "
                    f"{target[0] if target else name}, which EP rank {e} of {ep} needs"
                )
            src_ep_rank, local = held
            by_source.setdefault(src_ep_rank, []).append(
                (g, src_at[local], dst_offset, zero.numel(shape))
            )
        for src_ep_rank, segments in by_source.items():
            per_part = split_segments(segments, src.partition_size, dst_size, dst_count)
            if len(per_part) != dst_count or any(
                run.src_rank >= src_count for runs in per_part for run in runs
            ):
                raise AssertionError("plan error: an expert run outside its EDP group")
            for part, runs in enumerate(per_part):
                runs_by_rank[e + part * ep].extend(
                    Run(
                        src_ep_rank + r.src_rank * src.ep,
                        r.src_index,
                        r.src_start,
                        r.length,
                        r.dst_start,
                    )  # fmt: skip
                    for r in runs
                )
    tails = zero12_group_paddings(dst_data, sum(dst_numels), dst_size, dst_count, "zero")
    recorded = zero12_group_paddings(dst_data, sum(dst_numels), dst_size, dst_count, facts.kind)
    mappings = slice_mappings(
        [n for n, _ in dst_params],
        dst_numels,
        dst_offsets if any(dst_pads) else None,
        dst_count,
        dst_size,
    )
    partitions = []
    for rank in range(dp):
        merged: list[Run] = []
        for run in sorted(runs_by_rank[rank], key=lambda r: r.dst_start):
            _append(merged, run)
        partitions.append(Partition(rank, dst_size, tuple(merged), tails[rank // ep]))
    target_group = TargetGroup(
        index=g,
        param_group=g,
        params=tuple(dst_params),
        partitions=tuple(partitions),
        sources=(g,),
        alignment_paddings=tuple(dst_pads) if src.alignment_paddings is not None else None,
        ep=ep,
        label=f"ep_size_{ep}",
    )
    return (
        target_group,
        [recorded[rank // ep] for rank in range(dp)],
        [mappings[rank // ep] for rank in range(dp)],
    )


def _plan_zero3(facts: SourceFacts, dp: int) -> ReshapePlan:
    # Where each parameter's piece sits in the source: (sub-group, offset in every rank's tensor).
    where: dict[str, tuple[int, int]] = {}
    by_group: dict[int, list[tuple[str, Shape]]] = {}
    for s, src in enumerate(facts.groups):
        offset = 0
        for name, shape in src.params:
            where[name] = (s, offset)
            offset += zero.zero3_partition_numel(zero.numel(shape), facts.dp)
            by_group.setdefault(src.param_group, []).append((name, shape))
    ids = _zero3_param_ids(facts)
    groups: list[TargetGroup] = []
    for pg in sorted(by_group):
        params = by_group[pg]
        numels = [zero.numel(s) for _, s in params]
        for members in zero3_sub_groups(numels, dp, facts.sub_group_size):
            chosen = [params[i] for i in members]
            pieces = tuple((zero.numel(shape), *where[name]) for name, shape in chosen)
            sources = tuple(sorted({where[n][0] for n, _ in chosen}))
            groups.append(
                TargetGroup(
                    index=len(groups),
                    param_group=pg,
                    params=tuple(chosen),
                    partitions=Zero3Partitions(facts.dp, dp, pieces),
                    sources=sources,
                    ds_id=_zero3_ds_id(facts, chosen, ids),
                )
            )
    frozen = tuple(
        FrozenFragments(name, shape, Zero3Partitions(facts.dp, dp, ((zero.numel(shape), f, 0),)))
        for f, (name, shape) in enumerate(facts.frozen)
    )
    return ReshapePlan(
        kind="zero3", stage=3, source_dp=facts.dp, dp=dp, groups=tuple(groups), frozen=frozen
    )


def _zero3_param_ids(facts: SourceFacts) -> dict[str, int]:
    """Each parameter's ZeRO-3 ``ds_id``: DeepSpeed numbers parameters in module order from a
    process-wide counter, so it is the position in module order plus the offset the source's own
    ``ds_id`` strings (``"<first>_<last>"`` of each sub-group) reveal; named ones are kept."""
    position = {name: i for i, name in enumerate(facts.param_order)}
    known: dict[str, int] = {}
    for src in facts.groups:
        parts = (src.ds_id or "").split("_")
        if src.params and len(parts) == 2 and all(x.isdigit() for x in parts):
            known[src.params[0][0]] = int(parts[0])
            known[src.params[-1][0]] = int(parts[1])
    offsets = [known[n] - position[n] for n in known if n in position]
    offset = max(set(offsets), key=offsets.count) if offsets else 0
    return {**{n: i + offset for n, i in position.items()}, **known}


def _zero3_ds_id(
    facts: SourceFacts, chosen: Sequence[tuple[str, Shape]], ids: Mapping[str, int]
) -> str | None:
    """A sub-group's flat tensor ``ds_id`` (``"<first>_<last>"``); DeepSpeed never reads it back."""
    for src in facts.groups:
        if [n for n, _ in src.params] == [n for n, _ in chosen]:
            return src.ds_id
    first, last = chosen[0][0], chosen[-1][0]
    if first in ids and last in ids:
        return f"{ids[first]}_{ids[last]}"
    return None


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


@dataclass
class ReshapeResult:
    """What :func:`reshape` did (or, for a dry run, would do)."""

    plan: ReshapePlan
    source: Path
    out: Path
    tag: str
    written: bool
    files: list[str] = field(default_factory=list)
    nbytes: int = 0
    skipped: list[str] = field(default_factory=list)  # tag-directory entries not copied
    from_universal: bool = False  # the source was a universal checkpoint (ds_to_universal)
    # Plans every output file on demand (a dry run does not, unless asked: --dry-run --json).
    plan_files: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def what(self) -> str:
        """What was reshaped, for people: ``ZeRO-2``, ``ZeRO-1 MoE (expert parallelism 2 kept)``,
        ``universal checkpoint -> native ZeRO-3``..."""
        what = {
            "zero": f"ZeRO-{self.plan.stage}",
            "bf16_optimizer": "BF16_Optimizer (ZeRO-1)",
            "zero3": "ZeRO-3",
        }[self.plan.kind]
        if self.plan.source_ep_sizes:
            saved = ", ".join(str(e) for e in self.plan.source_ep_sizes)
            sizes = ", ".join(str(e) for e in self.plan.ep_sizes)
            what += f" MoE (expert parallelism {saved} -> {sizes})"
        elif self.plan.ep_sizes:
            sizes = ", ".join(str(e) for e in self.plan.ep_sizes)
            what += f" MoE (expert parallelism {sizes} kept)"
        if self.from_universal:
            what = f"universal checkpoint -> native {what}"
        return what

    def summary(self) -> str:
        what = self.what
        if not self.written:
            return (
                f"dry run: {what} DP {self.plan.source_dp} -> {self.plan.dp}; nothing written "
                f"(would write {self.out}/{self.tag}/)"
            )
        return (
            f"wrote {self.out} (tag {self.tag}): {what} resharded from DP "
            f"{self.plan.source_dp} to DP {self.plan.dp}, {len(self.files)} files, "
            f"{human_bytes(self.nbytes)}{skipped_note(self.skipped)}"
        )


def skipped_note(skipped: Sequence[str]) -> str:
    """The summary's warning about tag-directory entries that were not copied."""
    if not skipped:
        return ""
    return (
        f"; warning: not copied, as only regular files are: {', '.join(skipped)} "
        "(copy them by hand if the run needs them)"
    )
