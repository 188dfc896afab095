"""Opening input files safely: regular files only, never blocking, one line per failure.

The one way dsckpt opens a file it reads (checkpoint files, ``latest``, rule files): a FIFO,
device, socket or directory named like a rank file is refused before it is opened (opening some
devices acts on them) and again on the open descriptor, so a file swapped in between is caught.
Every file-system error becomes one :class:`~dsckpt.errors.UnreadableFile` line naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from dsckpt.errors import UnreadableFile

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: "a directory", "a FIFO (named pipe)", ..."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _not_regular(path: Path, mode: int) -> UnreadableFile:
    return UnreadableFile(
        path,
        f"is {file_kind(mode)}, not a regular file",
        "a checkpoint file must be a regular file (copy the real file in its place)",
    )


def os_error(path: Path, exc: OSError, doing: str = "read") -> UnreadableFile:
    """One line for a file-system error on ``path`` (an input dsckpt needs to ``doing``)."""
    code = exc.errno
    if code == errno.ENOENT and os.path.islink(path):
        target = os.readlink(path)
        return UnreadableFile(
            path,
            f"is a dangling symbolic link (to {target}, which does not exist)",
            "restore the file it points to or remove the link",
        )
    if code == errno.ELOOP:
        return UnreadableFile(
            path,
            "is a symbolic link loop (or a chain of links too long to follow)",
            "point the link at the real file",
        )
    if code in (errno.EACCES, errno.EPERM):
        return UnreadableFile(
            path, f"cannot be {doing}: permission denied", "check its permissions and owner"
        )
    reason = exc.strerror or type(exc).__name__
    return UnreadableFile(path, f"cannot be {doing}: {reason}", "check the path and the disk")


def regular_file_stat(path: Path) -> os.stat_result:
    """``stat`` of a path that must be a regular file (following links), or UnreadableFile."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(path, exc, "examined") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st


def open_regular(path: Path, follow_symlinks: bool = True) -> int:
    """Open a regular file for reading without blocking; the caller closes the descriptor.

    A FIFO, device, socket or directory is refused before it is opened (opening some devices
    acts on them) and again on the open descriptor: a file swapped between the two is caught.
    ``O_NONBLOCK`` keeps a FIFO swapped in at the last moment from blocking the open.

    Raises:
        UnreadableFile: not a regular file, a link when ``follow_symlinks`` is False, a dangling
            link or loop, or the system refuses to open it.
    """
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        raise os_error(path, exc) from exc
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise os_error(path, exc) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_head(path: Path, limit: int, follow_symlinks: bool = True) -> bytes:
    """At most ``limit`` bytes from the start of a regular file."""
    fd = open_regular(path, follow_symlinks)
    try:
        return os.pread(fd, limit, 0)
    except OSError as exc:
        raise os_error(path, exc) from exc
    finally:
        os.close(fd)
