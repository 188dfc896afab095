"""Reshape a pipeline / Megatron-DeepSpeed checkpoint to new TP, PP and DP degrees at once.

The same three steps as everywhere in dsckpt:

* **Discover** (:class:`PipelineSource`): every parameter's name, optimizer group, TP-local
  shapes and the stages holding it, from each ``mp_rank`` file's ``param_shapes``; the layer
  specs of the ``PipelineModule`` (given with ``--layer-specs`` or inferred from the files).
* **Plan** (:func:`plan_pipeline`, metadata only): the target stage boundaries exactly as
  DeepSpeed's ``PipelineModule`` computes them for the target (:func:`dsckpt.maps.partition_layers`
  over the layer specs, counting parameters at the target TP), the parameters of every target
  (stage, TP rank) per optimizer group in DeepSpeed's order, and each parameter's TP re-split
  (:mod:`dsckpt.tp_rules`: vocabulary re-padded, fused QKV and gated MLP split per block,
  replicated tensors copied).
* **Execute** (:func:`reshape_pipeline`): per target (stage, TP rank), every parameter's fp32
  master and optimizer state is cut from the source ZeRO partitions (memory-mapped), re-split for
  the new TP, laid into the new flat groups and partitioned over the new DP size by DeepSpeed's
  ZeRO-1 / BF16_Optimizer rules (the same arithmetic as :mod:`dsckpt.zero_reshape`); layer files are
  re-split the same way (copied byte for byte when TP is unchanged), ``mp_rank`` files get the
  new degrees and ``param_shapes``. The output directory appears complete or not at all.

What a checkpoint does not record, and what dsckpt decides:

* The layer spec list. A layer with parameters has a ``layer_NN`` file; a tied module's other
  uses (Megatron's LM head) have none, and parameter-free specs leave no trace. Inferred: a tied
  module's other use sits right after the last layer with parameters of each stage that holds
  the module without its layer file (after the last such layer overall for one stage) — where
  Megatron-DeepSpeed's ``GPTModelPipe`` puts its head — and nothing follows it. ``--layer-specs``
  gives the real list; ``uniform`` and ``type:`` partitioning need it.
* Which copy of a tied module: the source stage with the same index if it holds the module,
  else the first stage that does (stage 0's is the one DeepSpeed keeps in sync).
* Vocabulary padding rows added by a larger TP are zeros; rows dropped by a smaller one were
  padding (never a real token).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsckpt.discover import zero
from dsckpt.discover.files import Role
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout, UsageError
from dsckpt.plan import maps
from dsckpt.plan.pipeline_consolidation import (
    tied_names,
)
from dsckpt.printable import listed
from dsckpt.sizes import human_bytes

if TYPE_CHECKING:
    from dsckpt.discover.layout import Layout
    from dsckpt.plan.tp_rules import RuleSet, TPPlan

Shape = tuple[int, ...]
TIED_PREFIX = "tied_modules."
ARG_DEGREES = {  # Megatron's args that record the topology
    "tensor_model_parallel_size": "tp",
    "pipeline_model_parallel_size": "pp",
    "data_parallel_size": "dp",
}

# ---------------------------------------------------------------------------------------------
# Layer specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One entry of ``PipelineModule``'s layer list: its class or function name (``None`` when
    unknown) and, for a ``TiedLayerSpec``, its tie key."""

    typename: str | None = None
    tie_key: str | None = None

    def __str__(self) -> str:
        name = self.typename or "?"
        return f"{self.tie_key}@{name}" if self.tie_key else name


_SPEC = re.compile(r"^(?:(?P<key>[\w.-]+)@)?(?P<name>[\w.<>-]+)(?:\*(?P<count>\d+))?$")


def parse_layer_specs(text: str) -> tuple[LayerSpec, ...]:
    """``"_token_ids,embed@EmbeddingPipe,TransformerLayerPipe*3,..."`` -> layer specs.

    Each comma-separated entry is one spec: its type name, ``KEY@TYPE`` for a tied spec, ``*N``
    to repeat it.
    """
    specs: list[LayerSpec] = []
    for entry in (e.strip() for e in text.split(",")):
        found = _SPEC.match(entry)
        if not found:
            raise UsageError(
                f"--layer-specs: {entry!r} is not TYPE, KEY@TYPE or either with *COUNT "
                "(e.g. 'embed@EmbeddingPipe,TransformerLayerPipe*24,LayerNorm,embed@EmbeddingPipe')"
            )
        spec = LayerSpec(found["name"], found["key"])
        specs.extend([spec] * int(found["count"] or 1))
    return tuple(specs)


def format_layer_specs(specs: Sequence[LayerSpec]) -> str:
    """The inverse of :func:`parse_layer_specs`, runs of equal specs written ``*N``."""
    out: list[str] = []
    i = 0
    while i < len(specs):
        j = i
        while j < len(specs) and specs[j] == specs[i]:
            j += 1
        out.append(str(specs[i]) + (f"*{j - i}" if j - i > 1 else ""))
        i = j
    return ",".join(out)


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceParam:
    """One parameter of the source: its optimizer group, TP-local shape on each source TP rank,
    the stages holding it (several for a tied module) and its layer (``None`` when tied)."""

    name: str
    group: int
    shapes: tuple[Shape, ...]
    stages: tuple[int, ...]
    layer: int | None
    tie_key: str | None


@dataclass
class PipelineSource:
    """What the planner needs from a pipeline checkpoint (metadata only)."""

    layout: Layout
    params: dict[str, SourceParam]  # in DeepSpeed's group order over the whole model
    groups: int
    layer_files: dict[int, dict[str, str]]  # layer -> {state dict key: parameter name}
    rules: RuleSet

    @property
    def kind(self) -> str:
        return self.layout.optimizer


def open_pipeline(layout: Layout, rules_file: Path | None = None) -> PipelineSource:
    """Check a pipeline checkpoint is one :func:`reshape_pipeline` handles and read its facts.

    Raises:
        InconsistentCheckpoint: missing, mixed or damaged rank files.
        UnsupportedLayout: no ZeRO optimizer files, ZeRO stage other than 1, alignment padding.
    """
    from dsckpt.discover.layout import refuse_errors
    from dsckpt.io.unpickle import load_saved
    from dsckpt.plan.tp_rules import load_rules

    where = layout.dir
    refuse_errors(layout)  # the gate every writing command passes
    if layout.optimizer not in ("zero", "bf16_optimizer") or not layout.zero_sources:
        raise UnsupportedLayout(
            f"{where} has no ZeRO optimizer partitions (optimizer: {layout.optimizer}): without "
            "ZeRO the pipeline saves its optimizer state keyed by position, with no parameter "
            "names, so it cannot be re-split; resume it at the same degrees, or consolidate the "
            "weights with `dsckpt to-fp32 --from-layers`"
        )
    if layout.zero_stage != 1:
        raise UnsupportedLayout(
            f"{where}: ZeRO stage {layout.zero_stage} with pipeline "
            "parallelism is not a layout DeepSpeed writes; reshape reads "
            "ZeRO-1 and BF16_Optimizer pipelines"
        )
    params: dict[str, SourceParam] = {}
    groups = 0
    for mp in sorted(layout.zero_sources):
        stage, tp_rank = divmod(mp, layout.tp)
        sources = layout.zero_sources[mp]
        groups = max(groups, len(sources.groups))
        for g, group in enumerate(sources.groups):
            # Each parameter starts where the ones before it end (a running sum: summing every
            # prefix made this quadratic, 13 of 16 s at 800 layers).
            ends = itertools.accumulate((q.numel for q in group.params), initial=0)
            if any(p.offset != end for p, end in zip(group.params, ends, strict=False)):
                raise UnsupportedLayout(
                    f"{where}: optimizer group {g} of model-parallel rank "
                    f"{mp} has parameter_alignment padding, which reshape "
                    "does not re-create"
                )
            for p in group.params:
                known = params.get(p.name)
                if known is None:
                    head = p.name.split(".", 2)
                    tie_key = head[1] if p.name.startswith(TIED_PREFIX) else None
                    layer = int(head[0]) if head[0].isdigit() else None
                    known = SourceParam(p.name, g, (), (), layer, tie_key)
                shapes = known.shapes
                if tp_rank == len(shapes):
                    shapes = (*shapes, p.shape)
                stages = known.stages if stage in known.stages else (*known.stages, stage)
                params[p.name] = SourceParam(
                    p.name, known.group, shapes, stages, known.layer, known.tie_key
                )
                if known.group != g:
                    raise InconsistentCheckpoint(
                        f"{where}: {p.name} is in optimizer group {known.group} on one stage "
                        f"and {g} on another"
                    )
    for sp in params.values():
        if sp.layer is None and sp.tie_key is None:
            raise UnsupportedLayout(
                f"{where}: parameter {sp.name!r} is neither in a numbered layer nor a tied module, "
                "so the stage that holds it cannot be derived"
            )
    tied = tied_names(layout)
    layer_files: dict[int, dict[str, str]] = {}
    for f in layout.files:
        if f.role is Role.LAYER and f.tp == 0 and f.layer is not None:
            keys = load_saved(layout.dir / f.name) or {}
            layer_files[f.layer] = {k: tied.get((f.layer, k), f"{f.layer}.{k}") for k in keys}
    info = layout.model_info
    vocab = (info.get("checkpoint_info") or {}).get("original_vocab_size")
    rules = load_rules(
        rules_file,
        info.get("universal_checkpoint_info"),
        model_args=info.get("args"),
        facts={"original_vocab_size": vocab} if vocab else None,
    )
    return PipelineSource(layout, params, groups, layer_files, rules)


def infer_layer_specs(source: PipelineSource) -> tuple[LayerSpec, ...]:
    """The layer list as far as the files show it (see the module docstring for the rules)."""
    layout = source.layout
    at: dict[int, LayerSpec] = {}
    file_tie: dict[str, int] = {}
    for layer in source.layer_files:
        key = _file_tie_key(source, layer)
        at[layer] = LayerSpec(None, key)
        if key:
            file_tie[key] = layer
    tied_stages: dict[str, set[int]] = {}
    for p in source.params.values():
        if p.tie_key:
            tied_stages.setdefault(p.tie_key, set()).update(p.stages)
    parts = layout.stage_parts
    for key, stages in sorted(tied_stages.items()):
        home = maps.layer_stage(parts)[file_tie[key]] if key in file_tie and parts else None
        for stage in sorted(stages):
            if stage == home and layout.pp > 1:
                continue
            inside = [x for x in at if not parts or parts[stage] <= x < parts[stage + 1]]
            position = max(inside, default=(parts[stage] - 1) if parts else -1) + 1
            while position in at:
                position += 1
            at[position] = LayerSpec(None, key)
    count = max(at, default=-1) + 1
    return tuple(at.get(i, LayerSpec(None)) for i in range(count))


def _file_tie_key(source: PipelineSource, layer: int) -> str | None:
    """The tie key of the module saved in ``layer``'s file, if it is a tied module."""
    names = source.layer_files[layer].values()
    return next((k for n in names if n in source.params and (k := source.params[n].tie_key)), None)


def _check_specs(source: PipelineSource, specs: Sequence[LayerSpec]) -> None:
    for layer in sorted(source.layer_files):
        key = _file_tie_key(source, layer)
        if layer >= len(specs):
            raise UsageError(
                f"--layer-specs lists {len(specs)} layers, but the checkpoint has "
                f"a file for layer {layer}"
            )
        if specs[layer].tie_key != key:
            want = f"tied to {key!r} ({key}@TYPE)" if key else "not tied"
            raise UsageError(
                f"--layer-specs: layer {layer} is {specs[layer]} but its layer file "
                f"says it is {want}"
            )
    tie_keys = {k for p in source.params.values() if (k := p.tie_key)}
    for i, spec in enumerate(specs):
        if spec.tie_key and spec.tie_key not in tie_keys:
            raise UsageError(
                f"--layer-specs: layer {i} is tied to {spec.tie_key!r}, but the "
                f"checkpoint's tied modules are {sorted(tie_keys) or 'none'}"
            )


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetStage:
    """One target stage: its layers and, per optimizer group, its parameters in flat order."""

    stage: int
    layers: range
    groups: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PipelinePlan:
    """Everything the output depends on, in names and integers (plus the TP re-split plans).

    ``dst_parts`` are the target stage boundaries over ``specs``: DeepSpeed's
    ``PipelineModule.parts`` exactly when the layer specs are given; with inferred specs the
    parameter-free specs after the last visible one are missing, so the last boundary can be
    smaller than DeepSpeed's (every layer with parameters is on the same stage either way).
    """

    source: PipelineSource
    dst: maps.Topology
    method: str
    specs: tuple[LayerSpec, ...]
    specs_inferred: bool
    dst_parts: tuple[int, ...]
    stages: tuple[TargetStage, ...]
    tp_plans: Mapping[str, TPPlan]  # empty when TP is unchanged

    @property
    def src(self) -> maps.Topology:
        layout = self.source.layout
        return maps.Topology(pp=layout.pp, tp=layout.tp, dp=layout.dp)

    def local_shape(self, name: str, tp_rank: int) -> Shape:
        plan = self.tp_plans.get(name)
        if plan is None:
            return self.source.params[name].shapes[tp_rank]
        return tuple(plan.dst_shapes[tp_rank])

    def layer_counts(self) -> list[int]:
        """Trainable elements of each layer spec as one target TP rank builds it."""
        by_layer: dict[int | str, int] = {}
        for p in self.source.params.values():
            where: int | str = p.layer if p.layer is not None else f"tied:{p.tie_key}"
            by_layer[where] = by_layer.get(where, 0) + zero.numel(self.local_shape(p.name, 0))
        return [
            by_layer.get(f"tied:{s.tie_key}" if s.tie_key else i, 0)
            for i, s in enumerate(self.specs)
        ]


def plan_pipeline(
    layout: Layout,
    *,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    partition_method: str = "parameters",
    layer_specs: str | None = None,
    rules_file: Path | None = None,
) -> PipelinePlan:
    """Plan the reshape of a pipeline checkpoint (reads metadata only).

    Raises:
        UsageError: a degree below 1, a target the layers cannot fill, bad ``layer_specs``.
        RuleError: a parameter no TP rule covers, or a TP degree that does not divide it.
    """
    from dsckpt.plan.tp_rules import RuleError

    maps.check_degrees(dp=dp, tp=tp, pp=pp)
    source = open_pipeline(layout, rules_file)
    dst = maps.Topology(pp=pp or layout.pp, tp=tp or layout.tp, dp=dp or layout.dp)
    tp_plans: dict[str, TPPlan] = {}
    if dst.tp != layout.tp:
        source.rules.check(list(source.params))
        for name, p in source.params.items():
            try:
                tp_plans[name] = source.rules.reshard_plan(name, p.shapes, dst.tp)
            except RuleError as exc:
                raise RuleError(f"--tp {dst.tp}: {exc}") from None
            if tp_plans[name].combine == "mean":
                raise UnsupportedLayout(
                    f"{name}: its rule averages the TP copies, which gives new values rather "
                    "than the saved ones; reshape copies replicated tensors (rule kind "
                    '"replicated"), so use that rule to reshape'
                )
    specs = parse_layer_specs(layer_specs) if layer_specs else infer_layer_specs(source)
    _check_specs(source, specs)
    lowered = partition_method.lower()
    if layer_specs is None and (lowered == "uniform" or lowered.startswith("type:")):
        raise UsageError(
            f"--partition-method {partition_method} needs the model's layer spec list, which "
            "the checkpoint does not record: pass --layer-specs (what the files show: "
            f"{format_layer_specs(specs)}, where ? is an unknown type and parameter-free "
            "layers after the last one with parameters are not visible)"
        )
    if dst.pp > len(specs):
        how = "inferred from the files" if layer_specs is None else "given"
        raise UsageError(
            f"--pp {dst.pp}: the model has {len(specs)} layer specs ({how}), so "
            f"at most {len(specs)} stages can each hold one"
        )
    plan = PipelinePlan(source, dst, partition_method, specs, layer_specs is None, (), (), tp_plans)
    try:
        parts = tuple(
            maps.partition_layers(
                partition_method,
                dst.pp,
                num_layers=len(specs),
                param_counts=plan.layer_counts(),
                layer_types=[s.typename for s in specs],
            )
        )
    except maps.MapError as exc:
        raise UsageError(f"--partition-method: {exc}") from None
    stages = tuple(_target_stage(source, specs, parts, s) for s in range(dst.pp))
    for stage in stages:
        if not any(stage.groups):
            raise UsageError(
                f"--pp {dst.pp}: stage {stage.stage} would hold layers {list(stage.layers)} "
                f"with no parameters ({partition_method} partitioning of {len(specs)} layers); "
                "choose fewer stages"
            )
        for g, names in enumerate(stage.groups):
            if not names:
                raise UnsupportedLayout(
                    f"--pp {dst.pp}: stage {stage.stage} would have no parameter in optimizer "
                    f"group {g}; DeepSpeed cannot build an empty flat group"
                )
    placed = {n for stage in stages for names in stage.groups for n in names}
    lost = [n for n in source.params if n not in placed]
    if lost:
        raise UsageError(
            f"the layer specs place no stage on {len(lost)} parameter(s) "
            f"({listed(lost)}): check --layer-specs"
        )
    return PipelinePlan(
        source, dst, partition_method, specs, layer_specs is None, parts, stages, tp_plans
    )


def _target_stage(
    source: PipelineSource, specs: Sequence[LayerSpec], parts: Sequence[int], stage: int
) -> TargetStage:
    """DeepSpeed's flat order: the client's groups list the tied modules (registered first in
    ``PipelineModule``) and then the layers in index order, each in its own parameter order."""
    layers = range(parts[stage], parts[stage + 1])
    keys = {specs[i].tie_key for i in layers if specs[i].tie_key}
    groups: list[list[str]] = [[] for _ in range(source.groups)]
    for p in source.params.values():
        if p.tie_key in keys or p.layer in layers:
            groups[p.group].append(p.name)
    tied = [[n for n in names if source.params[n].tie_key] for names in groups]
    rest = [
        sorted(
            (n for n in names if not source.params[n].tie_key),
            key=lambda n: source.params[n].layer or 0,
        )
        for names in groups
    ]
    return TargetStage(stage, layers, tuple(tuple(t + r) for t, r in zip(tied, rest, strict=True)))


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


@dataclass
class PipelineReshapeResult:
    """What :func:`reshape_pipeline` did (or, for a dry run, would do)."""

    plan: PipelinePlan
    source: Path
    out: Path
    tag: str
    written: bool
    files: list[str] = field(default_factory=list)
    nbytes: int = 0
    skipped: list[str] = field(default_factory=list)  # tag-directory entries not copied
    # Plans every target file on demand (a dry run does not, unless asked: --dry-run --json).
    plan_files: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def dst_parts(self) -> tuple[int, ...]:
        return self.plan.dst_parts

    def summary(self) -> str:
        from dsckpt.plan.zero_reshape import skipped_note

        src, dst = self.plan.src, self.plan.dst
        move = f"PP {src.pp} x TP {src.tp} x DP {src.dp} -> PP {dst.pp} x TP {dst.tp} x DP {dst.dp}"
        if not self.written:
            return f"dry run: {move}; nothing written (would write {self.out}/{self.tag}/)"
        return (
            f"wrote {self.out} (tag {self.tag}): {move}, {len(self.files)} files, "
            f"{human_bytes(self.nbytes)}{skipped_note(self.skipped)}"
        )
