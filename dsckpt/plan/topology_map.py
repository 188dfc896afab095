"""Which file holds which layer slice for which rank, now and for a target topology.

Pure data over a :class:`~dsckpt.discover.layout.Layout` and the integer maps of
:mod:`dsckpt.plan.maps`; ``show-map`` renders it and ``reshape --dry-run`` will render the same
thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsckpt.discover import zero
from dsckpt.discover.files import Role
from dsckpt.discover.layout import Finding, Layout, ZeroSources
from dsckpt.discover.moe import MoeLayout
from dsckpt.errors import UnsupportedLayout, UsageError
from dsckpt.plan import maps
from dsckpt.plan.pipeline_reshape import PipelinePlan, format_layer_specs, plan_pipeline


@dataclass(frozen=True)
class StageRow:
    """One (stage, TP rank) of the source: its layers and files."""

    stage: int
    tp_rank: int
    mp_rank: int
    layers: tuple[int, ...]  # layers with a layer file on this TP rank, inside the stage
    model_files: tuple[str, ...]  # one, or one per DP rank (ZeRO-3)
    optim_files: tuple[str, ...]  # by DP rank

    @property
    def model_file(self) -> str | None:
        """The one model-states file of this rank; None where each DP rank writes its own."""
        return self.model_files[0] if len(self.model_files) == 1 else None


@dataclass(frozen=True)
class TargetRow:
    """One target (stage', TP rank') and the sources that make it."""

    stage: int
    tp_rank: int
    mp_rank: int
    layers: range
    source_stages: tuple[int, ...]
    tp_pieces: tuple[maps.Piece, ...]  # in units of 1/tp_unit of every split dimension
    dp_sources: tuple[tuple[int, ...], ...]  # per target DP rank: source DP ranks (a superset)


@dataclass(frozen=True)
class ExpertTargetRow:
    """One expert optimizer group at a target DP size: which source files feed each new rank.

    Target DP rank ``d'`` holds EDP rank ``d' // ep`` of EP rank ``d' % ep`` (EP unchanged), so
    its sources are files of the same EP rank only: ``R, R + ep, ...`` whose EDP partitions
    overlap its own."""

    group: int
    name: str
    ep_size: int
    edp_size: int  # at the target
    dp_sources: tuple[tuple[int, ...], ...]  # per target DP rank: source DP ranks


@dataclass(frozen=True)
class TopologyMap:
    src: maps.Topology
    src_parts: tuple[int, ...]
    rows: tuple[StageRow, ...]
    dst: maps.Topology | None = None
    dst_parts: tuple[int, ...] = ()
    method: str = ""
    tp_unit: int = 1
    targets: tuple[TargetRow, ...] = ()
    layer_specs: str = ""  # the PipelineModule layer list the target stages were computed over
    specs_inferred: bool = False
    # What discovery found wrong or notable (missing, stale or mixed files, bad metadata): a map
    # of a broken checkpoint is shown with them, never alone.
    findings: tuple[Finding, ...] = ()
    # Mixture-of-experts: the expert placement (Layout.moe) and, with a target DP, the sources
    # of each expert group's new partitions (``targets[].dp_sources`` then cover dense groups).
    moe: MoeLayout | None = None
    expert_targets: tuple[ExpertTargetRow, ...] = ()


def topology_map(
    layout: Layout,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    method: str = "parameters",
    layer_specs: str | None = None,
    plan: PipelinePlan | None = None,
) -> TopologyMap:
    """The source maps of ``layout`` and, when any degree is given, the old -> new maps.

    Raises:
        UsageError: a degree below 1, or a target the layers cannot fill.
        UnsupportedLayout: the checkpoint does not record what the map needs.
    """
    if layout.kind == "universal":
        # Its zero/ folders hold whole parameters: there are no ranks to map.
        raise UnsupportedLayout(
            f"{layout.dir} is a universal checkpoint: it holds every parameter whole, with no "
            "rank partitions to map; `dsckpt inspect --params` lists them"
        )
    src = maps.Topology(pp=layout.pp, tp=layout.tp, dp=layout.dp)
    rows = tuple(_rows(layout))
    parts = layout.stage_parts
    if layout.kind != "pipeline":
        parts = (0, 1)  # the whole model as one unit: only the DP dimension can change
    elif layout.pp == 1 and not parts:
        last = max((f.layer or 0 for f in layout.files if f.role is Role.LAYER), default=-1)
        parts = (0, last + 1)
    base = TopologyMap(
        src=src, src_parts=tuple(parts), rows=rows, findings=layout.findings, moe=layout.moe
    )
    if tp is None and pp is None and dp is None:
        return base
    maps.check_degrees(tp=tp, pp=pp, dp=dp)
    if layout.moe is not None and dp is not None:
        _check_moe_dp(layout.moe, dp)
    dst = maps.Topology(pp=pp or layout.pp, tp=tp or layout.tp, dp=dp or layout.dp)
    if layout.kind != "pipeline" and (dst.pp, dst.tp) != (layout.pp, layout.tp):
        raise UnsupportedLayout(
            f"{layout.dir} is not a pipeline / Megatron checkpoint: only --dp can change"
        )
    if not parts:
        raise UnsupportedLayout(
            f"{layout.dir}: the stage boundaries are not recorded (no ZeRO "
            "param_shapes), so a target pipeline map cannot be drawn"
        )
    specs_text, inferred = "", False
    if layout.kind == "pipeline" and layout.zero_sources:
        # The same plan `reshape` writes: layer specs, parameter counts at the target TP.
        if plan is None:  # reshape --dry-run passes the plan it made
            plan = plan_pipeline(
                layout,
                tp=dst.tp,
                pp=dst.pp,
                dp=dst.dp,
                partition_method=method,
                layer_specs=layer_specs,
            )
        dst_parts = plan.dst_parts
        parts = (*parts[:-1], max(parts[-1], len(plan.specs)))
        specs_text, inferred = format_layer_specs(plan.specs), plan.specs_inferred
    else:
        num_layers = parts[-1]
        if dst.pp > num_layers:
            raise UsageError(
                f"--pp {dst.pp}: the checkpoint shows {num_layers} layers, so at most "
                f"{num_layers} stages can each hold one"
            )
        dst_parts = tuple(
            maps.partition_layers(
                method,
                dst.pp,
                num_layers=num_layers,
                param_counts=_layer_param_counts(layout, num_layers),
            )
        )
    try:
        reshape = maps.map_3d(src, dst, src_parts=parts, dst_parts=dst_parts)
    except maps.MapError as exc:
        raise UsageError(str(exc)) from exc
    same_model = (dst.pp, dst.tp) == (src.pp, src.tp) and dst_parts == tuple(parts)
    targets = []
    for model in reshape.model_map.targets:
        if same_model and model.mp_rank in layout.zero_sources:
            dp_sources = _dp_overlaps(
                layout.zero_sources[model.mp_rank],
                dst.dp,
                layout.moe.expert_group_indices if layout.moe else frozenset(),
            )
        else:  # the flat groups change with the layers and slices: any source DP rank may feed
            dp_sources = tuple(tuple(range(src.dp)) for _ in range(dst.dp))
        targets.append(
            TargetRow(
                model.stage,
                model.tp_rank,
                model.mp_rank,
                model.layers,
                model.src_stages,
                model.tp_pieces,
                dp_sources,
            )
        )
    return TopologyMap(
        src=src,
        src_parts=tuple(parts),
        rows=rows,
        dst=dst,
        dst_parts=dst_parts,
        method=method,
        tp_unit=reshape.model_map.tp_unit,
        targets=tuple(targets),
        layer_specs=specs_text,
        specs_inferred=inferred,
        findings=layout.findings,
        moe=layout.moe,
        expert_targets=_expert_targets(layout, dst.dp),
    )


def _check_moe_dp(moe: MoeLayout, dp: int) -> None:
    """DeepSpeed builds expert-data-parallel groups of DP / EP ranks: DP must be a multiple of
    every layer's EP size."""
    bad = sorted({layer.ep_size for layer in moe.layers if layer.ep_size and dp % layer.ep_size})
    if bad:
        raise UsageError(
            f"--dp {dp}: the checkpoint's MoE layers have expert-parallel size "
            f"{', '.join(map(str, bad))}, and DeepSpeed needs the data-parallel size to be a "
            "multiple of it (EP stays as saved): pick a multiple"
        )


def _expert_targets(layout: Layout, dst_dp: int) -> tuple[ExpertTargetRow, ...]:
    if layout.moe is None or 0 not in layout.zero_sources:
        return ()
    sources = layout.zero_sources[0]
    rows = []
    for group in layout.moe.groups:
        new_edp = dst_dp // group.ep_size
        if sources.zero3 is not None:  # every parameter split on its own: all EDP ranks meet
            per_rank = [group.files_of(d % group.ep_size) for d in range(dst_dp)]
            rows.append(
                ExpertTargetRow(group.index, group.name, group.ep_size, new_edp, tuple(per_rank))
            )
            continue
        flat = sources.groups[group.index]
        new_edp = dst_dp // group.ep_size
        data = flat.data_numel
        new_size = zero.zero12_partition_size(data, new_edp)
        src_bounds = [min(data, r * flat.partition_size) for r in range(group.edp_size + 1)]
        dst_bounds = [min(data, r * new_size) for r in range(new_edp + 1)]
        overlaps = maps.overlap_pieces(src_bounds, dst_bounds)
        per_rank = []
        for d in range(dst_dp):
            ep_rank, edp_rank = d % group.ep_size, d // group.ep_size
            files = group.files_of(ep_rank)
            per_rank.append(tuple(sorted({files[p.src] for p in overlaps[edp_rank]})))
        rows.append(
            ExpertTargetRow(group.index, group.name, group.ep_size, new_edp, tuple(per_rank))
        )
    return tuple(rows)


def _dp_overlaps(
    sources: ZeroSources, dst_dp: int, skip: frozenset[int] = frozenset()
) -> tuple[tuple[int, ...], ...]:
    """Per target DP rank, the source DP ranks whose partitions overlap it, over all groups
    but ``skip`` (MoE expert groups, partitioned over their EP rank's files only)."""
    found: list[set[int]] = [set() for _ in range(dst_dp)]
    layouts = [g for i, g in enumerate(sources.groups) if i not in skip]
    if sources.zero3 is not None:  # every parameter is split on its own: all ranks meet
        return tuple(tuple(range(sources.zero3.dp)) for _ in range(dst_dp))
    for group in layouts:
        data = group.data_numel
        new_size = zero.zero12_partition_size(data, dst_dp)
        src_bounds = [min(data, r * group.partition_size) for r in range(group.dp + 1)]
        dst_bounds = [min(data, r * new_size) for r in range(dst_dp + 1)]
        for rank, pieces in enumerate(maps.overlap_pieces(src_bounds, dst_bounds)):
            found[rank].update(p.src for p in pieces)
    return tuple(tuple(sorted(s)) for s in found)


def _rows(layout: Layout) -> list[StageRow]:
    layer_tps: dict[int, set[int]] = {}
    for f in layout.files:
        if f.role is Role.LAYER and f.layer is not None:
            layer_tps.setdefault(f.tp or 0, set()).add(f.layer)
    parts = layout.stage_parts
    rows = []
    for stage in range(layout.pp):
        inside = range(parts[stage], parts[stage + 1]) if parts else range(0)
        for tp_rank in range(layout.tp):
            mp = stage * layout.tp + tp_rank
            optim = sorted(
                (f for f in layout.files if f.role is Role.OPTIM and f.mp == mp),
                key=lambda f: f.dp or 0,
            )
            layers = tuple(sorted(x for x in layer_tps.get(tp_rank, ()) if x in inside))
            if layout.kind == "zero3":  # every DP rank saves its own share of the model states
                model = tuple(
                    f"zero_pp_rank_{d}_mp_rank_{mp:02d}_model_states.pt" for d in range(layout.dp)
                )
            else:
                model = (f"mp_rank_{mp:02d}_model_states.pt",)
            rows.append(StageRow(stage, tp_rank, mp, layers, model, tuple(f.name for f in optim)))
    return rows


def _layer_param_counts(layout: Layout, num_layers: int) -> list[int]:
    """Trainable elements per layer as one TP rank holds them (what ``parameters`` balances)."""
    counts = [0] * num_layers
    for t in layout.tensors:
        head = t.name.split(".", 1)[0]
        if head.isdigit() and int(head) < num_layers:
            counts[int(head)] += t.numel
    return counts


def reshape_map(plan: PipelinePlan) -> TopologyMap:
    """The show-map view of a pipeline reshape plan: what ``reshape --dry-run`` renders."""
    return topology_map(
        plan.source.layout,
        tp=plan.dst.tp,
        pp=plan.dst.pp,
        dp=plan.dst.dp,
        method=plan.method,
        plan=plan,
    )
