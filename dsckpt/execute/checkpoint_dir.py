"""Writing a DeepSpeed save directory (``OUT/<tag>/`` and ``OUT/latest``) from a write plan.

The rank files are planned (:mod:`dsckpt.execute.formats.deepspeed_files`,
:mod:`dsckpt.execute.formats.pipeline_files`) and written by the one executor; the tag
directory's other entries (config copies, notes) are copied here, regular files only, into the
staged tag directory before it is committed. ``--force`` replaces ``latest`` and the tag
directory only: other files in OUT are kept.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsckpt.errors import OutputError
from dsckpt.execute.executor import _copy_bytes, run
from dsckpt.execute.output_guard import refuse_overlap
from dsckpt.plan.fileplan import WritePlan

if TYPE_CHECKING:
    from dsckpt.discover.layout import Layout


@dataclass(frozen=True)
class Written:
    """What :func:`write_tag_directory` wrote besides the plan's files."""

    copied: list[str]  # extra entries copied into the tag directory
    skipped: list[str]  # extra entries not copied, as "name (why)"
    nbytes: int  # bytes of every file in the tag directory


def write_tag_directory(
    plan: WritePlan,
    out: Path,
    tag: str,
    *,
    force: bool,
    progress: Any,
    description: str,
    extras_from: Path,
    extras: Sequence[str],
) -> Written:
    """Write ``plan`` (a :func:`~dsckpt.plan.fileplan.tag_directory_plan`) to ``out``
    atomically, with the regular files among ``extras`` (entries of ``extras_from``) copied into
    the tag directory before the commit.

    Raises:
        OutputError: see :func:`dsckpt.execute.atomic.atomic_entries`.
    """
    if progress is not None:
        progress.start(description, plan.data_nbytes)
    done: list[Written] = []

    def copy_extras(staged: Mapping[str, Path]) -> None:
        copied, skipped = copy_extra_files(extras_from, extras, staged[tag])
        nbytes = sum(p.stat().st_size for p in staged[tag].iterdir())
        done.append(Written(copied, skipped, nbytes))

    run(
        plan,
        out,
        force=force,
        progress=progress.advance if progress is not None else None,
        finish=copy_extras,
        planned=progress.grow if progress is not None else None,
    )
    # One process of several (dsckpt.execute.distributed) wrote its share only: the leader
    # copied the extra files and tells what it committed.
    return done[0] if done else Written([], [], plan.size)


def check_reshape_output(layout: Layout, out: Path, force: bool) -> None:
    """Refuse, before anything is written, an ``out`` that overlaps the checkpoint
    (:func:`dsckpt.output_guard.refuse_overlap`) or is a non-empty directory without force."""
    refuse_overlap(out, root=layout.root, tag_dir=layout.dir, other_tags=layout.other_tags)
    if os.path.lexists(out) and not force and not (out.is_dir() and not any(out.iterdir())):
        raise OutputError(
            f"{out} already exists: pass --force to replace `latest` and the tag "
            "directory in it (other files are kept), or choose another output "
            "directory"
        )


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def copy_extra_files(
    src_dir: Path, names: Iterable[str], dst_dir: Path
) -> tuple[list[str], list[str]]:
    """Copy the tag directory's extra entries that are regular files, and only those.

    Nothing is followed: an entry is judged by ``lstat`` and opened with ``O_NOFOLLOW`` and
    ``O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block), and the opened file must still be
    the regular file judged; so no symlink target (``/etc/passwd``, ``/proc/self/environ``) and
    no device or FIFO content ever reaches the output.

    Returns:
        ``(copied names, skipped entries as "name (why)")``: the caller reports the skipped ones.
    """
    copied, skipped = [], []
    for name in names:
        src = src_dir / name
        try:
            before = os.lstat(src)
        except FileNotFoundError:
            skipped.append(f"{name} (removed while reshaping)")
            continue
        if not stat.S_ISREG(before.st_mode):
            skipped.append(f"{name} ({_kind(before.st_mode)})")
            continue
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            skipped.append(f"{name} (unreadable: {exc.strerror})")
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (
                before.st_dev,
                before.st_ino,
            ):
                skipped.append(f"{name} (changed while reshaping)")
                continue
            out = os.open(
                dst_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
            try:
                _copy_bytes(fd, 0, out, 0, st.st_size)
            finally:
                os.close(out)
        finally:
            os.close(fd)
        copied.append(name)
    return copied, skipped
