"""ZeRO partition arithmetic: where each parameter's elements live across data-parallel ranks.

Pure integer code (no torch) so it can be tested with plain numbers. It lives with discovery
because it describes how DeepSpeed saved the checkpoint: discovery records each group's partition
layout in the Layout, and planning (consolidation, reshape) reads it from there.

ZeRO-1/2 (and DeepSpeed's BF16_Optimizer): each optimizer parameter group is one flat buffer, the
parameters in ``param_shapes`` order, each followed by its alignment padding
(``parameter_alignment``; none after the last), zero-padded at the end to a multiple of
``2 * dp``. Rank ``r`` owns the contiguous slice ``[r * P, (r + 1) * P)`` with ``P = padded / dp``.

ZeRO-3: every parameter is partitioned on its own. With ``c = ceil(numel / dp)``, rank ``r`` owns
elements ``[r * c, (r + 1) * c)`` of the parameter zero-padded to ``dp * c``; a rank's flat group
(one per sub-group) concatenates its pieces in ``param_shapes`` order, without further padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# DeepSpeed aligns a ZeRO-1/2 flat group to this many elements per data-parallel rank
# (``nccl_start_alignment_factor``: 4-byte starts for 16-bit elements).
NCCL_START_ALIGNMENT_FACTOR = 2


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class Piece:
    """A run of ``length`` elements: ``src_start`` in rank ``rank``'s flat tensor
    ``sub_group`` goes to element ``dst_start`` of the parameter."""

    rank: int
    sub_group: int
    src_start: int
    length: int
    dst_start: int


@dataclass(frozen=True)
class FlatParam:
    """One parameter inside a flat group: its name, full shape, and where it starts."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class Zero12Group:
    """The layout of one ZeRO-1/2 optimizer parameter group across ``dp`` ranks."""

    params: tuple[FlatParam, ...]
    dp: int
    partition_size: int

    @property
    def data_numel(self) -> int:
        """Elements up to the end of the last parameter (alignment pads included)."""
        last = self.params[-1] if self.params else None
        return last.offset + last.numel if last else 0

    @property
    def padded_numel(self) -> int:
        return self.partition_size * self.dp

    def tail_padding(self, rank: int) -> int:
        """Padding elements inside rank ``rank``'s slice (DeepSpeed's ``group_paddings[g]``)."""
        start = rank * self.partition_size
        return self.partition_size - max(0, min(self.partition_size, self.data_numel - start))

    def pieces(self, param: FlatParam) -> list[Piece]:
        """The slices of ``param`` held by each rank, in parameter order."""
        return _split_range(param.offset, param.numel, self.partition_size)


def _split_range(start: int, count: int, partition_size: int) -> list[Piece]:
    pieces = []
    done = 0
    while done < count:
        flat = start + done
        rank, inner = divmod(flat, partition_size)
        length = min(count - done, partition_size - inner)
        pieces.append(Piece(rank=rank, sub_group=0, src_start=inner, length=length, dst_start=done))
        done += length
    return pieces


def zero12_group(
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    dp: int,
    alignment_paddings: Sequence[int] | None = None,
    partition_size: int | None = None,
) -> Zero12Group:
    """Lay out one ZeRO-1/2 group.

    Args:
        shapes: ``(name, shape)`` in flat-buffer order (``param_shapes[g]``).
        dp: data-parallel degree (``partition_count[g]``).
        alignment_paddings: per-parameter padding (``param_alignment_paddings[g]``), if recorded.
        partition_size: per-rank slice size read from the files; derived from DeepSpeed's
            alignment rule when not given.
    """
    params = []
    offset = 0
    pads = list(alignment_paddings) if alignment_paddings is not None else [0] * len(shapes)
    for (name, shape), pad in zip(shapes, pads, strict=True):
        params.append(FlatParam(name=name, shape=tuple(shape), offset=offset))
        offset += numel(shape) + pad
    if partition_size is None:
        partition_size = zero12_partition_size(offset, dp)
    return Zero12Group(params=tuple(params), dp=dp, partition_size=partition_size)


def zero12_partition_size(data_numel: int, dp: int) -> int:
    """Per-rank slice size DeepSpeed picks for a flat group of ``data_numel`` elements."""
    align = NCCL_START_ALIGNMENT_FACTOR * dp
    return math.ceil(data_numel / align) * align // dp


def zero3_partition_numel(param_numel: int, dp: int) -> int:
    """Elements of one parameter each ZeRO-3 rank holds (``ceil(numel / dp)``)."""
    return math.ceil(param_numel / dp)


@dataclass(frozen=True)
class Zero3Param:
    name: str
    shape: tuple[int, ...]
    sub_group: int
    offset: int  # start of this parameter's piece in every rank's flat tensor ``sub_group``

    @property
    def numel(self) -> int:
        return numel(self.shape)


@dataclass(frozen=True)
class Zero3Layout:
    """Where every ZeRO-3 parameter lives across ``dp`` ranks and the sub-groups."""

    params: tuple[Zero3Param, ...]
    dp: int
    sub_group_numels: tuple[int, ...]  # elements of each rank's flat tensor, per sub-group

    def pieces(self, param: Zero3Param) -> list[Piece]:
        per_rank = zero3_partition_numel(param.numel, self.dp)
        pieces = []
        for rank in range(self.dp):
            dst = rank * per_rank
            length = min(per_rank, param.numel - dst)
            if length <= 0:
                break
            pieces.append(Piece(rank, param.sub_group, param.offset, length, dst))
        return pieces


def zero3_layout(
    sub_groups: Sequence[Sequence[tuple[str, tuple[int, ...]]]], dp: int
) -> Zero3Layout:
    """Lay out ZeRO-3 parameters from ``param_shapes`` (a ``(name, shape)`` list per sub-group)."""
    params = []
    sizes = []
    for index, shapes in enumerate(sub_groups):
        offset = 0
        for name, shape in shapes:
            params.append(Zero3Param(name=name, shape=tuple(shape), sub_group=index, offset=offset))
            offset += zero3_partition_numel(numel(shape), dp)
        sizes.append(offset)
    return Zero3Layout(params=tuple(params), dp=dp, sub_group_numels=tuple(sizes))
