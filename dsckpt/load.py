"""The only place dsckpt unpickles anything.

Every checkpoint file is opened with ``torch.load(weights_only=True, map_location="meta")``: the
restricted unpickler refuses any global that is not on an allow-list, and the meta device means
no tensor data is read at all. What comes back is the file's structure with shapeless-in-memory
meta tensors; :func:`tensor_ref` turns one of them into a :class:`TensorRef` (file, byte offset,
dtype, shape) so the executor can read exactly the bytes it needs with ``pread`` or copy them
kernel-side with ``copy_file_range``, never holding a whole flat group in memory.

DeepSpeed pickles a few of its own classes into checkpoints. They are replaced by the inert
stand-ins of :mod:`dsckpt.standins`, registered under DeepSpeed's import paths, so DeepSpeed
never needs importing and nothing in a checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import torch

from dsckpt.errors import CorruptFile, UnsafeCheckpoint
from dsckpt.standins import (  # noqa: F401  (re-exported: load.py's public names)
    STAND_INS,
    DynamicLossScaler,
    FragmentAddress,
    LossScaler,
    ZeroStageEnum,
    numpy_globals,
)


def _numpy_globals() -> list[tuple[Any, str]]:
    return [(obj, path) for path, obj in numpy_globals().items()]


@lru_cache(maxsize=1)
def _allowed_globals() -> list[Any]:
    return [(cls, path) for path, cls in STAND_INS.items()] + _numpy_globals()


# How torch's restricted unpickler names what it refused: a global, or a type to rebuild.
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")


def load_meta(path: Path) -> Any:
    """Unpickle a checkpoint file without reading tensor data and without running its code.

    Args:
        path: a ``torch.save`` zip file.

    Returns:
        The pickled object; every tensor in it is a meta tensor that :func:`tensor_ref` can locate.

    Raises:
        UnsafeCheckpoint: the pickle needs a global outside the allow-list.
        CorruptFile: the file is not a readable torch zip pickle (truncated, not a zip, ...).
    """
    return _safe_load(path, map_location="meta")


def load_mapped(path: Path) -> Any:
    """Like :func:`load_meta`, but tensors are CPU views of a read-only map of the file: their
    pages are read when touched, so a large file costs no memory until its values are used."""
    return _safe_load(path, map_location="cpu", mmap=True)


def _safe_load(path: Path, **options: Any) -> Any:
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        reason = (
            "empty file" if size == 0 else "not a torch zip file (truncated or not a checkpoint)"
        )
        raise CorruptFile(path, reason)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, weights_only=True, **options)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_IN_MESSAGE.search(str(exc))
        if found is None:
            raise CorruptFile(path, f"unreadable pickle ({_first_line(exc)})") from exc
        raise UnsafeCheckpoint(
            f"{path}: the pickle asks for `{found.group(1) or found.group(2)}`, "
            "which is not on dsckpt's allow-list "
            "(loading it could run code), so nothing from the file was run; if this file really "
            "is a DeepSpeed checkpoint, report the name so a stand-in can be added"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptFile(path, _first_line(exc)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class TensorRef:
    """Where one saved tensor's elements live on disk.

    ``offset`` is the byte offset of element 0 (storage offset included). A saved view may be
    strided; dsckpt only reads contiguous ones piecewise and reads others whole.
    """

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, step in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and step != expected:
                return False
            expected *= size
        return True


@cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_ref(path: Path, tensor: torch.Tensor) -> TensorRef:
    """Locate a meta tensor returned by :func:`load_meta` inside its file."""
    storage = tensor.untyped_storage()
    base = getattr(storage, "_checkpoint_offset", None)
    if base is None:
        raise CorruptFile(path, "a tensor has no record offset (not loaded through load_meta?)")
    itemsize = tensor.element_size()
    ref = TensorRef(
        path=path,
        offset=base + tensor.storage_offset() * itemsize,
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        stride=tuple(tensor.stride()),
    )
    span = _span_bytes(ref)
    if base + tensor.storage_offset() * itemsize + span > path.stat().st_size:
        raise CorruptFile(path, "a tensor record runs past the end of the file (truncated)")
    return ref


def _span_bytes(ref: TensorRef) -> int:
    """Bytes from element 0 to one past the furthest element, following the strides."""
    if ref.numel == 0:
        return 0
    last = sum((size - 1) * step for size, step in zip(ref.shape, ref.stride, strict=True))
    return (last + 1) * ref.itemsize


def read_tensor(ref: TensorRef, start: int = 0, count: int | None = None) -> torch.Tensor:
    """Read elements ``[start, start+count)`` of a tensor (flattened, row-major) into memory.

    Contiguous tensors read only the asked bytes; strided ones are read whole and sliced, which
    only happens for small bookkeeping tensors.
    """
    if count is None:
        count = ref.numel - start
    if ref.is_contiguous:
        data = _pread_exact(ref.path, ref.offset + start * ref.itemsize, count * ref.itemsize)
        return torch.frombuffer(data, dtype=ref.dtype) if count else torch.empty(0, dtype=ref.dtype)
    data = _pread_exact(ref.path, ref.offset, _span_bytes(ref))
    flat = torch.frombuffer(data, dtype=ref.dtype)
    whole = torch.as_strided(flat, ref.shape, ref.stride).reshape(-1)
    return whole[start : start + count].clone()


def read_full(ref: TensorRef) -> torch.Tensor:
    """Read a whole (small) tensor with its shape."""
    return read_tensor(ref).reshape(ref.shape)


def _pread_exact(path: Path, offset: int, nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CorruptFile(path, "unexpected end of file while reading a tensor")
            done += n
    finally:
        os.close(fd)
    return buf
