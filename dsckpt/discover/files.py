"""Finding a checkpoint on disk, classifying its files by name, and opening them safely.

Everything here treats the checkpoint directory as untrusted: a file named like a rank file may be
a FIFO, a device, a directory or a dangling link, and ``latest`` may name anything. Nothing is
opened that is not a regular file (checked before opening and again on the open descriptor, so a
file swapped in between is still caught), nothing blocks, and every file-system error becomes one
:class:`~dsckpt.errors.DsckptError` line naming the path.

Symbolic links: a rank file or tag directory that is a link is followed (checkpoints are often
linked from a shared drive), as long as it ends at a regular file (a directory for a tag). A
``latest`` that is a link is refused: DeepSpeed writes a regular file, and its content ends up in
messages. Tag directories found by looking around (no ``latest``, no ``--tag``) are real
directories only; a link is taken only when named explicitly.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from dsckpt.discover import trainer
from dsckpt.errors import CheckpointNotFound, UnreadableFile
from dsckpt.io.regular import file_kind, os_error, read_head, regular_file_stat


class Role(str, Enum):
    MODEL = "model_states"  # mp_rank_MM_model_states.pt
    ZERO3_MODEL = "zero3_model_states"  # zero_pp_rank_D_mp_rank_MM_model_states.pt
    OPTIM = "optim_states"  # [bf16_|fp16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt
    LAYER = "layer"  # layer_LL-model_TT-model_states.pt
    EXPERT = "expert_model_states"  # layer_L_expert_E_mp_rank_MM_model_states.pt (MoE)
    EXPP_OPTIM = "expp_optim_states"  # expp_rank_R_mp_rank_MM_optim_states.pt (MoE, no ZeRO)


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
    expert: int | None = None  # MoE expert files: the global expert id (``layer`` = MoE layer)
    ep: int | None = None  # MoE ZeRO-0 optimizer files: the expert-parallel rank


@dataclass(frozen=True)
class UnsupportedFile:
    """A file whose name follows a DeepSpeed pattern that no dsckpt layout accounts for yet.

    Ignoring one would write a model without the tensors it holds (MoE experts, say), so
    discovery turns these into an error for every command that writes.
    """

    name: str
    why: str  # what DeepSpeed writes such files for, in a few words


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
    (
        Role.EXPERT,
        re.compile(
            r"^layer_(?P<layer>\d+)_expert_(?P<expert>\d+)_mp_rank_(?P<mp>\d+)_model_states\.pt$"
        ),
    ),
    (Role.EXPP_OPTIM, re.compile(r"^expp_rank_(?P<ep>\d+)_mp_rank_(?P<mp>\d+)_optim_states\.pt$")),
]

# Names DeepSpeed 0.19.8 writes (engine.py's _get_expert_ckpt_name, _get_optimizer_ckpt_name;
# pipe/module.py's ckpt_layer_path with a topology other than pipe x data x model) for layouts
# dsckpt does not read yet. First match wins; the last two catch any other file named the way
# DeepSpeed names checkpoint files, so a new layout is refused rather than silently skipped.
_UNSUPPORTED: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"^expert_\d+_mp_rank_\d+_model_states\.pt$"),
        "a mixture-of-experts (MoE) expert file of DeepSpeed's older naming",
    ),
    (
        re.compile(r"^layer_\d+-model_states\.pt$"),
        "a pipeline layer file without a tensor-parallel rank in its name "
        "(a PipelineModule whose topology has no 'model' axis)",
    ),
    (
        re.compile(r"^layer_\d+-.+-model_states\.pt$"),
        "a pipeline layer file of a topology with other axes than pipe, data and model",
    ),
    (
        re.compile(r".+[_-](model|optim)_states\.pt$"),
        "a file named like a DeepSpeed checkpoint file, of a kind dsckpt does not know",
    ),
]


def match_name(name: str) -> tuple[Role, dict[str, int], str] | None:
    """The role, rank coordinates and optimizer prefix a rank-file name encodes, or None."""
    for role, pattern in _PATTERNS:
        found = pattern.match(name)
        if found:
            groups = {k: v for k, v in found.groupdict().items() if v is not None}
            prefix = groups.pop("prefix", "")
            return role, {k: int(v) for k, v in groups.items()}, prefix
    return None


def unsupported_why(name: str) -> str | None:
    """What a DeepSpeed-named file dsckpt cannot read yet is, or None for any other name."""
    if match_name(name) is not None:
        return None
    for pattern, why in _UNSUPPORTED:
        if pattern.match(name):
            return why
    return None


def classify(path: Path) -> RankFile | None:
    """The RankFile a file name describes, or None for a name DeepSpeed does not write.

    Raises:
        UnreadableFile: the name is a rank file's but the path is not a regular file (a
            directory, FIFO, device, dangling link or link loop) or cannot be examined.
    """
    found = match_name(path.name)
    if found is None:
        return None
    role, coords, prefix = found
    size = regular_file_stat(path).st_size
    return RankFile(name=path.name, role=role, size=size, prefix=prefix, **coords)  # type: ignore[arg-type]


# -- tags ----------------------------------------------------------------------------------------

# A tag is one directory name: NAME_MAX is 255 bytes on Linux file systems. `latest` is read up
# to this much plus one, so a huge or endless file is judged by its first bytes.
_MAX_TAG_BYTES = 255
_LATEST_READ_LIMIT = 4096 + 1


def check_tag(tag: str, source: str) -> str:
    """``tag`` if it is a single path component, else CheckpointNotFound saying why.

    ``source`` says where the tag came from (``"--tag"``, the path of ``latest``), for the
    message. The tag is never followed as a path: no ``/``, no ``.`` or ``..``, no control
    characters, not empty, at most 255 bytes.
    """

    def refuse(why: str) -> CheckpointNotFound:
        shown = repr(tag[:60]) + (" ..." if len(tag) > 60 else "")
        return CheckpointNotFound(
            f"{source} names the tag {shown}, which {why}: a tag is one directory name "
            "inside the checkpoint (such as global_step100); pass --tag with the right one"
        )

    if tag == "":
        raise refuse("is empty")
    if tag in (".", ".."):
        raise refuse("is not a directory name")
    if "/" in tag:
        raise refuse("is a path, not a directory name")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in tag):
        raise refuse("holds control characters")
    try:
        encoded = tag.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse("is not valid text") from None
    if len(encoded) > _MAX_TAG_BYTES:
        raise refuse(f"is {len(encoded)} bytes long, more than any file system allows")
    return tag


def read_latest(latest: Path) -> str:
    """The tag a ``latest`` file names (one trailing newline allowed), checked by check_tag."""
    try:
        mode = os.lstat(latest).st_mode
    except OSError as exc:
        raise os_error(latest, exc) from exc
    if not stat.S_ISREG(mode):
        raise UnreadableFile(
            latest,
            f"is {file_kind(mode)}, not a regular file",
            "DeepSpeed writes `latest` as a small file holding the tag: replace it with one "
            "or pass --tag",
        )
    raw = read_head(latest, _LATEST_READ_LIMIT, follow_symlinks=False)
    if len(raw) >= _LATEST_READ_LIMIT:
        raise CheckpointNotFound(
            f"{latest} is over 4 KiB: DeepSpeed writes only the tag there (such as "
            "global_step100); pass --tag to pick one"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointNotFound(
            f"{latest} is not UTF-8 text: DeepSpeed writes only the tag there (such as "
            "global_step100); pass --tag to pick one"
        ) from None
    return check_tag(text.removesuffix("\n").removesuffix("\r"), str(latest))


# -- locating a checkpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where a checkpoint's files are: the root given, the tag and the tag directory."""

    root: Path
    tag: str | None
    dir: Path
    other_tags: tuple[str, ...] = field(default_factory=tuple)
    universal: bool = False
    # How a Trainer/Accelerate folder was narrowed to this root (dsckpt.discover.trainer).
    picked: str = ""
    step: int | None = None


def _list_dir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError as exc:
        raise os_error(path, exc, "listed") from exc


def _names_rank_files(path: Path) -> bool:
    """Whether a directory looks like a tag directory (by names only: nothing is opened)."""
    try:
        entries = _list_dir(path)
    except UnreadableFile:
        return False  # an unreadable side directory (lost+found) is not a candidate
    return any(
        match_name(e.name) is not None or (e.name == "zero" and _is_real_dir(e)) for e in entries
    )


def _is_real_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a directory (following links); errors other than absence are raised."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        if os.path.islink(path):
            raise os_error(path, FileNotFoundError(errno.ENOENT, "dangling")) from None
        return False
    except NotADirectoryError:
        return False
    except OSError as exc:
        raise os_error(path, exc, "examined") from exc


def locate(path: Path, tag: str | None = None, step: int | None = None) -> Location:
    """Resolve a checkpoint root (with ``latest``), a root plus tag, or a tag directory.

    A Hugging Face Trainer ``output_dir`` is narrowed first to its newest ``checkpoint-N`` (or
    ``step``), see :func:`dsckpt.discover.trainer.resolve`.

    Raises:
        CheckpointNotFound: with a message saying what was found instead and what to pass; also
            for a ``latest`` or ``tag`` that is not a single directory name.
        UnreadableFile: a path that cannot be listed or read (permission, a link loop, a
            ``latest`` that is not a regular file).
    """
    found = trainer.resolve(Path(path), tag, step)
    location = _locate(found.path, found.tag)
    return replace(location, picked=found.picked, step=found.step)


def _locate(path: Path, tag: str | None) -> Location:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise os_error(path, FileNotFoundError(errno.ENOENT, "dangling")) from None
        raise CheckpointNotFound(
            f"{path} does not exist: pass the directory the run saved into"
        ) from None
    except OSError as exc:
        raise os_error(path, exc, "examined") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointNotFound(
            f"{path} is {'a file' if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)}: "
            "pass the checkpoint directory (the one holding `latest`) or a tag directory such as "
            "global_step100/"
        )
    entries = _list_dir(path)
    tags = sorted(e.name for e in entries if _is_real_dir(e) and _names_rank_files(Path(e.path)))
    if tag is not None:
        check_tag(tag, "--tag")
        here = path if path.name else Path(os.path.abspath(path))  # `.` has no name
        if not _is_dir(path / tag) and here.name == tag and _names_rank_files(path):
            # CKPT already is the tag directory: read it as the tag of its parent.
            return locate(here.parent, tag)
        if not _is_dir(path / tag):
            raise CheckpointNotFound(f"{path} has no tag {tag!r}: tags present: {_list(tags)}")
        return _location(path, tag, path / tag, tags)
    latest = path / "latest"
    if not os.path.lexists(latest) and os.path.lexists(path / "latest_universal"):
        # ds_to_universal names its output in `latest_universal` (load_universal reads that).
        latest = path / "latest_universal"
    if os.path.lexists(latest):
        named = read_latest(latest)
        if not _is_dir(path / named):
            raise CheckpointNotFound(
                f"{latest} names tag {named!r} but {path / named} is not a directory "
                f"(tags present: {_list(tags)}): pass --tag to pick one"
            )
        return _location(path, named, path / named, tags)
    if any(match_name(e.name) is not None for e in entries) or any(
        e.name == "zero" and _is_real_dir(e) for e in entries
    ):
        return _location(path, None, path, ())
    if len(tags) == 1:
        return _location(path, tags[0], path / tags[0], tags)
    if tags:
        raise CheckpointNotFound(
            f"{path} holds several tags and no `latest` file: {_list(tags)}: pass --tag to pick one"
        )
    if not entries:
        raise CheckpointNotFound(f"{path} is empty: pass the directory the run saved into")
    from dsckpt.discover.nearby import checkpoints_below, suggestion  # (nearby imports us)

    raise CheckpointNotFound(
        f"{path} holds no DeepSpeed checkpoint files (no `latest`, no *_model_states.pt, "
        "no tag directories): "
        + (
            suggestion(path, checkpoints_below(path))
            or "pass the directory `engine.save_checkpoint` wrote"
        )
    )


def _location(
    root: Path, tag: str | None, tag_dir: Path, tags: list[str] | tuple[str, ...]
) -> Location:
    others = tuple(t for t in tags if t != tag)
    return Location(
        root=root, tag=tag, dir=tag_dir, other_tags=others, universal=_is_dir(tag_dir / "zero")
    )


def _list(items: list[str] | tuple[str, ...]) -> str:
    return ", ".join(items) if items else "none"


# -- scanning a tag directory ------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """A tag directory's files by kind: rank files dsckpt reads, DeepSpeed-named files it does not
    read yet, and everything else (sorted by name)."""

    rank_files: list[RankFile]
    unsupported: list[UnsupportedFile]
    unrelated: list[str]


def survey(location: Location) -> Scan:
    """Classify the tag directory's entries.

    Rank files must be regular files (links to regular files are followed); directories not
    named like rank files are skipped (``zero/``, ``offloaded_tensors/``). Unsupported
    DeepSpeed-named files are listed whatever they are: they are refused anyway.

    Raises:
        UnreadableFile: the directory cannot be listed, or a rank-file name is a directory,
            FIFO, device, dangling link or link loop.
    """
    rank_files: list[RankFile] = []
    unsupported: list[UnsupportedFile] = []
    unrelated: list[str] = []
    for entry in sorted(_list_dir(location.dir), key=lambda e: e.name):
        found = classify(Path(entry.path))
        if found is not None:
            rank_files.append(found)
            continue
        why = unsupported_why(entry.name)
        if why is not None:
            unsupported.append(UnsupportedFile(entry.name, why))
        elif not _is_dir_entry(entry):
            unrelated.append(entry.name)
    return Scan(rank_files, unsupported, unrelated)


def _is_dir_entry(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def scan(location: Location) -> tuple[list[RankFile], list[str]]:
    """Classify the tag directory's files; returns (rank files, names of unrelated files).

    The names of unsupported DeepSpeed files (see :func:`survey`, which separates them) are
    among the unrelated ones here, as they always were.
    """
    found = survey(location)
    others = sorted(found.unrelated + [f.name for f in found.unsupported])
    return found.rank_files, others
