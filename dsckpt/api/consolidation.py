"""`to-fp32` as a library: discover -> plan -> stream into an atomic output -> a result."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsckpt.discover.layout import Layout, open_checkpoint
from dsckpt.errors import OutputError, UsageError
from dsckpt.execute.executor import iter_tensors, materialize, run
from dsckpt.execute.formats import SHARDED, output_plan
from dsckpt.execute.formats import output_format as by_suffix
from dsckpt.execute.formats.hf_folder import copied_files
from dsckpt.execute.formats.optimizer_writer import (
    OPTIMIZER_FORMATS,
    optimizer_file,
    optimizer_file_name,
)
from dsckpt.execute.output_guard import refuse_overlap
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.consolidation import ConsolidationPlan, plan_consolidation
from dsckpt.plan.fileplan import FilePlan, WritePlan
from dsckpt.plan.model import ConsolidationOptions
from dsckpt.plan.optim_export import plan_optimizer_export, refuse_without_state
from dsckpt.printable import listed
from dsckpt.sizes import human_bytes

if TYPE_CHECKING:
    import torch

ALIASES_KEY = "dsckpt.aliases"  # metadata: JSON {alias: canonical} of tied weights


@dataclass(frozen=True)
class OptimizerResult:
    """The optimizer state file ``--optimizer`` wrote beside the weights."""

    path: Path
    format: str  # "safetensors" or "torch"
    parameters: int  # parameters with state
    frozen: int  # parameters without state
    groups: int
    keys: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class ConsolidateResult:
    out: Path
    format: str
    tensors: int
    aliases: int
    nbytes: int
    seconds: float
    files: int
    source: str
    optimizer: OptimizerResult | None = None
    # A Trainer output_dir narrowed to one checkpoint-N: which and why ("" when read as given),
    # the checkpoint root read, and its step where the folder name gives it.
    picked: str = ""
    checkpoint: Path | None = None
    step: int | None = None
    # Hugging Face folder output (dsckpt.api.hf): None for plain output.
    hf: Any = None
    dtype: str = ""
    tied_left_out: tuple[str, ...] = ()  # as save_pretrained leaves them out

    def summary(self) -> str:
        tied = f" + {self.aliases} tied" if self.aliases else ""
        files = f", {self.files} files" if self.files > 1 else ""
        return (
            f"wrote {self.out} ({self.format}{files}): {self.tensors} tensors{tied}, "
            f"{human_bytes(self.nbytes)} in {self.seconds:.2f} s; source: {self.source}"
        )


def output_format(out: Path) -> str:
    """The format OUT asks for, or an OutputError naming the suffixes dsckpt writes."""
    fmt = by_suffix(out)
    if fmt is None:
        raise OutputError(
            f"{out}: unknown output suffix {out.suffix!r}: use .safetensors, .bin "
            "or .pt, or a directory path for Hugging Face shards"
        )
    return fmt


def plan_for(
    ckpt: Path | str | Layout,
    *,
    tag: str | None = None,
    step: int | None = None,
    dtype: str = "fp32",
    exclude_frozen: bool = False,
    rules_file: Path | None = None,
    from_layers: bool = False,
    strip_vocab_padding: bool = True,
    hf_names: bool = False,
) -> ConsolidationPlan:
    """The consolidation plan of a checkpoint (a path, or an already opened Layout).

    Raises:
        UsageError: an unknown ``dtype`` (checked before the checkpoint is opened).
        DsckptError: the checkpoint cannot be consolidated (see the message).
    """
    options = ConsolidationOptions(
        dtype,  # type: ignore[arg-type]  # ConsolidationOptions checks it
        exclude_frozen,
        rules_file,
        from_layers,
        strip_vocab_padding,
        hf_names,
    )
    layout = ckpt if isinstance(ckpt, Layout) else open_checkpoint(ckpt, tag, step)
    return plan_consolidation(layout, options)


def consolidate(
    ckpt: Path | str,
    out: Path | str,
    *,
    tag: str | None = None,
    step: int | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    exclude_frozen: bool = False,
    force: bool = False,
    progress: ProgressSink | None = None,
    rules_file: Path | None = None,
    from_layers: bool = False,
    strip_vocab_padding: bool = True,
    optimizer: bool = False,
    optimizer_format: str = "safetensors",
    hf: bool | None = False,
    hf_names: bool = False,
) -> ConsolidateResult:
    """Write one consolidated state dict of a DeepSpeed checkpoint.

    The format follows ``out``: ``*.safetensors``, ``*.bin``/``*.pt`` (torch.save), or a
    directory of Hugging Face shards plus ``model.safetensors.index.json``. The output is written
    under a temporary name beside ``out`` and renamed only when complete. ``ckpt`` may be a
    Hugging Face Trainer ``output_dir``: its newest ``checkpoint-N`` is read (``step`` picks
    another). ``hf`` True makes a directory ``out`` a ``from_pretrained`` folder, None does so
    when the checkpoint folder holds a ``config.json`` (see :mod:`dsckpt.api.hf`; ``dtype``
    ``"auto"`` then takes the config's).

    With ``optimizer``, the consolidated optimizer state is written too, in the same atomic
    step (both files or neither): ``optimizer.safetensors`` (or ``optimizer.pt`` with
    ``optimizer_format="torch"``) inside a directory ``out``, ``<stem>.optimizer.<ext>``
    beside a single file (see docs/to-fp32.md).

    With ``hf_names`` (AutoEP checkpoints only) the MoE tensors get the Hugging Face model's
    names (``experts.gate_up_proj``, ``experts.down_proj``, ``gate.weight``; docs/moe.md).

    Raises:
        OutputError: ``out`` exists (without ``force``), lies inside the checkpoint, has an
            unknown suffix, or the disk is full.
        DsckptError: the checkpoint cannot be consolidated (see the message).
    """
    out = Path(out)
    fmt = output_format(out)
    if optimizer:
        check_optimizer_options(optimizer_format, from_layers)
    layout = open_checkpoint(ckpt, tag, step)
    _refuse_inside(out, layout)
    if optimizer and layout.kind != "universal":  # universal: zero/ holds the state per name
        refuse_without_state(layout)
    from dsckpt.api import hf as hf_folder  # it builds on this module

    target = hf_folder.hf_output(layout, hf, fmt, dtype)
    if target is not None:
        dtype = target.dtype
        # A from_pretrained folder of an AutoEP run needs the model's own MoE names.
        hf_names = hf_names or (layout.moe is not None and layout.moe.autoep)
    plan = plan_for(
        layout,
        dtype=dtype,
        exclude_frozen=exclude_frozen,
        rules_file=rules_file,
        from_layers=from_layers,
        strip_vocab_padding=strip_vocab_padding,
        hf_names=hf_names,
    )
    left_out: tuple[str, ...] = ()
    if target is not None:
        plan, left_out = hf_folder.apply(plan, target)
    companion, optim_result = None, None
    if optimizer:
        companion, optim_result = _optimizer_companion(
            layout, plan, out, weights_in_directory=fmt == SHARDED, fmt=optimizer_format
        )
        _refuse_inside(optim_result.path, layout)
    metadata = {"format": "pt", "dsckpt.source": plan.source}
    if plan.aliases:
        metadata[ALIASES_KEY] = json.dumps(plan.aliases, sort_keys=True)
    started = time.perf_counter()
    copies = copied_files(target.copies) if target is not None else None
    write_plan = output_plan(
        fmt,
        out,
        plan,
        metadata=metadata,
        max_shard_size=max_shard_size,
        companion=companion,
        copies=copies,
    )
    files = write_files(write_plan, out, force=force, progress=progress)
    return ConsolidateResult(
        out=out,
        format=fmt,
        tensors=len(plan.tensors),
        aliases=len(plan.aliases),
        nbytes=plan.nbytes,
        seconds=time.perf_counter() - started,
        files=files,
        source=plan.source,
        optimizer=optim_result,
        picked=layout.picked,
        checkpoint=layout.root,
        step=layout.step,
        hf=target,
        dtype=dtype,
        tied_left_out=left_out,
    )


def write_files(
    write_plan: WritePlan, out: Path, *, force: bool, progress: ProgressSink | None
) -> int:
    """Run ``write_plan`` into ``out`` with a progress bar over its copied bytes; returns the
    number of files written."""
    progress = progress or ProgressSink()
    progress.start("consolidating", write_plan.data_nbytes)
    run(write_plan, out, force=force, progress=progress.advance)
    return len(write_plan.files)


def check_optimizer_options(optimizer_format: str, from_layers: bool) -> None:
    """Refuse --optimizer combinations that cannot work, before anything is read."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise UsageError(
            f"--optimizer-format {optimizer_format}: choose one of {', '.join(OPTIMIZER_FORMATS)}"
        )
    if from_layers:
        raise UsageError(
            "--optimizer with --from-layers: the optimizer state lives beside the fp32 "
            "partitions that --from-layers does without; drop one of the two options"
        )


def _optimizer_companion(
    layout: Layout,
    plan: ConsolidationPlan,
    out: Path,
    *,
    weights_in_directory: bool,
    fmt: str,
) -> tuple[FilePlan, OptimizerResult]:
    """The optimizer file to write with the weights: planned now, so a checkpoint without
    optimizer state is refused before anything is written."""
    export = plan_optimizer_export(layout, plan)
    name = optimizer_file_name(fmt, None if weights_in_directory else out.stem)
    path = (out if weights_in_directory else out.parent) / name
    result = OptimizerResult(
        path=path,
        format=fmt,
        parameters=sum(len(g.params) for g in export.groups),
        frozen=len(export.frozen),
        groups=len(export.groups),
        keys=export.keys,
        nbytes=export.nbytes,
    )

    return optimizer_file(name, export, fmt), result


def _refuse_inside(out: Path, layout: Layout) -> None:
    refuse_overlap(out, root=layout.root, tag_dir=layout.dir, other_tags=layout.other_tags)


class LazyStateDict(Mapping[str, "torch.Tensor"]):
    """A consolidated state dict whose tensors are read from disk when asked for, one at a time."""

    def __init__(self, plan: ConsolidationPlan) -> None:
        self._plan = plan
        self._by_name = {t.name: t for t in plan.tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        canonical = self._plan.aliases.get(name, name)
        return materialize(self._by_name[canonical])

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan.names())

    def __len__(self) -> int:
        return len(self._by_name) + len(self._plan.aliases)


def state_dict(ckpt: Path | str, **options: Any) -> LazyStateDict:
    """The consolidated fp32 state dict, lazily: each tensor is read when accessed.

    Accepts the options of :func:`plan_for` (``tag``, ``dtype``, ``exclude_frozen``, ...).
    """
    return LazyStateDict(plan_for(ckpt, **options))


def load_into(
    module: torch.nn.Module, ckpt: Path | str, *, strict: bool = True, **options: Any
) -> tuple[list[str], list[str]]:
    """Copy the consolidated weights into ``module`` one tensor at a time (bounded memory).

    Returns:
        ``(missing, unexpected)`` key lists, as ``load_state_dict`` reports them.

    Raises:
        OutputError: with ``strict``, when the keys differ.
    """
    plan = plan_for(ckpt, **options)
    own = module.state_dict(keep_vars=True)
    names = set(plan.names())
    missing = sorted(set(own) - names)
    unexpected = sorted(names - set(own))
    if strict and (missing or unexpected):
        differ = [
            f"{what} {listed(keys, 5)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise OutputError(f"the checkpoint does not fit the module: {'; '.join(differ)}")
    import torch

    with torch.no_grad():
        for name, value in iter_tensors(plan):
            if name in own:
                own[name].copy_(value)
    return missing, unexpected
