"""Safetensors files as write plans: the header and every tensor's place, from the specs alone.

The header is computed from the output specs before any data exists, so a file is a
:class:`~dsckpt.plan.fileplan.FilePlan`: the header as literal bytes, each tensor's bytes as the
copies and casts its plan names, each tied alias as a duplicate of its canonical tensor (a
safetensors file cannot alias). The one executor writes it.

Layout decisions:

* Tensors are laid out exactly as ``safetensors.torch.save_file`` lays them out: by dtype
  alignment, largest first, then by name. With the data section starting 8-byte aligned this
  keeps every tensor aligned to its element size (zero-copy readers rely on it), and with a
  single ``__metadata__`` entry the file is byte-for-byte what ``save_file`` writes.
* The header JSON is compact, ``__metadata__`` first, then tensors in data order, padded
  with spaces to a multiple of 8 bytes, as the safetensors library does.
* ``__metadata__`` always holds ``{"format": "pt"}`` (transformers checks it) plus the
  caller's string pairs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsckpt.execute.formats.sharding import PlannedTensor, TensorSpec
from dsckpt.io.dtypes import name_of
from dsckpt.plan.fileplan import DataOp, Duplicate, FilePlan, Literal

__all__ = [
    "SafetensorsLayout",
    "TensorSpec",
    "safetensors_dtype",
    "safetensors_file",
    "safetensors_layout",
]

MAX_HEADER_SIZE = 100_000_000  # the safetensors reader refuses larger headers

# safetensors dtype codes in the library's alignment order (its Rust ``Dtype`` enum order,
# ascending). Files sort tensors by descending position in this list, then by name.
_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
    "F64", "I64", "U64",
)  # fmt: skip
_RANK = {code: i for i, code in enumerate(_ORDER)}

_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "U64": "uint64", "U32": "uint32", "U16": "uint16", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip
_DTYPE_CODES = {name: code for code, name in _TORCH_NAMES.items()}


def safetensors_dtype(dtype: Any) -> str:
    """The safetensors code of a dtype, dsckpt's or torch's (``bfloat16`` -> ``"BF16"``)."""
    try:
        return _DTYPE_CODES[name_of(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in a safetensors file") from None


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class SafetensorsLayout:
    """Where everything goes in one safetensors file.

    Attributes:
        header: the 8-byte length prefix plus the padded JSON header.
        offsets: ``name -> (absolute file offset, nbytes)`` for every tensor and alias copy.
        file_size: total file size in bytes.
    """

    header: bytes
    offsets: Mapping[str, tuple[int, int]]
    file_size: int


def safetensors_layout(
    specs: Sequence[TensorSpec],
    *,
    metadata: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> SafetensorsLayout:
    """Compute a safetensors file's header and tensor offsets from the specs alone.

    Args:
        specs: the tensors of this file (order does not matter: the layout is canonical).
        metadata: string pairs stored in ``__metadata__`` after ``"format": "pt"``.
        aliases: ``{alias: canonical}``; each alias is stored as its own copy of the
            canonical tensor (safetensors cannot share storage) and is written along with it.
    """
    meta = {"format": "pt", **(metadata or {})}
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise ValueError("duplicate tensor names in a safetensors file")
    entries = dict(by_name)
    for alias, canonical in (aliases or {}).items():
        if alias in by_name or canonical not in by_name:
            raise ValueError(f"bad alias {alias!r} -> {canonical!r} for this file")
        c = by_name[canonical]
        entries[alias] = TensorSpec(alias, c.dtype, c.shape)
    if "__metadata__" in entries:
        raise ValueError("'__metadata__' is reserved and cannot be a tensor name")

    codes = {name: safetensors_dtype(s.dtype) for name, s in entries.items()}
    order = sorted(entries, key=lambda n: (-_RANK[codes[n]], n))
    header: dict[str, Any] = {"__metadata__": meta}
    relative: dict[str, tuple[int, int]] = {}
    pos = 0
    for name in order:
        s = entries[name]
        header[name] = {
            "dtype": codes[name],
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        relative[name] = (pos, s.nbytes)
        pos += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) > MAX_HEADER_SIZE:
        raise ValueError(f"safetensors header of {len(text)} bytes exceeds the 100 MB limit")
    data_start = 8 + len(text)
    prefix = len(text).to_bytes(8, "little") + text
    offsets = {n: (data_start + off, size) for n, (off, size) in relative.items()}
    return SafetensorsLayout(prefix, offsets, data_start + pos)


def safetensors_file(
    name: str,
    tensors: Sequence[PlannedTensor],
    *,
    metadata: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> FilePlan:
    """The write plan of one safetensors file: its header, every tensor's operations at its
    offset, and each alias as a duplicate of its canonical tensor's bytes."""
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
    layout = safetensors_layout(specs, metadata=metadata, aliases=aliases)
    ops: list[DataOp] = [Literal(0, layout.header)]
    for t in tensors:
        ops.extend(t.ops(layout.offsets[t.name][0]))
    derived = [
        Duplicate(layout.offsets[alias][0], *layout.offsets[canonical])
        for alias, canonical in (aliases or {}).items()
    ]
    return FilePlan(name, layout.file_size, tuple(ops), tuple(derived))
