"""A native ZeRO checkpoint opened for reshaping (:mod:`dsckpt.plan.zero_reshape` plans it).

Reading the source is the planner's only I/O: rank 0's model-states and optimizer files, read
with dsckpt's own reader, give the :class:`~dsckpt.plan.zero_reshape.SourceFacts` (names,
shapes, integers) after the checks that make a reshape trustworthy (group order, ZeRO-3
sub-groups, expert partitioning). The writer gets torch's meta-tensor pickles of the rank files
it copies from, each loaded when first used (:class:`LoadedOnUse`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsckpt.discover import zero
from dsckpt.discover.files import Location, Role, scan
from dsckpt.discover.layout import Layout, open_checkpoint, refuse_errors
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.bounds import short
from dsckpt.io.load import load_meta
from dsckpt.io.unpickle import SavedTensor, load_saved
from dsckpt.plan.maps import check_degrees
from dsckpt.plan.zero_reshape import (
    DEFAULT_SUB_GROUP_SIZE,
    ReshapePlan,
    Shape,
    SourceFacts,
    SourceGroup,
    group_order,
    plan_from_facts,
    zero3_sub_groups,
)

PIPELINE_HINT = "`reshape()` (the `dsckpt reshape` command) takes them to dsckpt.pipeline_reshape"


@dataclass
class Source:
    """A checkpoint opened for reshaping: its layout, every rank file's pickle (meta tensors)
    and the facts the planner needs."""

    layout: Layout
    tag: str
    facts: SourceFacts
    model: Mapping[int, tuple[Path, Any]]  # DP rank 0's model states, the template for all
    optim: Mapping[int, tuple[Path, Any]]  # dp rank -> optimizer file (loaded on first use)
    optim_prefix: str
    extra_files: tuple[Path, ...] = ()  # other entries of the tag directory (copied if regular)
    expert_files: tuple[Path, ...] = ()  # MoE expert weights: planned whole-file copies
    # (DP rank, group) -> position in that rank's file, where it differs (MoE expert groups)
    group_at: Mapping[tuple[int, int], int] = field(default_factory=dict)

    def position(self, rank: int, group: int) -> int:
        """Where flat group ``group`` (``param_shapes`` order) sits in rank ``rank``'s file."""
        return self.group_at.get((rank, group), group)


def open_source(ckpt: Path | str | Layout, tag: str | None = None) -> Source:
    """Open a checkpoint and check it is one :func:`reshape` handles.

    ``ckpt`` is a path, or a :class:`~dsckpt.layout.Layout` already opened by
    :func:`~dsckpt.layout.open_checkpoint` (then ``tag`` is ignored and it is not opened again).

    Raises:
        InconsistentCheckpoint: missing, mixed or damaged rank files (``inspect`` lists them all).
        UnsupportedLayout: pipeline/3D, tensor parallel, universal, stage 0 (MoE included),
            ZeRO-3 AutoEP, elastic or NVMe-offloaded checkpoints.
    """
    layout = ckpt if isinstance(ckpt, Layout) else open_checkpoint(ckpt, tag)
    where = layout.dir
    if layout.kind == "universal":
        raise UnsupportedLayout(
            f"{where} is a DeepSpeed universal checkpoint: this planner reads native rank files; "
            "`reshape()` (the `dsckpt reshape` command) takes it to dsckpt.plan.universal_reshape"
        )
    if layout.kind == "pipeline" or layout.pp > 1 or layout.tp > 1:
        raise UnsupportedLayout(
            f"{where} is a pipeline/tensor-parallel checkpoint (TP {layout.tp} x PP {layout.pp}): "
            f"reshape --dp handles single-model-rank ZeRO checkpoints; {PIPELINE_HINT}"
        )
    refuse_errors(layout)  # the gate every writing command passes
    if layout.kind == "plain" or layout.zero_stage == 0:
        raise UnsupportedLayout(
            f"{where} is a ZeRO stage 0 checkpoint: nothing to reshape, its files do not depend on "
            "the DP size and DeepSpeed loads them at any DP size as they are"
            + (
                " (mixture of experts: the optimizer is saved per expert-parallel rank, "
                "expp_rank_R files, and expert parallelism stays)"
                if layout.moe is not None
                else ""
            )
        )
    if (where / "offloaded_tensors").is_dir():
        raise UnsupportedLayout(
            f"{where} holds NVMe-offloaded optimizer state "
            "(offloaded_tensors/), which reshape does not handle"
        )
    if not layout.zero_sources:
        raise InconsistentCheckpoint(f"{where}: the optimizer partitions could not be located")

    files, _ = scan(location_of(layout))
    optim_paths: dict[int, Path] = {}
    model_paths: dict[int, Path] = {}
    prefix = ""
    for f in files:
        path = where / f.name
        if f.role is Role.OPTIM:
            optim_paths[f.dp or 0] = path
            prefix = f.prefix
        elif f.role is Role.MODEL or (f.role is Role.ZERO3_MODEL and not f.dp):
            model_paths[0] = path
    # The writer gets torch's meta-tensor pickles, each loaded when first used. Planning reads
    # rank 0's two files with dsckpt's own reader instead: importing torch and its unpickler took
    # seconds at 20,000 parameters, and the plan needs names and integers only.
    optim, model = LoadedOnUse(optim_paths), LoadedOnUse(model_paths)
    meta, optim0 = load_saved(model_paths[0]), load_saved(optim_paths[0])
    facts = _facts(layout, meta, optim0, optim)
    name = layout.tag if layout.tag is not None else where.name
    extra = tuple(where / n for n in extra_entries(where, files))
    # MoE expert files hold one expert's weights each, by MoE layer and global expert id: with
    # the expert-parallel size kept they do not depend on the DP size and are copied unchanged.
    experts = [where / f for layer in layout.moe.layers for f in layer.files] if layout.moe else []
    return Source(
        layout=layout,
        tag=name,
        facts=facts,
        model=model,
        optim=optim,
        optim_prefix=prefix,
        extra_files=extra,
        expert_files=tuple(experts),
        group_at=_group_positions(layout),
    )


def _group_positions(layout: Layout) -> Mapping[tuple[int, int], int]:
    """(DP rank, group) -> the group's position in that rank's optimizer file, where it is not
    the group's own index: MoE expert groups can be saved in another order in some files
    (discovery matched them by name and parameters, ``ExpertGroup.file_index``)."""
    out: dict[tuple[int, int], int] = {}
    for group in layout.moe.groups if layout.moe else ():
        for rank, at in enumerate(group.file_index):
            if at != group.index:
                out[(rank, group.index)] = at
    return out


class LoadedOnUse(Mapping[int, tuple[Path, Any]]):
    """DP rank -> (rank file, its pickle with meta tensors), each loaded with torch when first
    asked for, then kept. Planning needs none (it reads rank 0's files with dsckpt's own reader,
    and discovery has read and checked every rank file); the writer loads each as it copies
    from it. Loading all of them up front was most of reshape's planning time at a thousand
    ranks."""

    def __init__(self, paths: Mapping[int, Path]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[int, tuple[Path, Any]] = {}

    def __getitem__(self, rank: int) -> tuple[Path, Any]:
        found = self._loaded.get(rank)
        if found is None:
            path = self._paths[rank]
            found = self._loaded[rank] = (path, load_meta(path))
        return found

    def __iter__(self) -> Iterator[int]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def extra_entries(tag_dir: Path, rank_files: Iterable[Any]) -> list[str]:
    """Names of the tag directory's entries that are not rank files (config copies, notes,
    and whatever else a user keeps there), whatever their kind."""
    rank = {f.name for f in rank_files}
    with os.scandir(tag_dir) as it:
        return sorted(e.name for e in it if e.name not in rank)


def location_of(layout: Layout) -> Location:
    return Location(root=layout.root, tag=layout.tag, dir=layout.dir)


def _zero_config(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    config = meta.get("ds_config") or {}
    zcfg = config.get("zero_optimization") if isinstance(config, Mapping) else None
    return zcfg if isinstance(zcfg, Mapping) else {}


# How DeepSpeed's config model (pydantic) reads a boolean option written as text or a number.
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def config_flag(zcfg: Mapping[str, Any], key: str, where: Path | str) -> bool:
    """A boolean ``zero_optimization`` option of the saved ``ds_config`` as DeepSpeed read it.

    The file keeps the config as the user wrote it, and DeepSpeed's config model takes
    ``"false"``, ``"no"`` or ``0`` for false: ``bool("false")`` would be true, and a layout
    option such as ``round_robin_gradients`` read the other way than the run used it misplaces
    parameters. A value DeepSpeed would not have accepted is an error, not a guess."""
    value = zcfg.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InconsistentCheckpoint(
        f"{where}: the saved ds_config's zero_optimization.{key} is {short(value)}, which "
        "DeepSpeed does not read as true or false: the layout it describes is unknown (the file "
        "is damaged or was not written by DeepSpeed)"
    )


def sub_group_size_of(zcfg: Mapping[str, Any], where: Path) -> int:
    """ZeRO-3's ``sub_group_size`` from the saved ``ds_config`` (DeepSpeed's default when
    absent). It is written as a number (``1e9`` or ``1000000000``, or a string of one); a value
    that is no whole number is named, not turned into a traceback."""
    value = zcfg.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE)
    try:
        number = float(value)
        if not isinstance(value, bool) and number == int(number):
            return int(number)
    except (TypeError, ValueError, OverflowError):
        pass
    raise InconsistentCheckpoint(
        f"{where}: the saved ds_config's zero_optimization.sub_group_size is {short(value)}, not a "
        "whole number of elements: the ZeRO-3 sub-groups cannot be derived (the file is damaged "
        "or was not written by DeepSpeed)"
    )


def _facts(
    layout: Layout,
    meta: Mapping[str, Any],
    optim0: Mapping[str, Any],
    optim: Mapping[int, tuple[Path, Any]],
) -> SourceFacts:
    """What planning needs: ``meta`` and ``optim0`` are DP rank 0's model-states and optimizer
    pickles, read with dsckpt's own reader (tensors as
    :class:`~dsckpt.io.unpickle.SavedTensor`)."""
    sources = next(iter(layout.zero_sources.values()))
    osd0 = optim0["optimizer_state_dict"]
    zcfg = _zero_config(meta)
    if sources.zero3 is not None:
        if osd0.get("ds_zero_partition_groups") is not None or meta.get("ds_autoep_layers"):
            raise UnsupportedLayout(
                f"{layout.dir} is a ZeRO-3 AutoEP (mixture-of-experts) checkpoint: its experts "
                "live in ZeRO-3 sub-groups partitioned over expert-data-parallel groups "
                "(ds_zero_partition_groups), which reshape does not handle; ZeRO-1/2 MoE "
                "checkpoints reshape"
            )
        groups_of = zero3_group_of(osd0, len(meta["param_shapes"]), layout.dir)
        flats = osd0["fp32_flat_groups"]
        groups = tuple(
            SourceGroup(
                params=tuple((n, tuple(s)) for n, s in shapes.items()),
                param_group=groups_of[i],
                ds_id=getattr(flats[i], "ds_id", None) if i < len(flats) else None,
            )
            for i, shapes in enumerate(meta["param_shapes"])
        )
        sub_group_size = sub_group_size_of(zcfg, layout.dir)
        check_zero3_sub_groups(layout, groups, sub_group_size)
        buffers = set(meta.get("buffer_names") or [])
        aliases = set((meta.get("shared_params") or {}).keys())
        order = tuple(
            k for k in (meta.get("module") or {}) if k not in buffers and k not in aliases
        )
        frozen = tuple((n, tuple(s)) for n, s in (meta.get("frozen_param_shapes") or {}).items())
        return SourceFacts(
            kind="zero3",
            stage=3,
            dp=layout.dp,
            groups=groups,
            sub_group_size=sub_group_size,
            frozen=frozen,
            param_order=order,
        )
    if isinstance(osd0.get("base_optimizer_state"), list):
        raise UnsupportedLayout(
            f"{layout.dir} is an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint): "
            "reshape handles the default (rigid) layout"
        )
    kind = layout.optimizer
    aligns = osd0.get("param_alignment_paddings")
    experts = _expert_groups(layout, len(sources.groups))
    groups = tuple(
        SourceGroup(
            params=tuple((p.name, p.shape) for p in group.params),
            param_group=g,
            partition_size=group.partition_size,
            alignment_paddings=tuple(int(x) for x in aligns[g]) if aligns else None,
            ep=experts[g][0],
            label=experts[g][1],
        )
        for g, group in enumerate(sources.groups)
    )
    round_robin = kind == "zero" and config_flag(zcfg, "round_robin_gradients", layout.dir)
    _check_group_order(layout, groups, optim, round_robin)
    alignment = 1
    if kind == "zero" and config_flag(zcfg, "parameter_alignment", layout.dir):
        module = meta.get("module") or {}
        first = next((module[n] for g in groups for n, _ in g.params if n in module), None)
        size = first.element_size() if isinstance(first, SavedTensor) else 2
        alignment = 16 // math.gcd(16, size)
    return SourceFacts(
        kind=kind,
        stage=layout.zero_stage,
        dp=layout.dp,
        groups=groups,
        round_robin=round_robin,
        param_alignment=alignment,
        moe=layout.moe,
    )


def _expert_groups(layout: Layout, count: int) -> list[tuple[int, str]]:
    """``(ep, name)`` of every ZeRO-1/2 group: ``(1, "")`` for a dense group; for a MoE expert
    group its expert-parallel size and name (``ep_size_2``), from discovery's record. Each
    group must be partitioned as that says: over every DP rank, or an expert group over its
    expert-data-parallel size ``dp / ep``."""
    out = [(1, "")] * count
    for group in layout.moe.groups if layout.moe else ():
        out[group.index] = (group.ep_size, group.name)
    sources = next(iter(layout.zero_sources.values()))
    for g, (ep, name) in enumerate(out):
        saved = sources.groups[g].dp
        if ep < 1 or layout.dp % ep or saved != layout.dp // ep:
            what = f"expert group {name} (EP {ep})" if name else "a dense group"
            raise InconsistentCheckpoint(
                f"{layout.dir}: optimizer group {g} is partitioned over {saved} ranks at DP "
                f"{layout.dp}, but as {what} it would be over {layout.dp // max(ep, 1)}"
            )
    return out


def _check_group_order(
    layout: Layout,
    groups: Sequence[SourceGroup],
    optim: Mapping[int, tuple[Path, Any]],
    round_robin: bool,
) -> None:
    """Each rank's ``param_slice_mappings`` names its parameters in the group's own order; that
    order must be the one the flat order implies (plain, or round robin as ``ds_config`` says).
    Otherwise the parameters would be misplaced at the new size without any error.

    The names come from discovery, which read every rank file already (``slice_names``); each
    group's order is worked out once, so the check is linear in ranks + parameters."""
    sources = next(iter(layout.zero_sources.values()))
    names_by_rank = dict(enumerate(sources.slice_names))
    positions: list[dict[str | None, int]] = []  # a name the file lacks (None) has none
    for group in groups:
        order = group_order([n for n, _ in group.params], layout.dp // group.ep, round_robin)
        positions.append({n: i for i, n in enumerate(order)})
    for d in sorted(optim):
        mappings = names_by_rank.get(d) or ()
        for g, position in enumerate(positions):
            if g >= len(mappings):
                break
            names = mappings[g]
            seen = [-1] if names is None else [position.get(n, -1) for n in names]
            if -1 in seen or seen != sorted(seen):
                raise UnsupportedLayout(
                    f"{optim[d][0].name}: group {g} lists its parameters in an order the flat "
                    f"layout does not explain (round_robin_gradients={round_robin} per the saved "
                    "ds_config): reshaping would misplace them"
                )


def zero3_group_of(osd: Mapping[str, Any], count: int, where: Path) -> list[int]:
    """The optimizer group of each ZeRO-3 sub-group, from the torch optimizer's ``param_groups``
    (DeepSpeed numbers sub-groups group by group, so their state indices are 0, 1, 2, ...)."""
    groups = osd["optimizer_state_dict"]["param_groups"]
    owner = []
    for g, group in enumerate(groups):
        owner.extend([g] * len(group["params"]))
    flat = [i for group in groups for i in group["params"]]
    if flat != list(range(count)):
        raise InconsistentCheckpoint(
            f"{where}: the ZeRO-3 optimizer's param_groups list sub-groups {flat}, but the model "
            f"states describe {count} sub-groups numbered 0..{count - 1}"
        )
    return owner


def check_zero3_sub_groups(
    layout: Layout, groups: Sequence[SourceGroup], sub_group_size: int
) -> None:
    """DeepSpeed's sub-group rule at the source size must give back the saved sub-groups;
    otherwise the rule (or sub_group_size) is not what wrote the file, and a reshape would guess."""
    by_group: dict[int, list[tuple[str, Shape]]] = {}
    for g in groups:
        by_group.setdefault(g.param_group, []).extend(g.params)
    expected = []
    for pg in sorted(by_group):
        params = by_group[pg]
        for members in zero3_sub_groups(
            [zero.numel(s) for _, s in params], layout.dp, sub_group_size
        ):
            expected.append([params[i][0] for i in members])
    saved = [[n for n, _ in g.params] for g in groups]
    if expected != saved:
        raise UnsupportedLayout(
            f"{layout.dir}: the ZeRO-3 sub-groups saved ({len(saved)}) are not the ones "
            f"sub_group_size={sub_group_size} gives at DP {layout.dp} ({len(expected)}): the "
            "sub-group size that wrote this checkpoint is unknown, so the sub-groups at another "
            "size cannot be derived"
        )


def plan_reshape(
    ckpt: Path | str | Layout, dp: int, tag: str | None = None, ep: int | None = None
) -> tuple[Source, ReshapePlan]:
    """Open a checkpoint (a path, or an already opened Layout) and plan its reshape to ``dp``
    ranks, MoE expert groups at expert-parallel size ``ep`` (None: kept; reads metadata only)."""
    check_degrees(dp=dp, ep=ep)
    source = open_source(ckpt, tag)
    return source, plan_from_facts(source.facts, dp, ep)


def refuse_stage0_ep_change(layout: Layout, ep: int | None) -> None:
    """``--ep`` on a ZeRO stage 0 MoE checkpoint: refused before the stage-0 refusal, which
    would say that nothing depends on the DP size (true, but not the question asked)."""
    if ep is not None and layout.moe is not None and layout.zero_stage == 0:
        raise UnsupportedLayout(
            f"--ep {ep}: {layout.dir} is a ZeRO stage 0 MoE checkpoint: its optimizer is saved "
            "whole per expert-parallel rank (expp_rank_R files, torch optimizer state by "
            "position), and --ep re-cuts ZeRO-1/2 expert partitions only"
        )
