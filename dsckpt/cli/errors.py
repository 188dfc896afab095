"""The CLI's last-resort net: what escapes the core, said in one line.

The core raises :class:`~dsckpt.errors.DsckptError` for everything it foresees. What is left is
the operating system refusing something (a file unreadable, a device failing, a path too long)
and the interpreter giving up on a hostile file (memory, recursion). None of these is a bug of
dsckpt that a traceback would help with, so each becomes one line: the path, what the system
said, what to do.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_DEBUG_HINT = "DSCKPT_DEBUG=1 shows the traceback"

# errno -> what to do; the system's own words (strerror) say what happened.
_ADVICE = {
    errno.EACCES: "check the permissions: read access to the checkpoint, write access to OUT",
    errno.EPERM: "check the permissions: read access to the checkpoint, write access to OUT",
    errno.EROFS: "the file system is read-only: choose an OUT on a writable one",
    errno.ENAMETOOLONG: "use a shorter path or file name",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "a directory stands where a file is expected: check the path",
    errno.ELOOP: "the path has a symbolic link loop: fix or remove the link",
    errno.ENOENT: "the path does not exist (or was removed while dsckpt ran): check it",
    errno.EIO: "the device reported a read or write failure: check the disk, or copy the "
    "checkpoint again from where the run saved it",
    errno.ENOSPC: "free some space or choose an OUT on another file system",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another OUT",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on the system: close some programs and try again",
    errno.EXDEV: "OUT and its temporary name are on different file systems: choose another OUT",
    errno.ENXIO: "the path is a device or socket, not a file: check the path",
    errno.ETXTBSY: "the file is busy: try again when it is free",
}


def os_error_line(exc: OSError) -> str:
    """``<path>: <strerror>: <what to do>`` for any OSError."""
    what = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = f"{' -> '.join(paths)}: " if paths else ""
    advice = _ADVICE.get(exc.errno or 0, f"check the path and the file system ({_DEBUG_HINT})")
    return f"{where}{what}: {advice}"


def memory_error_line() -> str:
    return (
        "out of memory while reading the checkpoint: a file may be damaged or crafted to "
        "exhaust memory; run `dsckpt inspect` on it, or retry on a machine with more memory "
        f"({_DEBUG_HINT})"
    )


def recursion_error_line() -> str:
    return (
        "a checkpoint file nests its data too deeply to read: it is damaged or crafted; copy it "
        f"again from where the run saved it ({_DEBUG_HINT})"
    )


class Interrupted(Exception):
    """Ctrl-C, with a message that says truly what was and was not written."""


@contextmanager
def reporting_interrupt(out: Path | None) -> Iterator[None]:
    """Turn Ctrl-C inside a command that writes ``out`` into a message that is true.

    Outputs are staged under temporary names and committed by rename, and the temporaries are
    removed on any exception, so OUT either is as it was or was committed before the interrupt
    landed. Comparing OUT before and after tells which.
    """
    before = _snapshot(out) if out is not None else None
    try:
        yield
    except KeyboardInterrupt:
        if out is None or _snapshot(out) == before:
            raise Interrupted("interrupted: nothing was written") from None
        raise Interrupted(
            f"interrupted: {out} had already been (partly) written when the interrupt came: "
            "check it, or run the command again with --force"
        ) from None


def _snapshot(path: Path) -> object:
    """What identifies ``path``'s content without reading it: inode, size and mtime, and for a
    directory, those of its entries (the directory's own mtime moves with temporary files)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return (st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        with os.scandir(path) as entries:
            listing = sorted(
                (e.name, e.inode(), e.stat(follow_symlinks=False).st_mtime_ns) for e in entries
            )
    except OSError:
        return (st.st_ino, "unreadable")
    return (st.st_ino, tuple(listing))
