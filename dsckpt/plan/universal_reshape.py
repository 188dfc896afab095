"""Reshape a universal checkpoint into a native ZeRO checkpoint at any data-parallel size.

A universal checkpoint (``ds_to_universal``) holds each parameter's full optimizer state in its
own folder (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``), the
optimizer's unpartitioned bookkeeping in ``zero/optimizer_state.pt`` and the source run's model
files. Unmodified DeepSpeed reads it only through ``load_universal``; this module plans the
native rank files DeepSpeed itself would have saved at ``N`` ranks, so a plain
``engine.load_checkpoint(OUT)`` resumes from them.

The planning reuses the native planner (:func:`~dsckpt.plan.zero_reshape.plan_from_facts`):
the universal checkpoint is described as a source whose every flat group is held whole by one
virtual rank (ZeRO-1/2: the group's flat buffer in the source's flat order, alignment pads
included), and the runs the planner cuts from that flat buffer are then split at parameter
boundaries into runs over the parameters' own files (:class:`Run` with ``src_index`` the
parameter's position in :attr:`UniversalSource.params`). The writer
(:class:`~dsckpt.execute.formats.deepspeed_files.ZeroRankFiles`) turns those runs into byte
copies of the ``zero/<name>/*.pt`` tensors, exactly as it copies native partitions.

Which optimizer the output is for follows the source run, as its model files' ``ds_config``
records it (``zero_optimization.stage``; ``bf16.enabled`` with ``data_types.grad_accum_dtype``
fp32 at stage 1 is DeepSpeed's BF16_Optimizer), checked against ``zero/optimizer_state.pt``
(written by that optimizer's own ``state_dict``: ZeRO records ``zero_stage``, BF16_Optimizer
does not). When ``ds_config`` records no stage, ``optimizer_state.pt`` alone decides; when the
two disagree the reshape is refused: the files would not load into the run that reads them.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dsckpt.discover import zero
from dsckpt.discover.files import Role
from dsckpt.discover.layout import Layout, refuse_errors
from dsckpt.discover.universal import OPTIMIZER_STATE_FILE, ZERO_DIR, UniversalParam
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.load import TensorRef, load_meta
from dsckpt.io.unpickle import load_saved
from dsckpt.plan.maps import check_degrees
from dsckpt.plan.zero_reshape import (
    DEFAULT_SUB_GROUP_SIZE,
    Partition,
    ReshapePlan,
    Run,
    SourceFacts,
    SourceGroup,
    _offsets,
    plan_from_facts,
)
from dsckpt.plan.zero_source import (
    LoadedOnUse,
    check_zero3_sub_groups,
    config_flag,
    sub_group_size_of,
    zero3_group_of,
)
from dsckpt.printable import listed

# The optimizer state a universal folder holds per parameter, split like the fp32 master.
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class ParamSpan:
    """Where one parameter lies in its group's flat buffer (``start``, ``numel`` elements) and
    its index in :attr:`UniversalSource.params`."""

    index: int
    start: int
    numel: int


@dataclass
class UniversalSource:
    """A universal checkpoint opened for reshaping: what the writer needs besides the plan.

    Attributes:
        layout: the discovered checkpoint.
        tag: the tag directory's name, kept for the output (``OUT/latest`` names it).
        facts: the source as the native planner sees it (one virtual rank per group).
        params: the trainable parameters in flat order, group after group.
        states: per state (``fp32``, ``exp_avg``, ``exp_avg_sq``) the saved tensor of each
            parameter in ``params`` order (``None``: the folder lacks it).
        steps: per optimizer group, the saved ``step`` tensor of its first parameter that has one.
        model: DP rank 0's model-states file (the template of every output model file).
        optim: ``zero/optimizer_state.pt`` as a rank-0 optimizer file (see
            :class:`_OptimizerTemplate`).
        optim_prefix: ``bf16_`` when the run trained in bf16 (DeepSpeed's file naming).
        extra_files: other regular entries of the tag directory, copied as they are.
    """

    layout: Layout
    tag: str
    facts: SourceFacts
    params: tuple[str, ...]
    states: Mapping[str, tuple[TensorRef | None, ...]]
    steps: tuple[TensorRef | None, ...]
    model: Mapping[int, tuple[Path, Any]]
    optim: _OptimizerTemplate
    optim_prefix: str
    extra_files: tuple[Path, ...] = ()
    # What the writer asks of a native MoE source; universal MoE checkpoints are refused at
    # discovery, so there are no expert files and every group sits at its own position.
    expert_files: tuple[Path, ...] = ()

    def position(self, rank: int, group: int) -> int:
        return group


def open_universal(layout: Layout) -> UniversalSource:
    """Check that ``layout`` (a universal checkpoint) is one reshape can write natively, and
    gather the facts.

    Raises:
        InconsistentCheckpoint: discovery found an error (``inspect`` lists them all).
        UnsupportedLayout: pipeline, tensor-parallel or MoE sources, an optimizer that cannot
            be told, or optimizer state missing for part of a group.
    """
    where = layout.dir
    info = layout.universal
    if layout.pp > 1 and layout.tp == 1:
        raise UnsupportedLayout(_pipeline_refusal(layout))
    refuse_errors(layout)
    if info is None:
        raise InconsistentCheckpoint(f"{where}: the universal checkpoint could not be read")
    stage3 = layout.zero_stage == 3
    model_role = Role.ZERO3_MODEL if stage3 else Role.MODEL
    model_file = next(
        (f for f in layout.files if f.role is model_role and (f.mp or 0) == 0 and not f.dp),
        None,
    )
    if model_file is None:
        raise InconsistentCheckpoint(f"{where} has no rank-0 model-states file")
    model_path = where / model_file.name
    state_path = where / ZERO_DIR / OPTIMIZER_STATE_FILE
    if not state_path.is_file() or state_path.is_symlink():
        raise InconsistentCheckpoint(
            f"{state_path} is missing: it holds the optimizer's param_groups and loss-scaler "
            "state a native checkpoint needs; copy it from the ds_to_universal output"
        )
    meta = load_saved(model_path)
    saved_state = load_saved(state_path)
    config = meta.get("ds_config") if isinstance(meta.get("ds_config"), Mapping) else {}
    kind, stage = _optimizer_kind(config, saved_state, layout.zero_stage, model_path, state_path)
    if stage3 != (stage == 3):
        raise UnsupportedLayout(
            f"{where}: the model files are those of a ZeRO-{3 if stage3 else '1/2'} run but the "
            f"optimizer state says stage {stage}: the folder mixes two checkpoints"
        )
    kind = "zero3" if stage3 else kind
    zcfg = config.get("zero_optimization") if isinstance(config, Mapping) else None
    zcfg = zcfg if isinstance(zcfg, Mapping) else {}
    if config_flag(zcfg, "elastic_checkpoint", model_path.name):
        raise UnsupportedLayout(
            f"{model_path.name}: the run used zero_optimization.elastic_checkpoint; reshape "
            "writes the default (rigid) layout only"
        )
    if kind == "zero" and config_flag(zcfg, "parameter_alignment", model_path.name):
        raise UnsupportedLayout(
            f"{model_path.name}: the run used zero_optimization.parameter_alignment, which "
            "reshape from a universal checkpoint does not handle yet"
        )
    groups_shapes = meta.get("param_shapes")
    if not isinstance(groups_shapes, list) or not groups_shapes:
        raise InconsistentCheckpoint(f"{model_path.name} records no `param_shapes`")
    template = _OptimizerTemplate(state_path, meta)
    if stage3:
        groups = _zero3_groups(layout, groups_shapes, saved_state, template, state_path)
    else:
        groups = _zero12_groups(groups_shapes, saved_state, state_path)
    names = [n for group in groups for n, _ in group.params]
    by_name = info.by_name()
    facts = SourceFacts(
        kind=kind,
        stage=stage,
        dp=layout.dp,
        groups=tuple(groups),
        round_robin=kind == "zero" and config_flag(zcfg, "round_robin_gradients", model_path.name),
        sub_group_size=sub_group_size_of(zcfg, layout.dir) if stage3 else DEFAULT_SUB_GROUP_SIZE,
        frozen=tuple((n, tuple(s)) for n, s in (meta.get("frozen_param_shapes") or {}).items())
        if stage3
        else (),
        param_order=_module_order(meta) if stage3 else (),
    )
    if stage3:
        check_zero3_sub_groups(layout, groups, facts.sub_group_size)
    states = {key: tuple(_state(by_name.get(n), key) for n in names) for key in ("fp32", *MOMENTS)}
    missing_fp32 = [n for n, ref in zip(names, states["fp32"], strict=True) if ref is None]
    if missing_fp32:
        raise InconsistentCheckpoint(
            f"{where / ZERO_DIR}: no fp32.pt for {listed(missing_fp32)}: the fp32 "
            "master weights are nowhere else"
        )
    _check_moments(where, names, states)
    steps = []
    for g, group in enumerate(groups):
        held = [by_name[n].step_ref for n, _ in group.params if by_name[n].step_ref is not None]
        if not stage3 and not held:
            # (ZeRO-3: the step of each sub-group is in optimizer_state.pt's own state)
            raise UnsupportedLayout(
                f"{where / ZERO_DIR}: no parameter of group {g} has a step.pt holding a "
                "tensor: the optimizer's step count cannot be written as DeepSpeed saves it"
            )
        steps.append(held[0] if held else None)
    files = {f.name for f in layout.files}
    with os.scandir(where) as it:
        extra = tuple(
            Path(e.path)
            for e in sorted(it, key=lambda e: e.name)
            if e.name not in files and e.name != ZERO_DIR
        )
    return UniversalSource(
        layout=layout,
        tag=layout.tag if layout.tag is not None else where.name,
        facts=facts,
        params=tuple(names),
        states=states,
        steps=tuple(steps),
        model=LoadedOnUse({0: model_path}),
        optim=template,
        optim_prefix="bf16_" if _bf16(config) else "",
        extra_files=extra,
    )


def plan_universal(source: UniversalSource, dp: int) -> ReshapePlan:
    """The native rank files' plan at ``dp`` ranks (pure: integers in, integers out): the
    native planner's runs over the virtual one-rank source, re-cut per parameter."""
    check_degrees(dp=dp)
    facts = source.facts
    # ZeRO-3 pieces are cut from whole parameters: the virtual source has DP 1.
    virtual = replace(facts, dp=1, frozen=()) if facts.kind == "zero3" else facts
    plan = plan_from_facts(virtual, dp)
    spans = flat_spans(virtual, source.params)
    # Each group's span ends, to find a run's first parameter by bisection: planning stays
    # linear in ranks + parameters (a thousand ranks over tens of thousands of parameters).
    ends = [[s.start + s.numel for s in group] for group in spans]
    groups = tuple(
        replace(group, partitions=tuple(_per_param(p, spans, ends) for p in group.partitions))
        for group in plan.groups
    )
    plan = replace(plan, groups=groups, source_dp=facts.dp, run_sources=source.params)
    if facts.frozen:
        # ZeRO-3 frozen weights are not under zero/: the model files hold them in pieces at the
        # source's DP, re-split as a native reshape does.
        frozen = plan_from_facts(replace(facts, groups=()), dp).frozen
        plan = replace(plan, frozen=frozen)
    return plan


def flat_spans(facts: SourceFacts, params: Sequence[str]) -> list[list[ParamSpan]]:
    """Each group's parameters as they lie in its flat buffer on the virtual rank (ZeRO-1/2:
    ``param_shapes`` order with the alignment pads recorded; ZeRO-3: whole parameters one
    after another)."""
    index = {n: i for i, n in enumerate(params)}
    out = []
    for group in facts.groups:
        numels = [zero.numel(s) for _, s in group.params]
        pads = list(group.alignment_paddings or [0] * len(numels))
        offsets, _ = _offsets(numels, pads)
        out.append(
            [
                ParamSpan(index[n], start, numel)
                for (n, _), start, numel in zip(group.params, offsets, numels, strict=True)
            ]
        )
    return out


def _per_param(
    part: Partition, spans: Sequence[Sequence[ParamSpan]], ends: Sequence[Sequence[int]]
) -> Partition:
    """``part`` with each run over a virtual flat buffer split into runs over the parameters
    it crosses; the alignment pads between parameters are left to the zeros."""
    runs: list[Run] = []
    for run in part.runs:
        if run.src_rank != 0:
            raise AssertionError("plan error: a universal source has one virtual rank")
        lo, hi = run.src_start, run.src_start + run.length
        group = spans[run.src_index]
        # from the first parameter ending after `lo`, on while they start before `hi`
        i = bisect.bisect_right(ends[run.src_index], lo)
        while i < len(group) and group[i].start < hi:
            span = group[i]
            a, b = max(lo, span.start), min(hi, span.start + span.numel)
            if a < b:
                runs.append(Run(0, span.index, a - span.start, b - a, run.dst_start + a - lo))
            i += 1
    return replace(part, runs=tuple(runs))


class _OptimizerTemplate(Mapping[int, tuple[Path, Any]]):
    """``zero/optimizer_state.pt`` in the shape of DP rank 0's native optimizer file, loaded
    with torch's meta tensors when first asked for (the writer's template).

    ds_to_universal saved rank 0's ``optimizer_state_dict`` there without its partitioned
    entries (ZeRO-1/2; ZeRO-3 keeps them all), plus a ``param_groups`` copy of the torch
    optimizer's groups: that copy is set apart (:attr:`param_groups`), and the file's
    ``ds_config`` / ``ds_version`` come from the model file, as the engine saves both."""

    def __init__(self, path: Path, model_meta: Mapping[str, Any]) -> None:
        self.path = path
        self._top = {k: model_meta.get(k) for k in ("ds_config", "ds_version")}
        self._loaded: tuple[Path, Any] | None = None
        self.param_groups: Any = None

    def __getitem__(self, rank: int) -> tuple[Path, Any]:
        if rank != 0:
            raise KeyError(rank)
        if self._loaded is None:
            raw = dict(load_meta(self.path))
            self.param_groups = raw.pop("param_groups", None)
            self._loaded = (self.path, {"optimizer_state_dict": raw, **self._top})
        return self._loaded

    def __iter__(self) -> Iterator[int]:
        return iter((0,))

    def __len__(self) -> int:
        return 1


# What ds_to_universal leaves out of a ZeRO-1/2 optimizer_state.pt (the entries cut per rank):
# the writer makes them for the new size, so a file holding them is not its output.
SHARDED_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")


def _zero12_groups(
    groups_shapes: Sequence[Any], saved: Mapping[str, Any], state_path: Path
) -> list[SourceGroup]:
    """The flat groups as ``param_shapes`` lists them, one per torch param group, with the
    alignment pads ``optimizer_state.pt`` records."""
    sharded = [k for k in SHARDED_KEYS if k in saved]
    if sharded:
        raise UnsupportedLayout(
            f"{state_path} holds per-rank entries ({', '.join(sharded)}) ds_to_universal "
            "leaves out: it is not ds_to_universal's output; convert the native checkpoint again"
        )
    param_groups = saved.get("param_groups")
    expected = [[g] for g in range(len(groups_shapes))]
    saved_groups = (
        [list(g.get("params") or []) for g in param_groups if isinstance(g, Mapping)]
        if isinstance(param_groups, (list, tuple))
        else None
    )
    if saved_groups != expected:
        raise InconsistentCheckpoint(
            f"{state_path}: `param_groups` lists {saved_groups} where the model files' "
            f"`param_shapes` has {len(groups_shapes)} flat group(s) ({expected} for ZeRO-1/2): "
            "the file belongs to another checkpoint"
        )
    groups = []
    aligns = saved.get("param_alignment_paddings")
    for g, shapes in enumerate(groups_shapes):
        params = tuple((str(n), tuple(int(x) for x in s)) for n, s in shapes.items())
        pads = None
        if isinstance(aligns, (list, tuple)) and g < len(aligns):
            pads = tuple(int(x) for x in aligns[g])
            if len(pads) != len(params):
                raise InconsistentCheckpoint(
                    f"{state_path}: param_alignment_paddings[{g}] has {len(pads)} entries for "
                    f"the {len(params)} parameters `param_shapes` lists in group {g}"
                )
        numels = [zero.numel(s) for _, s in params]
        _, data = _offsets(numels, list(pads) if pads else [0] * len(numels))
        # One virtual rank holds the whole flat buffer (see the module docstring).
        groups.append(
            SourceGroup(
                params=params, param_group=g, partition_size=max(data, 1), alignment_paddings=pads
            )
        )
    return groups


def _zero3_groups(
    layout: Layout,
    groups_shapes: Sequence[Any],
    saved: Mapping[str, Any],
    template: _OptimizerTemplate,
    state_path: Path,
) -> list[SourceGroup]:
    """The source's sub-groups (``param_shapes`` of the rank-0 model file), their optimizer
    groups (the torch optimizer's ``param_groups`` ds_to_universal kept) and the flat tensors'
    ``ds_id`` strings (kept so an unchanged sub-group is written back as it was)."""
    osd = saved.get("optimizer_state_dict")
    if not isinstance(osd, Mapping) or not isinstance(saved.get("fp32_flat_groups"), list):
        raise InconsistentCheckpoint(
            f"{state_path} lacks the ZeRO-3 optimizer's state (optimizer_state_dict, "
            "fp32_flat_groups) ds_to_universal copies from rank 0"
        )
    owner = zero3_group_of(saved, len(groups_shapes), layout.dir)
    flats = template[0][1]["optimizer_state_dict"]["fp32_flat_groups"]
    return [
        SourceGroup(
            params=tuple((str(n), tuple(int(x) for x in s)) for n, s in shapes.items()),
            param_group=owner[i],
            ds_id=getattr(flats[i], "ds_id", None) if i < len(flats) else None,
        )
        for i, shapes in enumerate(groups_shapes)
    ]


def _module_order(meta: Mapping[str, Any]) -> tuple[str, ...]:
    buffers = set(meta.get("buffer_names") or [])
    aliases = set((meta.get("shared_params") or {}).keys())
    return tuple(k for k in (meta.get("module") or {}) if k not in buffers and k not in aliases)


def _state(param: UniversalParam | None, key: str) -> TensorRef | None:
    return None if param is None else param.states.get(key)


def _check_moments(where: Path, names: Sequence[str], states: Mapping[str, Sequence[Any]]) -> None:
    """Adam's moments of every trainable parameter: a native checkpoint keeps them for whole
    flat groups, and resuming without them would silently restart Adam."""
    for key in MOMENTS:
        lacking = [n for n, ref in zip(names, states[key], strict=True) if ref is None]
        if lacking:
            raise UnsupportedLayout(
                f"{where / ZERO_DIR}: no {key}.pt for {len(lacking)} trainable parameter(s) "
                f"({listed(lacking)}): a native "
                "checkpoint needs the optimizer state of every parameter; run ds_to_universal "
                "again (with --inject_missing_state) on the source checkpoint"
            )


def _pipeline_refusal(layout: Layout) -> str:
    """Why a pipeline run's universal checkpoint cannot become native pipeline files: what
    those files hold that ds_to_universal did not keep."""
    info = layout.universal
    params = info.params if info is not None else ()
    missing = [
        "the layer files (each layer's module state, buffers included, and which layer index "
        "holds a tied module)"
    ]
    cut = [p.name for p in params if p.vocab_rows is not None]
    if cut:
        missing.append(f"the vocabulary padding rows of {cut[0]}")
    if any(p.name.startswith("tied_modules.") for p in params) and not (
        info is not None and info.patterns.get("pipeline_replicated_parameter_patterns")
    ):
        missing.append("the first stage's copy of the tied modules")
    return (
        f"{layout.dir} is a universal checkpoint of a {layout.pp}-stage pipeline run: native "
        f"pipeline files need {', '.join(missing)}, which ds_to_universal does not keep; "
        "reshape the native checkpoint instead, or resume this one with load_universal"
    )


def _bf16(config: Any) -> bool:
    if not isinstance(config, Mapping):
        return False
    section = config.get("bf16") or config.get("bfloat16")
    return isinstance(section, Mapping) and section.get("enabled") is True


def _optimizer_kind(
    config: Any, saved: Mapping[str, Any], saved_stage: int, model_path: Path, state_path: Path
) -> tuple[str, int]:
    """``(kind, stage)`` of the source run's optimizer: ``ds_config`` first, checked against
    what ``optimizer_state.pt`` was written by (see the module docstring)."""
    # (discovery read the saved stage already: `zero_stage`, or 1 where BF16_Optimizer omits it)
    saved_kind = "zero" if saved.get("zero_stage") is not None else "bf16_optimizer"
    zcfg = config.get("zero_optimization") if isinstance(config, Mapping) else None
    stage = zcfg.get("stage") if isinstance(zcfg, Mapping) else None
    if not isinstance(stage, int) or isinstance(stage, bool):
        return saved_kind, saved_stage
    types = config.get("data_types") if isinstance(config, Mapping) else None
    accum = types.get("grad_accum_dtype") if isinstance(types, Mapping) else None
    offload_cfg = zcfg.get("offload_optimizer") if isinstance(zcfg, Mapping) else None
    offload = isinstance(offload_cfg, Mapping) and offload_cfg.get("device") not in (None, "none")
    bf16_optimizer = stage == 1 and _bf16(config) and accum in ("fp32", "float32") and not offload
    kind = "bf16_optimizer" if bf16_optimizer else "zero"
    if stage == 0 or (kind, stage) != (saved_kind, saved_stage):
        raise UnsupportedLayout(
            f"{model_path.name}: ds_config describes "
            f"{'BF16_Optimizer' if bf16_optimizer else f'ZeRO stage {stage}'} but "
            f"{state_path.name} was written by "
            f"{'BF16_Optimizer' if saved_kind == 'bf16_optimizer' else f'ZeRO stage {saved_stage}'}"
            ": the native files would not load into that run"
        )
    return kind, stage
