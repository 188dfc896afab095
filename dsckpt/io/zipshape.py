"""A checked zip's structure as bytes, so a sibling file is checked by comparison, not re-parsed.

Every rank of a ZeRO-3 run writes a model-states file with one placeholder tensor per parameter:
at 20,000 parameters, 20,006 zip records per file. Checking each record of each file the way
:mod:`dsckpt.io.unpickle` does (a central entry, a local header) costs a Python loop per record,
about a minute over 1,024 ranks. Those files are laid out identically: the records have the same
sizes at the same offsets, and differ only in the archive's folder name (torch names it after
the file), in the data of some records (the rank's frozen fragments, a save id) and in those
records' CRC-32s. So once one file has been read and checked in full, a :class:`ZipShape` keeps
its structural bytes: the central directory and end records, and every local header. A sibling
whose bytes are exactly those, with its own folder name in every place the checked file has its
own, and differences only in record data and CRC fields, has the same records at the same
offsets: every check the full reader makes gives the same verdict on it. That comparison is a
few ``memcmp``-speed operations per file (``bytes.join``, ``==``, ``startswith``), whatever the
record count. A file that differs anywhere else does not match, and its caller reads it in full,
which names what is wrong with it in the usual words.

Nothing here trusts the sibling: every structural byte the full reader would look at is read
from the sibling and compared; what is not compared (record data, CRC fields) is what the full
reader does not look at either, except for the records it reads (``data.pkl``, ``byteorder``),
which the caller reads and CRC-checks itself.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import dataclass

# Local headers closer than this to the next one are read in one block with it (the data and
# data descriptor between them come along and are not compared); a record with more data than
# this starts a new block, so its data is never read.
BLOCK_GAP = 64 << 10
MAX_BLOCK = 64 << 20
# A sibling whose bytes differ from the checked file's in more places than this is read in full:
# finding each difference costs a few comparisons, and siblings differ in a handful of records.
MAX_DIFFERENCES = 4096
_LEAF = 64  # differences are located to runs of this many bytes, then byte by byte


@dataclass(frozen=True)
class Region:
    """Bytes of the checked file at ``start``: ``pieces`` joined by the folder name, and
    ``free`` intervals (relative, sorted, disjoint) whose bytes a sibling may have its own."""

    start: int
    size: int
    pieces: tuple[bytes, ...]
    free_starts: tuple[int, ...]
    free_ends: tuple[int, ...]

    def expected(self, top: bytes) -> bytes:
        return top.join(self.pieces)


def region(
    data: bytes, start: int, top: bytes, names_at: list[int], free: list[tuple[int, int]]
) -> Region:
    """A :class:`Region` of ``data`` (read at ``start``) whose folder name ``top`` begins at
    each of ``names_at`` (relative, ascending) and whose ``free`` intervals may differ."""
    cuts = [0]
    for at in names_at:
        cuts += [at, at + len(top)]
    cuts.append(len(data))
    pieces = tuple(data[a:b] for a, b in zip(cuts[::2], cuts[1::2], strict=True))
    free = sorted(free)
    return Region(start, len(data), pieces, tuple(a for a, _ in free), tuple(b for _, b in free))


@dataclass(frozen=True)
class ZipShape:
    """The structural bytes of one checked zip, see the module's docstring.

    ``top`` is the checked file's folder name; ``top_at`` where a sibling's own name is read
    (absolute offset of the first central entry's name). ``regions[0]`` holds ``top_at``.
    """

    file_size: int
    top: bytes
    top_at: int
    regions: tuple[Region, ...]

    def sibling_top(self, fd: int) -> tuple[bytes, bytes] | None:
        """The sibling's folder name and its first region's bytes, if the sibling has this
        shape (every structural byte equal, up to its folder name), else None."""
        if os.fstat(fd).st_size != self.file_size:
            return None
        first = self.regions[0]
        data = _pread(fd, first.size, first.start)
        if data is None:
            return None
        at = self.top_at - first.start
        top = data[at : at + len(self.top)]
        # The full reader's verdicts carry over only if the new name splits, decodes and
        # case-folds like the old one: one folder (no "/"), no NUL, ASCII (the same under the
        # zip's UTF-8 and cp437 name encodings).
        if not top.isascii() or b"/" in top or b"\0" in top:
            return None
        if not same_outside(data, first.expected(top), first.free_starts, first.free_ends):
            return None
        for other in self.regions[1:]:
            got = _pread(fd, other.size, other.start)
            if got is None or not same_outside(
                got, other.expected(top), other.free_starts, other.free_ends
            ):
                return None
        return top, data


def _pread(fd: int, size: int, start: int) -> bytes | None:
    data = os.pread(fd, size, start)
    return data if len(data) == size else None


def same_outside(
    actual: bytes, expected: bytes, free_starts: tuple[int, ...], free_ends: tuple[int, ...]
) -> bool:
    """Whether ``actual`` equals ``expected`` at every byte outside the free intervals.

    Equal buffers cost one comparison; otherwise the differing runs are found by halving (each
    half compared in place, ``startswith`` on a memoryview: no copy) and each differing byte must
    lie in a free interval. More than :data:`MAX_DIFFERENCES` differing runs: False.
    """
    if len(actual) != len(expected):
        return False
    if actual == expected:
        return True
    view = memoryview(expected)
    todo = [(0, len(actual))]
    runs = 0
    while todo:
        lo, hi = todo.pop()
        if actual.startswith(view[lo:hi], lo):
            continue
        if hi - lo > _LEAF:
            mid = (lo + hi) // 2
            todo += [(mid, hi), (lo, mid)]
            continue
        runs += 1
        if runs > MAX_DIFFERENCES:
            return False
        for i in range(lo, hi):
            if actual[i] != expected[i]:
                k = bisect_right(free_starts, i) - 1
                if k < 0 or i >= free_ends[k]:
                    return False
    return True
