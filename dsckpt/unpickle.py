"""Read ``torch.save`` files without torch and without running any code from them.

:func:`load_saved` parses the zip directory itself (``struct``, one ``pread`` per record header),
unpickles ``data.pkl`` with the standard library's unpickler (its Python implementation,
``pickle._Unpickler``) whose ``find_class`` hands out only allow-listed objects, and returns
the file's structure with every tensor replaced by a :class:`SavedTensor`: dtype, shape,
stride and the absolute byte offset of its first element in the file, ready for ``pread`` or
``copy_file_range``. No tensor data is read, and torch is never imported (``import torch`` costs
more than copying a mid-sized model).

The allow-list is what :mod:`dsckpt.load` allows through torch's own restricted unpickler: the
DeepSpeed stand-ins of :mod:`dsckpt.standins`, ``argparse.Namespace``, numpy's array and dtype
reconstructors, the builtins torch's ``weights_only`` unpickler accepts, and torch's dense-tensor
rebuild functions, ``torch.Size``, ``torch.device``, dtypes and storage classes. The torch names
map to plain stand-ins (:class:`SavedTensor`, ``tuple``, :class:`Device`, :class:`DType`). Sparse,
quantized, nested and other tensor kinds torch can save are refused with
:class:`~dsckpt.errors.UnsupportedLayout`; any other global with
:class:`~dsckpt.errors.UnsafeCheckpoint`.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import re
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from dsckpt import dtypes
from dsckpt.dtypes import DType
from dsckpt.errors import CorruptFile, DsckptError, UnsafeCheckpoint, UnsupportedLayout
from dsckpt.standins import STAND_INS, numpy_globals

__all__ = ["Device", "SavedStorage", "SavedTensor", "load_saved"]

# The stand-ins below define __setstate__ to refuse: a pickle's BUILD calls it on any object
# it holds, and dataclass(slots=True, frozen=True) would otherwise add one that sets fields.
_IMMUTABLE = "dsckpt's stand-ins for torch objects are immutable"


@dataclass(frozen=True, slots=True)
class Device:
    """Stand-in for a pickled ``torch.device``; ``str()`` gives torch's spelling (``"cuda:1"``)."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Device, (self.type, self.index))

    def __setstate__(self, state: Any) -> None:
        raise TypeError(_IMMUTABLE)


class SavedStorage:
    """One storage record (``<archive>/data/<key>``) as a tensor or the pickle refers to it.

    ``numel`` counts elements of ``dtype``; ``record_offset`` is the absolute byte offset of the
    record's data in ``path``.
    """

    __slots__ = ("path", "key", "dtype", "numel", "record_offset", "location")

    path: Path
    key: str
    dtype: DType
    numel: int
    record_offset: int
    location: str

    def __init__(
        self, path: Path, key: str, dtype: DType, numel: int, record_offset: int, location: str
    ) -> None:
        self.path = path
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.record_offset = record_offset
        self.location = location

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"SavedStorage({self.dtype}[{self.numel}], key {self.key!r}, "
            f"offset {self.record_offset})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.path, self.key, self.dtype, self.numel, self.record_offset, self.location)
        return (SavedStorage, fields)

    def __setstate__(self, state: Any) -> None:
        raise TypeError(_IMMUTABLE)


class SavedTensor:
    """A tensor in a saved file: where its elements are, not their values.

    Attributes mirror torch's where they can: ``dtype`` (a :class:`DType`), ``shape`` and
    ``stride`` (tuples of ints; note ``stride`` is an attribute here, a method in torch),
    ``storage_offset`` (elements), ``requires_grad``. ``offset`` is the absolute byte offset in
    ``path`` of element 0 (the storage record's offset plus ``storage_offset * itemsize``).
    Tensors that share a storage (tied weights, views) share ``storage_key``; ``storage_numel``
    is the size of that storage in elements of ``dtype``. ``is_parameter`` says the tensor was
    pickled as an ``nn.Parameter``; ``attrs`` holds Python attributes pickled with it (ZeRO-3's
    ``ds_id``), also readable as attributes (``t.ds_id``). ``location`` is the device it was saved
    from (``"cpu"``, ``"cuda:0"``).

    Treat instances as read-only (:meth:`replace` makes a changed copy); they do not enforce it,
    because a file can hold thousands and plain slot stores are twice as fast.
    """

    __slots__ = (
        "path",
        "dtype",
        "shape",
        "stride",
        "storage_offset",
        "storage_key",
        "storage_numel",
        "offset",
        "requires_grad",
        "is_parameter",
        "attrs",
        "location",
    )

    path: Path
    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage_key: str
    storage_numel: int
    offset: int
    requires_grad: bool
    is_parameter: bool
    attrs: dict[str, Any]
    location: str

    def __init__(
        self,
        path: Path,
        dtype: DType,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        storage_offset: int,
        storage_key: str,
        storage_numel: int,
        offset: int,
        requires_grad: bool = False,
        is_parameter: bool = False,
        attrs: dict[str, Any] | None = None,
        location: str = "cpu",
    ) -> None:
        self.path = path
        self.dtype = dtype
        self.shape = shape
        self.stride = stride
        self.storage_offset = storage_offset
        self.storage_key = storage_key
        self.storage_numel = storage_numel
        self.offset = offset
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self.attrs = {} if attrs is None else attrs
        self.location = location

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def replace(self, **changes: Any) -> SavedTensor:
        """A copy with some fields changed (like :func:`dataclasses.replace`)."""
        fields = dict(zip(self.__slots__, self._fields(), strict=True))
        fields.update(changes)
        return SavedTensor(**fields)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SavedTensor, self._fields())

    def __setstate__(self, state: Any) -> None:
        raise TypeError(_IMMUTABLE)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: pickled Python attributes, like torch's tensors.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return object.__getattribute__(self, "attrs")[name]
        except (KeyError, AttributeError):
            raise AttributeError(f"'SavedTensor' object has no attribute {name!r}") from None

    def __repr__(self) -> str:
        kind = "Parameter" if self.is_parameter else "Tensor"
        dims = ", ".join(map(str, self.shape))
        return (
            f"SavedTensor({kind} {self.dtype}[{dims}], storage {self.storage_key!r}, "
            f"offset {self.offset})"
        )

    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def element_size(self) -> int:
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating

    def is_contiguous(self) -> bool:
        expected = 1
        for size, step in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size == 0:
                return True
            if size != 1 and step != expected:
                return False
            expected *= size
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's elements (``numel() * element_size()``), as in torch."""
        return self.numel() * self.dtype.itemsize

    @property
    def span_bytes(self) -> int:
        """Bytes from element 0 to one past the furthest element, following the strides."""
        return _span(self.shape, self.stride) * self.dtype.itemsize

    @property
    def record_offset(self) -> int:
        """Absolute byte offset of the storage's element 0."""
        return self.offset - self.storage_offset * self.dtype.itemsize


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from element 0 to one past the furthest one (0 for an empty tensor)."""
    last = 0
    for size, step in zip(shape, stride, strict=True):
        if size == 0:
            return 0
        last += (size - 1) * step
    return last + 1


def load_saved(path: Path) -> Any:
    """Unpickle a ``torch.save`` file without torch, without reading tensor data or running code.

    Args:
        path: a ``torch.save`` zip file.

    Returns:
        The pickled object, each tensor a :class:`SavedTensor` (each bare storage a
        :class:`SavedStorage`), ``torch.Size`` a tuple, ``torch.device`` a :class:`Device`,
        dtypes :class:`DType`, DeepSpeed classes the stand-ins of :mod:`dsckpt.standins`.

    Raises:
        UnsafeCheckpoint: the pickle needs a global outside the allow-list (nothing was run).
        UnsupportedLayout: the file holds a tensor kind this reader does not handle (sparse,
            quantized, ...), numpy values without numpy installed, or big-endian data.
        CorruptFile: not a readable torch zip pickle (empty, truncated, not a zip, bad pickle).
    """
    path = Path(path)
    pkl, records = _read_archive(path)
    unpickler = _Unpickler(pkl, path, records)
    try:
        return unpickler.load()
    except DsckptError:
        raise
    except Exception as exc:  # anything else an untrusted pickle provokes means a bad file
        raise CorruptFile(path, f"unreadable pickle ({_first_line(exc)})") from exc
    finally:
        unpickler.verify_classes_untouched()


# -- the zip ---------------------------------------------------------------------------------
#
# The zip directory is parsed here rather than by :mod:`zipfile`, whose ZipInfo objects cost
# ~15 us per record: a file with thousands of tensors would spend most of its load time there.
# Layouts follow the zip specification (APPNOTE 4.3), as torch's writer (miniz) produces them:
# stored records, a zip64 end record, and data aligned by padding in each local header's extra
# field, which differs from the central directory's, so each local header is read (30 bytes).

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # one central directory entry
_LOCAL = struct.Struct("<I22xHH")  # local header: signature, name and extra lengths
_LOCAL_SIGNATURE = 0x04034B50
_MAX_COMMENT = 0xFFFF
_U16, _U32 = 0xFFFF, 0xFFFFFFFF


class _Record(NamedTuple):
    name: str
    header_offset: int
    size: int
    crc: int


def _read_archive(path: Path) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``data.pkl``'s bytes and, per storage key, (absolute data offset, size in bytes)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CorruptFile(path, _first_line(exc)) from exc
    try:
        file_size = os.fstat(fd).st_size
        if file_size == 0:
            raise CorruptFile(path, "empty file")
        records = _central_directory(path, fd, file_size)
        tops = {record.name.partition("/")[0] for record in records}
        if len(tops) != 1:
            raise CorruptFile(
                path,
                f"a torch.save zip has one top folder, this one has {len(tops)} "
                f"({', '.join(sorted(tops)[:3])})",
            )
        top = tops.pop()
        data_prefix = f"{top}/data/"
        storages: dict[str, tuple[int, int]] = {}
        pkl = byteorder = None
        for record in records:
            if record.name.startswith(data_prefix):
                start = _data_offset(path, fd, record, file_size)
                storages[record.name[len(data_prefix) :]] = (start, record.size)
            elif record.name == f"{top}/data.pkl":
                pkl = record
            elif record.name == f"{top}/byteorder":
                byteorder = record
        if pkl is None:
            raise CorruptFile(path, f"no {top}/data.pkl in the zip: not a torch.save file")
        if byteorder is not None:
            order = _read_record(path, fd, byteorder, file_size).strip()
            if order != b"little":
                raise UnsupportedLayout(
                    f"{path}: the tensors were saved {order.decode(errors='replace')}-endian; "
                    "dsckpt reads little-endian files only: load and re-save it with torch"
                )
        return _read_record(path, fd, pkl, file_size), storages
    except OSError as exc:
        raise CorruptFile(path, _first_line(exc)) from exc
    finally:
        os.close(fd)


def _central_directory(path: Path, fd: int, file_size: int) -> list[_Record]:
    not_a_zip = CorruptFile(path, "not a torch zip file (truncated or not a checkpoint)")
    tail_size = min(file_size, _EOCD.size + _MAX_COMMENT + _EOCD64_LOCATOR.size)
    tail_start = file_size - tail_size
    tail = os.pread(fd, tail_size, tail_start)

    def ends_the_file(at: int) -> bool:  # the record and its comment fill the tail exactly
        end = at + _EOCD.size
        return end <= tail_size and end + struct.unpack_from("<H", tail, end - 2)[0] == tail_size

    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and not ends_the_file(at):
        at = tail.rfind(b"PK\x05\x06", 0, at)  # the signature inside a comment
    if at < 0:
        raise not_a_zip
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    cd_end = tail_start + at  # where the central directory ends: the next record's start
    locator_at = at - _EOCD64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
        _, _, eocd64_offset, _ = _EOCD64_LOCATOR.unpack_from(tail, locator_at)
        eocd64 = os.pread(fd, _EOCD64.size, eocd64_offset)
        if len(eocd64) < _EOCD64.size or eocd64[:4] != b"PK\x06\x06":
            raise not_a_zip
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = _EOCD64.unpack(eocd64)
        cd_end = eocd64_offset
    elif _U16 in (count,) or _U32 in (cd_size, cd_offset):
        raise not_a_zip
    if disk or cd_disk:
        raise CorruptFile(path, "a multi-disk zip: not a file torch.save wrote")
    # Bytes before the zip (zipfile allows them too) shift every offset.
    shift = cd_end - cd_size - cd_offset
    if shift < 0 or cd_offset + shift < 0:
        raise not_a_zip
    directory = os.pread(fd, cd_size, cd_offset + shift)
    if len(directory) < cd_size:
        raise not_a_zip
    records = []
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > cd_size:
            raise not_a_zip
        (sig, _, _, _, _, flags, method, _, _, crc, packed, size, name_len, extra_len,
         comment_len, _, _, _, header_offset) = _CENTRAL.unpack_from(directory, pos)  # fmt: skip
        if sig != b"PK\x01\x02":
            raise not_a_zip
        pos += _CENTRAL.size
        raw_name = directory[pos : pos + name_len]
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        if method != 0 or flags & 0x1:
            raise CorruptFile(
                path,
                f"record {name} is compressed or encrypted (zip method {method}); "
                "torch.save never does that, so torch did not write this file",
            )
        if _U32 in (size, packed, header_offset):
            size, header_offset = _zip64_extra(
                directory[pos + name_len : pos + name_len + extra_len], size, packed, header_offset
            )
            if size is None:
                raise not_a_zip
        pos += name_len + extra_len + comment_len
        records.append(_Record(name, header_offset + shift, size, crc))
    return records


def _zip64_extra(extra: bytes, size: int, packed: int, offset: int) -> tuple[Any, int]:
    """Sizes and offset too big for the central entry, from its zip64 extra field (id 1)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            # Only the fields that overflowed are present, in this order.
            size = next(values) if size == _U32 else size
            packed = next(values) if packed == _U32 else packed
            offset = next(values) if offset == _U32 else offset
            return size, offset
        pos += 4 + length
    return None, offset


def _data_offset(path: Path, fd: int, record: _Record, file_size: int) -> int:
    header = os.pread(fd, _LOCAL.size, record.header_offset)
    if len(header) < _LOCAL.size:
        raise CorruptFile(path, f"record {record.name} runs past the end of the file (truncated)")
    signature, name_len, extra_len = _LOCAL.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        raise CorruptFile(path, f"bad local zip header for record {record.name}")
    start = record.header_offset + _LOCAL.size + name_len + extra_len
    if start + record.size > file_size:
        raise CorruptFile(path, f"record {record.name} runs past the end of the file (truncated)")
    return start


def _read_record(path: Path, fd: int, record: _Record, file_size: int) -> bytes:
    """A small record's bytes, CRC-checked."""
    data = os.pread(fd, record.size, _data_offset(path, fd, record, file_size))
    if zlib.crc32(data) != record.crc:
        raise CorruptFile(path, f"record {record.name} fails its CRC check")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- the allow-list --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _StorageType:
    """What a storage-class global (``torch.FloatStorage``) unpickles to."""

    name: str
    dtype: DType

    def __setstate__(self, state: Any) -> None:
        raise TypeError(_IMMUTABLE)


@dataclass(frozen=True, slots=True)
class _TensorType:
    """What ``torch.Tensor`` / ``torch.nn.parameter.Parameter`` unpickle to (the ``new_type``
    argument of ``torch._tensor._rebuild_from_type_v2``)."""

    is_parameter: bool

    def __setstate__(self, state: Any) -> None:
        raise TypeError(_IMMUTABLE)


_TENSOR = _TensorType(is_parameter=False)
_PARAMETER = _TensorType(is_parameter=True)


@cache
def _static_globals() -> dict[str, Any]:
    """Allow-listed globals that hold no per-file state, by import path."""
    allowed: dict[str, Any] = dict(STAND_INS)
    allowed.update(
        {
            # What torch's weights_only unpickler allows besides tensors (_get_allowed_globals).
            "collections.OrderedDict": OrderedDict,
            "collections.Counter": Counter,
            "builtins.set": set,
            "builtins.complex": complex,
            "torch.Tensor": _TENSOR,
            "torch.nn.parameter.Parameter": _PARAMETER,
        }
    )
    for dtype in dtypes.ALL:
        allowed[f"torch.{dtype.name}"] = dtype
    for name in dtypes.storage_type_names():
        module = "torch.storage" if name == "UntypedStorage" else "torch"
        allowed[f"{module}.{name}"] = _StorageType(name, dtypes.from_storage_type(name))
    return allowed


# Globals torch's restricted unpickler accepts but this reader does not turn into SavedTensors:
# refused as unsupported (torch can load them), not as unsafe.
_UNSUPPORTED_TORCH = re.compile(
    r"torch\._utils\._rebuild_\w+|torch\.serialization\._get_layout|torch\.storage\.TypedStorage"
    r"|torch\.\w*(Tensor|Storage)|torch\.(float8_\w+|float4_\w+|complex32|bits\w+|u?int[1-7]"
    r"|q\w+|per_\w+)"
)

# Old pickles name torch._tensor by its former path (torch.serialization's load_module_mapping).
_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}

_Py_TPFLAGS_IMMUTABLETYPE = 1 << 8


def _is_mutable_class(cls: type) -> bool:
    return not cls.__flags__ & _Py_TPFLAGS_IMMUTABLETYPE


def _snapshot(cls: type) -> list[tuple[Any, dict[str, Any]]]:
    """The attributes of a class (and of an enum's members), to check after unpickling."""
    state: list[tuple[Any, dict[str, Any]]] = [(cls, dict(vars(cls)))]
    members = getattr(cls, "__members__", None)
    if isinstance(members, Mapping):
        state += [(member, dict(vars(member))) for member in members.values()]
    return state


class _Unpickler(pickle._Unpickler):
    """The standard unpickler with every global, persistent id and tensor rebuild under our control.

    It is the Python implementation, like torch's ``weights_only`` unpickler: the C one keeps its
    memo in an array sized by the largest index it is given, so one damaged ``LONG_BINPUT`` makes
    it allocate and clear gigabytes (a bit flip in a test file stalled it 44 s); this one keeps a
    dict. It costs about 3x the C unpickler's time, a few microseconds per tensor.
    """

    def __init__(self, data: bytes, path: Path, records: dict[str, tuple[int, int]]) -> None:
        self._input = io.BytesIO(data)
        super().__init__(self._input, encoding="utf-8")
        # Protocols 0-3 (torch.save writes 2) have no frames: see load().
        self._unframed = len(data) < 2 or data[0] != pickle.PROTO[0] or data[1] < 4
        self._path = path
        self._records = records
        self._storages: dict[str, SavedStorage] = {}
        self._snapshots: dict[type, list[tuple[Any, dict[str, Any]]]] = {}
        # Bound methods, not functions: a pickle's BUILD can set attributes on any object it
        # holds, and a bound method refuses them (a function would take new __defaults__).
        # builtins.bytearray is here to narrow what torch allows, see _bytearray.
        self._calls: dict[str, Callable[..., Any]] = {
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor_v3": self._rebuild_tensor_v3,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
            "torch.Size": self._size,
            "torch.device": self._device,
            "_codecs.encode": self._encode,
            "builtins.bytearray": self._bytearray,
        }

    def load(self) -> Any:
        """pickle._Unpickler.load, minus its frame reader on unframed protocols (a third faster:
        every opcode's read otherwise goes through one more Python call)."""
        if not self._unframed:
            return super().load()
        self.read = self._input.read  # type: ignore[method-assign]
        self.readline = self._input.readline  # type: ignore[method-assign]
        self.metastack: list[Any] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)  # type: ignore[arg-type]
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            return stop.value

    # -- globals and persistent ids

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 writes Python 2 names (__builtin__.set); map them back as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        module = _MODULE_RENAMES.get(module, module)
        full = f"{module}.{name}"
        found = self._calls.get(full)
        if found is None:
            found = _static_globals().get(full)
        if found is None and module.partition(".")[0] == "numpy":
            found = self._numpy_global(full)
        if found is None:
            if _UNSUPPORTED_TORCH.fullmatch(full):
                raise UnsupportedLayout(
                    f"{self._path}: the pickle holds `{full}`, a kind of tensor or dtype "
                    "dsckpt's torch-free reader does not handle (it reads dense tensors of "
                    f"{', '.join(d.name for d in dtypes.ALL)})"
                )
            raise UnsafeCheckpoint(
                f"{self._path}: the pickle asks for `{full}`, which is not on dsckpt's allow-list "
                "(loading it could run code), so nothing from the file was run; if this file "
                "really is a DeepSpeed checkpoint, report the name so a stand-in can be added"
            )
        if isinstance(found, type) and _is_mutable_class(found) and found not in self._snapshots:
            self._snapshots[found] = _snapshot(found)
        return found

    def _numpy_global(self, full: str) -> Any:
        allowed = numpy_globals()
        if not allowed:
            raise UnsupportedLayout(
                f"{self._path}: the pickle holds numpy values (`{full}`) and numpy is not "
                "installed: pip install numpy"
            )
        return allowed.get(full)

    def verify_classes_untouched(self) -> None:
        """Undo and refuse any change the pickle made to an allow-listed class.

        The unpickler's BUILD can set attributes on any object on its stack, classes included;
        everything it could set is itself allow-listed data, so no code runs, but it must not
        leak into the process (or into the next file).
        """
        changed = []
        for cls, state in self._snapshots.items():
            for obj, attrs in state:
                if dict(vars(obj)) == attrs:
                    continue
                changed.append(cls.__qualname__)
                if isinstance(obj, type):
                    for key in set(vars(obj)) - set(attrs):
                        type.__delattr__(obj, key)
                    for key, value in attrs.items():
                        if vars(obj).get(key, _MISSING) is not value:
                            type.__setattr__(obj, key, value)
                else:
                    vars(obj).clear()
                    vars(obj).update(attrs)
        if changed:
            raise UnsafeCheckpoint(
                f"{self._path}: the pickle tries to change the class `{changed[0]}` (a checkpoint "
                "never does), so the file was refused and the change undone"
            )

    def persistent_load(self, pid: Any) -> SavedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError("a persistent id that is not a storage")
        _, storage_type, key, location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if isinstance(location, bytes):
            location = location.decode("ascii")
        if not (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and isinstance(location, str)
            and type(numel) is int
            and numel >= 0
        ):
            raise pickle.UnpicklingError(f"a malformed storage id {pid!r}")
        found = self._storages.get(key)
        if found is not None:
            # torch keeps the first type it saw for a key; torch.save refuses to write one
            # storage under two types, so they agree in every file torch wrote.
            return found
        record = self._records.get(key)
        if record is None:
            raise CorruptFile(self._path, f"the pickle needs storage record data/{key}, missing")
        start, size = record
        storage = SavedStorage(self._path, key, storage_type.dtype, numel, start, location)
        if storage.nbytes > size:
            raise CorruptFile(
                self._path,
                f"storage record data/{key} holds {size} bytes, its tensors need {storage.nbytes}",
            )
        self._storages[key] = storage
        return storage

    # -- torch's rebuild functions, as stand-ins

    def _tensor(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        dtype: DType,
        metadata: Any,
    ) -> SavedTensor:
        if type(storage) is not SavedStorage:
            raise pickle.UnpicklingError("a tensor whose storage is not a storage record")
        shape = size if type(size) is tuple else tuple(size)
        strides = stride if type(stride) is tuple else tuple(stride)
        if type(storage_offset) is not int or storage_offset < 0 or len(shape) != len(strides):
            raise pickle.UnpicklingError(f"a malformed tensor ({shape}, {strides})")
        # One pass: check the sizes and strides, and find the furthest element.
        last = 0
        empty = False
        for n, step in zip(shape, strides, strict=True):
            if type(n) is not int or type(step) is not int or n < 0 or step < 0:
                raise pickle.UnpicklingError(f"a malformed tensor ({shape}, {strides})")
            if n == 0:
                empty = True
            last += (n - 1) * step
        if metadata and any(metadata.values()):
            raise UnsupportedLayout(
                f"{self._path}: a tensor carries torch's lazy conjugate/negative bits "
                f"({metadata}); dsckpt's torch-free reader does not apply them"
            )
        itemsize = dtype.itemsize
        storage_numel = storage.numel * storage.dtype.itemsize // itemsize
        if not empty and storage_offset + last >= storage_numel:
            raise CorruptFile(
                self._path,
                f"a tensor of shape {list(shape)} runs past the end of its storage data/"
                f"{storage.key} ({storage_numel} elements)",
            )
        return SavedTensor(
            self._path,
            dtype,
            shape,
            strides,
            storage_offset,
            storage.key,
            storage_numel,
            storage.record_offset + storage_offset * itemsize,
            requires_grad is True,
            False,
            None,
            storage.location,
        )

    def _rebuild_tensor(
        self, storage: Any, storage_offset: Any, size: Any, stride: Any
    ) -> SavedTensor:
        dtype = storage.dtype if isinstance(storage, SavedStorage) else dtypes.UINT8
        return self._tensor(storage, storage_offset, size, stride, False, dtype, None)

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        metadata: Any = None,
    ) -> SavedTensor:
        dtype = storage.dtype if isinstance(storage, SavedStorage) else dtypes.UINT8
        return self._tensor(storage, storage_offset, size, stride, requires_grad, dtype, metadata)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> SavedTensor:
        if not isinstance(dtype, DType):
            raise pickle.UnpicklingError(f"a tensor whose dtype is {type(dtype).__name__}")
        return self._tensor(storage, storage_offset, size, stride, requires_grad, dtype, metadata)

    def _rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> SavedTensor:
        if not isinstance(data, SavedTensor):
            raise pickle.UnpicklingError("a parameter whose data is not a tensor")
        return data.replace(is_parameter=True, requires_grad=bool(requires_grad))

    def _rebuild_parameter_with_state(
        self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any
    ) -> SavedTensor:
        param = self._rebuild_parameter(data, requires_grad, backward_hooks)
        return param.replace(attrs={**param.attrs, **_state_attrs(state)})

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> SavedTensor:
        if not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
            raise pickle.UnpicklingError("a tensor rebuilt as something other than a tensor")
        tensor = func(*args)
        if not isinstance(tensor, SavedTensor):
            raise pickle.UnpicklingError("a tensor rebuilt from something other than a tensor")
        return tensor.replace(
            is_parameter=tensor.is_parameter or new_type.is_parameter,
            attrs={**tensor.attrs, **_state_attrs(state)},
        )

    def _size(self, sizes: Any = ()) -> tuple[int, ...]:
        shape = tuple(sizes)
        if not all(type(n) is int for n in shape):
            raise pickle.UnpicklingError(f"a torch.Size of non-integers {shape!r}")
        return shape

    def _device(self, kind: Any, index: Any = None) -> Device:
        if isinstance(kind, str) and index is None and ":" in kind:
            kind, _, number = kind.partition(":")
            index = int(number)
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise pickle.UnpicklingError(f"a malformed torch.device ({kind!r}, {index!r})")
        return Device(kind, index)

    def _bytearray(self, data: Any = b"", encoding: Any = None) -> bytearray:
        # Protocol 2 pickles bytearray(b) as bytearray(str, "latin-1"); refuse bytearray(n),
        # which would allocate n bytes on a damaged file's say-so.
        if isinstance(data, str) and encoding in ("latin1", "latin-1"):
            return bytearray(data, "latin1")
        if isinstance(data, bytes) and encoding is None:
            return bytearray(data)
        raise pickle.UnpicklingError("bytearray from something other than bytes")

    def _encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        # How protocol 2 pickles bytes: _codecs.encode(str, "latin1"). Other codecs (zlib, ...)
        # have no business in a checkpoint.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")


_MISSING = object()


def _state_attrs(state: Any) -> dict[str, Any]:
    """The Python attributes in a tensor's pickled state (``__dict__``, or it and slots)."""
    parts = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
    attrs: dict[str, Any] = {}
    for part in parts:
        if part is None:
            continue
        if not isinstance(part, dict) or not all(isinstance(k, str) for k in part):
            raise pickle.UnpicklingError("a tensor's attribute state that is not a dict")
        attrs.update(part)
    return attrs
