"""Write plans: every output file as a list of byte-level operations (pure data).

A :class:`WritePlan` is what any writing job hands to the one executor
(:func:`dsckpt.execute.executor.run`): the output files, each with its size and the operations
that fill it. Nothing here reads or writes a file, so a plan can be printed (``describe``),
digested, checked before the first byte is written, and split into shares for several workers.

A file's operations come in two phases:

* **data operations** (:class:`Copy`, :class:`CastCopy`, :class:`Literal`,
  :class:`Zeros`) write disjoint byte
  ranges of the file and depend on nothing else in it: any order, any split across workers;
* **derived operations** (:class:`Duplicate`, :class:`Crc32`) read bytes the data operations
  wrote (a safetensors alias is a second copy of its canonical tensor; a zip record's CRC-32
  is computed over its data), so they run after every data operation of their file, in order.

The one record for "a range of bytes of a source file" is :class:`ByteRange`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef


@dataclass(frozen=True)
class ByteRange:
    """``nbytes`` bytes at byte ``offset`` of source file ``path``. A rank file may be a link
    to the real file; a file copied into an output folder (a tokenizer file) is read only if
    it is no link (``follow_links`` False), as it was when planned."""

    path: Path
    offset: int
    nbytes: int
    follow_links: bool = True


@dataclass(frozen=True)
class Copy:
    """Copy ``source``'s bytes, unchanged, to byte ``at`` of the output file."""

    at: int
    source: ByteRange

    @property
    def nbytes(self) -> int:
        return self.source.nbytes


@dataclass(frozen=True)
class CastCopy:
    """``count`` elements of a saved tensor from element ``start``, cast to ``dtype``, at ``at``.

    Used where a byte copy cannot do: a dtype change, or a strided (non-contiguous) source.
    """

    at: int
    source: TensorRef
    start: int
    count: int
    dtype: DType

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


@dataclass(frozen=True)
class Literal:
    """Bytes the plan already holds (a safetensors header, a pickle, zip records) at ``at``."""

    at: int
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Zeros:
    """``nbytes`` zero bytes at ``at`` (padding no source holds). A new output file is sized
    before any operation runs, and a sized file reads as zeros, so nothing needs writing."""

    at: int
    nbytes: int


@dataclass(frozen=True)
class Duplicate:
    """The file's own bytes ``[start, start + nbytes)`` copied again to ``at`` (a derived
    operation: a safetensors alias stores its own copy of its canonical tensor)."""

    at: int
    start: int
    nbytes: int


@dataclass(frozen=True)
class Crc32:
    """The zip CRC-32 of the file's bytes ``[start, start + nbytes)``, written as a little-endian
    u32 at every offset of ``at`` (a derived operation: a record's data descriptor and its
    central-directory entry carry the same CRC)."""

    start: int
    nbytes: int
    at: tuple[int, ...]


@dataclass(frozen=True)
class Computed:
    """``nbytes`` bytes that no source holds, made in memory by ``make`` when written (a merged
    LoRA weight: ``W + B @ A * scaling``), one at a time. ``make`` returns a contiguous CPU
    tensor or a buffer of exactly ``nbytes``; ``what`` names it for descriptions and digests."""

    at: int
    nbytes: int
    make: Callable[[], Any] = field(compare=False, repr=False)
    what: str = ""


DataOp = Copy | CastCopy | Literal | Zeros | Computed
DerivedOp = Duplicate | Crc32


@dataclass(frozen=True)
class FilePlan:
    """One output file: its name (relative to the output directory, or the output file's own
    name), its final size, and the operations that write every byte of it."""

    name: str
    size: int
    ops: tuple[DataOp, ...]
    derived: tuple[DerivedOp, ...] = ()

    @property
    def data_nbytes(self) -> int:
        """Bytes copied from source files or computed (what a progress bar counts)."""
        return sum(op.nbytes for op in self.ops if isinstance(op, (Copy, CastCopy, Computed)))

    def problems(self) -> list[str]:
        """What is wrong with this file's plan: operations outside the file, data operations or
        duplicates that overlap, bytes none of them writes (CRC fields patch bytes a literal
        wrote). Empty for a sound plan."""
        found: list[str] = []
        writes = [*self.ops, *(op for op in self.derived if isinstance(op, Duplicate))]
        spans = sorted((op.at, op.at + op.nbytes) for op in writes if op.nbytes)
        pos = 0
        for start, end in spans:
            if start < 0 or end > self.size:
                found.append(f"{self.name}: bytes [{start}, {end}) lie outside its {self.size}")
            elif start < pos:
                found.append(f"{self.name}: bytes [{start}, {min(pos, end)}) are written twice")
            elif start > pos:
                found.append(f"{self.name}: bytes [{pos}, {start}) are never written")
            pos = max(pos, end)
        if pos < self.size:
            found.append(f"{self.name}: bytes [{pos}, {self.size}) are never written")
        for op in self.derived:
            reads = (op.start, op.start + op.nbytes)
            targets: list[tuple[int, int]] = (
                [(op.at, op.at + op.nbytes)]
                if isinstance(op, Duplicate)
                else [(a, a + 4) for a in op.at]
            )
            for a, b in [reads, *targets]:
                if a < 0 or b > self.size:
                    found.append(
                        f"{self.name}: {type(op).__name__} at [{a}, {b}) lies outside "
                        f"its {self.size} bytes"
                    )
        return found


@dataclass(frozen=True)
class DeferredFile:
    """An output file whose operations are planned when it is written, and dropped after.

    A ZeRO-3 model-states file lists an operation per zip record (a placeholder per parameter:
    20,000 records, about 10 MB of operations at 20,000 parameters): a plan holding every rank's
    at once grows with the rank count (DP 128: 1.8 GB). The executor builds a deferred file just
    before writing it and checks it as it checks every file (every byte written exactly once)
    before its first byte; the output is still committed only when every file is complete.
    ``build`` must return the same plan each time it is called (a plan is deterministic).
    """

    name: str
    build: Callable[[], FilePlan] = field(repr=False, compare=False)

    def planned(self) -> FilePlan:
        """The file's plan, which must carry this file's name."""
        file = self.build()
        if file.name != self.name:
            raise ValueError(f"the deferred file {self.name} was planned as {file.name}")
        return file


@dataclass(frozen=True)
class WritePlan:
    """Every file a job writes, complete before the first byte is written.

    Attributes:
        files: the output files, in commit order (for a directory output the last one is the
            commit point: an index); a :class:`DeferredFile` is planned when it is written.
            The sizes and byte counts below are those of the planned files;
            :meth:`resolved` plans the deferred ones (holding every file's operations).
        directory: ``files`` are entries of an output directory that may hold other files
            (kept); otherwise the output is the single file ``files[0]``.
        withdraw: existing entries moved aside before the first new one is renamed into place
            (old entry points that must never name a mix of old and new files).
        stale: a regular expression matching the names of the job's own earlier outputs,
            deleted after the commit when not rewritten ("" for none).
        dirs: entries of the output directory that are directories created by the plan (a
            checkpoint's tag directory); a file ``"tag/name"`` goes inside entry ``"tag"``.
        entries: the output directory's entries in commit order, when not the files' own
            names (``("tag", "latest")``: the tag directory first, then ``latest``).
        beside: the files are entries of the output file's own directory, among files of
            others (a weights file and its optimizer file): ``--force`` is needed only for the
            entries that exist; the last file is the output itself, the commit point.
    """

    files: tuple[FilePlan | DeferredFile, ...]
    directory: bool = False
    withdraw: tuple[str, ...] = ()
    stale: str = ""
    dirs: tuple[str, ...] = ()
    entries: tuple[str, ...] = ()
    beside: bool = False

    @property
    def deferred(self) -> bool:
        """Some files are planned only when written."""
        return any(isinstance(f, DeferredFile) for f in self.files)

    def planned_files(self) -> Iterator[FilePlan]:
        """The files planned so far (deferred ones are not built)."""
        return (f for f in self.files if isinstance(f, FilePlan))

    def resolved(self) -> WritePlan:
        """This plan with every deferred file planned (what needs every file's operations at
        once: a split across processes, a printed plan)."""
        if not self.deferred:
            return self
        files = tuple(f.planned() if isinstance(f, DeferredFile) else f for f in self.files)
        return replace(self, files=files)

    def commit_order(self) -> tuple[str, ...]:
        """The output directory's entries, in the order they are renamed into place."""
        return self.entries or tuple(f.name for f in self.files)

    @property
    def data_nbytes(self) -> int:
        """Bytes copied from source files, over all planned files."""
        return sum(f.data_nbytes for f in self.planned_files())

    @property
    def size(self) -> int:
        """Total bytes of every planned output file."""
        return sum(f.size for f in self.planned_files())

    def problems(self) -> list[str]:
        """Every problem of every file (see :meth:`FilePlan.problems`), plus duplicate names."""
        names = [f.name for f in self.files]
        found = [f"{n}: planned more than once" for n in sorted(set(names)) if names.count(n) > 1]
        if not self.directory and len(self.files) != 1:
            found.append(f"a single-file output with {len(self.files)} files")
        entries = set(self.commit_order())
        for f in self.files:
            top, sep, _ = f.name.partition("/")
            if (top in self.dirs) != bool(sep) or top not in entries:
                found.append(
                    f"{f.name}: not an entry of the output or a file in one of its directories"
                )
        for f in self.planned_files():
            found.extend(f.problems())
        return found

    def sources(self) -> Iterator[Path]:
        """Every source file read by the planned files, once each, in first-use order."""
        seen: set[Path] = set()
        for f in self.planned_files():
            for op in f.ops:
                path = op.source.path if isinstance(op, (Copy, CastCopy)) else None
                if path is not None and path not in seen:
                    seen.add(path)
                    yield path

    def describe(self, ranges: bool = False) -> dict[str, Any]:
        """The plan as JSON-ready data: files, sizes and operation counts, and with ``ranges``
        every operation's output range and source (what ``--dry-run --json`` can print)."""
        plan = self.resolved()
        files = []
        for f in plan.planned_files():
            entry: dict[str, Any] = {
                "name": f.name,
                "size": f.size,
                "copied_bytes": f.data_nbytes,
                "copies": sum(isinstance(op, Copy) for op in f.ops),
                "casts": sum(isinstance(op, CastCopy) for op in f.ops),
                "literals": sum(isinstance(op, Literal) for op in f.ops),
                "zeros": sum(isinstance(op, Zeros) for op in f.ops),
                "derived": len(f.derived),
            }
            if ranges:
                entry["ops"] = [_describe_op(op) for op in sorted(f.ops, key=lambda o: o.at)]
                entry["derived_ops"] = [_describe_op(op) for op in f.derived]
            files.append(entry)
        return {"files": files, "size": plan.size, "copied_bytes": plan.data_nbytes}


def tag_directory_plan(tag: str, files: Sequence[FilePlan | DeferredFile]) -> WritePlan:
    """The write plan of a DeepSpeed save directory: the tag directory holding ``files`` (named
    ``tag/...``), committed first, then ``latest`` naming it (what ``load_checkpoint`` reads)."""
    latest = tag.encode()
    return WritePlan(
        (*files, FilePlan("latest", len(latest), (Literal(0, latest),))),
        directory=True,
        dirs=(tag,),
        entries=(tag, "latest"),
    )


def _describe_op(op: DataOp | DerivedOp) -> dict[str, Any]:
    if isinstance(op, Copy):
        return {
            "op": "copy",
            "at": op.at,
            "nbytes": op.nbytes,
            "source": str(op.source.path),
            "offset": op.source.offset,
        }
    if isinstance(op, CastCopy):
        return {
            "op": "cast",
            "at": op.at,
            "nbytes": op.nbytes,
            "source": str(op.source.path),
            "offset": op.source.offset,
            "from": op.source.dtype.name,
            "to": op.dtype.name,
            "start": op.start,
            "count": op.count,
        }
    if isinstance(op, Literal):
        return {"op": "literal", "at": op.at, "nbytes": op.nbytes}
    if isinstance(op, Zeros):
        return {"op": "zeros", "at": op.at, "nbytes": op.nbytes}
    if isinstance(op, Computed):
        return {"op": "computed", "at": op.at, "nbytes": op.nbytes, "what": op.what}
    if isinstance(op, Duplicate):
        return {"op": "duplicate", "at": op.at, "nbytes": op.nbytes, "start": op.start}
    return {"op": "crc32", "at": list(op.at), "start": op.start, "nbytes": op.nbytes}


def plan_digest(plan: WritePlan) -> str:
    """A digest of everything ``plan`` writes: processes that planned differently (other
    inputs, options or versions) must not write shares of one output."""
    h = hashlib.sha256()
    for name, value in (
        ("directory", plan.directory),
        ("entries", plan.commit_order()),
        ("dirs", plan.dirs),
        ("withdraw", plan.withdraw),
        ("stale", plan.stale),
        ("beside", plan.beside),
    ):
        h.update(f"{name}={value!r};".encode())
    for f in plan.resolved().planned_files():
        h.update(f"file {f.name} {f.size};".encode())
        for op in (*f.ops, *f.derived):
            if isinstance(op, Literal):
                h.update(f"literal {op.at} ".encode() + hashlib.sha256(op.data).digest())
            elif isinstance(op, Computed):
                h.update(f"computed {op.at} {op.nbytes} {op.what};".encode())
            elif isinstance(op, CastCopy):
                src = op.source
                h.update(
                    f"cast {op.at} {src.path} {src.offset} {src.dtype.name} {src.shape} "
                    f"{src.stride} {op.start} {op.count} {op.dtype.name};".encode()
                )
            else:
                h.update(f"{op!r};".encode())
    return h.hexdigest()[:16]
