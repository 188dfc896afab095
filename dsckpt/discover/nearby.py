"""Checkpoints near a path that holds none: what to suggest when CKPT is one folder too high.

A user often points at a run's output folder (``runs/``, ``output/``) rather than the checkpoint
inside it (``runs/checkpoint-500/``, ``output/step_2000/``). When discovery finds nothing at the
path itself, a short, bounded look below it finds the checkpoints the user probably meant, so the
error can name them instead of only saying what is absent.

The search reads directory listings only (no file is opened), never follows a symbolic link to a
directory (no loops, no wandering onto other disks), skips hidden folders, and stops after a fixed
depth and number of listings, so a huge tree costs a bounded moment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dsckpt.discover.files import match_name
from dsckpt.printable import listed

MAX_DEPTH = 3  # CKPT/run/checkpoint-N/global_stepN: the tag directory of a run folder's run
MAX_LISTINGS = 400  # directories listed at most, whatever the tree holds
SHOWN = 5


@dataclass(frozen=True)
class Found:
    """A checkpoint below the searched folder: a root with ``latest`` or a tag directory."""

    path: Path
    mtime: float


def checkpoints_below(path: Path, max_depth: int = MAX_DEPTH) -> list[Found]:
    """Checkpoints up to ``max_depth`` levels below ``path``, newest first.

    A folder holding ``latest`` (a checkpoint root) or rank files (a tag directory) counts as one
    checkpoint and is not searched further; a root's tag directories are not listed again.
    """
    found: list[Found] = []
    level = [path]
    listings = 0
    for _ in range(max_depth):
        below: list[Path] = []
        for folder in level:
            for child in _subfolders(folder):
                if listings >= MAX_LISTINGS:
                    return _newest_first(found)
                listings += 1
                names = _names(child)
                if names is None:
                    continue
                if "latest" in names or any(match_name(n) is not None for n in names):
                    found.append(Found(child, _mtime(child)))
                else:
                    below.append(child)
        level = below
    return _newest_first(found)


def suggestion(path: Path, found: list[Found]) -> str:
    """The end of the "holds no checkpoint" message: the checkpoints below, or "" if none."""
    if not found:
        return ""
    shown = listed(found, SHOWN, more=" (and {} more)", each=lambda f: f.path)
    noun = "a checkpoint" if len(found) == 1 else f"{len(found)} checkpoints"
    pick = "pass it" if len(found) == 1 else "pass one of them"
    return f"{noun} below it, newest first: {shown}: {pick} as CKPT"


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return sorted(
                Path(e.path)
                for e in entries
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
            )
    except OSError:
        return []  # an unreadable side folder (lost+found) holds nothing to suggest


def _names(folder: Path) -> set[str] | None:
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except OSError:
        return None


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return 0.0


def _natural(path: Path) -> list[object]:
    """checkpoint-10 after checkpoint-9: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _newest_first(found: list[Found]) -> list[Found]:
    # Newest first; equal times (a copied tree) fall back to the highest step number first.
    by_name = sorted(found, key=lambda f: _natural(f.path), reverse=True)
    return sorted(by_name, key=lambda f: -f.mtime)
