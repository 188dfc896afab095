"""Tensor element types, without torch.

A :class:`DType` names an element type the way torch does (``"bfloat16"``, without ``torch.``)
and carries what dsckpt needs to move its bytes: the item size and the safetensors code. The
torch-free reader (:mod:`dsckpt.io.unpickle`) turns torch's dtype and legacy storage-class globals
into these; :func:`to_torch` and :func:`from_torch` cross over where torch is loaded anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsckpt.errors import UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class DType:
    """One element type.

    Attributes:
        name: torch's name without ``torch.`` (``"float32"``, ``"bfloat16"``).
        itemsize: bytes per element.
        safetensors_code: the dtype string in a safetensors header (``"F32"``), ``None`` where
            safetensors has none.
        is_floating: what ``torch.is_floating_point`` says (complex types are not floating).
    """

    name: str
    itemsize: int
    safetensors_code: str | None
    is_floating: bool

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"dsckpt.io.dtypes.{self.name.upper()}"

    # Pickling and copying give back the module's constant. The explicit __setstate__ stops
    # dataclass(slots=True) from adding one that rewrites the fields: an untrusted pickle's BUILD
    # calls it, and must not be able to change a constant.
    def __reduce__(self) -> tuple[Any, ...]:
        if _BY_NAME.get(self.name) is self:
            return (by_name, (self.name,))
        return (DType, (self.name, self.itemsize, self.safetensors_code, self.is_floating))

    def __setstate__(self, state: Any) -> None:
        raise TypeError("a DType is immutable")


FLOAT64 = DType("float64", 8, "F64", True)
FLOAT32 = DType("float32", 4, "F32", True)
FLOAT16 = DType("float16", 2, "F16", True)
BFLOAT16 = DType("bfloat16", 2, "BF16", True)
FLOAT8_E4M3FN = DType("float8_e4m3fn", 1, "F8_E4M3", True)
FLOAT8_E5M2 = DType("float8_e5m2", 1, "F8_E5M2", True)
COMPLEX128 = DType("complex128", 16, None, False)
COMPLEX64 = DType("complex64", 8, "C64", False)
INT64 = DType("int64", 8, "I64", False)
INT32 = DType("int32", 4, "I32", False)
INT16 = DType("int16", 2, "I16", False)
INT8 = DType("int8", 1, "I8", False)
UINT64 = DType("uint64", 8, "U64", False)
UINT32 = DType("uint32", 4, "U32", False)
UINT16 = DType("uint16", 2, "U16", False)
UINT8 = DType("uint8", 1, "U8", False)
BOOL = DType("bool", 1, "BOOL", False)

ALL: tuple[DType, ...] = (
    FLOAT64,
    FLOAT32,
    FLOAT16,
    BFLOAT16,
    FLOAT8_E4M3FN,
    FLOAT8_E5M2,
    COMPLEX128,
    COMPLEX64,
    INT64,
    INT32,
    INT16,
    INT8,
    UINT64,
    UINT32,
    UINT16,
    UINT8,
    BOOL,
)

_BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
# torch's aliases (``torch.float is torch.float32``); pickles always use the canonical name.
_ALIASES: dict[str, DType] = {
    "double": FLOAT64,
    "float": FLOAT32,
    "half": FLOAT16,
    "cdouble": COMPLEX128,
    "cfloat": COMPLEX64,
    "long": INT64,
    "int": INT32,
    "short": INT16,
}

# torch's legacy storage classes, as ``torch.save`` names them in a storage's persistent id
# (torch.storage._dtype_to_storage_type_map). Newer dtypes are saved as an UntypedStorage (bytes)
# with the dtype passed to ``_rebuild_tensor_v3``.
_STORAGE_TYPES: dict[str, DType] = {
    "DoubleStorage": FLOAT64,
    "FloatStorage": FLOAT32,
    "HalfStorage": FLOAT16,
    "BFloat16Storage": BFLOAT16,
    "ComplexDoubleStorage": COMPLEX128,
    "ComplexFloatStorage": COMPLEX64,
    "LongStorage": INT64,
    "IntStorage": INT32,
    "ShortStorage": INT16,
    "CharStorage": INT8,
    "ByteStorage": UINT8,
    "BoolStorage": BOOL,
    "UntypedStorage": UINT8,
}


def by_name(name: str) -> DType:
    """The dtype called ``name`` (``"bfloat16"``, ``"torch.float32"``, or an alias like ``"half"``).

    Raises:
        UsageError: no such dtype here.
    """
    key = name.removeprefix("torch.")
    found = _BY_NAME.get(key) or _ALIASES.get(key)
    if found is None:
        known = ", ".join(_BY_NAME)
        raise UsageError(f"unknown dtype {name!r}: dsckpt knows {known}")
    return found


def from_storage_type(name: str) -> DType:
    """The dtype of a torch storage class named in a pickle.

    ``"FloatStorage"`` or ``"torch.FloatStorage"`` -> float32; ``"torch.storage.UntypedStorage"``
    -> uint8 (bytes).

    Raises:
        UsageError: not a storage class dsckpt reads (quantized storages, for instance).
    """
    found = _STORAGE_TYPES.get(name.rsplit(".", 1)[-1])
    if found is None:
        raise UsageError(f"unknown storage type {name!r}: dsckpt reads {', '.join(_STORAGE_TYPES)}")
    return found


def storage_type_names() -> tuple[str, ...]:
    """The legacy storage class names :func:`from_storage_type` knows (without ``torch.``)."""
    return tuple(_STORAGE_TYPES)


def to_torch(dtype: DType) -> torch.dtype:
    """The matching ``torch.dtype`` (imports torch)."""
    import torch

    found = getattr(torch, dtype.name, None)
    if not isinstance(found, torch.dtype):
        raise UsageError(f"this torch ({torch.__version__}) has no dtype {dtype.name}")
    return found


def name_of(dtype: DType | torch.dtype) -> str:
    """``"bfloat16"`` for a :class:`DType` or a ``torch.dtype`` alike (no torch import)."""
    return str(dtype).removeprefix("torch.")


def from_torch(dtype: torch.dtype) -> DType:
    """The :class:`DType` for a ``torch.dtype``."""
    return by_name(str(dtype))
