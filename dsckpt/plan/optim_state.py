"""Per-parameter optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``) of a checkpoint.

DeepSpeed keeps each flat group's optimizer state beside its fp32 master partition, element for
element: ZeRO-1/2 and BF16_Optimizer save ``exp_avg``/``exp_avg_sq`` of a group with the same
flat layout as the fp32 slice (with the tail padding that ZeRO-1/2's fp32 slice omits: same
offsets, only longer); ZeRO-3 saves one state per sub-group laid out like ``fp32_flat_groups``.
So the consolidation plan already says where every parameter's state lives: each of its reads
names an fp32 partition, and the same element range of that partition's state tensor holds the
parameter's state. :func:`plan_optimizer_state` builds the plan of the master weights (ZeRO
1/2/3, BF16_Optimizer, Megatron pipelines with their TP merge rules) and swaps each read's
source for the matching state tensor, reading metadata only.

The result is plain plans (:class:`~dsckpt.plan.consolidation.ConsolidationPlan`), so the
executor streams them like weights: ``verify`` compares them, and they can be written as a state
dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsckpt.discover.layout import Layout, ZeroSources
from dsckpt.discover.moe import MoeLayout
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.load import TensorRef, read_scalar, tensor_ref
from dsckpt.io.unpickle import SavedTensor, load_saved
from dsckpt.plan.consolidation import ConsolidationPlan, OutputTensor, Read


@dataclass(frozen=True)
class GroupState:
    """The optimizer state saved beside one fp32 partition (one rank, one flat group)."""

    path: Path
    group: int  # flat group (ZeRO-1/2) or sub-group (ZeRO-3) index in the file
    tensors: Mapping[str, TensorRef]  # partitioned state: key -> flat tensor
    step: float | int | None
    param_group: int = 0  # the torch optimizer's param group this partition belongs to
    options: Mapping[str, Any] = field(default_factory=dict)  # that group's hyper-parameters


@dataclass(frozen=True)
class OptimizerState:
    """Where each parameter's optimizer state lives, as plans (no tensor data read).

    Attributes:
        keys: the partitioned state entries, in saved order (``("exp_avg", "exp_avg_sq")``).
        plans: per key, one full-shape tensor per trainable parameter, named as the
            consolidated state dict names it.
        steps: the ``step`` of each parameter's group (``None`` where the optimizer keeps none).
        sources: each parameter's saved group states (one per read of its plan), for the
            param group and hyper-parameters it was trained with.
    """

    keys: tuple[str, ...]
    plans: Mapping[str, ConsolidationPlan]
    steps: Mapping[str, float | int | None] = field(default_factory=dict)
    sources: Mapping[str, tuple[GroupState, ...]] = field(default_factory=dict)


def plan_optimizer_state(layout: Layout, master: ConsolidationPlan) -> OptimizerState:
    """The per-parameter optimizer state of ``layout``.

    Args:
        layout: an opened checkpoint with fp32 optimizer partitions.
        master: its fp32 consolidation plan (:func:`dsckpt.api.consolidation.plan_for`, not
            ``from_layers``): trainable tensors read from the partitions get state.

    Raises:
        UnsupportedLayout: no ZeRO partitions (stage 0 keeps a torch optimizer state keyed by
            position, which names no parameter), or an elastic checkpoint.
        InconsistentCheckpoint: a rank's state is missing or not laid out like its partition.
    """
    if not layout.zero_sources:
        raise UnsupportedLayout(
            f"{layout.dir} has no ZeRO optimizer partitions (stage {layout.zero_stage}): its "
            "torch optimizer state is keyed by position and names no parameter, so the state "
            "per parameter name cannot be read"
        )
    by_source: dict[TensorRef, GroupState] = {}
    for rank_sources in layout.zero_sources.values():
        by_source.update(_group_states(rank_sources, layout.moe))
    keys: list[str] = []
    for state in by_source.values():
        keys.extend(k for k in state.tensors if k not in keys)
    plans: dict[str, list[OutputTensor]] = {k: [] for k in keys}
    steps: dict[str, float | int | None] = {}
    sources: dict[str, tuple[GroupState, ...]] = {}
    for tensor in master.tensors:
        if not tensor.reads or any(r.source not in by_source for r in tensor.reads):
            continue  # buffers and frozen parameters: no optimizer state
        states = [by_source[r.source] for r in tensor.reads]
        steps[tensor.name] = states[0].step
        sources[tensor.name] = tuple(states)
        for key in keys:
            reads = []
            for read, state in zip(tensor.reads, states, strict=True):
                ref = state.tensors.get(key)
                if ref is None:
                    raise InconsistentCheckpoint(
                        f"{state.path}: group {state.group} has no optimizer state {key!r} "
                        f"where other groups do (parameter {tensor.name})"
                    )
                reads.append(Read(ref, read.src_start, read.length, read.dst_start))
            dtype = reads[0].source.dtype
            plans[key].append(OutputTensor(tensor.name, tensor.shape, dtype, tuple(reads)))
    return OptimizerState(
        keys=tuple(keys),
        plans={
            k: ConsolidationPlan(tensors=tuple(v), source=f"optimizer state {k}")
            for k, v in plans.items()
        },
        steps=steps,
        sources=sources,
    )


def _group_states(
    sources: ZeroSources, moe: MoeLayout | None = None
) -> dict[TensorRef, GroupState]:
    """Each fp32 partition of one model-parallel rank -> the state saved beside it.

    ``sources`` lists groups in ``param_shapes`` order; a MoE file may hold its expert groups
    in another order (``ExpertGroup.file_index``), which is where their state is looked up."""
    out: dict[TensorRef, GroupState] = {}
    for d, refs in enumerate(sources.fp32):
        if not refs:
            continue
        path = refs[0].path
        osd = (load_saved(path) or {}).get("optimizer_state_dict")
        if not isinstance(osd, Mapping):
            raise InconsistentCheckpoint(f"{path} holds no optimizer_state_dict")
        base = osd.get("optimizer_state_dict" if sources.zero3 else "base_optimizer_state")
        if isinstance(base, list):
            raise UnsupportedLayout(
                f"{path} is an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint): "
                "its optimizer state is not saved per partition"
            )
        if not isinstance(base, Mapping):
            raise InconsistentCheckpoint(f"{path} holds no torch optimizer state")
        saved = base.get("state") or {}
        for g, ref in enumerate(refs):
            if sources.zero3 is not None:
                index: Any = g  # DeepSpeed numbers ZeRO-3 sub-group states 0, 1, 2, ...
                length = ref.numel
                param_group = in_file = _zero3_param_group(base, g, path)
            else:
                expert = moe.group(g) if moe is not None else None
                in_file = expert.file_index[d] if expert is not None else g
                index = _zero12_index(base, in_file, path)
                length = sources.groups[g].partition_size
                param_group = g
            state = saved.get(index)
            if not isinstance(state, Mapping):
                raise InconsistentCheckpoint(
                    f"{path}: group {g} has no optimizer state (state key {index!r})"
                )
            options = {k: v for k, v in base["param_groups"][in_file].items() if k != "params"}
            out[ref] = GroupState(
                path,
                g,
                _partitioned(state, length, path, g),
                _step(state, path),
                param_group,
                options,
            )
    return out


def _zero12_index(base: Mapping[str, Any], group: int, path: Path) -> Any:
    """The torch state key of ZeRO-1/2 flat group ``group``: its one entry in param_groups."""
    groups = base.get("param_groups") or []
    params = groups[group].get("params") if group < len(groups) else None
    if not params or len(params) != 1:
        raise InconsistentCheckpoint(
            f"{path}: optimizer param_groups[{group}] holds {params!r}; ZeRO-1/2 keeps one "
            "flat partition per group"
        )
    return params[0]


def _zero3_param_group(base: Mapping[str, Any], sub_group: int, path: Path) -> int:
    """The param group of ZeRO-3 sub-group ``sub_group``: the one whose ``params`` list it."""
    for g, group in enumerate(base.get("param_groups") or []):
        if sub_group in (group.get("params") or ()):
            return g
    raise InconsistentCheckpoint(
        f"{path}: no optimizer param group lists ZeRO-3 sub-group {sub_group}: the file's "
        "param_groups do not match its fp32_flat_groups"
    )


def _partitioned(
    state: Mapping[str, Any], length: int, path: Path, group: int
) -> dict[str, TensorRef]:
    """The state entries split like the partition: 1-D tensors of the partition's length."""
    found = {}
    for key, value in state.items():
        if not isinstance(value, SavedTensor) or value.dim() == 0:
            continue  # step and other scalars
        if value.dim() == 1 and value.numel() == length:
            found[key] = tensor_ref(path, value)
            continue
        raise InconsistentCheckpoint(
            f"{path}: optimizer state {key!r} of group {group} has shape {tuple(value.shape)}, "
            f"not the partition's {length} elements: the file does not match its fp32 partition"
        )
    return found


def _step(state: Mapping[str, Any], path: Path) -> float | int | None:
    step = state.get("step")
    if isinstance(step, SavedTensor):
        return read_scalar(tensor_ref(path, step))
    if isinstance(step, (int, float)):
        return step
    return None
