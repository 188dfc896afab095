"""Where a writing command may put its output: one policy for ``to-fp32`` and ``reshape``.

dsckpt never writes into what it reads. Before anything is written, OUT is compared with the
checkpoint by *resolved* paths (symlinks, ``..`` and relative spellings all followed), both as
OUT itself and as the directory entry OUT names (a symlink at OUT is replaced, not followed):

* OUT equal to the checkpoint's root or tag directory, or containing either: refused (a
  ``--force`` would replace or fill the checkpoint itself);
* OUT inside the tag directory: refused (the rank files live there);
* OUT equal to, or containing, a file that is read (``latest``, any entry of the tag
  directory, wherever a symlink there points), or another tag directory of the same root:
  refused;
* anything else inside the root is allowed: ``checkpoint-N/model.safetensors`` beside
  ``checkpoint-N/global_stepN/`` is how Hugging Face Trainer users consolidate (DeepSpeed's own
  ``zero_to_fp32.py`` documents it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dsckpt.errors import OutputError

__all__ = ["refuse_overlap"]


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _entry(path: Path) -> Path:
    """The resolved directory entry ``path`` names: its parent resolved, its name kept, so a
    symlink at ``path`` itself is not followed."""
    if path.name in ("", ".", ".."):
        return _real(path)
    return _real(path.absolute().parent) / path.name


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _read_paths(root: Path, tag_dir: Path) -> list[Path]:
    """Every file a command may read, as the entry and where it points."""
    paths = []
    latest = root / "latest"
    if root != tag_dir and os.path.lexists(latest):
        paths += [_entry(latest), _real(latest)]
    try:
        entries = list(os.scandir(tag_dir))
    except OSError:
        entries = []
    for entry in entries:
        paths += [_entry(Path(entry.path)), _real(Path(entry.path))]
    return paths


def refuse_overlap(
    out: os.PathLike[str] | str, *, root: Path, tag_dir: Path, other_tags: Iterable[str] = ()
) -> None:
    """Refuse an ``out`` that would write into, over or around the checkpoint being read.

    Args:
        out: the output path as the user gave it.
        root: the checkpoint directory given (the one holding ``latest``, or the tag directory
            itself when that was given).
        tag_dir: the tag directory the rank files are read from.
        other_tags: names of the root's other tag directories (never written into either).

    Raises:
        OutputError: one line naming OUT, what it collides with, and what to do.
    """
    out = Path(out)
    real_root, real_tag = _real(root), _real(tag_dir)
    targets = {_entry(out), _real(out)}
    fix = "choose an output path outside the checkpoint"
    for target in targets:
        for what, path in (("the checkpoint", real_root), ("its tag directory", real_tag)):
            if target == path:
                raise OutputError(f"{out} is {what} being read ({path}): {fix}")
            if target in path.parents:
                raise OutputError(f"{out} contains {what} being read ({path}): {fix}")
        for path in _read_paths(root, tag_dir):
            if _within(path, target):
                raise OutputError(f"{out} would replace {path}, which this command reads: {fix}")
        if _within(target, real_tag):
            raise OutputError(
                f"{out} is inside the tag directory being read ({real_tag}): {fix} "
                f"(beside it in {real_root} is fine)"
                if real_root != real_tag
                else f"{out} is inside the checkpoint being read ({real_tag}): {fix}"
            )
        for other in other_tags:
            other_dir = _real(root / other)
            if _within(other_dir, target) or _within(target, other_dir):
                raise OutputError(
                    f"{out} would write over tag directory {other} of the checkpoint "
                    f"({other_dir}): {fix}"
                )
