"""``torch.save`` zip files as write plans, in bounded memory.

``torch.save`` needs every tensor in memory at once. A plan does not: from the specs alone (or
a structure whose tensors are lazy file ranges, :class:`LazyStorages`) this module builds the
checkpoint's pickle (storages referred to by key) and the whole zip layout, and returns a
:class:`~dsckpt.plan.fileplan.FilePlan`: every header and small record as literal bytes, every
storage's bytes as copies and casts from the source files, each storage's CRC-32 as a derived
operation. The one executor writes it (:func:`save_torch` plans and writes one file).

The file reproduces ``torch.save``'s own layout (torch 2.x, miniz writer), record for record:

    <archive>/data.pkl                 pickle protocol 2, storages as persistent ids
    <archive>/.format_version          "1"
    <archive>/.storage_alignment       "64"
    <archive>/byteorder                "little"
    <archive>/data/0 ... data/N-1      one record per storage, data 64-byte aligned
    <archive>/version                  "3\\n"
    <archive>/.data/serialization_id   40 digits (derived from the content: reproducible)

Every record is ZIP_STORED with a local header carrying a ``FB`` padding extra field (plus a
zip64 extra field past 4 GiB) so its data starts on a 64-byte boundary, and is followed by a
data descriptor (none for an empty record); a zip64 end-of-central-directory record is always
written, as torch does. Hence ``torch.load(..., weights_only=True)``, ``mmap=True`` and torch's
offset-computing readers all work, and so do ordinary zip tools: CRC-32s are real (the executor
computes those of copied bytes from the sources while copying: no second pass over the data).

Tied aliases share their canonical tensor's storage, as in DeepSpeed's own state dicts: the
alias key refers to the very same tensor object, exactly what ``torch.save`` writes for
``sd[alias] = sd[canonical]``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsckpt.execute.formats.crc import crc32 as _crc32
from dsckpt.execute.formats.crc import crc32_combine
from dsckpt.execute.formats.sharding import PlannedTensor, TensorSpec
from dsckpt.io import dtypes
from dsckpt.plan.fileplan import ByteRange, Copy, Crc32, DataOp, FilePlan, Literal, Zeros

__all__ = [
    "LazyStorages",
    "TensorSpec",
    "TorchLayout",
    "crc32_combine",
    "pickle_for_torch",
    "save_torch",
    "torch_file",
    "torch_object_file",
    "torch_layout",
]

ALIGNMENT = 64  # torch's storage alignment (.storage_alignment record)
_U32 = 0xFFFFFFFF
_FLAG_DESCRIPTOR = 0x0008  # sizes and CRC follow the data
_FLAG_UTF8 = 0x0800

# dtypes that torch pickles with a legacy typed-storage class and _rebuild_tensor_v2; every
# other dtype is pickled as an UntypedStorage plus the dtype via _rebuild_tensor_v3.
_LEGACY_STORAGE = {
    torch.float64: "DoubleStorage",
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int16: "ShortStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.complex128: "ComplexDoubleStorage",
    torch.complex64: "ComplexFloatStorage",
}


# --------------------------------------------------------------------------- pickle


class _StorageRef:
    __slots__ = ("key", "cls", "numel")

    def __init__(self, key: str, cls: type, numel: int) -> None:
        self.key, self.cls, self.numel = key, cls, numel


class _TensorRef:
    """Pickles as torch pickles a contiguous CPU tensor: ``_rebuild_tensor_v2/v3(...)``."""

    __slots__ = ("args", "func")

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def _torch_dtype(dtype: Any) -> torch.dtype:
    """Specs may carry dsckpt's :class:`~dsckpt.dtypes.DType` (plans do) or torch dtypes."""
    return dtype if isinstance(dtype, torch.dtype) else dtypes.to_torch(dtype)


def _pickle_state_dict(specs: Sequence[TensorSpec], aliases: Mapping[str, str]) -> bytes:
    tensors: dict[str, _TensorRef] = {}
    for i, s in enumerate(specs):
        key = str(i)
        stride = _contiguous_strides(s.shape)
        dtype = _torch_dtype(s.dtype)
        legacy = _LEGACY_STORAGE.get(dtype)
        if legacy is not None:
            storage = _StorageRef(key, getattr(torch, legacy), s.numel)
            args: tuple[Any, ...] = (storage, 0, s.shape, stride, False, OrderedDict())
            tensors[s.name] = _TensorRef(torch._utils._rebuild_tensor_v2, args)
        else:
            storage = _StorageRef(key, torch.storage.UntypedStorage, s.nbytes)
            args = (storage, 0, s.shape, stride, False, OrderedDict(), dtype)
            tensors[s.name] = _TensorRef(torch._utils._rebuild_tensor_v3, args)
    state = {s.name: tensors[s.name] for s in specs}
    for alias, canonical in aliases.items():
        state[alias] = tensors[canonical]  # same object: the pickle memo makes them one tensor
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    return buf.getvalue()


# --------------------------------------------------------------------------- zip layout


@dataclass(frozen=True)
class _Record:
    name: bytes  # full name inside the zip, archive prefix included
    header_offset: int
    data_offset: int
    size: int
    local_header: bytes
    payload: bytes | None  # contents of small records, None for tensor storages

    @property
    def zip64(self) -> bool:
        return self.size >= _U32 or self.header_offset >= _U32

    @property
    def flags(self) -> int:
        return _FLAG_UTF8 | (_FLAG_DESCRIPTOR if self.size else 0)

    @property
    def end(self) -> int:
        return self.data_offset + self.size + self.descriptor_size

    @property
    def descriptor_size(self) -> int:
        if not self.size:
            return 0
        return 24 if self.zip64 else 16

    def descriptor(self, crc: int) -> bytes:
        if self.zip64:
            return struct.pack("<IIQQ", 0x08074B50, crc, self.size, self.size)
        return struct.pack("<IIII", 0x08074B50, crc, self.size, self.size)

    def central_entry(self, crc: int) -> bytes:
        extra = b""
        size32, offset32 = self.size, self.header_offset
        fields = []
        if self.size >= _U32:
            fields += [self.size, self.size]
            size32 = _U32
        if self.header_offset >= _U32:
            fields.append(self.header_offset)
            offset32 = _U32
        if fields:
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
        head = struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50, 0, 0, self.flags, 0, 0, 0, crc, size32, size32,
            len(self.name), len(extra), 0, 0, 0, 0, offset32,
        )  # fmt: skip
        return head + self.name + extra


def _local_record(name: bytes, offset: int, size: int, payload: bytes | None) -> _Record:
    zip64_fields = []
    if size >= _U32:
        zip64_fields += [size, 0]  # miniz writes the compressed size as 0 here
    if offset >= _U32:
        zip64_fields.append(offset)
    extra = b""
    if zip64_fields:
        extra = struct.pack(f"<HH{len(zip64_fields)}Q", 1, 8 * len(zip64_fields), *zip64_fields)
    start = offset + 30 + len(name) + len(extra) + 4
    pad = -start % ALIGNMENT
    extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
    flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
    header = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra)
    )
    header += name + extra
    return _Record(name, offset, offset + len(header), size, header, payload)


@dataclass(frozen=True)
class TorchLayout:
    """The complete layout of a torch zip checkpoint, computed from the specs.

    Attributes:
        records: every zip record, in file order.
        offsets: ``tensor name -> (absolute data offset, nbytes)`` of its storage.
        storage_records: ``tensor name -> index`` into ``records``.
        central_offset: where the central directory starts.
        file_size: total size in bytes.
    """

    records: tuple[_Record, ...]
    offsets: Mapping[str, tuple[int, int]]
    storage_records: Mapping[str, int]
    central_offset: int
    file_size: int

    def tail(self, crcs: Sequence[int]) -> bytes:
        """Central directory, zip64 end records and end record, for the given record CRCs."""
        central = b"".join(r.central_entry(c) for r, c in zip(self.records, crcs, strict=True))
        n, cd_off, cd_size = len(self.records), self.central_offset, len(central)
        z64_off = cd_off + cd_size
        z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_off)
        locator = struct.pack("<IIQI", 0x07064B50, 0, z64_off, 1)
        end = struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
            min(cd_size, _U32), cd_off if cd_off < _U32 else _U32, 0,
        )  # fmt: skip
        return central + z64 + locator + end


def torch_layout(
    specs: Sequence[TensorSpec],
    *,
    aliases: Mapping[str, str] | None = None,
    archive_name: str = "archive",
) -> TorchLayout:
    """Compute a torch zip checkpoint's layout for a state dict of ``specs`` (+ ``aliases``).

    Args:
        specs: tensors in state-dict order; storage ``data/i`` holds ``specs[i]``.
        aliases: ``{alias: canonical}``; appended after the specs, sharing storage.
        archive_name: the zip's top folder (torch uses the file name's stem, or "archive"
            when saving to a file object; readers accept any).
    """
    aliases = dict(aliases or {})
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in a torch checkpoint")
    for alias, canonical in aliases.items():
        if alias in names or canonical not in names:
            raise ValueError(f"bad alias {alias!r} -> {canonical!r}")

    data_pkl = _pickle_state_dict(specs, aliases)
    return _archive_layout(data_pkl, [(s.name, s.nbytes) for s in specs], archive_name)


def _archive_layout(
    data_pkl: bytes, storages: Sequence[tuple[str, int]], archive_name: str
) -> TorchLayout:
    """The zip layout for a pickle and its storages ``(name, nbytes)``, stored as data/0.."""
    if not archive_name or "/" in archive_name:
        raise ValueError(f"invalid archive name {archive_name!r}")
    sizes = ",".join(f"{name}:{nbytes}" for name, nbytes in storages).encode()
    digest = int.from_bytes(hashlib.sha256(data_pkl + sizes).digest(), "big")
    serialization_id = f"{digest % 10**40:040d}".encode()

    prefix = archive_name.encode() + b"/"
    entries: list[tuple[bytes, int, bytes | None]] = [
        (b"data.pkl", len(data_pkl), data_pkl),
        (b".format_version", 1, b"1"),
        (b".storage_alignment", 2, b"64"),
        (b"byteorder", 6, b"little"),
        *((f"data/{i}".encode(), nbytes, None) for i, (_, nbytes) in enumerate(storages)),
        (b"version", 2, b"3\n"),
        (b".data/serialization_id", len(serialization_id), serialization_id),
    ]
    records = []
    cursor = 0
    for name, size, payload in entries:
        rec = _local_record(prefix + name, cursor, size, payload)
        records.append(rec)
        cursor = rec.end
    first = 4  # index of data/0
    offsets = {
        name: (records[first + i].data_offset, nbytes) for i, (name, nbytes) in enumerate(storages)
    }
    storage = {name: first + i for i, (name, _) in enumerate(storages)}
    tail_size = len(TorchLayout(tuple(records), {}, {}, cursor, 0).tail([0] * len(records)))
    return TorchLayout(tuple(records), offsets, storage, cursor, cursor + tail_size)


def torch_file(
    name: str,
    tensors: Sequence[PlannedTensor],
    *,
    aliases: Mapping[str, str] | None = None,
    archive_name: str = "archive",
) -> FilePlan:
    """The write plan of one ``torch.save`` zip file of a state dict of ``tensors``: every zip
    record as literal bytes, every tensor's operations at its storage's offset, and each
    storage's CRC-32 as a derived operation (see :func:`_zip_plan`)."""
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
    layout = torch_layout(specs, aliases=aliases, archive_name=archive_name)
    storage_ops = {t.name: t.ops(layout.offsets[t.name][0]) for t in tensors}
    return _zip_plan(name, layout, storage_ops, crc32=True)


def _zip_plan(
    name: str, layout: TorchLayout, storage_ops: Mapping[str, Sequence[DataOp]], *, crc32: bool
) -> FilePlan:
    """A torch zip file as a write plan: the local headers, small records, data descriptors
    and the central directory as literals, the storages' bytes as ``storage_ops``, and (with
    ``crc32``) each storage's CRC-32 as a derived operation patching its data descriptor and
    central-directory entry; without, storage CRCs stay zero, as torch writes them when
    ``torch.serialization.set_crc32_options(False)``."""
    ops: list[DataOp] = []
    crcs = []
    for rec in layout.records:
        ops.append(Literal(rec.header_offset, rec.local_header))
        crc = 0  # a storage's CRC is patched in once its bytes are written
        if rec.payload is not None:
            crc = _crc32(rec.payload)
            ops.append(Literal(rec.data_offset, rec.payload))
        crcs.append(crc)
        if rec.size:
            ops.append(Literal(rec.data_offset + rec.size, rec.descriptor(crc)))
    ops.append(Literal(layout.central_offset, layout.tail(crcs)))
    for storage in storage_ops.values():
        ops.extend(storage)
    derived = []
    entry = layout.central_offset  # each central entry's CRC field is at byte 16 of it
    for rec in layout.records:
        if crc32 and rec.payload is None and rec.size:
            derived.append(
                Crc32(rec.data_offset, rec.size, (rec.data_offset + rec.size + 4, entry + 16))
            )
        entry += len(rec.central_entry(0))
    return FilePlan(name, layout.file_size, tuple(ops), tuple(derived))


# --------------------------------------------------------------------------- any object


class LazyStorages:
    """Meta-device storages whose bytes are ranges of files, for :func:`torch_object_file`.

    A tensor on a storage made here behaves like any tensor while a structure is built (views,
    ``nn.Parameter``, ``requires_grad``, attributes) but holds no data: its storage's bytes are
    :class:`~dsckpt.plan.fileplan.Copy` records (``at``: the byte offset inside the storage),
    which become the file's copies when the structure is planned. Bytes no range covers are
    zeros.
    """

    def __init__(self) -> None:
        # keyed by the storage's identity (its StorageImpl); the storage is kept alive with it
        self._ranges: dict[int, tuple[Any, tuple[Copy, ...]]] = {}

    def storage(self, nbytes: int, ranges: Sequence[Copy] = ()) -> Any:
        """A new meta ``UntypedStorage`` of ``nbytes`` whose bytes come from ``ranges``."""
        for r in ranges:
            if r.nbytes < 0 or r.at < 0 or r.at + r.nbytes > nbytes:
                raise ValueError(f"range {r} is outside a storage of {nbytes} bytes")
        storage = torch.UntypedStorage(nbytes, device="meta")
        self._ranges[storage._cdata] = (storage, tuple(r for r in ranges if r.nbytes))
        return storage

    def tensor(
        self,
        dtype: torch.dtype,
        shape: Sequence[int],
        ranges: Sequence[Copy] = (),
    ) -> torch.Tensor:
        """A contiguous meta tensor on a new storage filled from ``ranges``."""
        numel = 1
        for d in shape:
            numel *= d
        storage = self.storage(numel * _itemsize(dtype), ranges)
        return self.view(storage, dtype, 0, shape, _contiguous_strides(tuple(shape)))

    @staticmethod
    def view(
        storage: Any, dtype: torch.dtype, offset: int, shape: Sequence[int], stride: Sequence[int]
    ) -> torch.Tensor:
        """A meta tensor viewing ``storage`` (element ``offset``, ``shape``, ``stride``)."""
        return torch.empty(0, dtype=dtype, device="meta").set_(
            storage, offset, tuple(shape), tuple(stride)
        )

    def ranges(self, storage: Any) -> tuple[Copy, ...] | None:
        entry = self._ranges.get(storage._cdata)
        return None if entry is None else entry[1]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class _Storage:
    key: str
    nbytes: int
    dtype: torch.dtype
    ranges: tuple[Copy, ...] | None  # lazy: from files
    memory: Any = None  # in-memory CPU UntypedStorage


class _TorchPickling:
    """Mixin for a ``pickle.Pickler`` class (C or pure Python): tensors pickle exactly as
    ``torch.save`` pickles CPU tensors (``_rebuild_tensor_v2``/``v3``, ``_rebuild_parameter``,
    ``_rebuild_from_type_v2`` for tensors with attributes), their storages as persistent ids
    ``("storage", type, key, "cpu", numel)``. Keys number storages in first-seen order; two
    tensors on one storage refer to one key, as in ``torch.save``."""

    _lazy: LazyStorages | None
    _by_storage: dict[int, _Storage]
    storages: list[_Storage]

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor:
            return self._reduce_tensor(obj)
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
            raise TypeError(
                f"cannot stream a {type(obj).__name__}: only plain tensors and "
                "nn.Parameter are supported"
            )
        if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
            raise TypeError("cannot stream a bare storage: save a tensor viewing it instead")
        return NotImplemented  # nn.Parameter reduces to its .data, a plain tensor

    def _reduce_tensor(self, t: torch.Tensor) -> Any:
        if t.device.type not in ("cpu", "meta") or t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"cannot stream a {t.device.type} {t.layout} tensor")
        stored = self._storage_of(t)
        legacy = _LEGACY_STORAGE.get(t.dtype)
        func: Any
        dtype: tuple[torch.dtype, ...]
        if legacy is not None:  # a typed storage class carries the dtype
            ref = _StorageRef(stored.key, getattr(torch, legacy), stored.nbytes // t.element_size())
            func, dtype = torch._utils._rebuild_tensor_v2, ()
        else:  # an untyped storage: the dtype is v3's last argument
            ref = _StorageRef(stored.key, torch.storage.UntypedStorage, stored.nbytes)
            func, dtype = torch._utils._rebuild_tensor_v3, (t.dtype,)
        args: tuple[Any, ...] = (
            ref,
            t.storage_offset(),
            tuple(t.size()),
            t.stride(),
            t.requires_grad,
            OrderedDict(),
            *dtype,
        )
        metadata = torch._utils.get_tensor_metadata(t)
        if metadata:
            args += (metadata,)
        state = torch._utils._get_obj_state(t)
        if state:
            return torch._tensor._rebuild_from_type_v2, (func, torch.Tensor, args, state)
        return func, args

    def _storage_of(self, t: torch.Tensor) -> _Storage:
        storage = t.untyped_storage()
        stored = self._by_storage.get(storage._cdata)
        if stored is None:
            if t.device.type == "meta":
                ranges = self._lazy.ranges(storage) if self._lazy is not None else None
                if ranges is None:
                    raise ValueError(
                        "a meta tensor whose storage is not a LazyStorages one: "
                        "its bytes are unknown"
                    )
                stored = _Storage(str(len(self.storages)), storage.nbytes(), t.dtype, ranges)
            else:
                stored = _Storage(str(len(self.storages)), storage.nbytes(), t.dtype, None, storage)
            self._by_storage[storage._cdata] = stored
            self.storages.append(stored)
        elif stored.dtype != t.dtype:
            raise ValueError(
                f"tensors of {stored.dtype} and {t.dtype} view one storage, which "
                "torch.save refuses too"
            )
        return stored


def pickle_for_torch(
    obj: Any, pickler: type = pickle.Pickler, lazy: LazyStorages | None = None
) -> tuple[bytes, list[_Storage]]:
    """``obj``'s ``data.pkl`` (protocol 2, as torch.save) and its storages in key order."""
    cls = type("_StreamPickler", (_TorchPickling, pickler), {})
    buf = io.BytesIO()
    p = cls(buf, protocol=2)
    p._lazy, p._by_storage, p.storages = lazy, {}, []
    p.dump(obj)
    return buf.getvalue(), p.storages


def torch_object_file(
    name: str,
    obj: Any,
    *,
    lazy: LazyStorages | None = None,
    pickler: type = pickle.Pickler,
    archive_name: str = "archive",
    crc32: bool = True,
) -> FilePlan:
    """The write plan of ``torch.save(obj)``: ``obj``'s pickle and zip records as literals, its
    in-memory storages as literals, its lazy storages as copies of their file ranges (a later
    range wins where two overlap, zeros where none reaches), and each storage's CRC-32 as a
    derived operation (see :func:`save_torch` for what ``obj`` may hold)."""
    data_pkl, storages = pickle_for_torch(obj, pickler, lazy)
    layout = _archive_layout(data_pkl, [(s.key, s.nbytes) for s in storages], archive_name)
    storage_ops: dict[str, list[DataOp]] = {}
    for s in storages:
        base = layout.offsets[s.key][0]
        if s.memory is not None:  # a CPU tensor's bytes, already in memory
            raw = torch.empty(0, dtype=torch.uint8).set_(s.memory)
            storage_ops[s.key] = [Literal(base, _tensor_bytes(raw))] if s.nbytes else []
            continue
        storage_ops[s.key] = _visible_ops(s.ranges or (), s.nbytes, base)
    return _zip_plan(name, layout, storage_ops, crc32=crc32)


def _tensor_bytes(raw: torch.Tensor) -> bytes:
    from dsckpt.execute.executor import tensor_memory

    return bytes(tensor_memory(raw))


def _visible_ops(ranges: Sequence[Copy], nbytes: int, base: int) -> list[DataOp]:
    """Copies of the bytes of ``ranges`` that end up in a storage of ``nbytes`` at file offset
    ``base`` (a later range overwrites an earlier one where they overlap), zeros elsewhere."""
    ordered = sorted(ranges, key=lambda r: r.at)
    if any(a.at + a.nbytes > b.at for a, b in zip(ordered, ordered[1:], strict=False)):
        ordered = _last_wins(ranges)  # overlaps: rare, so the quadratic clipping is fine
    ops: list[DataOp] = []
    pos = 0
    for r in ordered:
        if r.at > pos:
            ops.append(Zeros(base + pos, r.at - pos))
        ops.append(Copy(base + r.at, r.source))
        pos = r.at + r.nbytes
    if pos < nbytes:
        ops.append(Zeros(base + pos, nbytes - pos))
    return ops


def _last_wins(ranges: Sequence[Copy]) -> list[Copy]:
    """Disjoint copies, in storage order, of what ``ranges`` leave when each overwrites the
    earlier ones where they overlap."""
    visible: list[Copy] = []
    for r in reversed(ranges):  # clip each earlier range by every later one
        pieces = [(r.at, r.at + r.nbytes)]
        for v in visible:
            a, b = v.at, v.at + v.nbytes
            pieces = [
                p for lo, hi in pieces for p in ((lo, min(hi, a)), (max(lo, b), hi)) if p[0] < p[1]
            ]
        src = r.source
        visible.extend(
            Copy(lo, ByteRange(src.path, src.offset + lo - r.at, hi - lo)) for lo, hi in pieces
        )
    return sorted(visible, key=lambda v: v.at)


def save_torch(
    obj: Any,
    path: os.PathLike[str] | str,
    *,
    lazy: LazyStorages | None = None,
    pickler: type = pickle.Pickler,
    archive_name: str = "archive",
    crc32: bool = True,
    preallocate: bool = True,
    progress: Any = None,
) -> int:
    """``torch.save(obj, path)`` in bounded memory: lazy tensors' bytes are copied from files.

    ``obj`` is any structure ``torch.save`` takes whose tensors are CPU tensors (written from
    memory) or meta tensors on ``lazy``'s storages (their bytes copied kernel-side with
    ``copy_file_range`` from the source files, straight into the output; zeros elsewhere).
    Tensors sharing a storage share it in the file; ``nn.Parameter``, ``requires_grad`` and
    tensor attributes are kept; ``torch.load`` gives back what ``torch.save`` would have
    written. The file is planned (:func:`torch_object_file`) and written by the one executor
    in one pass, not fsynced.

    Args:
        obj: the structure to save.
        path: the file to create (truncated if it exists).
        lazy: the registry of ``obj``'s meta tensors' storages.
        pickler: the ``pickle.Pickler`` class to extend (one writing other GLOBAL names, say).
        archive_name: the zip's top folder.
        crc32: real CRC-32s (computed from the source chunks on a worker thread while the
            kernel copies them), or zeros as ``torch.serialization.set_crc32_options(False)``
            writes (``torch.load`` never checks them; zip tools do).
        preallocate: unused: the executor always reserves the file's blocks up front.
        progress: called with each number of bytes copied.

    Returns:
        The file's size in bytes.
    """
    from dsckpt.execute.executor import write_plan_file

    path = Path(path)
    plan = torch_object_file(
        path.name, obj, lazy=lazy, pickler=pickler, archive_name=archive_name, crc32=crc32
    )
    write_plan_file(plan, path, progress)
    return plan.size
