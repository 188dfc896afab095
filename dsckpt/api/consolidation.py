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
from dsckpt.execute.executor import iter_tensors, materialize
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.consolidation import DTYPES, ConsolidationPlan, plan_consolidation

if TYPE_CHECKING:
    import torch

ALIASES_KEY = "dsckpt.aliases"  # metadata: JSON {alias: canonical} of tied weights


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

    def summary(self) -> str:
        tied = f" + {self.aliases} tied" if self.aliases else ""
        files = f", {self.files} files" if self.files > 1 else ""
        return (
            f"wrote {self.out} ({self.format}{files}): {self.tensors} tensors{tied}, "
            f"{self.nbytes / 2**20:.1f} MiB in {self.seconds:.2f} s; source: {self.source}"
        )


def output_format(out: Path) -> str:
    """The format OUT asks for, or an OutputError naming the suffixes dsckpt writes."""
    from dsckpt.execute.formats import output_format as by_suffix

    fmt = by_suffix(out)
    if fmt is None:
        raise OutputError(f"{out}: unknown output suffix {out.suffix!r}: use .safetensors, .bin "
                          "or .pt, or a directory path for Hugging Face shards")
    return fmt


def plan_for(
    ckpt: Path | str | Layout,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    exclude_frozen: bool = False,
    rules_file: Path | None = None,
    from_layers: bool = False,
    strip_vocab_padding: bool = True,
) -> ConsolidationPlan:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    layout = ckpt if isinstance(ckpt, Layout) else open_checkpoint(ckpt, tag)
    return plan_consolidation(
        layout,
        dtype,
        exclude_frozen,
        rules_file=rules_file,
        from_layers=from_layers,
        strip_vocab_padding=strip_vocab_padding,
    )


def consolidate(
    ckpt: Path | str,
    out: Path | str,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    exclude_frozen: bool = False,
    force: bool = False,
    progress: ProgressSink | None = None,
    rules_file: Path | None = None,
    from_layers: bool = False,
    strip_vocab_padding: bool = True,
) -> ConsolidateResult:
    """Write one consolidated state dict of a DeepSpeed checkpoint.

    The format follows ``out``: ``*.safetensors``, ``*.bin``/``*.pt`` (torch.save), or a
    directory of Hugging Face shards plus ``model.safetensors.index.json``. The output is written
    under a temporary name beside ``out`` and renamed only when complete.

    Raises:
        OutputError: ``out`` exists (without ``force``), lies inside the checkpoint, has an
            unknown suffix, or the disk is full.
        DsckptError: the checkpoint cannot be consolidated (see the message).
    """
    from dsckpt.execute.executor import run
    from dsckpt.execute.formats import output_plan

    out = Path(out)
    fmt = output_format(out)
    layout = open_checkpoint(ckpt, tag)
    _refuse_inside(out, layout)
    plan = plan_for(
        layout,
        dtype=dtype,
        exclude_frozen=exclude_frozen,
        rules_file=rules_file,
        from_layers=from_layers,
        strip_vocab_padding=strip_vocab_padding,
    )
    metadata = {"format": "pt", "dsckpt.source": plan.source}
    if plan.aliases:
        metadata[ALIASES_KEY] = json.dumps(plan.aliases, sort_keys=True)
    started = time.perf_counter()
    write_plan = output_plan(fmt, out, plan, metadata=metadata, max_shard_size=max_shard_size)
    progress = progress or ProgressSink()
    progress.start("consolidating", write_plan.data_nbytes)
    run(write_plan, out, force=force, progress=progress.advance)
    return ConsolidateResult(
        out=out,
        format=fmt,
        tensors=len(plan.tensors),
        aliases=len(plan.aliases),
        nbytes=plan.nbytes,
        seconds=time.perf_counter() - started,
        files=len(write_plan.files),
        source=plan.source,
    )


def _refuse_inside(out: Path, layout: Layout) -> None:
    from dsckpt.execute.output_guard import refuse_overlap

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
        raise OutputError(
            f"the checkpoint does not fit the module: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    import torch

    with torch.no_grad():
        for name, value in iter_tensors(plan):
            if name in own:
                own[name].copy_(value)
    return missing, unexpected
