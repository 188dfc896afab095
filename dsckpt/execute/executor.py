"""Streaming execution of a consolidation plan.

Every output tensor has a known place in a preallocated output file (a sink). Each read of the
plan is a byte range of a saved tensor; when no cast is needed it is copied kernel-side with
``copy_file_range`` (no user-space buffer, nothing resident), otherwise it is read in bounded
chunks with ``pread``, cast, and written with ``pwrite``. Memory stays at one chunk whatever the
model size, and the page cache, not the process, holds the data in flight.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dsckpt.io import dtypes
from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef, read_tensor
from dsckpt.plan.consolidation import ConsolidationPlan, OutputTensor, Read

if TYPE_CHECKING:
    import torch

# Elements cast per chunk: bounds memory for casting reads (16 MiB of fp32).
CAST_CHUNK = 4 << 20
Progress = Callable[[int], None]


class Sink(Protocol):
    """Where each output tensor's bytes go: an open file descriptor and the absolute offset."""

    def locate(self, name: str) -> tuple[int, int]: ...


class _Sources:
    """Read-only descriptors of the source files, opened once each."""

    def __init__(self, stack: ExitStack) -> None:
        self._fds: dict[Path, int] = {}
        self._stack = stack

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            fd = os.open(path, os.O_RDONLY)
            self._stack.callback(os.close, fd)
            self._fds[path] = fd
        return self._fds[path]


def execute(plan: ConsolidationPlan, sink: Sink, progress: Progress | None = None) -> None:
    """Fill every output tensor of ``plan`` into ``sink``."""
    with ExitStack() as stack:
        sources = _Sources(stack)
        for tensor in plan.tensors:
            fd, base = sink.locate(tensor.name)
            item = tensor.dtype.itemsize
            for read in tensor.reads:
                _copy(read, tensor, sources, fd, base + read.dst_start * item)
                if progress:
                    progress(read.length * item)


_copy_file_range_works = hasattr(os, "copy_file_range")


def _copy(
    read: Read, tensor: OutputTensor, sources: _Sources, out_fd: int, out_offset: int
) -> None:
    src = read.source
    if src.dtype == tensor.dtype and src.is_contiguous:
        start = src.offset + read.src_start * src.itemsize
        _copy_bytes(sources.fd(src.path), start, out_fd, out_offset, read.length * src.itemsize)
        return
    fd = sources.fd(src.path)
    done = 0
    while done < read.length:
        count = min(CAST_CHUNK, read.length - done)
        piece = _cast(src, read.src_start + done, count, tensor.dtype, fd)
        _pwrite_all(out_fd, piece, out_offset + done * tensor.dtype.itemsize)
        done += count


def _cast(src: TensorRef, start: int, count: int, dtype: DType, fd: int) -> memoryview:
    """Elements ``[start, start+count)`` of ``src`` as ``dtype`` bytes.

    The exact widenings (bfloat16 and float16 to float32) of contiguous sources read the raw
    bytes and widen them with numpy where it is installed (much cheaper to import than torch),
    else with torch; everything else, and strided sources, go through torch. Both give the same
    bits: the widenings are exact.
    """
    if src.is_contiguous and dtype == dtypes.FLOAT32 and src.dtype in _WIDEN:
        raw = os.pread(fd, count * src.itemsize, src.offset + start * src.itemsize)
        if len(raw) != count * src.itemsize:
            raise OSError(errno.EIO, f"unexpected end of {src.path}")
        np = _numpy()
        if np is None:
            return _widen_with_torch(raw, src.dtype)
        if src.dtype == dtypes.BFLOAT16:  # the high half of a float32: exact
            wide = np.frombuffer(raw, dtype="<u2").astype("<u4") << 16
        else:
            wide = np.frombuffer(raw, dtype="<f2").astype("<f4")
        return memoryview(wide.tobytes())
    return tensor_memory(read_tensor(src, start, count).to(dtypes.to_torch(dtype)))


_WIDEN = (dtypes.BFLOAT16, dtypes.FLOAT16)


def _widen_with_torch(raw: bytes, dtype: DType) -> memoryview:
    import torch

    if not raw:
        return memoryview(b"")
    narrow = torch.frombuffer(bytearray(raw), dtype=dtypes.to_torch(dtype))
    return tensor_memory(narrow.to(torch.float32))


def tensor_memory(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, as a writable memoryview sharing its memory (no copy).

    torch's own ``.numpy()`` would do, but needs numpy, which neither torch nor dsckpt requires.
    The view keeps the tensor alive. A non-contiguous tensor is copied to a contiguous one first,
    so writes through the view reach ``tensor`` only when it is contiguous.
    """
    import ctypes

    flat = tensor.reshape(-1).contiguous()
    if flat.device.type != "cpu":
        raise ValueError(f"tensor_memory needs a CPU tensor, not {flat.device}")
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    block = (ctypes.c_char * nbytes).from_address(flat.data_ptr())
    block._tensor = flat  # type: ignore[attr-defined]  # the memory's owner outlives the view
    return memoryview(block).cast("B")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # not a dependency of dsckpt or torch: torch casts instead
        return None
    return numpy


def _copy_bytes(in_fd: int, in_offset: int, out_fd: int, out_offset: int, nbytes: int) -> None:
    global _copy_file_range_works
    while nbytes > 0:
        if _copy_file_range_works:
            try:
                n = os.copy_file_range(in_fd, out_fd, nbytes, in_offset, out_offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                _copy_file_range_works = False
                continue
        else:
            data = os.pread(in_fd, min(nbytes, CAST_CHUNK * 4), in_offset)
            n = len(data)
            _pwrite_all(out_fd, data, out_offset)
        if n == 0:
            raise OSError(errno.EIO, "unexpected end of a source file")
        in_offset += n
        out_offset += n
        nbytes -= n


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def materialize(tensor: OutputTensor) -> torch.Tensor:
    """One output tensor, in memory (for the library's lazy state dict)."""
    import torch

    dtype = dtypes.to_torch(tensor.dtype)
    out = torch.empty(tensor.numel, dtype=dtype)
    for read in tensor.reads:
        out[read.dst_start : read.dst_start + read.length] = read_tensor(
            read.source, read.src_start, read.length
        ).to(dtype)
    return out.view(tensor.shape)


def iter_tensors(plan: ConsolidationPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time; aliases yield the same tensor object again."""
    for tensor in plan.tensors:
        value = materialize(tensor)
        yield tensor.name, value
        for alias, canonical in plan.aliases.items():
            if canonical == tensor.name:
                yield alias, value
