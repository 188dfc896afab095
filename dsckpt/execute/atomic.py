"""Atomic output: a file or directory appears at its destination complete, or not at all.

Everything is written under a hidden temporary name beside the destination (same directory,
hence same filesystem), then renamed into place::

    with atomic_output(Path("out.safetensors"), force=args.force, nbytes=plan_bytes) as tmp:
        write_everything_to(tmp)
    # out.safetensors now exists, complete and fsync'ed

Guarantees and limits:

* On success the data is fsync'ed before the rename and the directory after it, so a crash
  never leaves a destination that looks complete but is not.
* On any exception, including ``KeyboardInterrupt``, the temporary (and any parent directory
  created for it) is removed and the exception propagates; a clean-up that fails never replaces
  it. File-system errors on the write path (``ENOSPC``/``EDQUOT``, ``EACCES``/``EPERM``,
  ``EROFS``, ``ENAMETOOLONG``, ``ENOTDIR``, ``ENOENT``, ``EISDIR``, ...) become a one-line
  :class:`OutputError` naming the path and what to do: this module is the one place that maps
  them.
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
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from dsckpt.errors import OutputError
from dsckpt.sizes import exact_bytes

__all__ = [
    "TMP_MARKER",
    "atomic_entries",
    "atomic_output",
    "check_disk_space",
    "preallocate",
    "stale_temporaries",
]

TMP_MARKER = ".dsckpt-tmp-"
OLD_MARKER = ".dsckpt-old-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_SIGTERM_EXIT = 128 + signal.SIGTERM


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
            f"not enough free space to write {dest}: need {exact_bytes(nbytes)}, "
            f"{exact_bytes(free)} free: free some space or choose another output path"
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


def _clear_stale(dest: Path) -> None:
    """Remove temporaries of ``dest`` left by a dsckpt process that is gone (killed, or a lost
    leader of a multi-process run): the next run to write ``dest`` cleans up after it. Only
    dsckpt's own temporary names of this very destination are touched, and never the
    ``.dsckpt-old-`` copy of an earlier output set aside during a commit."""
    pattern = re.compile(re.escape(f".{dest.name[:200]}{TMP_MARKER}") + r"(\d+)-[0-9a-f]{8}")
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return  # no directory yet: nothing to clear
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is not None and not _running(int(m.group(1))):
            _remove(Path(entry.path))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive, someone else's (or not a pid this system can have: leave it)
    return True


_ADVICE = {
    errno.EACCES: "permission denied: choose a directory you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a directory you can write to",
    errno.EROFS: "the file system is read-only: choose an output path on a writable one",
    errno.ENAMETOOLONG: "a name in the path is too long: choose a shorter output path",
    errno.ENOTDIR: "a parent of the output path is a file, not a directory: choose another path",
    errno.ENOENT: "a parent directory of the output is missing (removed while writing?): "
    "choose an existing location",
    errno.EISDIR: "a directory is in the way: remove it or choose another output path",
    errno.EEXIST: "something appeared at the output path meanwhile: choose another output path",
    errno.ELOOP: "too many symbolic links in the output path: choose another path",
    errno.EMLINK: "the directory holds too many entries: choose another output path",
    errno.EIO: "the device reported an I/O error: check it, or choose another output path",
    errno.EFBIG: "the file is too large for this file system: choose another output path",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _touches(filename: object, dest: Path, staged: Iterable[Path]) -> bool:
    """Whether an OSError's path is on the output side: ``dest``, a temporary, or an ancestor
    or descendant of either (source files being read are not)."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    path = Path(os.fsdecode(filename)).absolute()
    for ref in (dest, *staged):
        ref = ref.absolute()
        if path == ref or path in ref.parents or ref in path.parents:
            return True
    return False


def output_error(
    exc: BaseException, dest: Path, staged: Iterable[Path] = (), nbytes: int | None = None
) -> OutputError | None:
    """The one-line :class:`OutputError` for a file-system error writing ``dest``, or None when
    ``exc`` is not one (an error reading the input, say, keeps its own type).

    ``staged`` are the temporaries being written for ``dest``: errors naming them count too.
    """
    staged = list(staged)
    for cur in _chain(exc):
        if isinstance(cur, OutputError):
            return None  # already one line
        if not isinstance(cur, OSError) or cur.errno is None:
            continue
        if cur.errno in _NO_SPACE:
            need = f"need {exact_bytes(nbytes)}" if nbytes is not None else "need more"
            try:
                free = f"{exact_bytes(_free_bytes(dest.parent))} free"
            except OSError:
                free = "free space unknown"
            return OutputError(f"no space left on device writing {dest}: {need}, {free}")
        on_output = _touches(cur.filename, dest, staged) or _touches(cur.filename2, dest, staged)
        # Errors without a path (a pwrite on an output descriptor) that only a write can give.
        if on_output or (cur.filename is None and cur.errno in (errno.EROFS, errno.EFBIG)):
            where = os.fsdecode(cur.filename) if cur.filename is not None else str(dest)
            advice = _ADVICE.get(cur.errno, "choose another output path")
            reason = cur.strerror or os.strerror(cur.errno)
            return OutputError(f"cannot write {dest}: {reason} ({where}): {advice}")
    return None


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories created, outermost first."""
    missing = []
    cur = directory.absolute()
    while not cur.exists() and cur != cur.parent:
        missing.append(cur)
        cur = cur.parent
    missing.reverse()
    for d in missing:
        d.mkdir(exist_ok=True)
    return missing


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):  # only if still empty: never remove what someone else put there
        with contextlib.suppress(OSError):
            d.rmdir()


def _cleanup(paths: Iterable[Path], exc: BaseException) -> None:
    """Remove temporaries after a failure; a removal that fails is noted on ``exc`` (the first
    error stays the one raised)."""
    for path in paths:
        try:
            _remove(path)
        except OSError as cleanup_exc:
            exc.add_note(
                f"dsckpt could not remove its temporary {path}: {cleanup_exc}; delete it by hand"
            )


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
            directory), or a file-system error on the write path (no space, permission
            denied, read-only, name too long, a parent that is a file...).
    """
    dest = Path(dest)
    tmp = _temp_name(dest, TMP_MARKER)
    try:
        _refuse_existing(dest, force=force, is_dir=is_dir)
        _clear_stale(dest)
        created = _make_parents(dest.parent)
    except OSError as exc:
        mapped = output_error(exc, dest, (tmp,), nbytes)
        if mapped is not None:
            raise mapped from exc
        raise
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
            _cleanup([tmp], exc)
            _remove_created(created)
            mapped = output_error(exc, dest, (tmp,), nbytes)
            if mapped is not None:
                raise mapped from exc
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


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _check_entries(
    directory: Path,
    names: Sequence[str],
    dirs: Collection[str],
    *,
    force: bool,
    per_entry: bool = False,
) -> None:
    if os.path.lexists(directory) and not directory.is_dir():
        raise OutputError(
            f"{directory} is a file and the output is a directory: remove it or "
            "choose another output path (--force does not replace a file with a "
            "directory)"
        )
    if not directory.is_dir() or (not per_entry and _is_empty_dir(directory)):
        return  # a new or empty directory needs no --force
    if not force and not per_entry:
        raise OutputError(
            f"{directory} exists and is not empty: pass --force to write dsckpt's "
            "files into it (files it does not write are kept), or choose another "
            "output path"
        )
    for name in names:
        path = directory / name
        if not os.path.lexists(path):
            continue
        if not force:  # per_entry: only the entries written need --force
            raise OutputError(f"{path} exists: pass --force to overwrite")
        is_dir = path.is_dir() and not path.is_symlink()
        if name in dirs and not is_dir:
            raise OutputError(
                f"{path} is a file and dsckpt writes a directory there: remove it "
                "or choose another output path"
            )
        if name not in dirs and is_dir:
            raise OutputError(
                f"{path} is a directory and dsckpt writes a file there: remove it "
                "or choose another output path"
            )


@contextlib.contextmanager
def atomic_entries(
    directory: os.PathLike[str] | str,
    names: Sequence[str],
    *,
    force: bool = False,
    dirs: Collection[str] = (),
    withdraw: Collection[str] = (),
    stale: Callable[[str], bool] | None = None,
    nbytes: int | None = None,
    durable: bool = True,
    per_entry: bool = False,
) -> Iterator[dict[str, Path]]:
    """Write some entries of a directory that may hold other files, which are kept.

    Each entry is staged under a hidden temporary name inside ``directory`` (same filesystem),
    then, once all are complete, renamed into place in the order of ``names``: the last one is
    the commit point (an index, ``latest``). Example::

        with atomic_entries(out, ["model-00001-of-00002.safetensors", ...,
                                  "model.safetensors.index.json"], force=True) as paths:
            write each name to paths[name]

    Guarantees:

    * Nothing outside ``names`` (and ``withdraw``/``stale`` entries, below) is ever touched.
    * Every name, at every instant, is either absent or a complete file (old or new): each is
      replaced by one ``rename``; a directory entry by an atomic swap where Linux supports it.
    * ``withdraw`` entries (old entry points, e.g. the previous index) are moved aside before
      the first rename and deleted after the last, so a crash in between never leaves an old
      entry point naming a mixture of old and new files.
    * After the commit, regular files (never directories or symlinks' targets) for which
      ``stale(name)`` is true and that are not in ``names`` are deleted: the previous output's
      leftovers, e.g. shards the new index no longer lists.
    * On an exception everything staged is removed (and a ``directory`` created for the call);
      withdrawn entries are put back if no entry was replaced yet.

    Args:
        directory: the output directory; created (with parents) if missing. An existing
            non-empty one needs ``force``; an empty one does not.
        names: the entries to write, in commit order.
        force: write into an existing non-empty directory.
        dirs: which of ``names`` are directories (created empty for the caller).
        withdraw: existing entries to move out of the way before the first rename.
        stale: which other file names are the caller's own naming, deleted when not rewritten.
        nbytes: the expected output size, for the out-of-space message.
        durable: fsync the staged entries before the renames and the directory after.
        per_entry: the entries are files the caller named beside others (a weights file and
            its optimizer file): ``force`` is needed only for entries that exist, not for a
            non-empty directory.

    Yields:
        ``{name: temporary path to write}``.

    Raises:
        OutputError: refused up front (not empty without force, a file where a directory goes
            or the reverse), or a file-system error on the write path.
    """
    directory = Path(directory)
    for name in names:  # a name from a checkpoint (the tag) must never lead outside directory
        if name in ("", ".", "..") or "/" in name or "\0" in name or os.sep in name:
            raise OutputError(
                f"{name!r} cannot be an entry of {directory}: it is not a single file name"
            )
    staged = {name: _temp_name(directory / name, TMP_MARKER) for name in names}
    try:
        _check_entries(directory, names, dirs, force=force, per_entry=per_entry)
        for name in names:
            _clear_stale(directory / name)
        created = _make_parents(directory)
    except OSError as exc:
        mapped = output_error(exc, directory, staged.values(), nbytes)
        if mapped is not None:
            raise mapped from exc
        raise
    aside: dict[Path, Path] = {}
    replaced = False
    with _SigtermGuard() as guard:
        try:
            for name in dirs:
                staged[name].mkdir()
            yield dict(staged)
            for tmp in staged.values():
                if not os.path.lexists(tmp):
                    raise RuntimeError(f"nothing was written to the temporary output {tmp}")
                if durable:
                    _fsync_tree(tmp)
            # kinds may have changed since (and, per entry, an entry may have appeared)
            _check_entries(
                directory, names, dirs, force=force or not per_entry, per_entry=per_entry
            )
            guard.defer()
            for name in withdraw:
                path = directory / name
                if os.path.lexists(path):
                    aside[path] = _temp_name(path, OLD_MARKER)
                    os.rename(path, aside[path])
            for name, tmp in staged.items():
                replaced = True
                _commit(tmp, directory / name, is_dir=name in dirs)
            for old in aside.values():
                _remove(old)
            if stale is not None:
                _remove_stale(directory, set(names), stale)
            if durable:
                _fsync_path(directory)
        except BaseException as exc:
            guard.defer()
            _cleanup(staged.values(), exc)
            if not replaced:
                for path, old in aside.items():
                    with contextlib.suppress(OSError):
                        os.rename(old, path)
            else:
                _cleanup(aside.values(), exc)
            _remove_created(created)
            mapped = output_error(exc, directory, [*staged.values(), *aside.values()], nbytes)
            if mapped is not None:
                raise mapped from exc
            raise
        guard.resume()


def _remove_stale(directory: Path, keep: set[str], stale: Callable[[str], bool]) -> None:
    with os.scandir(directory) as it:
        leftovers = [
            e
            for e in it
            if e.name not in keep and stale(e.name) and e.is_file(follow_symlinks=False)
        ]
    for entry in leftovers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)


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
        if pid != os.getpid() and not _running(pid):
            out.append(entry)
    return out
