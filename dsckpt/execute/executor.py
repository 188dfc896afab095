"""The one executor: it writes any :class:`~dsckpt.plan.fileplan.WritePlan`, atomically.

Each output file is created under a temporary name (:mod:`dsckpt.execute.atomic`), sized and
preallocated, and filled by the plan's operations: literal bytes with ``pwrite``; byte copies
kernel-side with ``copy_file_range`` (no user-space buffer, nothing resident); casts in bounded
chunks (``pread``, cast, ``pwrite``). Then the derived operations run (alias duplicates, CRC-32
fields), and the files are renamed into place only when every one is complete. Memory stays at
one chunk whatever the model size, and the page cache, not the process, holds the data in flight.
The executor knows nothing about ZeRO, Megatron or file formats: those made the plan.
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsckpt.errors import IncompleteOutputError
from dsckpt.execute import distributed
from dsckpt.execute.atomic import atomic_entries, atomic_output, preallocate
from dsckpt.execute.formats.crc import CrcCopier, crc32
from dsckpt.io import dtypes
from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef, read_tensor
from dsckpt.io.regular import open_regular
from dsckpt.plan.consolidation import ConsolidationPlan, OutputTensor
from dsckpt.plan.fileplan import (
    CastCopy,
    Computed,
    Copy,
    Crc32,
    DeferredFile,
    Duplicate,
    FilePlan,
    Literal,
    WritePlan,
    Zeros,
    plan_digest,
)
from dsckpt.printable import listed

if TYPE_CHECKING:
    import torch

# Elements cast per chunk: bounds memory for casting reads (16 MiB of fp32).
CAST_CHUNK = 4 << 20
Progress = Callable[[int], None]
# Average bytes per copy from which a CRC-32 field is computed from the sources while copying.
STREAM_CRC_MIN = 256 << 10


class _Sources:
    """Read-only descriptors of the source files, opened once each."""

    def __init__(self, stack: ExitStack) -> None:
        self._fds: dict[tuple[Path, bool], int] = {}
        self._stack = stack

    def fd(self, path: Path, follow_links: bool = True) -> int:
        key = (path, follow_links)
        if key not in self._fds:
            # Checked again at the open: a source swapped for a FIFO, a device (or, where not
            # followed, a link) since it was planned is refused, never read (or blocked on).
            fd = open_regular(path, follow_symlinks=follow_links)
            self._stack.callback(os.close, fd)
            self._fds[key] = fd
        return self._fds[key]


def run(
    plan: WritePlan,
    out: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    durable: bool = False,
    finish: Callable[[Mapping[str, Path]], None] | None = None,
    planned: Progress | None = None,
) -> None:
    """Write every file of ``plan`` to ``out`` (a file, or a directory of entries), atomically.

    Deferred files (:class:`~dsckpt.plan.fileplan.DeferredFile`) are planned one at a time,
    each checked before its first byte is written and dropped once written, so memory does not
    grow with their number; a split across processes plans them all up front (every process
    needs every file's size).

    Args:
        plan: the files and their operations; checked before anything is created.
        out: the output file, or for a directory plan the output directory (a ``beside`` plan:
            the output file, whose directory holds the entries).
        force: replace an existing output (see :func:`dsckpt.execute.atomic.atomic_output`).
        progress: called with the number of source bytes each copy or cast wrote.
        durable: fsync before the renames. Off for consolidations: like ``torch.save`` and
            safetensors, durability against power loss is the filesystem's; the rename still
            guarantees no half-written file carries the output's name.
        finish: called with the staged entries' paths once every planned file is written,
            before the commit (reshape copies a tag directory's extra files there).
        planned: called with the data bytes (what ``progress`` counts) of each deferred file
            when it is planned, which ``plan.data_nbytes`` did not count.

    Raises:
        IncompleteOutputError: the plan does not write every byte of its files exactly once.
        OutputError: see :func:`dsckpt.execute.atomic.atomic_output`.
    """
    world = distributed.launched_world()
    if world is not None:
        # Each process's share is balanced by file sizes: every file is planned up front.
        before = plan.data_nbytes
        plan = plan.resolved()
        if planned is not None and plan.data_nbytes != before:
            planned(plan.data_nbytes - before)
        _refuse_unsound(plan.problems())
        _run_shared(
            plan, out, world, force=force, progress=progress, durable=durable, finish=finish
        )
        return
    _refuse_unsound(plan.problems())
    with _staging(plan, out, force=force, durable=durable) as staged:
        paths = {f.name: _staged_path(staged, f.name) for f in plan.files}
        _write_files(plan, paths, progress, planned)
        if finish is not None:
            finish(staged)


def _staging(
    plan: WritePlan, out: Path, *, force: bool, durable: bool
) -> AbstractContextManager[Mapping[str, Path]]:
    """The atomic output of ``plan``: ``{entry: temporary path}``, committed on a clean exit."""
    if plan.directory:
        pattern = re.compile(plan.stale) if plan.stale else None
        return atomic_entries(
            out.parent if plan.beside else out,
            plan.commit_order(),
            force=force,
            dirs=plan.dirs,
            withdraw=plan.withdraw,
            stale=(lambda name: pattern.fullmatch(name) is not None) if pattern else None,
            nbytes=plan.data_nbytes,
            durable=durable,
            per_entry=plan.beside,
        )
    return _single_entry(
        plan.files[0].name,
        atomic_output(out, force=force, nbytes=plan.data_nbytes, durable=durable),
    )


@contextmanager
def _single_entry(name: str, output: AbstractContextManager[Path]) -> Iterator[Mapping[str, Path]]:
    with output as tmp:
        yield {name: tmp}


def _run_shared(
    plan: WritePlan,
    out: Path,
    world: distributed.World,
    *,
    force: bool,
    progress: Progress | None,
    durable: bool,
    finish: Callable[[Mapping[str, Path]], None] | None,
) -> None:
    """This process's share of ``plan``, one of ``world``'s (see :mod:`.distributed`).

    Every process planned the same plan (checked by digest before anything is created). The
    leader stages the output and hands its temporary paths out; each process writes its share:
    whole files of a directory plan, balanced by size, or for one file a byte-balanced part of
    its data operations (the leader sizes the file first, and runs its derived operations, the
    CRC fields and alias copies, once every part is written). The leader commits last.
    """
    single = not plan.directory
    files = _every_file(plan)
    with distributed.coordinator(world) as coord:
        coord.agree("plan", plan_digest(plan))
        if single:
            shares = distributed.balance([op.nbytes for op in files[0].ops], world.size)
        else:
            shares = distributed.balance([f.size for f in files], world.size)
        mine = shares[world.rank]
        progress = coord.progress(progress)
        if not world.is_leader:
            handed = coord.hand_out("staging", dict, _encode_paths, _decode_paths)
            coord.report(_attempt(lambda: _write_share(plan, handed, mine, progress)))
            return
        with _staging(plan, out, force=force, durable=durable) as staged:
            if single:
                _create_sized(staged[files[0].name], files[0].size)
            coord.hand_out("staging", lambda: staged, _encode_paths, _decode_paths)
            coord.report(_attempt(lambda: _write_share(plan, staged, mine, progress)))
            if single:  # every part is in: the CRC fields and alias copies read them back
                with ExitStack() as stack:
                    write_file(
                        files[0],
                        staged[files[0].name],
                        _Sources(stack),
                        None,
                        share=(),
                        derive=True,
                    )
            if finish is not None:
                finish(staged)
        coord.committed()


def _write_share(
    plan: WritePlan, staged: Mapping[str, Path], share: Sequence[int], progress: Progress | None
) -> None:
    files = _every_file(plan)
    with ExitStack() as stack:
        sources = _Sources(stack)
        if plan.directory:
            for i in share:
                file = files[i]
                write_file(file, _staged_path(staged, file.name), sources, progress)
        else:
            file = files[0]
            write_file(file, staged[file.name], sources, progress, share=share, derive=False)


def _every_file(plan: WritePlan) -> list[FilePlan]:
    """The files of a plan without deferred ones (see :meth:`WritePlan.resolved`)."""
    files = list(plan.planned_files())
    if len(files) != len(plan.files):
        raise ValueError("a plan split across processes must have every file planned")
    return files


def _attempt(work: Callable[[], None]) -> Exception | None:
    try:
        work()
    except Exception as exc:  # reported to every rank; the leader then commits nothing
        return exc
    return None


def _create_sized(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        preallocate(fd, size)
    finally:
        os.close(fd)


def _encode_paths(staged: Mapping[str, Path]) -> str:
    return json.dumps({name: str(path) for name, path in staged.items()})


def _decode_paths(text: str) -> dict[str, Path]:
    return {name: Path(path) for name, path in json.loads(text).items()}


def _refuse_unsound(problems: list[str]) -> None:
    if problems:
        first = listed(problems, 1, more=" (and {} more)")
        raise IncompleteOutputError(
            f"the write plan is unsound: {first} (a dsckpt bug: please report it)"
        )


def _staged_path(staged: Mapping[str, Path], name: str) -> Path:
    top, sep, rest = name.partition("/")
    return staged[top] / rest if sep else staged[top]


def write_plan_file(file: FilePlan, path: Path, progress: Progress | None = None) -> None:
    """Write one planned file straight to ``path`` (the caller makes it atomic: it is, say,
    inside a staging directory), after checking the plan covers every byte once."""
    _refuse_unsound(file.problems())
    with ExitStack() as stack:
        write_file(file, path, _Sources(stack), progress)


def _write_files(
    plan: WritePlan,
    paths: Mapping[str, Path],
    progress: Progress | None,
    planned: Progress | None = None,
) -> None:
    with ExitStack() as stack:
        sources = _Sources(stack)
        for entry in plan.files:
            if isinstance(entry, DeferredFile):
                # Planned now, checked like the others were before anything was created, and
                # dropped once written: an unsound one fails the run, and nothing is committed.
                file = entry.planned()
                _refuse_unsound(file.problems())
                if planned is not None:
                    planned(file.data_nbytes)
            else:
                file = entry
            write_file(file, paths[file.name], sources, progress)
            del file


def write_file(
    file: FilePlan,
    path: Path,
    sources: _Sources,
    progress: Progress | None,
    share: Sequence[int] | None = None,
    derive: bool = True,
) -> None:
    """Create ``path`` and run ``file``'s data operations, then its derived ones.

    A CRC-32 field over bytes that are all copies, literals and zeros, with large copies
    (``STREAM_CRC_MIN`` bytes each on average), is computed from the sources while they are
    copied (:class:`~dsckpt.execute.formats.crc.CrcCopier`: a worker thread CRCs each chunk,
    still in the page cache, as the kernel copies the next one), so no second pass reads the
    output; any other range (casts, many small pieces) is read back from the output.

    With ``share`` (several processes writing one file: see :mod:`dsckpt.execute.distributed`)
    ``path`` exists at its full size already and only the data operations of those indices
    run, then the derived ones if ``derive`` (the leader's, once every share is written): their
    CRCs are read back from the output.
    """
    streamed = _streamed_crcs(file) if share is None else {}
    tiles = {i for inside in streamed.values() for i in inside}
    parts: dict[int, list[tuple[Any, int]]] = {}  # op index -> CRC parts of its bytes
    if share is None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    else:
        fd = os.open(path, os.O_RDWR)
    copier = CrcCopier() if streamed else None
    try:
        if share is None:
            preallocate(fd, file.size)
        for i in range(len(file.ops)) if share is None else share:
            op = file.ops[i]
            if isinstance(op, Literal):
                _pwrite_all(fd, op.data, op.at)
                if i in tiles:
                    parts[i] = [(crc32(op.data), op.nbytes)]
                continue
            if isinstance(op, Zeros):  # the sized file already reads as zeros
                parts[i] = [(None, op.nbytes)]
                continue
            if isinstance(op, Computed):
                _write_computed(op, fd)
                if progress:
                    progress(op.nbytes)
                continue
            crc_parts = _copy(op, sources, fd, copier if i in tiles else None)
            if crc_parts is not None:
                parts[i] = crc_parts
            if progress:
                progress(op.nbytes)
        for derived in file.derived if derive else ():
            if isinstance(derived, Duplicate):
                _copy_bytes(fd, derived.start, fd, derived.at, derived.nbytes)
                continue
            inside = streamed.get(derived)
            if inside is not None:
                crc = CrcCopier.crc_of(part for i in inside for part in parts[i])
            else:
                crc = _crc_of_output(fd, derived.start, derived.nbytes)
            field = crc.to_bytes(4, "little")
            for at in derived.at:
                _pwrite_all(fd, field, at)
    finally:
        if copier is not None:
            copier.close()
        os.close(fd)


def _write_computed(op: Computed, fd: int) -> None:
    value = op.make()  # one computed tensor in memory at a time, released on return
    data = tensor_memory(value) if hasattr(value, "data_ptr") else memoryview(value).cast("B")
    if data.nbytes != op.nbytes:
        raise IncompleteOutputError(
            f"{op.what} was computed as {data.nbytes} bytes where the plan holds {op.nbytes} "
            "(a dsckpt bug: please report it)"
        )
    _pwrite_all(fd, data, op.at)


def _streamed_crcs(file: FilePlan) -> dict[Crc32, list[int]]:
    """``{Crc32 op: indices of the data ops tiling its range, in order}`` for the CRC fields
    computable from the sources (ranges of copies, literals and zeros only)."""
    crcs = [op for op in file.derived if isinstance(op, Crc32)]
    if not crcs:
        return {}
    order = sorted(range(len(file.ops)), key=lambda i: file.ops[i].at)
    starts = [file.ops[i].at for i in order]
    result: dict[Crc32, list[int]] = {}
    for op in crcs:
        k = bisect.bisect_left(starts, op.start)
        inside, pos, end = [], op.start, op.start + op.nbytes
        while pos < end and k < len(order) and file.ops[order[k]].at == pos:
            data = file.ops[order[k]]
            if isinstance(data, CastCopy) or data.at + data.nbytes > end:
                break
            if data.nbytes:
                inside.append(order[k])
            pos += data.nbytes
            k += 1
        copies = [i for i in inside if isinstance(file.ops[i], Copy)]
        # Worth it for large copies only: a CRC job per small copy costs more than reading a
        # small storage back from the page cache.
        if pos == end and copies and op.nbytes >= STREAM_CRC_MIN * len(copies):
            result[op] = inside
    return result


def _crc_of_output(fd: int, start: int, nbytes: int) -> int:
    buf = bytearray(min(nbytes, 16 << 20))  # reused: no allocation per chunk
    view = memoryview(buf)
    crc, pos = 0, 0
    while pos < nbytes:
        n = os.preadv(fd, [view[: min(len(buf), nbytes - pos)]], start + pos)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of an output file while computing a CRC")
        crc = crc32(view[:n], crc)
        pos += n
    return crc


_copy_file_range_works = hasattr(os, "copy_file_range")


def _copy(
    op: Copy | CastCopy, sources: _Sources, out_fd: int, copier: CrcCopier | None = None
) -> list[tuple[Any, int]] | None:
    """Run one copy or cast; with ``copier``, a byte copy also CRCs its bytes on the way and
    returns the pending CRC parts."""
    if isinstance(op, Copy):
        src = op.source
        if copier is not None:
            in_fd = sources.fd(src.path, src.follow_links)
            return copier.copy(in_fd, src.offset, out_fd, op.at, src.nbytes)
        _copy_bytes(sources.fd(src.path, src.follow_links), src.offset, out_fd, op.at, src.nbytes)
        return None
    fd = sources.fd(op.source.path)
    done = 0
    while done < op.count:
        count = min(CAST_CHUNK, op.count - done)
        piece = _cast(op.source, op.start + done, count, op.dtype, fd)
        _pwrite_all(out_fd, piece, op.at + done * op.dtype.itemsize)
        done += count
    return None


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
