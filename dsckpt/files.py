"""Finding a checkpoint on disk and classifying its files by name (no file is opened here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from dsckpt.errors import CheckpointNotFound


class Role(str, Enum):
    MODEL = "model_states"  # mp_rank_MM_model_states.pt
    ZERO3_MODEL = "zero3_model_states"  # zero_pp_rank_D_mp_rank_MM_model_states.pt
    OPTIM = "optim_states"  # [bf16_|fp16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt
    LAYER = "layer"  # layer_LL-model_TT-model_states.pt


@dataclass(frozen=True)
class RankFile:
    """One checkpoint file and the rank coordinates its name encodes."""

    name: str
    role: Role
    size: int
    mp: int | None = None  # model-parallel rank: stage * tp + tp_rank
    dp: int | None = None  # data-parallel rank ("pp" in DeepSpeed's names is the DP rank)
    layer: int | None = None
    tp: int | None = None
    prefix: str = ""  # "", "bf16_" or "fp16_" on optimizer files


_PATTERNS: list[tuple[Role, re.Pattern[str]]] = [
    (Role.MODEL, re.compile(r"^mp_rank_(?P<mp>\d+)_model_states\.pt$")),
    (
        Role.ZERO3_MODEL,
        re.compile(r"^zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt$"),
    ),
    (
        Role.OPTIM,
        re.compile(
            r"^(?P<prefix>bf16_|fp16_)?zero_pp_rank_(?P<dp>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$"
        ),
    ),
    (Role.LAYER, re.compile(r"^layer_(?P<layer>\d+)-model_(?P<tp>\d+)-model_states\.pt$")),
]


def classify(path: Path) -> RankFile | None:
    """The RankFile a file name describes, or None for a name DeepSpeed does not write."""
    for role, pattern in _PATTERNS:
        found = pattern.match(path.name)
        if found:
            groups = {k: v for k, v in found.groupdict().items() if v is not None}
            prefix = groups.pop("prefix", "")
            coords = {k: int(v) for k, v in groups.items()}
            return RankFile(
                name=path.name, role=role, size=path.stat().st_size, prefix=prefix, **coords
            )
    return None


@dataclass(frozen=True)
class Location:
    """Where a checkpoint's files are: the root given, the tag and the tag directory."""

    root: Path
    tag: str | None
    dir: Path
    other_tags: tuple[str, ...] = field(default_factory=tuple)
    universal: bool = False


def _looks_like_tag_dir(path: Path) -> bool:
    return path.is_dir() and (
        any(classify(p) is not None for p in path.iterdir() if p.is_file())
        or (path / "zero").is_dir()
    )


def locate(path: Path, tag: str | None = None) -> Location:
    """Resolve a checkpoint root (with ``latest``), a root plus tag, or a tag directory.

    Raises:
        CheckpointNotFound: with a message saying what was found instead and what to pass.
    """
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist: pass the directory the run saved into")
    if not path.is_dir():
        raise CheckpointNotFound(
            f"{path} is a file: pass the checkpoint directory (the one holding `latest`) "
            "or a tag directory such as global_step100/"
        )
    tags = sorted(p.name for p in path.iterdir() if _looks_like_tag_dir(p))
    if tag is not None:
        tag_dir = path / tag
        if not tag_dir.is_dir():
            raise CheckpointNotFound(f"{path} has no tag {tag!r}: tags present: {_list(tags)}")
        return _location(path, tag, tag_dir, tags)
    latest = path / "latest"
    if latest.is_file():
        named = latest.read_text().strip()
        if not (path / named).is_dir():
            raise CheckpointNotFound(
                f"{latest} names tag {named!r} but {path / named} does not exist "
                f"(tags present: {_list(tags)}): pass --tag to pick one"
            )
        return _location(path, named, path / named, tags)
    if _looks_like_tag_dir(path):
        return _location(path, None, path, ())
    if len(tags) == 1:
        return _location(path, tags[0], path / tags[0], tags)
    if tags:
        raise CheckpointNotFound(
            f"{path} holds several tags and no `latest` file: {_list(tags)}: pass --tag to pick one"
        )
    if not any(path.iterdir()):
        raise CheckpointNotFound(f"{path} is empty: pass the directory the run saved into")
    raise CheckpointNotFound(
        f"{path} holds no DeepSpeed checkpoint files (no `latest`, no *_model_states.pt, "
        "no tag directories): pass the directory `engine.save_checkpoint` wrote"
    )


def _location(
    root: Path, tag: str | None, tag_dir: Path, tags: list[str] | tuple[str, ...]
) -> Location:
    others = tuple(t for t in tags if t != tag)
    return Location(
        root=root, tag=tag, dir=tag_dir, other_tags=others, universal=(tag_dir / "zero").is_dir()
    )


def _list(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(items) if items else "none"


def scan(location: Location) -> tuple[list[RankFile], list[str]]:
    """Classify the tag directory's files; returns (rank files, names of unrelated files)."""
    rank_files: list[RankFile] = []
    unrelated: list[str] = []
    for entry in sorted(location.dir.iterdir()):
        if entry.is_dir():
            continue
        found = classify(entry)
        if found is None:
            unrelated.append(entry.name)
        else:
            rank_files.append(found)
    return rank_files, unrelated
