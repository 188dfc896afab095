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

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dsckpt.api.consolidation import (
    ConsolidateResult,
    consolidate,
    output_format,
    plan_for,
    write_files,
)
from dsckpt.api.verify import open_output
from dsckpt.discover.layout import Layout, open_checkpoint
from dsckpt.discover.trainer import (
    ADAPTER_FILES,
    COPIED_FILES,
    ModelFolder,
    model_folder,
    read_model_folder,
)
from dsckpt.errors import UnsupportedLayout, UsageError
from dsckpt.execute.executor import materialize
from dsckpt.execute.formats import SHARDED, output_plan
from dsckpt.execute.formats.hf_folder import adapter_plan, copied_files
from dsckpt.execute.output_guard import refuse_overlap
from dsckpt.execute.progress import ProgressSink
from dsckpt.io import dtypes
from dsckpt.io.load import read_full
from dsckpt.plan.consolidation import DTYPES, ConsolidationPlan, OutputTensor, Read
from dsckpt.printable import listed

__all__ = [
    "AdapterOutput",
    "HfOutput",
    "config_dtype",
    "export",
    "export_adapter",
    "hf_output",
    "export_merged",
    "lora_scaling",
    "peft_names",
    "ties_embeddings",
]

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
    copied: tuple[str, ...] = ()  # files of the folder copied unchanged
    not_copied: tuple[tuple[str, str], ...] = ()  # (name, why): symbolic links and the like

    @property
    def copies(self) -> dict[str, Path]:
        return {name: self.folder.path / name for name in self.copied}


def config_dtype(config: Mapping[str, Any], where: Path) -> str:
    """The dtype ``config.json`` names, as fp32/bf16/fp16, or a UsageError saying what to pass."""
    named = config.get("dtype", config.get("torch_dtype"))
    if isinstance(named, str) and named.removeprefix("torch.") in _CONFIG_DTYPES:
        return _CONFIG_DTYPES[named.removeprefix("torch.")]
    return _refuse_auto(
        f"{where} names dtype {named!r}" if named is not None else f"{where} names no dtype"
    )


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
    if hf is False:
        if dtype == "auto":
            _refuse_auto(
                "the dtype comes from config.json and is used only for a Hugging Face "
                "folder output (a directory OUT; --no-hf was given)"
            )
        return None
    found = model_folder(layout.root, layout.dir)
    folder = read_model_folder(found) if found is not None else None
    has_config = folder is not None and folder.config is not None
    asked = hf is True
    if hf is None:
        hf = has_config and fmt == SHARDED
    if not hf:
        if dtype == "auto":
            _refuse_auto(
                "the dtype comes from config.json and is used only for a Hugging Face "
                "folder output (a directory OUT, with --hf)"
            )
        return None
    if fmt != SHARDED:
        raise UsageError(
            "--hf writes a folder (shards, index, config.json, tokenizer): give a "
            "directory as OUT, or drop --hf for a single file"
        )
    if folder is not None and folder.config is None and "config.json" in dict(folder.skipped):
        raise UsageError(
            f"--hf: {folder.path / 'config.json'} is "
            f"{dict(folder.skipped)['config.json']}: dsckpt copies regular files "
            "only; put the file itself there, or pass --no-hf"
        )
    if folder is None or folder.config is None:
        where = found or layout.root
        adapter = folder is not None and (folder.path / "adapter_config.json").exists()
        raise UsageError(
            f"--hf: {where} holds no config.json"
            + (
                " (a PEFT adapter checkpoint: --adapter writes the adapter folder; the base "
                "model's config is elsewhere)"
                if adapter
                else ""
            )
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
        copied=folder.present(COPIED_FILES),
        not_copied=folder.not_copied(COPIED_FILES),
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
    return consolidate(
        ckpt,
        out,
        tag=tag,
        step=step,
        dtype=dtype,
        hf=True,
        max_shard_size=max_shard_size,
        exclude_frozen=exclude_frozen,
        force=force,
        progress=progress,
    )


# -- PEFT adapters ---------------------------------------------------------------------------

# LoRA parameters as a PeftModel names them: a Linear's A/B matrices are modules
# (`...q_proj.lora_A.<adapter>.weight`), an Embedding's are parameters
# (`...embed_tokens.lora_embedding_A.<adapter>`). PEFT's save_pretrained drops `.<adapter>`.
_LORA_MODULE_KEY = re.compile(r"(?P<head>.+\.lora_[AB])\.(?P<adapter>[^.]+)\.(?P<leaf>weight|bias)")
_LORA_PARAM_KEY = re.compile(r"(?P<head>.+\.lora_embedding_[AB])\.(?P<adapter>[^.]+)")
# adapter_config.json settings whose saved tensors are more than LoRA's A and B matrices
# (setting -> the value that adds nothing); dsckpt refuses what it does not write exactly.
_PLAIN_LORA = {
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "trainable_token_indices": None,
}


@dataclass(frozen=True)
class AdapterOutput:
    """A PEFT adapter folder: the renaming of the LoRA tensors and the files copied."""

    folder: ModelFolder | None
    adapter_name: str
    renames: Mapping[str, str]  # live name -> PEFT's saved name
    copied: tuple[str, ...] = ()
    not_copied: tuple[tuple[str, str], ...] = ()
    why: str = "--adapter"
    dtype_from_config: bool = False

    @property
    def copies(self) -> dict[str, Path]:
        if self.folder is None:  # no model folder beside the checkpoint: nothing to copy
            return {}
        return {name: self.folder.path / name for name in self.copied}


def peft_names(names: list[str], where: Path) -> tuple[str, dict[str, str]]:
    """``(adapter name, {live name: saved name})`` of LoRA tensors named as in a PeftModel.

    Raises:
        UnsupportedLayout: a name that is not a LoRA matrix, or several adapters.
    """
    renames: dict[str, str] = {}
    adapters: set[str] = set()
    others = []
    for name in names:
        m = _LORA_MODULE_KEY.fullmatch(name) or _LORA_PARAM_KEY.fullmatch(name)
        if m is None:
            others.append(name)
            continue
        adapters.add(m["adapter"])
        leaf = m.groupdict().get("leaf")
        renames[name] = m["head"] + (f".{leaf}" if leaf else "")
    if others:
        raise UnsupportedLayout(
            f"{where}: trainable tensors that are not LoRA matrices ({listed(others)}): "
            "--adapter writes LoRA adapters only "
            "(lora_A / lora_B); use to-fp32 without --adapter for every tensor"
        )
    if len(adapters) != 1:
        raise UnsupportedLayout(
            f"{where}: "
            + (
                f"{len(adapters)} adapters ({', '.join(sorted(adapters))}): --adapter writes one"
                if adapters
                else "no LoRA tensors: --adapter needs a checkpoint of a PEFT LoRA model"
            )
        )
    return adapters.pop(), renames


def _check_adapter_config(config: Mapping[str, Any], path: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise UnsupportedLayout(
            f"{path}: peft_type {config.get('peft_type')!r}: --adapter writes LoRA adapters only"
        )
    for key, plain in _PLAIN_LORA.items():
        value = config.get(key, plain)
        if value not in (plain, [], {}) and not (plain is False and value is None):
            raise UnsupportedLayout(
                f"{path}: {key} is {value!r}: the adapter then holds tensors besides the LoRA "
                "matrices, which --adapter does not write yet; use to-fp32 without --adapter"
            )


def adapter_output(layout: Layout, names: list[str]) -> AdapterOutput:
    """How the LoRA tensors ``names`` of ``layout`` become a PEFT adapter folder."""
    found = model_folder(layout.root, layout.dir)
    folder = read_model_folder(found) if found is not None else None
    if folder is not None and folder.adapter_config is not None:
        _check_adapter_config(folder.adapter_config, folder.path / "adapter_config.json")
    adapter, renames = peft_names(names, layout.dir)
    return AdapterOutput(
        folder=folder,
        adapter_name=adapter,
        renames=renames,
        copied=folder.present(ADAPTER_FILES) if folder is not None else (),
        not_copied=folder.not_copied(ADAPTER_FILES) if folder is not None else (),
    )


def export_adapter(
    ckpt: Path | str,
    out: Path | str,
    *,
    step: int | None = None,
    tag: str | None = None,
    dtype: str = "fp32",
    force: bool = False,
    progress: ProgressSink | None = None,
) -> ConsolidateResult:
    """Write a PEFT adapter folder from a Trainer checkpoint of a LoRA model.

    ``out`` gets ``adapter_model.safetensors`` holding the LoRA matrices, fp32 master weights
    (cast to ``dtype``), named as PEFT's ``save_pretrained`` names them (the adapter name, e.g.
    ``.default``, removed), plus ``adapter_config.json`` and tokenizer files copied unchanged;
    ``PeftModel.from_pretrained(base, out)`` loads it.

    Raises:
        UnsupportedLayout: the checkpoint holds trainable tensors other than LoRA matrices, or
            ``adapter_config.json`` asks for more (DoRA, biases, modules_to_save).
        DsckptError: the checkpoint cannot be consolidated, or ``out`` cannot be written.
    """

    out = Path(out)
    if output_format(out) != SHARDED:
        raise UsageError(
            f"--adapter writes a folder (adapter_model.safetensors, "
            f"adapter_config.json): {out} is a file name; give a directory"
        )
    if dtype == "auto":
        _refuse_auto("an adapter is written in the dtype asked for (fp32 by default)")
    layout = open_checkpoint(ckpt, tag, step)
    refuse_overlap(out, root=layout.root, tag_dir=layout.dir, other_tags=layout.other_tags)
    # The Trainer saves PEFT models without their frozen base; a checkpoint that has it still
    # gives the adapter alone.
    plan = plan_for(layout, dtype=dtype, exclude_frozen=True)
    if plan.aliases:
        raise UnsupportedLayout(
            f"{layout.dir}: tied LoRA tensors ({', '.join(plan.aliases)}): "
            "--adapter does not write them"
        )
    target = adapter_output(layout, [t.name for t in plan.tensors])
    plan = replace(
        plan, tensors=tuple(replace(t, name=target.renames[t.name]) for t in plan.tensors)
    )
    started = time.perf_counter()
    write_plan = adapter_plan(
        plan, copies=target.copies, metadata={"format": "pt", "dsckpt.source": plan.source}
    )
    files = write_files(write_plan, out, force=force, progress=progress)
    return _result(out, "PEFT adapter", plan, files, started, layout, target, dtype)


# -- merging a LoRA adapter into its base model ----------------------------------------------

# PeftModel names: `base_model.model.` + the base model's own module path.
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class MergeOutput:
    """A base model with a LoRA adapter merged in: what is merged and what is copied."""

    folder: ModelFolder | None  # the checkpoint's folder (adapter_config.json, tokenizer)
    base: Path
    adapter_name: str
    merged: tuple[str, ...]  # base weight names that got a LoRA delta
    scaling: float
    copied: tuple[str, ...] = ()
    sources: Mapping[str, Path] = field(default_factory=dict)  # name -> file copied
    not_copied: tuple[tuple[str, str], ...] = ()
    why: str = "--merge-adapter"
    dtype_from_config: bool = False

    @property
    def copies(self) -> dict[str, Path]:
        return dict(self.sources)


def lora_scaling(config: Mapping[str, Any], path: Path) -> float:
    """PEFT's scaling of a LoRA delta: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    Raises:
        UnsupportedLayout: per-module ranks or alphas (``rank_pattern``, ``alpha_pattern``),
            which give each module its own scaling: not merged yet.
    """
    import math

    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise UnsupportedLayout(
                f"{path}: {key} gives modules their own LoRA scaling, which "
                "--merge-adapter does not handle yet: merge with PEFT"
            )
    try:
        r, alpha = int(config["r"]), config["lora_alpha"]
    except (KeyError, TypeError, ValueError):
        raise UnsupportedLayout(
            f"{path} has no LoRA r / lora_alpha: --merge-adapter needs them (PEFT writes both)"
        ) from None
    if not isinstance(alpha, (int, float)) or r <= 0:
        raise UnsupportedLayout(f"{path}: r {r!r} and lora_alpha {alpha!r} are not a LoRA scaling")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def export_merged(
    ckpt: Path | str,
    out: Path | str,
    base: Path | str,
    *,
    step: int | None = None,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: ProgressSink | None = None,
) -> ConsolidateResult:
    """Write the base model with the trained LoRA adapter merged in, as a ``from_pretrained``
    folder.

    The Trainer's checkpoint of a PEFT model holds the adapter only, so ``base`` is the base
    model's folder (``save_pretrained`` safetensors, one file or shards; ``dtype="auto"`` takes
    the dtype its ``config.json`` names). Each targeted weight
    becomes ``W + (B @ A) * scaling`` computed in fp32 with ``W`` upcast, the formula and order
    of PEFT's ``merge_and_unload``; every other base tensor is copied (cast to ``dtype``).
    ``config.json`` and ``generation_config.json`` come from ``base``, tokenizer files from the
    checkpoint folder (else from ``base``).

    Raises:
        UnsupportedLayout: the adapter is not plain LoRA (see :func:`export_adapter`), has
            per-module scalings, or names a weight ``base`` does not hold (with its shape).
        UsageError: ``base`` is not a model folder with ``config.json``.
        DsckptError: the checkpoint cannot be consolidated, or ``out`` cannot be written.
    """

    out, base = Path(out), Path(base)
    if output_format(out) != SHARDED:
        raise UsageError(
            f"--merge-adapter writes a model folder: {out} is a file name; give a directory"
        )
    base_folder = read_model_folder(base) if base.is_dir() else None
    if base_folder is None or base_folder.config is None:
        raise UsageError(
            f"--merge-adapter {base}: not a model folder with config.json: give "
            "the base model's folder (what save_pretrained wrote)"
        )
    from_config = dtype == "auto"
    if from_config:
        dtype = config_dtype(base_folder.config, base / "config.json")
    layout = open_checkpoint(ckpt, tag, step)
    refuse_overlap(out, root=layout.root, tag_dir=layout.dir, other_tags=layout.other_tags)
    refuse_overlap(out, root=base, tag_dir=base)
    adapter_plan = plan_for(layout, dtype="fp32", exclude_frozen=True)
    target = adapter_output(layout, [t.name for t in adapter_plan.tensors])
    if target.folder is None or target.folder.adapter_config is None:
        raise UsageError(
            f"{layout.root} holds no adapter_config.json: --merge-adapter needs "
            "the LoRA rank and alpha it records"
        )
    config_path = target.folder.path / "adapter_config.json"
    scaling = lora_scaling(target.folder.adapter_config, config_path)
    fan_in_fan_out = bool(target.folder.adapter_config.get("fan_in_fan_out"))
    lora = {target.renames[t.name]: t for t in adapter_plan.tensors}
    stored = open_output(base).tensors
    pairs: dict[str, tuple[OutputTensor, OutputTensor]] = {}
    for name in lora:
        if not name.endswith(".lora_A.weight"):
            if not name.endswith(".lora_B.weight"):
                raise UnsupportedLayout(
                    f"{layout.dir}: {name}: --merge-adapter merges LoRA "
                    "Linear layers (lora_A / lora_B weights) only"
                )
            continue
        module = name.removesuffix(".lora_A.weight")
        weight = module.removeprefix(_PEFT_PREFIX) + ".weight"
        b = lora.get(module + ".lora_B.weight")
        if b is None or weight not in stored:
            missing = module + ".lora_B.weight" if b is None else f"{weight} in {base}"
            raise UnsupportedLayout(
                f"{layout.dir}: {name} has no {missing}: the adapter does not fit this base model"
            )
        a = lora[name]
        out_features, in_features = b.shape[0], a.shape[1]
        want = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        if stored[weight].shape != want:
            raise UnsupportedLayout(
                f"{name}: the LoRA delta is {list(want)} but {weight} in "
                f"{base} is {list(stored[weight].shape)}: not the base model "
                "the adapter was trained on"
            )
        pairs[weight] = (a, b)
    if len(pairs) * 2 != len(lora):
        raise UnsupportedLayout(
            f"{layout.dir}: lora_B weights without their lora_A: the adapter is incomplete"
        )
    out_dtype = DTYPES[dtype]
    tensors = []
    for name, ref in stored.items():
        kept = out_dtype if ref.dtype.is_floating else ref.dtype
        if name in pairs:
            make = _merged(ref, *pairs[name], scaling, fan_in_fan_out, kept)
            tensors.append(OutputTensor(name, ref.shape, kept, (), compute=make))
        else:
            tensors.append(OutputTensor(name, ref.shape, kept, (Read(ref, 0, ref.numel, 0),)))
    plan = replace(
        adapter_plan,
        tensors=tuple(tensors),
        aliases={},
        source=f"{base} merged with the fp32 LoRA adapter from the optimizer partitions",
    )
    sources = {n: base / n for n in base_folder.present(("config.json", "generation_config.json"))}
    tokenizer = tuple(n for n in ADAPTER_FILES if n != "adapter_config.json")
    for name in tokenizer:
        for folder in (target.folder, base_folder):
            if name in folder.files:
                sources.setdefault(name, folder.path / name)
    merge = MergeOutput(
        folder=target.folder,
        base=base,
        adapter_name=target.adapter_name,
        merged=tuple(pairs),
        scaling=scaling,
        copied=tuple(sources),
        sources=sources,
        not_copied=target.folder.not_copied(tokenizer)
        + base_folder.not_copied(("config.json", "generation_config.json")),
        dtype_from_config=from_config,
    )
    started = time.perf_counter()
    write_plan = output_plan(
        SHARDED,
        out,
        plan,
        metadata={"format": "pt", "dsckpt.source": plan.source},
        max_shard_size=max_shard_size,
        copies=copied_files(sources),
    )
    files = write_files(write_plan, out, force=force, progress=progress)
    return _result(out, SHARDED, plan, files, started, layout, merge, dtype)


def _result(
    out: Path,
    fmt: str,
    plan: ConsolidationPlan,
    files: int,
    started: float,
    layout: Layout,
    hf: Any,
    dtype: str,
) -> ConsolidateResult:
    """The result of an adapter or merged export (no tied aliases: neither writes any)."""
    return ConsolidateResult(
        out=out, format=fmt, tensors=len(plan.tensors), aliases=0, nbytes=plan.nbytes,
        seconds=time.perf_counter() - started, files=files, source=plan.source,
        picked=layout.picked, checkpoint=layout.root, step=layout.step, hf=hf, dtype=dtype,
    )  # fmt: skip


def _merged(ref: Any, a: Any, b: Any, scaling: float, fan_in_fan_out: bool, dtype: Any) -> Any:
    """A function making ``W + (B @ A) * scaling`` in fp32 (PEFT's merge), cast to ``dtype``."""

    def make() -> Any:
        weight = read_full(ref).to(dtypes.to_torch(dtypes.FLOAT32))
        delta = materialize(b) @ materialize(a)
        if fan_in_fan_out:
            delta = delta.T
        weight += delta * scaling
        return weight.to(dtypes.to_torch(dtype)).contiguous()

    return make
