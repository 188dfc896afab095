"""Reading checkpoint files: the allow-listed loaders and where tensors' bytes are.

Two loaders, both refusing any global outside an allow-list, neither reading tensor data:

* :func:`dsckpt.io.unpickle.load_saved`, dsckpt's own torch-free unpickler, for discovery and
  consolidation (``import torch`` alone costs more than copying a large model);
* :func:`load_meta`, ``torch.load(weights_only=True, map_location="meta")``, where torch objects
  are needed anyway (reshape builds torch structures to save). torch.load bounds neither time nor
  memory on a hostile pickle, so each file is first read by dsckpt's own reader, with its bounds
  (:mod:`dsckpt.io.bounds`) and zip checks, from the same open descriptor torch then loads.

:func:`tensor_ref` turns a tensor from either into a :class:`TensorRef` (file, byte offset,
dtype, shape) so the executor can read exactly the bytes it needs with ``pread`` or copy them
kernel-side with ``copy_file_range``, never holding a whole flat group in memory.

DeepSpeed pickles a few of its own classes into checkpoints. They are replaced by the inert
stand-ins of :mod:`dsckpt.io.standins`, registered under DeepSpeed's import paths, so DeepSpeed
never needs importing and nothing in a checkpoint can run code.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsckpt.errors import CorruptFile, UnsafeCheckpoint
from dsckpt.io import dtypes
from dsckpt.io.dtypes import DType
from dsckpt.io.regular import open_regular, os_error
from dsckpt.io.standins import (  # noqa: F401  (re-exported: load.py's public names)
    STAND_INS,
    DynamicLossScaler,
    FragmentAddress,
    LossScaler,
    ZeroStageEnum,
    numpy_globals,
)
from dsckpt.io.unpickle import SavedTensor, load_saved_fd

if TYPE_CHECKING:
    import torch


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
    # torch.load bounds neither memory nor time on a hostile pickle, and its zip reader resolves
    # duplicate names its own way: the file is first read whole by dsckpt's own reader, which
    # applies the same bounds as discovery and refuses what torch might read differently. Both
    # read the same open file (through /proc/self/fd where there is one), so a file swapped
    # between the two reads is not the one torch loads.
    path = Path(path)
    fd = open_regular(path)
    try:
        load_saved_fd(path, fd)
        same_file = f"/proc/self/fd/{fd}"
        return _torch_load(path, same_file if os.path.exists(same_file) else path, **options)
    finally:
        os.close(fd)


def _torch_load(path: Path, source: str | Path, **options: Any) -> Any:
    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(source, weights_only=True, **options)
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
    dtype: DType
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
        return self.dtype.itemsize

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


def tensor_ref(path: Path, tensor: SavedTensor | torch.Tensor) -> TensorRef:
    """Locate a tensor from :func:`~dsckpt.io.unpickle.load_saved` or :func:`load_meta` in its
    file."""
    if isinstance(tensor, SavedTensor):
        ref = TensorRef(path, tensor.offset, tensor.dtype, tensor.shape, tensor.stride)
    else:
        storage = tensor.untyped_storage()
        base = getattr(storage, "_checkpoint_offset", None)
        if base is None:
            raise CorruptFile(path, "a tensor has no record offset (not loaded through load_meta?)")
        ref = TensorRef(
            path=path,
            offset=base + tensor.storage_offset() * tensor.element_size(),
            dtype=dtypes.from_torch(tensor.dtype),
            shape=tuple(tensor.shape),
            stride=tuple(tensor.stride()),
        )
    if ref.offset + _span_bytes(ref) > _file_size(path):
        raise CorruptFile(path, "a tensor record runs past the end of the file (truncated)")
    return ref


@lru_cache(maxsize=4096)
def _file_size(path: Path) -> int:
    # Checkpoint inputs are never written while dsckpt reads them: one stat per file is enough.
    return path.stat().st_size


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
    import torch

    dtype = dtypes.to_torch(ref.dtype)
    if count is None:
        count = ref.numel - start
    if ref.is_contiguous:
        data = _pread_exact(ref.path, ref.offset + start * ref.itemsize, count * ref.itemsize)
        return torch.frombuffer(data, dtype=dtype) if count else torch.empty(0, dtype=dtype)
    data = _pread_exact(ref.path, ref.offset, _span_bytes(ref))
    flat = torch.frombuffer(data, dtype=dtype)
    whole = torch.as_strided(flat, ref.shape, ref.stride).reshape(-1)
    return whole[start : start + count].clone()


def read_bytes(ref: TensorRef, start: int, count: int) -> bytes:
    """The raw bytes of elements ``[start, start+count)`` of a contiguous tensor."""
    if not ref.is_contiguous:
        raise ValueError(f"{ref.path.name}: a strided tensor has no contiguous byte range")
    return bytes(_pread_exact(ref.path, ref.offset + start * ref.itemsize, count * ref.itemsize))


def read_full(ref: TensorRef) -> torch.Tensor:
    """Read a whole (small) tensor with its shape."""
    return read_tensor(ref).reshape(ref.shape)


_SCALAR_FORMATS = {
    "float64": "<d",
    "float32": "<f",
    "float16": "<e",
    "int64": "<q",
    "int32": "<i",
    "int16": "<h",
    "int8": "<b",
    "uint8": "<B",
    "bool": "<?",
}


def read_scalar(ref: TensorRef) -> float | int | bool:
    """The value of a one-element tensor (an optimizer ``step``), without torch."""
    if ref.numel != 1:
        raise ValueError(f"{ref.path.name}: a tensor of {ref.numel} elements is not a scalar")
    raw = read_bytes(ref, 0, 1)
    if ref.dtype.name == "bfloat16":  # the top half of a float32
        return float(struct.unpack("<f", b"\0\0" + raw)[0])
    fmt = _SCALAR_FORMATS.get(ref.dtype.name)
    if fmt is None:
        raise ValueError(f"{ref.path.name}: cannot read a {ref.dtype} scalar")
    return struct.unpack(fmt, raw)[0]  # type: ignore[no-any-return]


def _pread_exact(path: Path, offset: int, nbytes: int) -> bytearray:
    fd = open_regular(path)
    buf = bytearray(nbytes)
    try:
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CorruptFile(path, "unexpected end of file while reading a tensor")
            done += n
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        os.close(fd)
    return buf
