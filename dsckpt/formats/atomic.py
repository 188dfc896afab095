"""Atomic outputs: written under a temporary name beside the destination, renamed when complete.

An existing destination is refused unless ``force``; any failure (an exception, Ctrl-C, SIGTERM,
a full disk) removes the temporary file or directory, so nothing that looks complete is left
behind. Only a SIGKILL can leave a temporary behind; its name says what it is.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsckpt.errors import OutputError

TMP_MARK = ".dsckpt-tmp-"


def temporary_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{TMP_MARK}{os.getpid()}")


@contextmanager
def atomic_output(dest: Path, *, force: bool, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` when the block succeeds."""
    if dest.exists() and not force:
        raise OutputError(f"{dest} exists: pass --force to overwrite it")
    if dest.exists() and dest.is_dir() != is_dir:
        kind = "a directory" if dest.is_dir() else "a file"
        raise OutputError(f"{dest} exists and is {kind}: remove it or choose another OUT")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(dest)
    _remove(tmp)
    try:
        with _sigterm_as_interrupt():
            yield tmp
            _commit(tmp, dest, is_dir)
    except BaseException:
        _remove(tmp)
        raise


def _commit(tmp: Path, dest: Path, is_dir: bool) -> None:
    if not is_dir or not dest.exists():
        os.replace(tmp, dest)  # atomic for files, also over an existing one
        return
    # A directory cannot be replaced atomically: move the old one aside first, drop it after.
    old = dest.with_name(f".{dest.name}.dsckpt-old-{os.getpid()}")
    os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    for sidecar in path.parent.glob(path.name + ".*"):
        sidecar.unlink(missing_ok=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while writing, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reserve(fd: int, path: Path, nbytes: int) -> None:
    """Allocate the file's blocks now, so a full disk fails before any data is copied."""
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise OutputError(
                f"no space left on the device for {path.name}: it needs "
                f"{nbytes / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free; "
                "free space or choose another OUT"
            ) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, nbytes)  # a filesystem without fallocate: a sparse file will do
