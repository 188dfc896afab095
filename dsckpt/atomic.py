"""Atomic output: a file or directory appears at its destination complete, or not at all.

Everything is written under a hidden temporary name beside the destination (same directory,
hence same filesystem), then renamed into place::

    with atomic_output(Path("out.safetensors"), force=args.force, nbytes=plan_bytes) as tmp:
        write_everything_to(tmp)
    # out.safetensors now exists, complete and fsync'ed

Guarantees and limits:

* On success the data is fsync'ed before the rename and the directory after it, so a crash
  never leaves a destination that looks complete but is not.
* On any exception, including ``KeyboardInterrupt``, the temporary is removed and the
  exception propagates. ``ENOSPC``/``EDQUOT`` become a one-line :class:`OutputError`.
* ``SIGTERM`` (while the context runs in the main thread) is turned into ``SystemExit(143)``
  so the same cleanup runs.
* ``SIGKILL``, a power cut or a kernel panic cannot be intercepted: they can leave a temporary
  named ``.<dest name>.dsckpt-tmp-<pid>-<random>`` (or ``.dsckpt-old-`` for a directory being
  replaced) beside the destination, never a file at the destination itself.
  :func:`stale_temporaries` lists the ones whose process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from dsckpt.errors import OutputError

__all__ = [
    "TMP_MARKER",
    "atomic_output",
    "check_disk_space",
    "format_bytes",
    "preallocate",
    "stale_temporaries",
]

TMP_MARKER = ".dsckpt-tmp-"
OLD_MARKER = ".dsckpt-old-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_SIGTERM_EXIT = 128 + signal.SIGTERM


def format_bytes(n: int) -> str:
    """``28000000000`` -> ``"28000000000 bytes (28.0 GB)"``: exact, and readable at a glance."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= factor:
            return f"{n} bytes ({n / factor:.1f} {unit})"
    return f"{n} bytes"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_ancestor(path)).free


def check_disk_space(dest: os.PathLike[str] | str, nbytes: int) -> None:
    """Refuse up front when the filesystem that will hold ``dest`` has less than ``nbytes`` free.

    ``dest`` may be the output file or directory, existing or not (its nearest existing
    ancestor is measured). With ``--force`` the old output is only removed after the new one
    is complete, so the full ``nbytes`` must be free regardless.

    Raises:
        OutputError: not enough free space.
    """
    free = _free_bytes(Path(dest))
    if nbytes > free:
        raise OutputError(
            f"not enough free space to write {dest}: need {format_bytes(nbytes)}, "
            f"{format_bytes(free)} free: free some space or choose another output path"
        )


_fallocate_fn: object = None  # None: not looked up yet; False: unavailable


def _libc() -> ctypes.CDLL:
    # The process's own symbols include libc's (ctypes.util.find_library would spawn ldconfig).
    return ctypes.CDLL(None, use_errno=True)


def _libc_fallocate():  # type: ignore[no-untyped-def]
    global _fallocate_fn
    if _fallocate_fn is None:
        _fallocate_fn = False
        with contextlib.suppress(OSError, AttributeError, TypeError):
            fn = _libc().fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _fallocate_fn = fn
    return _fallocate_fn or None


def preallocate(fd: int, nbytes: int) -> bool:
    """Size an open file to ``nbytes`` and reserve its blocks when the filesystem can.

    Reserving blocks (Linux ``fallocate``) makes a full disk fail here, with ``ENOSPC``,
    before any tensor is written, instead of hours later. Where ``fallocate`` is not supported
    the file is just extended (sparse); glibc's slow zero-writing emulation
    (``posix_fallocate``) is deliberately avoided.

    Returns:
        True if the blocks were reserved, False if the file is only sparse.

    Raises:
        OSError: ``ENOSPC``/``EDQUOT`` and other real errors.
    """
    os.ftruncate(fd, nbytes)
    fn = _libc_fallocate()
    if nbytes == 0 or fn is None:
        return False
    while True:
        if fn(fd, 0, 0, nbytes) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise OSError(err, os.strerror(err))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if not path.is_dir():
        _fsync_path(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync_path(Path(root, name))
        _fsync_path(Path(root))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        fn = _libc().renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        at_fdcwd = -100
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return True
    return False


def _temp_name(dest: Path, marker: str) -> Path:
    # Keep the name under the usual 255-byte limit however long the destination name is.
    return dest.with_name(f".{dest.name[:200]}{marker}{os.getpid()}-{secrets.token_hex(4)}")


def _no_space_error(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _NO_SPACE:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _refuse_existing(dest: Path, *, force: bool, is_dir: bool) -> None:
    if not (dest.exists() or dest.is_symlink()):
        return
    if not force:
        raise OutputError(f"{dest} exists: pass --force to overwrite")
    if dest.is_dir() and not dest.is_symlink() and not is_dir:
        raise OutputError(
            f"{dest} is a directory and the output is a single file: remove it or choose "
            "another output path (--force does not replace a directory with a file)"
        )
    if is_dir and not dest.is_dir():
        raise OutputError(
            f"{dest} is a file and the output is a directory: remove it or choose another "
            "output path (--force does not replace a file with a directory)"
        )


class _SigtermGuard:
    """Turn SIGTERM into SystemExit(143) while active, so the ``except`` cleanup runs.

    While deferred (during cleanup or the final renames) a SIGTERM is only recorded, so it
    cannot cut a rename pair in half; :meth:`resume` raises it afterwards. Installing a
    handler is only possible in the main thread (Python delivers signals there); elsewhere
    the guard does nothing.
    """

    def __init__(self) -> None:
        self._previous: object = None
        self._installed = False
        self._deferred = False
        self._pending = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._deferred:
            self._pending = True
            return
        self._deferred = True  # a second SIGTERM must not interrupt the cleanup
        raise SystemExit(_SIGTERM_EXIT)

    def __enter__(self) -> _SigtermGuard:
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                self._previous = signal.signal(signal.SIGTERM, self._handler)
                self._installed = True
        return self

    def defer(self) -> None:
        self._deferred = True

    def resume(self) -> None:
        """Leave deferred mode, raising a SIGTERM that arrived meanwhile."""
        self._deferred = False
        if self._pending:
            self._pending = False
            self._deferred = True
            raise SystemExit(_SIGTERM_EXIT)

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]


@contextlib.contextmanager
def atomic_output(
    dest: os.PathLike[str] | str,
    *,
    force: bool = False,
    is_dir: bool = False,
    nbytes: int | None = None,
    durable: bool = True,
) -> Iterator[Path]:
    """Write to a temporary beside ``dest`` and rename it into place on success.

    Args:
        dest: the output file, or directory when ``is_dir``. Missing parents are created.
        force: replace an existing ``dest`` (a file atomically; a directory by an atomic swap
            where Linux supports it, else by moving the old one aside first). Without it an
            existing ``dest`` is refused before anything is written.
        is_dir: the output is a directory; the yielded temporary directory is created.
        nbytes: the expected output size, used in the out-of-space message.
        durable: fsync the output before the rename and its directory after.

    Yields:
        The temporary path to write to (for a file: not yet created).

    Raises:
        OutputError: ``dest`` exists without ``force``, is of the other kind (file vs
            directory), or the device ran out of space (ENOSPC/EDQUOT).
    """
    dest = Path(dest)
    _refuse_existing(dest, force=force, is_dir=is_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest, TMP_MARKER)
    with _SigtermGuard() as guard:
        try:
            if is_dir:
                tmp.mkdir()
            yield tmp
            if not (tmp.exists() or tmp.is_symlink()):
                raise RuntimeError(f"nothing was written to the temporary output {tmp}")
            if durable:
                _fsync_tree(tmp)
            _refuse_existing(dest, force=force, is_dir=is_dir)  # it may have appeared since
            guard.defer()
            _commit(tmp, dest, is_dir=is_dir)
            if durable:
                _fsync_path(dest.parent)
        except BaseException as exc:
            guard.defer()
            _remove(tmp)
            no_space = _no_space_error(exc)
            if no_space is not None:
                need = f"need {format_bytes(nbytes)}" if nbytes is not None else "need more"
                raise OutputError(
                    f"no space left on device writing {dest}: {need}, "
                    f"{format_bytes(_free_bytes(dest.parent))} free"
                ) from exc
            raise
        guard.resume()  # complete and in place; now honour a SIGTERM that came during commit


def _commit(tmp: Path, dest: Path, *, is_dir: bool) -> None:
    exists = dest.exists() or dest.is_symlink()
    if not is_dir or not exists:
        os.replace(tmp, dest)  # atomic for files; for a new directory a plain rename
        return
    # Replace a directory: swap atomically if possible, then delete the old tree.
    if _exchange(tmp, dest):
        _remove(tmp)
        return
    old = _temp_name(dest, OLD_MARKER)
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


_TEMP_RE = re.compile(r"^\..*(?:\.dsckpt-tmp-|\.dsckpt-old-)(\d+)-[0-9a-f]{8}$")


def stale_temporaries(directory: os.PathLike[str] | str) -> list[Path]:
    """Temporaries left in ``directory`` by dsckpt processes that no longer run (e.g. SIGKILL).

    Safe to delete. Temporaries of running processes (this one included) are not listed.
    """
    out = []
    for entry in sorted(Path(directory).iterdir()):
        m = _TEMP_RE.match(entry.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            out.append(entry)
        except PermissionError:  # alive, someone else's
            pass
    return out
