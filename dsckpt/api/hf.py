"""Hugging Face output: a DeepSpeed checkpoint of a Trainer run -> a ``from_pretrained`` folder.

The weights are the consolidated fp32 master weights (:mod:`dsckpt.api.consolidation`), written
as Transformers' shards and index; this module decides what makes the folder a Hugging Face one:

* which files beside the checkpoint are copied unchanged (``config.json``, generation config,
  tokenizer, chat template: :data:`dsckpt.discover.trainer.COPIED_FILES`);
* ``--dtype auto``: the dtype ``config.json`` names (``dtype``, or ``torch_dtype`` before
  transformers 5);
* tied weights as ``save_pretrained`` writes them: with ``tie_word_embeddings`` true the tied
  names (DeepSpeed's ``shared_params``, e.g. ``lm_head.weight``) are left out, since
  ``from_pretrained`` ties them again; otherwise (false, or not said) every name is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dsckpt.api.consolidation import ConsolidateResult, consolidate
from dsckpt.discover.layout import Layout
from dsckpt.discover.trainer import ModelFolder, model_folder, read_model_folder
from dsckpt.errors import UsageError
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.consolidation import ConsolidationPlan

__all__ = ["HfOutput", "export", "hf_output", "config_dtype", "ties_embeddings"]

# config.json dtype names -> dsckpt's
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class HfOutput:
    """What makes a directory output a Hugging Face folder, decided before anything is written."""

    folder: ModelFolder
    why: str  # "--hf", or "config.json found" when it was the default
    dtype: str  # fp32 | bf16 | fp16, resolved from "auto"
    dtype_from_config: bool
    drop_aliases: bool  # tied names left out, as save_pretrained does

    @property
    def copies(self) -> dict[str, Path]:
        return {name: self.folder.path / name for name in self.folder.files}


def config_dtype(config: Mapping[str, Any], where: Path) -> str:
    """The dtype ``config.json`` names, as fp32/bf16/fp16, or a UsageError saying what to pass."""
    named = config.get("dtype", config.get("torch_dtype"))
    if isinstance(named, str) and named.removeprefix("torch.") in _CONFIG_DTYPES:
        return _CONFIG_DTYPES[named.removeprefix("torch.")]
    return _refuse_auto(f"{where} names dtype {named!r}" if named is not None
                        else f"{where} names no dtype")


def _refuse_auto(why: str) -> str:
    raise UsageError(f"--dtype auto: {why}: pass --dtype fp32, bf16 or fp16")


def ties_embeddings(config: Mapping[str, Any]) -> bool | None:
    """``tie_word_embeddings`` of the config (or of its ``text_config``); None when not said
    (the default differs between model classes in transformers 5)."""
    for scope in (config, config.get("text_config")):
        if isinstance(scope, Mapping) and isinstance(scope.get("tie_word_embeddings"), bool):
            return bool(scope["tie_word_embeddings"])
    return None


def hf_output(layout: Layout, hf: bool | None, fmt: str, dtype: str) -> HfOutput | None:
    """Whether OUT becomes a Hugging Face folder, and how; None for plain output.

    ``hf`` True asks for it, False refuses it, None takes it when the checkpoint folder holds a
    ``config.json`` and OUT is a directory.

    Raises:
        UsageError: ``--hf`` with a single-file OUT or without a ``config.json``;
            ``--dtype auto`` without a config naming a dtype.
    """
    from dsckpt.execute.formats import SHARDED

    if hf is False:
        if dtype == "auto":
            _refuse_auto("the dtype comes from config.json and is used only for a Hugging Face "
                         "folder output (a directory OUT; --no-hf was given)")
        return None
    found = model_folder(layout.root, layout.dir)
    folder = read_model_folder(found) if found is not None else None
    has_config = folder is not None and folder.config is not None
    asked = hf is True
    if hf is None:
        hf = has_config and fmt == SHARDED
    if not hf:
        if dtype == "auto":
            _refuse_auto("the dtype comes from config.json and is used only for a Hugging Face "
                         "folder output (a directory OUT, with --hf)")
        return None
    if fmt != SHARDED:
        raise UsageError("--hf writes a folder (shards, index, config.json, tokenizer): give a "
                         "directory as OUT, or drop --hf for a single file")
    if folder is None or folder.config is None:
        where = found or layout.root
        adapter = folder is not None and (folder.path / "adapter_config.json").exists()
        raise UsageError(
            f"--hf: {where} holds no config.json"
            + (" (it is a PEFT adapter checkpoint: the base model's config is elsewhere)"
               if adapter else "")
            + ": a from_pretrained folder needs the model's config; pass --no-hf for the "
            "weights alone"
        )
    config = folder.config
    resolved = config_dtype(config, folder.path / "config.json") if dtype == "auto" else dtype
    return HfOutput(
        folder=folder,
        why="--hf" if asked else "config.json found",
        dtype=resolved,
        dtype_from_config=dtype == "auto",
        drop_aliases=ties_embeddings(config) is True,
    )


def apply(plan: ConsolidationPlan, out: HfOutput) -> tuple[ConsolidationPlan, tuple[str, ...]]:
    """The plan as ``save_pretrained`` would write it, and the tied names it leaves out."""
    if not out.drop_aliases or not plan.aliases:
        return plan, ()
    return replace(plan, aliases={}), tuple(plan.aliases)


def export(
    ckpt: Path | str,
    out: Path | str,
    *,
    step: int | None = None,
    tag: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    exclude_frozen: bool = False,
    force: bool = False,
    progress: ProgressSink | None = None,
) -> ConsolidateResult:
    """Write a ``from_pretrained``-ready folder from a Trainer checkpoint.

    ``ckpt`` is the Trainer's ``output_dir`` (its newest ``checkpoint-N``, or ``step``),
    a ``checkpoint-N`` folder or its ``global_stepN``. ``out`` gets safetensors shards and
    ``model.safetensors.index.json`` (one ``model.safetensors`` for a small model) with the fp32
    master weights (cast to ``dtype``; ``"auto"`` takes the dtype ``config.json`` names), plus
    ``config.json``, ``generation_config.json``, tokenizer and chat-template files copied
    unchanged. The checkpoint is read only; ``out`` is written atomically (see
    :func:`dsckpt.consolidate`).

    Raises:
        UsageError: the checkpoint folder holds no ``config.json``; ``dtype="auto"`` and the
            config names no dtype.
        DsckptError: the checkpoint cannot be consolidated, or ``out`` cannot be written.
    """
    return consolidate(ckpt, out, tag=tag, step=step, dtype=dtype, hf=True,
                       max_shard_size=max_shard_size, exclude_frozen=exclude_frozen,
                       force=force, progress=progress)
