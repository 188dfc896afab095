"""Hugging Face Trainer and Accelerate folders: find the DeepSpeed checkpoint users point at.

Users hold what the Trainer wrote, ``output_dir/checkpoint-N/`` (each a DeepSpeed checkpoint
root: ``latest``, ``global_stepN/``, plus ``config.json`` and tokenizer files), or what
Accelerate's ``save_state`` wrote (tags ``pytorch_model``, ``pytorch_model_1`` for a second
model). :func:`resolve` turns the folder given into the DeepSpeed root and tag before
:func:`dsckpt.discover.files.locate` reads it; :func:`model_folder` says where the model's
``config.json`` and tokenizer files are. Names and directory listings only: nothing is opened.

Why these rules (tests/fixtures/hf/FORMAT-NOTES.md has the observations):

* ``output_dir`` holds one ``checkpoint-N`` per save; N is the global step, so "newest" is the
  largest N (compared as numbers: ``checkpoint-10`` is newer than ``checkpoint-9``). Accelerate's
  automatic naming writes ``checkpoint_N``, taken the same way.
* With several Accelerate models in one folder, ``latest`` names the *last model saved*, not a
  step: trusting it would silently convert the wrong model, so without ``--tag`` that is an error
  listing the models.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsckpt.errors import CheckpointNotFound, CorruptFile, UsageError

_CHECKPOINT_DIR = re.compile(r"checkpoint[-_](\d+)")
_ACCELERATE_TAG = re.compile(r"pytorch_model(?:_\d+)?")
# Files whose presence marks a Hugging Face model folder (the Trainer's save_pretrained, PEFT's).
MODEL_MARKERS = ("config.json", "adapter_config.json")


@dataclass(frozen=True)
class Resolved:
    """The DeepSpeed root (or tag directory) to read, and how it was chosen."""

    path: Path
    tag: str | None
    # "checkpoint-4 (newest of checkpoint-2, checkpoint-4)" when a folder was picked inside the
    # one given; "" when the path is read as given.
    picked: str = ""
    step: int | None = None


def _real_dirs(path: Path) -> list[str]:
    """Names of the real (not symlinked) subdirectories of ``path``; [] if it cannot be listed
    (``locate`` reports unreadable paths itself)."""
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def checkpoint_steps(output_dir: Path) -> dict[int, str]:
    """``{N: "checkpoint-N"}`` for the Trainer (or Accelerate) checkpoint folders in a directory."""
    steps: dict[int, str] = {}
    for name in _real_dirs(output_dir):
        m = _CHECKPOINT_DIR.fullmatch(name)
        if m is not None:
            steps.setdefault(int(m.group(1)), name)
    return steps


def _is_deepspeed_root(path: Path) -> bool:
    """Whether ``path`` holds a ``latest`` file or tag directories of its own (by names)."""
    return os.path.lexists(path / "latest")


def _refuse_several_models(path: Path, tag: str | None) -> None:
    if tag is not None:
        return
    models = sorted(n for n in _real_dirs(path) if _ACCELERATE_TAG.fullmatch(n))
    if len(models) > 1:
        raise UsageError(
            f"{path} holds {len(models)} models saved by Accelerate's save_state: "
            f"{', '.join(models)} (`latest` names only the last one saved): pass --tag to "
            "choose one"
        )


def resolve(path: Path, tag: str | None = None, step: int | None = None) -> Resolved:
    """The DeepSpeed checkpoint a user means by ``path``.

    ``output_dir/`` (no ``latest`` of its own) -> its newest ``checkpoint-N/``, or
    ``checkpoint-{step}/`` with ``step``; a checkpoint root or tag directory -> itself. A root
    holding several Accelerate models needs ``tag``.

    Raises:
        CheckpointNotFound: ``step`` names no ``checkpoint-N`` folder.
        UsageError: several Accelerate models and no ``tag``; ``step`` for a path that is not
            an ``output_dir``.
    """
    path = Path(path)
    if not path.is_dir():
        if step is not None:
            raise CheckpointNotFound(
                f"--step {step}: {path} is not a directory: pass the "
                "Trainer's output_dir (the folder holding checkpoint-N/)"
            )
        return Resolved(path, tag)
    steps = checkpoint_steps(path)
    if step is None and (_is_deepspeed_root(path) or not steps):
        _refuse_several_models(path, tag)
        return Resolved(path, tag, step=_own_step(path))
    if step is not None:
        if step not in steps:
            own = _own_step(path)
            if own == step and not steps:
                return Resolved(path, tag, step=step)
            found = ", ".join(steps[n] for n in sorted(steps)) or "none"
            raise CheckpointNotFound(
                f"--step {step}: {path} has no checkpoint-{step}/ folder (checkpoint folders "
                f"present: {found}): pass one of their steps, or the Trainer's output_dir"
            )
        chosen, why = step, f"--step {step}"
    else:
        chosen = max(steps)
        others = [steps[n] for n in sorted(steps)]
        why = "the only checkpoint" if len(others) == 1 else f"newest of {', '.join(others)}"
    folder = path / steps[chosen]
    _refuse_several_models(folder, tag)
    return Resolved(folder, tag, picked=f"{steps[chosen]} ({why})", step=chosen)


def _own_step(path: Path) -> int | None:
    m = _CHECKPOINT_DIR.fullmatch(path.name)
    return int(m.group(1)) if m is not None else None


def model_folder(root: Path, tag_dir: Path) -> Path | None:
    """The folder holding the model's ``config.json`` / ``adapter_config.json`` and tokenizer
    files for a checkpoint read from ``root`` (``tag_dir`` when a tag directory was given
    directly, whose parent is then the Trainer's ``checkpoint-N/``), or None."""
    candidates = [root] + ([tag_dir.parent] if root == tag_dir else [])
    for folder in candidates:
        if any(os.path.lexists(folder / marker) for marker in MODEL_MARKERS):
            return folder
    return None


# What a `from_pretrained`-ready folder needs besides the weights, as `save_pretrained` of a
# model, its generation config, tokenizer and processor write them. Everything else the Trainer
# leaves in checkpoint-N/ is training state (trainer_state.json, training_args.bin, rng_state_*,
# zero_to_*.py, latest) or the Trainer's own 16-bit model.safetensors, which are not copied.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# A PEFT adapter folder: PEFT's own config, and the tokenizer files the Trainer saves beside it.
ADAPTER_FILES = ("adapter_config.json",) + tuple(
    n for n in COPIED_FILES if n not in ("config.json", "generation_config.json")
)
_CONFIG_LIMIT = 16 << 20  # a config.json is a few KiB; refuse to parse anything absurd


@dataclass(frozen=True)
class ModelFolder:
    """The Hugging Face files beside a Trainer checkpoint: what to copy, what not and why."""

    path: Path
    config: Mapping[str, Any] | None  # config.json parsed, None when absent
    files: tuple[str, ...]  # regular files of COPIED_FILES and ADAPTER_FILES, in that order
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (name, why)
    adapter_config: Mapping[str, Any] | None = None  # adapter_config.json parsed

    def present(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Those of ``names`` that are regular files here, in the order of ``names``."""
        return tuple(n for n in names if n in self.files)

    def not_copied(self, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple((n, why) for n, why in self.skipped if n in names)


def read_model_folder(folder: Path) -> ModelFolder:
    """List the files of :data:`COPIED_FILES` and :data:`ADAPTER_FILES` in ``folder`` and parse
    its ``config.json`` and ``adapter_config.json``.

    Only regular files are copied: a symbolic link (it may point anywhere, e.g. into a Hub
    cache) or anything else is skipped and reported, never followed.

    Raises:
        CorruptFile: ``config.json`` or ``adapter_config.json`` is not a JSON object.
        UnreadableFile: one of them cannot be read.
    """
    files, skipped = [], []
    for name in dict.fromkeys(COPIED_FILES + ADAPTER_FILES):
        path = folder / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            skipped.append((name, exc.strerror or "cannot be examined"))
            continue
        if stat.S_ISREG(mode):
            files.append(name)
        else:
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            skipped.append((name, kind))
    config, adapter = (
        _read_json(folder / n) if n in files else None
        for n in ("config.json", "adapter_config.json")
    )
    return ModelFolder(folder, config, tuple(files), tuple(skipped), adapter)


def _read_json(path: Path) -> dict[str, Any]:
    from dsckpt.discover.files import read_head

    raw = read_head(path, _CONFIG_LIMIT + 1, follow_symlinks=False)
    if len(raw) > _CONFIG_LIMIT:
        raise CorruptFile(path, "is over 16 MiB, not a model configuration")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFile(path, f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CorruptFile(path, "holds no JSON object")
    return config
