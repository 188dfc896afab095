"""Output tensor specs and Hugging Face style sharding (pure data, no torch import).

A shard plan is computed from the output specs alone, before a byte is written, so the
executor knows every file, its size and every tensor's home up front.

The grouping reproduces ``huggingface_hub.split_torch_state_dict_into_shards``, which
``transformers``' ``save_pretrained`` uses:

* tensors are taken in the caller's order (the state-dict order), greedily;
* a tensor that would push the current shard over the cap closes it;
* a tensor larger than the cap gets a shard of its own, appended *at once* (so it can precede
  the shard still being filled, exactly as huggingface_hub does);
* aliases (tied names sharing one storage) go to their canonical tensor's shard and are
  counted once in sizes, as storage sharing is counted once there;
* one shard is named ``model.safetensors`` with no index; several are named
  ``model-00001-of-00003.safetensors`` ... and described by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from dsckpt.errors import UsageError

if TYPE_CHECKING:
    import torch

    from dsckpt.io.dtypes import DType
    from dsckpt.plan.fileplan import CastCopy, Computed, Copy

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "SAFETENSORS_PATTERN",
    "TORCH_PATTERN",
    "Shard",
    "PlannedTensor",
    "ShardPlan",
    "TensorSpec",
    "index_filename",
    "parse_size",
    "plan_shards",
]

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # huggingface_hub's and transformers' default, "5GB"
SAFETENSORS_PATTERN = "model{suffix}.safetensors"
TORCH_PATTERN = "pytorch_model{suffix}.bin"


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, known before any byte of it is written.

    Args:
        name: state-dict key.
        dtype: the dtype written to the file (the caller casts pieces to it before writing).
        shape: the tensor's shape; ``()`` is a 0-d tensor, any 0 in it an empty tensor.
    """

    name: str
    dtype: DType | torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # Accept torch.Size or lists from callers, store a plain hashable tuple.
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r} has a negative dimension: {self.shape}")

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class PlannedTensor(Protocol):
    """An output tensor whose bytes a plan knows how to write (a consolidation's
    :class:`~dsckpt.plan.consolidation.OutputTensor`)."""

    @property
    def name(self) -> str: ...

    @property
    def dtype(self) -> DType: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...

    def ops(self, at: int) -> Sequence[Copy | CastCopy | Computed]: ...


class _Sized(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def nbytes(self) -> int: ...


T = TypeVar("T", bound=_Sized)


@dataclass(frozen=True)
class Shard(Generic[T]):
    """One output file of a shard plan.

    Attributes:
        filename: file name inside the output directory.
        tensors: the tensors stored in this file, in plan order.
        aliases: ``(alias, canonical)`` pairs whose canonical tensor lives in this file.
        nbytes: tensor bytes in this shard, aliases counted once (as huggingface_hub does).
    """

    filename: str
    tensors: tuple[T, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    nbytes: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors) + tuple(a for a, _ in self.aliases)


@dataclass(frozen=True)
class ShardPlan(Generic[T]):
    """Where every output tensor goes, for a sharded (or single-file) output."""

    shards: tuple[Shard[T], ...]
    weight_map: Mapping[str, str] = field(hash=False)
    total_size: int
    index_name: str

    @property
    def is_sharded(self) -> bool:
        """True when there is more than one file and hence an index file."""
        return len(self.shards) > 1

    def index(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The index JSON object: ``{"metadata": {...,"total_size": N}, "weight_map": {...}}``.

        ``total_size`` always comes from the plan; the caller's metadata cannot override it.
        """
        meta: dict[str, Any] = dict(metadata or {})
        meta["total_size"] = self.total_size
        return {"metadata": meta, "weight_map": dict(self.weight_map)}

    def index_json(self, metadata: Mapping[str, Any] | None = None) -> str:
        """The index file's text, formatted as transformers writes it (sorted keys, indent 2)."""
        return json.dumps(self.index(metadata), indent=2, sort_keys=True) + "\n"


def index_filename(filename_pattern: str) -> str:
    """``model{suffix}.safetensors`` -> ``model.safetensors.index.json``."""
    return filename_pattern.format(suffix="") + ".index.json"


def plan_shards(
    tensors: Sequence[T],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    *,
    aliases: Mapping[str, str] | None = None,
    filename_pattern: str = SAFETENSORS_PATTERN,
) -> ShardPlan[T]:
    """Group tensors into shards the way transformers' ``save_pretrained`` does.

    Args:
        tensors: output tensors in state-dict order (anything with ``name`` and ``nbytes``).
        max_shard_size: cap per shard in bytes, or a size string (see :func:`parse_size`).
            A tensor larger than the cap gets a shard of its own.
        aliases: ``{alias: canonical}`` tied names; each alias is listed in its canonical
            tensor's shard and in the weight map, and adds no bytes.
        filename_pattern: must contain ``{suffix}``; ``pytorch_model{suffix}.bin`` for torch.

    Returns:
        The plan. With a single shard its file is ``filename_pattern.format(suffix="")``.
    """
    cap = parse_size(max_shard_size, what="max_shard_size")
    if "{suffix}" not in filename_pattern:
        raise ValueError(f"filename_pattern must contain '{{suffix}}': {filename_pattern!r}")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"duplicate tensor name {dup!r} in the output plan")
    aliases = dict(aliases or {})
    known = set(names)
    for alias, canonical in aliases.items():
        if alias in known:
            raise ValueError(f"alias {alias!r} is also a tensor of its own")
        if canonical not in known:
            raise ValueError(f"alias {alias!r} points to {canonical!r}, which is not an output")

    groups: list[list[T]] = []
    current: list[T] = []
    current_size = 0
    total = 0
    for t in tensors:
        size = t.nbytes
        total += size
        if size > cap:
            groups.append([t])
            continue
        if current_size + size > cap:
            groups.append(current)
            current, current_size = [], 0
        current.append(t)
        current_size += size
    if current or not groups:
        groups.append(current)

    n = len(groups)
    shards: list[Shard[T]] = []
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        filename = filename_pattern.format(suffix="" if n == 1 else f"-{i + 1:05d}-of-{n:05d}")
        members = {t.name for t in group}
        pairs = tuple((a, c) for a, c in aliases.items() if c in members)
        shards.append(Shard(filename, tuple(group), pairs, sum(t.nbytes for t in group)))
        for name in (*members, *(a for a, _ in pairs)):
            weight_map[name] = filename
    ordered = {name: weight_map[name] for name in [*names, *aliases]}
    return ShardPlan(tuple(shards), ordered, total, index_filename(filename_pattern))


_BINARY = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10))
_DECIMAL = (("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(size: int | str, *, what: str = "size") -> int:
    """Parse a shard size the way transformers' ``convert_file_size_to_int`` does.

    * ``KiB``/``MiB``/``GiB`` (any case) are binary: ``"10GiB"`` is 10 * 2**30.
    * ``KB``/``MB``/``GB`` (any case) are decimal: ``"5GB"`` is 5 * 10**9.
    * A decimal unit ending in a lower-case ``b`` means *bits*, divided by 8: ``"5Gb"`` and
      ``"5gb"`` are 625_000_000 bytes. This is transformers' rule, kept for compatibility.
    * The number must be an integer (``"1.5GB"`` is refused, as in transformers).
    * Unlike transformers, a bare integer string (``"1000"``) is accepted as bytes, so a
      command-line value and a Python int mean the same thing.

    Args:
        size: bytes, or a string as above.
        what: how to name the value in the error (e.g. ``"--max-shard-size"``).

    Raises:
        UsageError: the string has no recognised form, or the size is not positive.
    """
    if isinstance(size, bool):  # bool is an int subclass; True is not a size
        raise UsageError(f"{what} {size!r}: give a number of bytes or a string like 5GB")
    value = size if isinstance(size, int) else _parse_size_str(str(size), what)
    if value <= 0:
        raise UsageError(f"{what} {size!r}: it must be at least one byte")
    return value


def _parse_size_str(text: str, what: str) -> int:
    upper = text.upper()
    try:
        for unit, factor in _BINARY:
            if upper.endswith(unit):
                return int(text[:-3]) * factor
        for unit, factor in _DECIMAL:
            if upper.endswith(unit):
                value = int(text[:-2]) * factor
                return value // 8 if text.endswith("b") else value
        return int(text)
    except ValueError:
        raise UsageError(
            f"{what} {text!r}: use an integer number of bytes or an integer with a unit, "
            "e.g. 5GB (10^9 bytes), 500MB, 10GiB (2^30 bytes)"
        ) from None
