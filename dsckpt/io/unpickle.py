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

Every file is untrusted: only regular files are opened (:func:`dsckpt.io.regular.open_regular`), the
zip is refused if any reader could see it differently (duplicate or case-folded names, overlapping
records, bad zip64 fields), ``data.pkl`` is at most :data:`MAX_PICKLE_BYTES`, and the unpickling
itself runs under the budgets of :mod:`dsckpt.bounds` (memory, time, hashing, depth, cycles).
"""

from __future__ import annotations

import _compat_pickle
import io
import itertools
import operator
import os
import pickle
import re
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from dsckpt.errors import CorruptFile, DsckptError, UnsafeCheckpoint, UnsupportedLayout
from dsckpt.io import bounds, dtypes, zipshape
from dsckpt.io.bounds import short
from dsckpt.io.dtypes import DType
from dsckpt.io.regular import open_regular
from dsckpt.io.standins import STAND_INS, check_numpy_build, checked_numpy_globals
from dsckpt.io.zipshape import ZipShape
from dsckpt.printable import listed

__all__ = ["Device", "SavedFile", "SavedStorage", "SavedTensor", "SiblingReader", "load_saved"]

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
    fd = open_regular(path)
    try:
        return load_saved_fd(path, fd)
    finally:
        os.close(fd)


def load_saved_fd(path: Path, fd: int) -> Any:
    """:func:`load_saved` on a descriptor already open on ``path`` (checked to be a regular
    file, as :func:`dsckpt.io.regular.open_regular` does): callers that go on reading the same file
    read what was checked, even if the name is swapped meanwhile."""
    try:
        pkl, records = _read_archive_fd(path, fd)
    except OSError as exc:
        raise CorruptFile(path, _first_line(exc)) from exc
    return _unpickle(path, pkl, records)[0]


def _unpickle(
    path: Path, pkl: bytes, records: dict[str, tuple[int, int]]
) -> tuple[Any, dict[str, int]]:
    """The value of ``data.pkl``, and the bytes each storage record it uses must hold."""
    unpickler = _Unpickler(pkl, path, records)
    try:
        value = unpickler.load()
    except DsckptError:
        raise
    except Exception as exc:  # anything else an untrusted pickle provokes means a bad file
        raise CorruptFile(path, f"unreadable pickle ({_first_line(exc)})") from exc
    finally:
        unpickler.verify_classes_untouched()
    return value, {key: s.nbytes for key, s in unpickler._storages.items()}


# -- files many ranks wrote ------------------------------------------------------------------


@dataclass(frozen=True)
class SavedFile:
    """One file read by :class:`SiblingReader`.

    ``value`` is what :func:`load_saved` returns for the file, except when ``shared_with`` names
    another file: then ``value`` is that file's parse (their ``data.pkl`` records are
    byte-identical, and this file holds every storage record that parse uses, at least as
    large), whose tensors :meth:`locate` moves into this file.
    """

    path: Path
    value: Any
    records: dict[str, tuple[int, int]]
    shared_with: Path | None = None

    def locate(self, tensor: SavedTensor) -> SavedTensor:
        """``tensor``, a tensor of :attr:`value`, where it lies in this file."""
        if self.shared_with is None:
            return tensor
        start = self.records[tensor.storage_key][0]
        return tensor.replace(
            path=self.path, offset=start + tensor.storage_offset * tensor.dtype.itemsize
        )


@dataclass(frozen=True)
class _Parsed:
    path: Path
    pkl: bytes
    value: Any
    needs: dict[str, int]


@dataclass(frozen=True)
class _Shaped:
    """A fully checked file's :class:`ZipShape` and what a sibling of that shape shares with it:
    its storage records, and where its ``data.pkl`` and ``byteorder`` records and their CRC
    fields are."""

    shape: ZipShape
    storages: dict[str, tuple[int, int]]
    pkl: bytes
    pkl_at: int
    pkl_crc_at: int  # in the shape's first region (the central directory)
    pkl_crc: int
    byteorder: tuple[int, int, int] | None  # data offset, size, CRC field


class SiblingReader:
    """Reads the files that the ranks of one run wrote for the same object, such as ZeRO-3's
    per-rank model-states files, without paying a full read per file when they are alike.

    Each file is read as :func:`load_saved` reads it, with two shortcuts that keep every check:

    * **the zip**: a file of the same size as one read before is compared with that file's
      :class:`~dsckpt.io.zipshape.ZipShape` (its structural bytes, a few ``memcmp``-speed steps);
      if they match, the records are the same, and only ``data.pkl`` and ``byteorder`` are
      read and CRC-checked. Otherwise the zip is read record by record, as :func:`load_saved`
      does, with the same errors.
    * **the pickle**: a ``data.pkl`` byte-identical to one parsed before is the same value, so
      that parse is shared (:attr:`SavedFile.shared_with`), once this file's records are
      checked to hold every storage the parse uses; any other ``data.pkl`` is parsed in full.
      (DeepSpeed's ZeRO-3 rank 0 differs from the others: it alone records ``shared_params``;
      a GPU save records each storage's device, ``cuda:<local rank>``, so up to one
      ``data.pkl`` per local rank: hence ten distinct parses by default.)

    Keep one reader per set of siblings: it holds up to ``max_parses`` distinct parses and
    ``max_shapes`` shapes (a few MB each for a file of 20,000 records).
    """

    def __init__(self, max_shapes: int = 8, max_parses: int = 10) -> None:
        self._max_shapes = max_shapes
        self._max_parses = max_parses
        self._parsed: list[_Parsed] = []  # distinct data.pkl parses, the first few
        self._shapes: dict[int, list[_Shaped]] = {}  # by file size
        # id(records) -> whether they meet the first parse's needs, for the records a shape
        # holds (alive as long as the reader, so the id is never reused)
        self._fits: dict[tuple[int, int], bool] = {}

    def read(self, path: Path) -> SavedFile:
        """The file at ``path``, read and checked, see the class docstring.

        Raises:
            The errors of :func:`load_saved`, with the same messages.
        """
        path = Path(path)
        fd = open_regular(path)
        try:
            try:
                pkl, records = self._archive(path, fd)
            except OSError as exc:
                raise CorruptFile(path, _first_line(exc)) from exc
        finally:
            os.close(fd)
        for parsed in self._parsed:
            if pkl == parsed.pkl and self._meets(records, parsed):
                return SavedFile(path, parsed.value, records, parsed.path)
        value, needs = _unpickle(path, pkl, records)
        if len(self._parsed) < self._max_parses:
            self._parsed.append(_Parsed(path, pkl, value, needs))
        return SavedFile(path, value, records)

    def _archive(self, path: Path, fd: int) -> tuple[bytes, dict[str, tuple[int, int]]]:
        size = os.fstat(fd).st_size
        for shaped in self._shapes.get(size, ()):
            pkl = _read_like(fd, shaped)
            if pkl is not None:
                return pkl, shaped.storages
        archive = _read_archive(path, fd)
        if sum(map(len, self._shapes.values())) < self._max_shapes:
            made = _shaped(fd, archive)
            if made is not None:
                self._shapes.setdefault(size, []).append(made)
        return archive.pkl, archive.storages

    def _meets(self, records: dict[str, tuple[int, int]], parsed: _Parsed) -> bool:
        # Records shared by every file of one shape are checked once (the dict is one object).
        key = (id(records), id(parsed))
        known = self._fits.get(key)
        if known is None:
            missing = (0, -1)
            known = all(records.get(k, missing)[1] >= n for k, n in parsed.needs.items())
            if any(records is s.storages for same in self._shapes.values() for s in same):
                self._fits[key] = known
        return known


def _shaped(fd: int, archive: _Archive) -> _Shaped | None:
    """The :class:`_Shaped` of a file :func:`_read_archive` has just checked, or None if its
    folder name is not plain ASCII (a sibling's could then decode differently)."""
    top = archive.top.encode("ascii", errors="replace")
    if not top or not archive.top.isascii():
        return None
    directory_start, records = archive.directory_start, archive.records
    tail = os.pread(fd, archive.file_size - directory_start, directory_start)
    if len(tail) != archive.file_size - directory_start:
        return None
    names_at = [at + _CENTRAL.size for at in archive.entries_at]
    if any(tail[at : at + len(top)] != top for at in names_at):
        return None
    crc_fields = [(at + 16, at + 20) for at in archive.entries_at]
    regions = [zipshape.region(tail, directory_start, top, names_at, crc_fields)]
    # Local headers, in file order, read in blocks where records are small.
    order = sorted(range(len(records)), key=lambda i: records[i].header_offset)
    blocks: list[list[int]] = []
    for i in order:
        if blocks:
            last = blocks[-1][-1]
            gap = records[i].header_offset - archive.starts[last]
            span = archive.starts[i] - records[blocks[-1][0]].header_offset
            if gap <= zipshape.BLOCK_GAP and span <= zipshape.MAX_BLOCK:
                blocks[-1].append(i)
                continue
        blocks.append([i])
    for block in blocks:
        start = records[block[0]].header_offset
        size = archive.starts[block[-1]] - start
        data = os.pread(fd, size, start)
        if len(data) != size:
            return None
        local_names = [
            records[i].header_offset - start + _LOCAL.size
            for i in block
            if data.startswith(top, records[i].header_offset - start + _LOCAL.size)
        ]
        # A sibling may hold its own data between the headers, and its own CRC-32s in them
        # (the full reader checks neither, but for the records read below).
        free = [
            (archive.starts[a] - start, records[b].header_offset - start)
            for a, b in zip(block, block[1:], strict=False)
        ] + [
            (records[i].header_offset - start + 14, records[i].header_offset - start + 18)
            for i in block
        ]
        regions.append(zipshape.region(data, start, top, local_names, free))
    pkl_index = next(i for i, r in enumerate(records) if r.name == f"{archive.top}/data.pkl")
    byteorder = next(
        (
            (archive.starts[i], r.size, archive.entries_at[i] + 16)
            for i, r in enumerate(records)
            if r.name == f"{archive.top}/byteorder"
        ),
        None,
    )
    return _Shaped(
        shape=zipshape.ZipShape(
            archive.file_size, top, directory_start + names_at[0], tuple(regions)
        ),
        storages=archive.storages,
        pkl=archive.pkl,
        pkl_at=archive.starts[pkl_index],
        pkl_crc_at=archive.entries_at[pkl_index] + 16,
        pkl_crc=records[pkl_index].crc,
        byteorder=byteorder,
    )


def _read_like(fd: int, shaped: _Shaped) -> bytes | None:
    """The ``data.pkl`` of a file with ``shaped``'s shape, CRC-checked, or None if the file does
    not have that shape or a record it reads fails (the full reader then says why)."""
    found = shaped.shape.sibling_top(fd)
    if found is None:
        return None
    directory = found[1]
    if shaped.byteorder is not None:
        at, size, crc_at = shaped.byteorder
        order = os.pread(fd, size, at)
        if zlib.crc32(order) != _crc_field(directory, crc_at) or order.strip() != b"little":
            return None
    pkl = os.pread(fd, len(shaped.pkl), shaped.pkl_at)
    crc = _crc_field(directory, shaped.pkl_crc_at)
    # Equal bytes under an equal CRC field were checked with the shape's file; others are
    # checked here.
    if not (crc == shaped.pkl_crc and pkl == shaped.pkl) and zlib.crc32(pkl) != crc:
        return None
    return pkl


def _crc_field(directory: bytes, at: int) -> int:
    return int.from_bytes(directory[at : at + 4], "little")


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


# Bounds on what a file may make dsckpt read or build. DeepSpeed's data.pkl files are KBs to a
# few MB (a model of 100k tensors pickles in about 7 MB) and hold thousands of records, not
# millions: these leave room for ten times that and keep a hostile file to a few hundred MB and a
# few seconds.
MAX_PICKLE_BYTES = 32 << 20
MAX_RECORDS = 1 << 20
_MAX_DIRECTORY_BYTES = 128 << 20
_CENTRAL_MIN = _CENTRAL.size


class _Record(NamedTuple):
    name: str
    header_offset: int
    size: int
    crc: int


class _Archive(NamedTuple):
    """What the full zip reader found: ``data.pkl``'s bytes, the storage records (key ->
    (data offset, size)), and the facts :func:`_shape_of` needs to describe the file."""

    pkl: bytes
    storages: dict[str, tuple[int, int]]
    top: str
    records: list[_Record]
    starts: list[int]  # each record's data offset
    entries_at: list[int]  # each record's central entry, relative to the directory
    directory_start: int
    file_size: int


def _read_archive_fd(path: Path, fd: int) -> tuple[bytes, dict[str, tuple[int, int]]]:
    archive = _read_archive(path, fd)
    return archive.pkl, archive.storages


def _read_archive(path: Path, fd: int) -> _Archive:
    file_size = os.fstat(fd).st_size
    if file_size == 0:
        raise CorruptFile(path, "empty file")
    records, directory_start, entries_at = _central_directory(path, fd, file_size)
    tops = {record.name.partition("/")[0] for record in records}
    if len(tops) != 1:
        raise CorruptFile(
            path,
            f"a torch.save zip has one top folder, this one has {len(tops)} "
            f"({listed(sorted(tops), each=repr)})",
        )
    top = tops.pop()
    data_prefix = f"{top}/data/"
    storages: dict[str, tuple[int, int]] = {}
    pkl = byteorder = None
    extents = []
    starts = []
    for record in records:
        start = _data_offset(path, fd, record, file_size)
        starts.append(start)
        extents.append((record.header_offset, start + record.size, record.name))
        if record.name.startswith(data_prefix):
            storages[record.name[len(data_prefix) :]] = (start, record.size)
        elif record.name == f"{top}/data.pkl":
            pkl = record
        elif record.name == f"{top}/byteorder":
            byteorder = record
    _check_extents(path, extents, directory_start)
    if pkl is None:
        raise CorruptFile(path, f"no {top}/data.pkl in the zip: not a torch.save file")
    if byteorder is not None:
        _check_byteorder(path, _read_record(path, fd, byteorder, file_size, 16))
    pkl_bytes = _read_record(path, fd, pkl, file_size, MAX_PICKLE_BYTES)
    return _Archive(
        pkl_bytes, storages, top, records, starts, entries_at, directory_start, file_size
    )


def _check_byteorder(path: Path, data: bytes) -> None:
    order = data.strip()
    if order != b"little":
        raise UnsupportedLayout(
            f"{path}: the tensors were saved {order.decode(errors='replace')!r}-endian; "
            "dsckpt reads little-endian files only: load and re-save it with torch"
        )


def _central_directory(path: Path, fd: int, file_size: int) -> tuple[list[_Record], int, list[int]]:
    """The records of the zip's central directory, checked, where that directory starts, and
    where each record's entry is in it."""
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
        if eocd64_offset + _EOCD64.size > tail_start + locator_at:
            raise not_a_zip
        eocd64 = os.pread(fd, _EOCD64.size, eocd64_offset)
        if len(eocd64) < _EOCD64.size or eocd64[:4] != b"PK\x06\x06":
            raise not_a_zip
        _, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = _EOCD64.unpack(eocd64)
        cd_end = eocd64_offset
    elif _U16 in (count,) or _U32 in (cd_size, cd_offset):
        raise not_a_zip
    if disk or cd_disk:
        raise CorruptFile(path, "a multi-disk zip: not a file torch.save wrote")
    if count > MAX_RECORDS or cd_size > _MAX_DIRECTORY_BYTES:
        raise CorruptFile(
            path,
            f"the zip directory claims {count} records in {cd_size} bytes, more than dsckpt "
            f"reads ({MAX_RECORDS} records, {_MAX_DIRECTORY_BYTES >> 20} MiB): not a checkpoint",
        )
    if count * _CENTRAL_MIN > cd_size or cd_size > cd_end:
        raise not_a_zip
    # Bytes before the zip (zipfile allows them too) shift every offset.
    shift = cd_end - cd_size - cd_offset
    if shift < 0:
        raise not_a_zip
    directory = os.pread(fd, cd_size, cd_offset + shift)
    if len(directory) < cd_size:
        raise not_a_zip
    records = []
    entries_at = []
    seen: dict[str, str] = {}
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > cd_size:
            raise not_a_zip
        (sig, _, _, _, _, flags, method, _, _, crc, packed, size, name_len, extra_len,
         comment_len, _, _, _, header_offset) = _CENTRAL.unpack_from(directory, pos)  # fmt: skip
        if sig != b"PK\x01\x02":
            raise not_a_zip
        entries_at.append(pos)
        pos += _CENTRAL.size
        if pos + name_len + extra_len + comment_len > cd_size:
            raise not_a_zip
        name = _record_name(path, directory[pos : pos + name_len], flags)
        # torch's zip reader (miniz) looks names up ignoring case: two names that differ only
        # in case are one name to it, and which of them it reads is not ours to guess.
        folded = name.lower()
        if folded in seen:
            raise CorruptFile(
                path,
                f"the zip holds two records named {seen[folded]!r} and {name!r}: torch would "
                "read one and dsckpt might read the other",
            )
        seen[folded] = name
        if method != 0 or flags & 0x1:
            raise CorruptFile(
                path,
                f"record {name!r} is compressed or encrypted (zip method {method}); "
                "torch.save never does that, so torch did not write this file",
            )
        if _U32 in (size, packed, header_offset):
            extra = directory[pos + name_len : pos + name_len + extra_len]
            size, packed, header_offset = _zip64_extra(
                path, name, extra, size, packed, header_offset
            )
        if packed != size:
            raise CorruptFile(path, f"record {name!r} is stored with two different sizes")
        pos += name_len + extra_len + comment_len
        records.append(_Record(name, header_offset + shift, size, crc))
    return records, cd_offset + shift, entries_at


def _record_name(path: Path, raw: bytes, flags: int) -> str:
    try:
        name = raw.decode("utf-8" if flags & 0x800 else "cp437")
    except UnicodeDecodeError:
        raise CorruptFile(
            path, f"a zip record name is not valid UTF-8 ({raw[:40]!r}): torch did not write it"
        ) from None
    if not name or "\0" in name:
        raise CorruptFile(path, f"a zip record has the malformed name {name!r}")
    return name


def _zip64_extra(
    path: Path, name: str, extra: bytes, size: int, packed: int, offset: int
) -> tuple[int, int, int]:
    """Sizes and offset too big for the central entry, from its zip64 extra field (id 1)."""
    malformed = CorruptFile(path, f"record {name!r} has a malformed zip64 extra field")
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise malformed
        if tag == 1:
            # Only the fields that overflowed are present, in this order.
            needed = [size == _U32, packed == _U32, offset == _U32]
            if length < 8 * sum(needed):
                raise malformed
            values = iter(struct.unpack_from(f"<{sum(needed)}Q", extra, pos + 4))
            size = next(values) if needed[0] else size
            packed = next(values) if needed[1] else packed
            offset = next(values) if needed[2] else offset
            return size, packed, offset
        pos += 4 + length
    raise malformed


def _data_offset(path: Path, fd: int, record: _Record, file_size: int) -> int:
    header = os.pread(fd, _LOCAL.size, record.header_offset)
    if len(header) < _LOCAL.size:
        raise CorruptFile(path, f"record {record.name!r} runs past the end of the file (truncated)")
    signature, name_len, extra_len = _LOCAL.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        raise CorruptFile(path, f"bad local zip header for record {record.name!r}")
    start = record.header_offset + _LOCAL.size + name_len + extra_len
    if start + record.size > file_size:
        raise CorruptFile(path, f"record {record.name!r} runs past the end of the file (truncated)")
    return start


def _check_extents(path: Path, extents: list[tuple[int, int, str]], directory_start: int) -> None:
    """Refuse records that overlap each other or the central directory: torch.save writes them
    one after another, and overlapping ones are how a file shows two readers different bytes."""
    extents.sort()
    end, previous = 0, ""
    for start, stop, name in extents:
        if start < end:
            raise CorruptFile(path, f"zip records {previous!r} and {name!r} overlap")
        end, previous = stop, name
    if end > directory_start:
        raise CorruptFile(path, f"zip record {previous!r} overlaps the zip directory")


def _read_record(path: Path, fd: int, record: _Record, file_size: int, limit: int) -> bytes:
    """A small record's bytes, CRC-checked; one over ``limit`` bytes is refused unread."""
    if record.size > limit:
        raise UnsafeCheckpoint(
            f"{path}: record {record.name!r} is {record.size} bytes, more than dsckpt reads "
            f"({limit >> 10} KiB; a DeepSpeed checkpoint's is far smaller), so the file was "
            "refused; if it really is a DeepSpeed checkpoint, report it"
        )
    data = os.pread(fd, record.size, _data_offset(path, fd, record, file_size))
    if zlib.crc32(data) != record.crc:
        raise CorruptFile(path, f"record {record.name!r} fails its CRC check")
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
        self._data = data
        super().__init__(self._input, encoding="utf-8")
        # Protocols 0-3 (torch.save writes 2) have no frames: see load().
        self._unframed = len(data) < 2 or data[0] != pickle.PROTO[0] or data[1] < 4
        self._path = path
        self._records = records
        self._storages: dict[str, SavedStorage] = {}
        self._hash_units = 0
        self._tuple_weights: dict[int, tuple[tuple[Any, ...], int]] = {}
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
        self._own_calls = frozenset(id(call) for call in self._calls.values())

    def load(self) -> Any:
        """pickle._Unpickler.load with every opcode charged to a budget (see
        :mod:`dsckpt.bounds`), and without its frame reader on unframed protocols (a third
        faster: every opcode's read otherwise goes through one more Python call). The result is
        checked for cycles, depth and shared-part blow-ups before it is returned."""
        if self._unframed:
            self.read = self._input.read  # type: ignore[method-assign]
            self.readline = self._input.readline  # type: ignore[method-assign]
        else:
            unframer = pickle._Unframer(self._input.read, self._input.readline)  # type: ignore[attr-defined]
            self._unframer = unframer
            self.read = unframer.read  # type: ignore[method-assign]
            self.readinto = unframer.readinto
            self.readline = unframer.readline  # type: ignore[method-assign]
        self.metastack: list[Any] = []
        self.stack: list[Any] = []
        self.append = self.stack.append
        self.proto = 0
        read = self.read
        dispatch = self.dispatch
        costs = bounds.COSTS
        units = bounds.MAX_OP_UNITS
        int_runs = _INT_RUNS if self._unframed else {}
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                code = key[0]
                units -= costs[code]
                if units < 0:
                    raise bounds.refused(
                        self._path, f"takes more than {bounds.MAX_OP_UNITS} steps to build"
                    )
                if code in int_runs:
                    units = self._int_run(code, units)
                else:
                    dispatch[code](self)  # type: ignore[arg-type]
        except pickle._Stop as stop:  # type: ignore[attr-defined]
            value = stop.value
        self.stack = self.metastack = []
        self.memo.clear()  # type: ignore[attr-defined]
        self._tuple_weights.clear()
        bounds.check_graph(self._path, value, _children, _LEAVES)
        return value

    def _int_run(self, code: int, units: int) -> int:
        """Push a run of the same small-int opcode (``BININT1``, ``BININT2`` or ``BININT``) at
        C speed; returns the budget left after charging every opcode of the run.

        ZeRO-1/2 optimizer files hold one int per parameter (``param_alignment_paddings``), a
        run of ``BININT1`` pickled between ``MARK`` and ``APPENDS``: millions of one-byte ints
        over a thousand ranks, ~0.5 us each through the dispatch loop. The values, budget and
        errors are the standard opcodes' own: the run matches only whole opcodes, and an opcode
        without its payload (a truncated pickle) is left to the standard handler.
        """
        pattern, one = _INT_RUNS[code]
        start = self._input.tell() - 1  # the opcode already read and charged
        # Most ints come alone or in twos (a shape, a stride): those take the standard handler
        # after one look at where the run's _MIN_RUN-th opcode would be.
        gate = start + (_MIN_RUN - 1) * one.size
        if gate >= len(self._data) or self._data[gate] != code:
            self.dispatch[code](self)  # type: ignore[index,arg-type]
            return units
        run = pattern.match(self._data, start)
        count = (run.end() - start) // one.size if run else 0
        if count < 2:
            self.dispatch[code](self)  # type: ignore[index,arg-type]
            return units
        units -= (count - 1) * bounds.COSTS[code]
        if units < 0:
            raise bounds.refused(
                self._path, f"takes more than {bounds.MAX_OP_UNITS} steps to build"
            )
        end = start + count * one.size
        if code == pickle.BININT1[0]:
            self.stack.extend(self._data[start + 1 : end : 2])  # a bytes object's items are ints
        else:
            self.stack.extend(map(_first, one.iter_unpack(memoryview(self._data)[start:end])))
        self._input.seek(end)
        return units

    # -- hashing: dict keys, set members and call arguments are weighed first

    def _weight(self, obj: Any) -> int:
        """How many elements hashing ``obj`` visits (tuples count through nested tuples).

        Worked out when a tuple is first hashed, not when it is built (most never are), and
        remembered: each distinct tuple is measured once however often it is shared.
        """
        if type(obj) is not tuple:
            return 1
        known = self._tuple_weights
        found = known.get(id(obj))
        if found is not None:
            return found[1]
        pending = [obj]
        while pending:
            item = pending[-1]
            if id(item) in known:
                pending.pop()
                continue
            inner = [c for c in item if type(c) is tuple and id(c) not in known]
            if inner:
                pending.extend(inner)
                continue
            weight = 1
            for c in item:
                weight += known[id(c)][1] if type(c) is tuple else 1
            # Kept with the tuple, so its id cannot pass to another object meanwhile.
            known[id(item)] = (item, min(weight, 1 << 62))
            pending.pop()
        return known[id(obj)][1]

    def _key(self, key: Any) -> None:
        """Charge hashing ``key``; refuse one too heavy to be a key DeepSpeed writes."""
        weight = self._weight(key)
        if weight > bounds.MAX_KEY_WEIGHT:
            raise bounds.refused(
                self._path, f"hashes a key of {weight} nested tuple elements (a tuple bomb)"
            )
        self._hash_units += weight
        if self._hash_units > bounds.MAX_HASH_UNITS:
            raise bounds.refused(self._path, f"hashes more than {bounds.MAX_HASH_UNITS} elements")

    def _check_args(self, args: Any) -> None:
        """Charge what an allow-listed callable may hash: its arguments and their members."""
        if type(args) is not tuple and type(args) is not list:
            raise pickle.UnpicklingError(f"call arguments that are a {type(args).__name__}")
        for arg in args:
            kind = type(arg)
            if kind is tuple:
                self._key(arg)
                members: Any = arg
            elif kind in (list, set, frozenset) or isinstance(arg, dict):
                members = arg
            else:
                continue
            self._hash_units += len(members)
            for member in members:
                if type(member) is tuple:
                    self._key(member)
        if self._hash_units > bounds.MAX_HASH_UNITS:
            raise bounds.refused(self._path, f"hashes more than {bounds.MAX_HASH_UNITS} elements")

    # -- opcodes that build containers or call: the standard ones, checked

    def _pop_mark(self) -> list[Any]:
        return pickle._Unpickler.pop_mark(self)  # type: ignore[attr-defined,no-any-return]

    def load_dict(self) -> None:
        items = self._pop_mark()
        result: dict[Any, Any] = {}
        for i in range(0, len(items) - 1, 2):
            if type(items[i]) is tuple:
                self._key(items[i])
            result[items[i]] = items[i + 1]
        self.append(result)

    def load_setitem(self) -> None:
        stack = self.stack
        value = stack.pop()
        key = stack.pop()
        self._setitems(stack[-1], [key, value])

    def load_setitems(self) -> None:
        items = self._pop_mark()
        self._setitems(self.stack[-1], items)

    def _setitems(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict):
            raise pickle.UnpicklingError(f"dict items set on a {type(target).__name__}")
        for i in range(0, len(items) - 1, 2):
            if type(items[i]) is tuple:
                self._key(items[i])
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._extend(self.stack[-1], [value])

    def load_appends(self) -> None:
        items = self._pop_mark()
        self._extend(self.stack[-1], items)

    @staticmethod
    def _extend(target: Any, items: list[Any]) -> None:
        if not isinstance(target, list):
            raise pickle.UnpicklingError(f"list items appended to a {type(target).__name__}")
        target.extend(items)

    def load_additems(self) -> None:
        items = self._pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise pickle.UnpicklingError(f"set items added to a {type(target).__name__}")
        for item in items:
            self._key(item)
        target.update(items)

    def load_frozenset(self) -> None:
        items = self._pop_mark()
        for item in items:
            self._key(item)
        self.append(frozenset(items))

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if id(func) not in self._own_calls:  # torch's rebuilds (ours) hash nothing
            self._check_args(args)
        stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_args(args)
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise pickle.UnpicklingError("keyword arguments that are not a dict of names")
        self._check_args(args)
        self._check_args(tuple(kwargs.values()))
        self.append(cls.__new__(cls, *args, **kwargs))

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        self._check_args(args)
        super()._instantiate(klass, args)  # type: ignore[misc]

    def load_build(self) -> None:
        state = self.stack[-1]
        inst = self.stack[-2]
        if type(inst).__module__.partition(".")[0] == "numpy":
            check_numpy_build(inst, state)
        else:
            parts = state if type(state) is tuple and len(state) == 2 else (state,)
            for part in parts:
                if isinstance(part, dict):
                    for key in part:
                        if type(key) is not str:
                            self._key(key)
        super().load_build()  # type: ignore[misc]

    def load_frame(self) -> None:
        (size,) = struct.unpack("<Q", self.read(8))
        if size > len(self._input.getbuffer()) - self._input.tell():
            raise pickle.UnpicklingError(f"a pickle frame of {size} bytes, longer than the pickle")
        self._unframer.load_frame(size)

    # -- integers: bounded before they are converted

    def load_long1(self) -> None:
        size = self.read(1)[0]
        self._int_size(size)
        self.append(pickle.decode_long(self.read(size)))

    def load_long4(self) -> None:
        (size,) = struct.unpack("<i", self.read(4))
        if size < 0:
            raise pickle.UnpicklingError("LONG4 with a negative length")
        self._int_size(size)
        self.append(pickle.decode_long(self.read(size)))

    def load_int(self) -> None:
        line = self.readline()
        self._int_size(len(line) // 2)
        if line in (b"00\n", b"01\n"):
            self.append(line == b"01\n")
        else:
            self.append(self._checked_int(int(line, 0)))

    def load_long(self) -> None:
        line = self.readline()
        self._int_size(len(line) // 2)
        digits = line[:-1].removesuffix(b"L")
        self.append(self._checked_int(int(digits, 0)))

    def _int_size(self, nbytes: int) -> None:
        if nbytes > bounds.MAX_INT_BYTES:
            raise bounds.refused(self._path, f"holds an integer of about {nbytes} bytes")

    def _checked_int(self, value: int) -> int:
        self._int_size((value.bit_length() + 7) // 8)
        return value

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
        allowed = checked_numpy_globals()
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
            and 0 <= numel < _INT64
        ):
            raise pickle.UnpicklingError(f"a malformed storage id {short(pid)}")
        found = self._storages.get(key)
        if found is not None:
            # torch keeps the first type it saw for a key; torch.save refuses to write one
            # storage under two types, so they agree in every file torch wrote.
            return found
        record = self._records.get(key)
        if record is None:
            raise CorruptFile(
                self._path, f"the pickle needs storage record data/{key[:60]}, missing"
            )
        start, size = record
        storage = SavedStorage(self._path, key, storage_type.dtype, numel, start, location)
        if storage.nbytes > size:
            raise CorruptFile(
                self._path,
                f"storage record data/{key[:60]} holds {size} bytes, "
                f"its tensors need {storage.nbytes}",
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
        if type(size) not in (tuple, list) or type(stride) not in (tuple, list):
            raise pickle.UnpicklingError("a tensor whose size or stride is not a sequence")
        shape, strides = tuple(size), tuple(stride)
        if (
            type(storage_offset) is not int
            or not 0 <= storage_offset < _INT64
            or len(shape) != len(strides)
            or len(shape) > _MAX_DIMS
        ):
            raise pickle.UnpicklingError(
                f"a malformed tensor ({short(shape)}, {short(strides)}, "
                f"offset {short(storage_offset)})"
            )
        # One pass: check the sizes and strides, and find the furthest element and the count.
        last = 0
        numel = 1
        for n, step in zip(shape, strides, strict=True):
            if (
                type(n) is not int
                or type(step) is not int
                or not (0 <= n < _INT64 and 0 <= step < _INT64)
            ):
                raise pickle.UnpicklingError(
                    f"a malformed tensor ({short(shape)}, {short(strides)})"
                )
            numel *= n
            last += (n - 1) * step
        if metadata and any(metadata.values()):
            raise UnsupportedLayout(
                f"{self._path}: a tensor carries torch's lazy conjugate/negative bits "
                f"({short(metadata)}); dsckpt's torch-free reader does not apply them"
            )
        itemsize = dtype.itemsize
        storage_numel = storage.numel * storage.dtype.itemsize // itemsize
        if numel and storage_offset + last >= storage_numel:
            raise CorruptFile(
                self._path,
                f"a tensor of shape {list(shape)} runs past the end of its storage data/"
                f"{short(storage.key)} ({storage_numel} elements)",
            )
        if numel > storage_numel:
            # Strides that revisit elements (an expand()ed view): DeepSpeed never saves one, and
            # what reads it would build far more than the file holds.
            raise UnsupportedLayout(
                f"{self._path}: a tensor of shape {list(shape)} and strides {list(strides)} "
                f"repeats the elements of its storage data/{storage.key[:60]} "
                f"({storage_numel} elements); dsckpt reads tensors that are views without overlap"
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
        if type(sizes) not in (tuple, list) or len(sizes) > _MAX_DIMS:
            raise pickle.UnpicklingError(f"a torch.Size of {short(sizes)}")
        shape = tuple(sizes)
        numel = 1
        for n in shape:
            # torch's sizes are int64; DeepSpeed's shapes are those of real tensors
            if type(n) is not int or not 0 <= n < _INT64:
                raise pickle.UnpicklingError(f"a torch.Size of {short(shape)}")
            numel *= n
        if numel >= _INT64:
            raise pickle.UnpicklingError(f"a torch.Size of {short(shape)}, {numel} elements")
        return shape

    def _device(self, kind: Any, index: Any = None) -> Device:
        if isinstance(kind, str) and index is None and ":" in kind:
            kind, _, number = kind.partition(":")
            index = int(number) if number.isdigit() and len(number) < 10 else -1
        if not (
            isinstance(kind, str)
            and len(kind) < 64
            and (index is None or (type(index) is int and 0 <= index < 1 << 31))
        ):
            raise pickle.UnpicklingError(
                f"a malformed torch.device ({short(kind)}, {short(index)})"
            )
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


# The standard dispatch table, pointing at this class's checked versions where it has them.
_Unpickler.dispatch = {  # type: ignore[attr-defined]
    code: getattr(_Unpickler, function.__name__)
    for code, function in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
}

_LEAVES: frozenset[type] = frozenset(
    {str, int, float, bool, bytes, bytearray, complex, type(None), SavedStorage, DType, Device}
)
_CONTAINERS = (list, tuple, set, frozenset)


def _children(obj: Any) -> Iterable[Any] | None:
    """What a value in an unpickled result holds (None for a leaf), for bounds.check_graph."""
    kind = type(obj)
    if kind is SavedTensor:
        return (obj.attrs,) if obj.attrs else None
    if isinstance(obj, type):
        return None
    state = getattr(obj, "__dict__", None)  # what a pickle's BUILD set: Namespace, stand-ins
    extra = (state,) if isinstance(state, dict) and state else ()
    if isinstance(obj, dict):
        return itertools.chain(obj.keys(), obj.values(), extra)
    if isinstance(obj, _CONTAINERS):
        return itertools.chain(obj, extra)
    if kind.__module__.partition(".")[0] == "numpy":
        dtype = getattr(obj, "dtype", None)
        return obj.flat if getattr(dtype, "hasobject", False) and obj.ndim else None
    return extra or None


# Opcodes whose runs _Unpickler._int_run pushes in one step: (a run of whole opcodes, one
# opcode with its payload as a struct). DOTALL: a payload byte is any byte.
_INT_RUNS: dict[int, tuple[re.Pattern[bytes], struct.Struct]] = {
    pickle.BININT1[0]: (re.compile(rb"(?:K.)+", re.DOTALL), struct.Struct("<xB")),
    pickle.BININT2[0]: (re.compile(rb"(?:M..)+", re.DOTALL), struct.Struct("<xH")),
    pickle.BININT[0]: (re.compile(rb"(?:J....)+", re.DOTALL), struct.Struct("<xi")),
}
_first = operator.itemgetter(0)
_MIN_RUN = 8

_MISSING = object()
_INT64 = 1 << 63
_MAX_DIMS = 64


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
