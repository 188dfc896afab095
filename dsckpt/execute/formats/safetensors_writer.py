"""Preallocated, random-access safetensors output (single file or Hugging Face shards).

The header is computed from the output specs before any data exists, the file is sized (and
its blocks reserved where the filesystem allows), and tensor bytes are then written piece by
piece, in any order, with ``os.pwrite``: no seek state, so threads may share one writer.
Callers that do their own I/O (``os.copy_file_range`` from a source file) ask ``locate(name)``
for the file descriptor and offset instead.

Layout decisions:

* Tensors are laid out exactly as ``safetensors.torch.save_file`` lays them out: by dtype
  alignment, largest first, then by name. With the data section starting 8-byte aligned this
  keeps every tensor aligned to its element size (zero-copy readers rely on it), and with a
  single ``__metadata__`` entry the file is byte-for-byte what ``save_file`` writes.
* The header JSON is compact, ``__metadata__`` first, then tensors in data order, padded
  with spaces to a multiple of 8 bytes, as the safetensors library does.
* ``__metadata__`` always holds ``{"format": "pt"}`` (transformers checks it) plus the
  caller's string pairs.

Why ``pwrite`` and not a writable mmap of the output: on 1 GiB of fp32 pieces ``pwrite``
costs about half the CPU of ``mmap`` + ``Tensor.copy_`` (page faults dominate the latter),
and a full disk under a sparse mmap is a ``SIGBUS`` crash, where ``pwrite`` raises ``ENOSPC``
that :func:`dsckpt.atomic.atomic_output` turns into a one-line error. To convert dtypes,
cast each piece (best into a reused staging buffer) and write the result.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dsckpt.execute.atomic import preallocate as _preallocate
from dsckpt.execute.formats.sharding import PlannedTensor, Shard, ShardPlan, TensorSpec
from dsckpt.io.dtypes import name_of
from dsckpt.plan.fileplan import DataOp, Duplicate, FilePlan, Literal

__all__ = [
    "IncompleteOutputError",
    "SafetensorsLayout",
    "SafetensorsWriter",
    "ShardedSafetensorsWriter",
    "TensorSpec",
    "safetensors_dtype",
    "safetensors_file",
    "safetensors_layout",
    "sharded_safetensors_size",
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


class IncompleteOutputError(RuntimeError):
    """An output tensor was not completely written: a bug in the plan or the executor."""


# --------------------------------------------------------------------------- shared helpers


def as_bytes(data: Any, expected: Any = None, what: str = "") -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor or any buffer-protocol object.

    The caller must keep ``data`` alive while the view is used.
    """
    torch = sys.modules.get("torch")  # without torch loaded, data cannot be a tensor
    if torch is not None and isinstance(data, torch.Tensor):
        if expected is not None and name_of(data.dtype) != name_of(expected):
            raise ValueError(
                f"piece of {what} is {data.dtype} but the output is {expected}: cast it first"
            )
        if data.device.type != "cpu":
            raise ValueError(f"piece of {what} is on {data.device}: move it to the CPU first")
        if not data.is_contiguous():
            raise ValueError(f"piece of {what} is not contiguous: call .contiguous() first")
        n = data.numel() * data.element_size()
        if n == 0:
            return memoryview(b"")
        return memoryview((ctypes.c_ubyte * n).from_address(data.data_ptr())).cast("B")
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until done: Linux moves at most ~2 GiB per call."""
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def copy_within(fd: int, src: int, dst: int, nbytes: int, chunk: int = 16 << 20) -> None:
    """Copy ``nbytes`` from offset ``src`` to non-overlapping offset ``dst`` of one file."""
    done = 0
    while done < nbytes:
        data = os.pread(fd, min(chunk, nbytes - done), src + done)
        if not data:
            raise OSError(f"unexpected end of file copying {nbytes} bytes at {src}")
        pwrite_all(fd, memoryview(data), dst + done)
        done += len(data)


class Coverage:
    """Which byte ranges of each tensor were written (thread-safe appends, checked at close)."""

    def __init__(self) -> None:
        self._pieces: dict[str, list[tuple[int, int, int]]] = {}
        self._lock = threading.Lock()
        self.external: set[str] = set()  # handed out by ``locate``: written by the caller

    def add(self, key: str, start: int, end: int, crc: int = 0) -> None:
        if end > start:
            with self._lock:
                self._pieces.setdefault(key, []).append((start, end, crc))

    def pieces(self, key: str) -> list[tuple[int, int, int]]:
        return sorted(self._pieces.get(key, []))

    def first_gap(self, key: str, size: int) -> tuple[int, int] | None:
        """The first never-written range ``[a, b)`` of ``[0, size)``, or None.

        Tensors handed out by ``locate`` are written by the caller and are not checked.
        """
        if key in self.external:
            return None
        pos = 0
        for start, end, _ in self.pieces(key):
            if start > pos:
                return pos, start
            pos = max(pos, end)
        return (pos, size) if pos < size else None


def _raise_incomplete(path: Path, name: str, gap: tuple[int, int], size: int) -> None:
    raise IncompleteOutputError(
        f"output tensor {name!r} in {path.name} was not completely written: bytes "
        f"[{gap[0]}, {gap[1]}) of {size} were never written (a dsckpt bug: please report it)"
    )


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


# --------------------------------------------------------------------------- writers


_W = TypeVar("_W", bound="ClosingWriter")


class ClosingWriter:
    """What every writer shares: ``with`` closes it, checking completeness unless the block
    raised, and the file descriptor is closed exactly once."""

    _fd: int | None = None
    path: Path
    layout: Any  # offsets: name -> (absolute start, size)
    _dtypes: dict[str, Any]

    def _checked_write(self, name: str, offset: int, data: Any) -> tuple[int, memoryview, int]:
        """Validate a write, perform it, and return (fd, bytes written, end offset in tensor)."""
        fd = self._fd
        if fd is None:
            raise ValueError(f"{self.path.name} is closed")
        if name not in self._dtypes:
            raise KeyError(f"{name!r} is not a tensor of {self.path.name}")
        view = as_bytes(data, self._dtypes[name], name)
        start, size = self.layout.offsets[name]
        end = offset + view.nbytes
        if offset < 0 or end > size:
            raise ValueError(f"write to {name!r} at [{offset}, {end}) is outside its {size} bytes")
        pwrite_all(fd, view, start + offset)
        return fd, view, end

    def close(self, *, check: bool = True) -> None:
        raise NotImplementedError

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(check=exc_type is None)


class SafetensorsWriter(ClosingWriter):
    """A safetensors file whose tensors are filled piece by piece, in any order.

    Example::

        with SafetensorsWriter(tmp, specs, metadata={"dsckpt": "1"}) as w:
            w.write("wte.weight", 0, first_rows)          # bytes at offset 0 of the tensor
            w.write("wte.weight", first_rows_nbytes, rest)

    ``write`` may be called from several threads. ``close`` (or leaving the ``with`` block
    without an exception) checks that every byte of every tensor was written.

    Callers doing their own I/O (``os.copy_file_range`` from a source file, say) use
    :meth:`locate` instead; such tensors are trusted, not checked.
    """

    def __init__(
        self,
        path: os.PathLike[str] | str,
        specs: Sequence[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
        aliases: Mapping[str, str] | None = None,
        preallocate: bool = True,
    ) -> None:
        self.path = Path(path)
        self.layout = safetensors_layout(specs, metadata=metadata, aliases=aliases)
        self._dtypes = {s.name: s.dtype for s in specs}
        self._mirrors: dict[str, list[str]] = {}
        for alias, canonical in (aliases or {}).items():
            self._mirrors.setdefault(canonical, []).append(alias)
        self._coverage = Coverage()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if preallocate:
                _preallocate(self._fd, self.layout.file_size)
            else:
                os.ftruncate(self._fd, self.layout.file_size)
            pwrite_all(self._fd, memoryview(self.layout.header), 0)
        except BaseException:
            self._close_fd()
            raise

    @property
    def nbytes(self) -> int:
        """The file's final size."""
        return self.layout.file_size

    def write(self, name: str, offset: int, data: Any) -> None:
        """Write ``data`` at byte ``offset`` of tensor ``name``.

        Args:
            name: a tensor of this file (not an alias: aliases follow their canonical tensor).
            offset: byte offset within the tensor.
            data: a contiguous CPU tensor of the output dtype, or any bytes-like object.
        """
        fd, view, end = self._checked_write(name, offset, data)
        for alias in self._mirrors.get(name, ()):
            pwrite_all(fd, view, self.layout.offsets[alias][0] + offset)
        self._coverage.add(name, offset, end)

    def locate(self, name: str) -> tuple[int, int]:
        """``(fd, absolute file offset)`` of tensor ``name``, for callers doing their own I/O.

        This is the executor's ``Sink`` protocol. The caller must fill all of the tensor's
        bytes (they are not tracked); aliases of it are copied from it at :meth:`close`.
        """
        if self._fd is None:
            raise ValueError(f"{self.path.name} is closed")
        if name not in self._dtypes:
            raise KeyError(f"{name!r} is not a tensor of {self.path.name}")
        self._coverage.external.add(name)
        return self._fd, self.layout.offsets[name][0]

    def close(self, *, check: bool = True) -> None:
        """Close the file, first checking (unless ``check=False``) that it is complete."""
        if self._fd is None:
            return
        try:
            if check:
                for name in self._dtypes:
                    size = self.layout.offsets[name][1]
                    gap = self._coverage.first_gap(name, size)
                    if gap is not None:
                        _raise_incomplete(self.path, name, gap, size)
                for name in self._coverage.external:  # their aliases were not mirrored
                    start, size = self.layout.offsets[name]
                    for alias in self._mirrors.get(name, ()):
                        copy_within(self._fd, start, self.layout.offsets[alias][0], size)
        finally:
            self._close_fd()


def _shard_layouts(
    plan: ShardPlan[TensorSpec], metadata: Mapping[str, str] | None
) -> Iterable[tuple[str, SafetensorsLayout]]:
    for shard in plan.shards:
        yield (
            shard.filename,
            safetensors_layout(shard.tensors, metadata=metadata, aliases=dict(shard.aliases)),
        )


def sharded_safetensors_size(
    plan: ShardPlan[TensorSpec],
    *,
    metadata: Mapping[str, str] | None = None,
    index_metadata: Mapping[str, Any] | None = None,
) -> int:
    """Total bytes of every file a :class:`ShardedSafetensorsWriter` will create."""
    size = sum(layout.file_size for _, layout in _shard_layouts(plan, metadata))
    if plan.is_sharded:
        size += len(plan.index_json({**(metadata or {}), **(index_metadata or {})}).encode())
    return size


class ShardedSafetensorsWriter(ClosingWriter):
    """Hugging Face style output directory: one or more shards plus, if several, the index.

    Args:
        directory: an existing (typically temporary, see :func:`dsckpt.atomic.atomic_output`)
            directory.
        plan: from :func:`dsckpt.formats.sharding.plan_shards`.
        metadata: string pairs for every shard's ``__metadata__``, also copied into the
            index's ``metadata``.
        index_metadata: extra JSON values for the index's ``metadata`` only.
        preallocate: reserve every shard's blocks up front.
        paths: where to write each file instead of ``directory / name`` (temporary names
            staged by :func:`dsckpt.atomic.atomic_entries`).
    """

    def __init__(
        self,
        directory: os.PathLike[str] | str,
        plan: ShardPlan[TensorSpec],
        *,
        metadata: Mapping[str, str] | None = None,
        index_metadata: Mapping[str, Any] | None = None,
        preallocate: bool = True,
        paths: Mapping[str, Path] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._paths = dict(paths or {})
        self.plan = plan
        self._metadata = metadata
        self._index_meta = {**(metadata or {}), **(index_metadata or {})}
        self._writers: dict[str, Any] = {}
        self._route: dict[str, Any] = {}
        try:
            for shard in plan.shards:
                w = self._open_shard(self._path(shard.filename), shard, preallocate)
                self._writers[shard.filename] = w
                for t in shard.tensors:
                    self._route[t.name] = w
        except BaseException:
            self.close(check=False)
            raise

    def _path(self, name: str) -> Path:
        return self._paths.get(name, self.directory / name)

    def _open_shard(self, path: Path, shard: Shard[TensorSpec], preallocate: bool) -> Any:
        return SafetensorsWriter(
            path,
            shard.tensors,
            metadata=self._metadata,
            aliases=dict(shard.aliases),
            preallocate=preallocate,
        )

    def write(self, name: str, offset: int, data: Any) -> None:
        """Write a piece of tensor ``name`` (see :meth:`SafetensorsWriter.write`)."""
        try:
            writer = self._route[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not an output tensor (aliases are written with their canonical)"
            ) from None
        writer.write(name, offset, data)

    def locate(self, name: str) -> tuple[int, int]:
        """``(fd, absolute offset)`` of tensor ``name`` in its shard (see ``SafetensorsWriter``)."""
        try:
            writer = self._route[name]
        except KeyError:
            raise KeyError(f"{name!r} is not an output tensor") from None
        return writer.locate(name)  # type: ignore[no-any-return]

    def close(self, *, check: bool = True) -> None:
        """Close every shard (checking completeness) and write the index if sharded."""
        error: BaseException | None = None
        for w in self._writers.values():
            try:
                w.close(check=check and error is None)
            except BaseException as exc:  # close the others anyway
                error = error or exc
        if error is not None:
            raise error
        if check and self.plan.is_sharded:
            self._path(self.plan.index_name).write_text(
                self.plan.index_json(self._index_meta), encoding="utf-8"
            )
