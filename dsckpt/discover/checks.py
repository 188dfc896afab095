"""Type and range checks for values read from checkpoint pickles, before anything uses them.

A pickle is untrusted input: a count of ranks can be 0 or 10**9, a shape can hold a negative or
a string, a dict can be a list. Discovery passes every value it uses through one of the checks
below, which return the value in the type the rest of dsckpt expects or raise
:class:`BadMetadata` naming the file and the key path (``optimizer_state_dict.partition_count[1]``),
so no IndexError, KeyError, TypeError or MemoryError reaches the user.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from dsckpt.errors import CorruptFile
from dsckpt.io.unpickle import SavedTensor

# Bounds that no real run reaches but that keep every later sum and loop small: a degree of
# parallelism (the largest runs have ~10**5 ranks) and a tensor's elements (2**48 fp32 elements
# are 1 PiB).
MAX_RANKS = 1 << 20
MAX_NUMEL = 1 << 48


class BadMetadata(CorruptFile):
    """A value in a checkpoint pickle is missing, of the wrong type or out of range.

    ``code`` is the finding slug discovery records it under: ``missing-key`` or ``bad-metadata``.
    """

    def __init__(self, path: Path, reason: str, code: str = "bad-metadata") -> None:
        super().__init__(path, reason)
        self.code = code


@dataclass(frozen=True)
class At:
    """A place in a file's pickle, for messages: the file and the key path inside it."""

    path: Path
    key: str = ""

    def __truediv__(self, sub: object) -> At:
        """The place of ``sub`` inside this one: a key (``a.b``) or an index (``a[3]``)."""
        if isinstance(sub, int):
            return At(self.path, f"{self.key}[{sub}]")
        text = str(sub) if len(str(sub)) <= 80 else str(sub)[:77] + "..."
        return At(self.path, f"{self.key}.{text}" if self.key else text)

    def fail(self, problem: str) -> NoReturn:
        raise BadMetadata(self.path, f"`{self.key}` {problem}")

    def missing(self, key: str) -> NoReturn:
        where = self / key
        raise BadMetadata(
            self.path, f"key `{where.key}` is missing (DeepSpeed always writes it)", "missing-key"
        )


def _kind(value: Any) -> str:
    return type(value).__name__


def mapping(value: Any, at: At) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        at.fail(f"is a {_kind(value)} where a dict belongs")
    return value


def field(container: Mapping[str, Any], key: str, at: At) -> Any:
    """``container[key]``, which DeepSpeed always writes (``None`` counts as missing)."""
    value = container.get(key)
    if value is None:
        at.missing(key)
    return value


def integer(value: Any, at: At, lo: int = 0, hi: int = MAX_NUMEL) -> int:
    """An int in ``[lo, hi]`` (bools and floats refused: DeepSpeed writes ints)."""
    if isinstance(value, bool) or not isinstance(value, int):
        at.fail(f"is {_show(value)} where an integer belongs")
    if not lo <= value <= hi:
        at.fail(f"is {value}, outside {lo}..{hi}")
    return int(value)


def count(value: Any, at: At) -> int:
    """A number of ranks or a parallel degree: 1 to :data:`MAX_RANKS`."""
    return integer(value, at, 1, MAX_RANKS)


def int_list(value: Any, at: At, lo: int = 0, hi: int = MAX_NUMEL) -> list[int]:
    if not isinstance(value, (list, tuple)):
        at.fail(f"is {_show(value)} where a list of integers belongs")
    if _plain_ints_within(value, lo, hi):
        return list(value)
    # Some value fails: the slow path names the first one and its index.
    return [integer(v, at / i, lo, hi) for i, v in enumerate(value)]


def _plain_ints_within(values: list[Any] | tuple[Any, ...], lo: int, hi: int) -> bool:
    """Every value a plain int in ``[lo, hi]``, checked at C speed (``map``, ``min``, ``max``):
    the same verdict as :func:`integer` on each (bools are not ints by ``type``), without
    building a message path per element. ZeRO-1/2 files hold one value per parameter per rank
    (``param_alignment_paddings``), millions at a thousand ranks."""
    return not values or (
        set(map(type, values)) == {int} and lo <= min(values) and max(values) <= hi
    )


def name(value: Any, at: At) -> str:
    if not isinstance(value, str) or not value:
        at.fail(f"is {_show(value)} where a parameter name belongs")
    return value


def names(value: Any, at: At) -> list[str]:
    if not isinstance(value, (list, tuple)):
        at.fail(f"is {_show(value)} where a list of names belongs")
    return [name(v, at / i) for i, v in enumerate(value)]


def name_map(value: Any, at: At) -> dict[str, str]:
    return {name(k, at): name(v, at / k) for k, v in mapping(value, at).items()}


def shape(value: Any, at: At) -> tuple[int, ...]:
    """A tensor shape: non-negative int dimensions whose product stays under :data:`MAX_NUMEL`."""
    if not isinstance(value, (list, tuple)):
        at.fail(f"is {_show(value)} where a shape belongs")
    if _plain_ints_within(value, 0, MAX_NUMEL):
        dims = tuple(value)
    else:
        dims = tuple(integer(d, at / i, 0, MAX_NUMEL) for i, d in enumerate(value))
    if math.prod(dims) > MAX_NUMEL:
        at.fail(f"is {list(dims)}: more than 2**48 elements")
    return dims


def shape_map(value: Any, at: At) -> dict[str, tuple[int, ...]]:
    return {name(k, at): shape(v, at / k) for k, v in mapping(value, at).items()}


def shape_groups(value: Any, at: At) -> list[list[tuple[str, tuple[int, ...]]]]:
    """``param_shapes``: one ``{name: shape}`` per group, each name in one group only."""
    if not isinstance(value, (list, tuple)):
        at.fail(f"is {_show(value)} where a list of {{name: shape}} dicts belongs")
    groups = [list(shape_map(group, at / g).items()) for g, group in enumerate(value)]
    seen: dict[str, int] = {}
    for g, group in enumerate(groups):
        for n, _ in group:
            if n in seen:
                (at / g).fail(f"lists {n!r} again (already in group {seen[n]})")
            seen[n] = g
    return groups


def tensor(value: Any, at: At) -> SavedTensor:
    """A saved tensor whose elements are distinct (see :func:`check_view`)."""
    if not isinstance(value, SavedTensor):
        at.fail(f"is {_show(value)} where a tensor belongs")
    check_view(value, at)
    return value


def flat_tensor(value: Any, at: At) -> SavedTensor:
    """A 1-D contiguous floating-point tensor: a flat fp32 partition as DeepSpeed saves it."""
    t = tensor(value, at)
    if len(t.shape) != 1 or not t.is_contiguous():
        at.fail(
            f"is a {list(t.shape)} view with strides {list(t.stride)} where DeepSpeed "
            "saves a flat contiguous partition"
        )
    return t


def tensor_list(value: Any, at: At, flat: bool = False) -> list[SavedTensor]:
    if not isinstance(value, (list, tuple)):
        at.fail(f"is {_show(value)} where a list of tensors belongs")
    check = flat_tensor if flat else tensor
    return [check(v, at / i) for i, v in enumerate(value)]


def check_view(t: SavedTensor, at: At) -> None:
    """Refuse a view that reads some storage element twice (a stride of 0 or overlapping
    strides): written out, it would be larger than what the file holds, and no parameter
    DeepSpeed saves is one. Negative strides and views past their storage are refused when the
    file is read."""
    dims = sorted((step, size) for size, step in zip(t.shape, t.stride, strict=True) if size > 1)
    reach = 1  # elements spanned by the dimensions checked so far
    for step, size in dims:
        if step < reach:
            at.fail(
                f"is a view of shape {list(t.shape)} with strides {list(t.stride)} that "
                "reads the same storage elements more than once (an expanded or "
                "overlapping view)"
            )
        reach = step * size
    if t.numel() > t.storage_numel:
        at.fail(f"has {t.numel()} elements but its storage holds {t.storage_numel}")


def number(value: Any, at: At) -> float | int:
    """A finite, non-negative count such as an optimizer ``step``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        at.fail(f"is {_show(value)} where a number belongs")
    if not math.isfinite(value) or value < 0:
        at.fail(f"is {value}: not a finite, non-negative count")
    return value


def _show(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return f"a {_kind(value)}"
