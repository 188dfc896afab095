"""The optimizer state of a checkpoint as one exportable state, per parameter name (a plan).

:func:`~dsckpt.plan.optim_state.plan_optimizer_state` already says where each parameter's Adam
moments live (``verify`` compares them). This module turns that into what ``to-fp32
--optimizer`` writes: one plan whose tensors are ``<param name>.<state key>`` (``exp_avg``,
``exp_avg_sq``), the optimizer's param groups (hyper-parameters, step, parameter names in
DeepSpeed's group order), and the order of ``model.parameters()`` that a torch optimizer
state dict is indexed by. Pure data: no tensor is read, torch is not imported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsckpt.discover.files import Role
from dsckpt.discover.layout import Layout
from dsckpt.discover.universal import OPTIMIZER_STATE_FILE, ZERO_DIR
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.load import read_scalar, tensor_ref
from dsckpt.io.unpickle import SavedTensor, load_saved
from dsckpt.plan.consolidation import ConsolidationPlan, OutputTensor
from dsckpt.plan.model import Read
from dsckpt.plan.optim_state import GroupState, plan_optimizer_state
from dsckpt.plan.zero_reshape import group_order
from dsckpt.plan.zero_source import config_flag
from dsckpt.printable import listed

# safetensors metadata keys (each a JSON string)
GROUPS_KEY = "dsckpt.optimizer.param_groups"
STATE_KEYS_KEY = "dsckpt.optimizer.state_keys"
FROZEN_KEY = "dsckpt.optimizer.frozen"
PARAMETERS_KEY = "dsckpt.optimizer.parameters"


@dataclass(frozen=True)
class ParamGroup:
    """One torch param group as DeepSpeed's optimizer held it.

    Attributes:
        options: its hyper-parameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ...) as
            saved, ``params`` left out; a tensor-valued one is read as a number.
        params: the names of its parameters in the order they were given to the optimizer
            (DeepSpeed's ``param_shapes`` order, ``round_robin_gradients`` undone).
        step: the optimizer step count of the group (``None`` when none is saved).
    """

    options: Mapping[str, Any]
    params: tuple[str, ...]
    step: float | int | None


@dataclass(frozen=True)
class OptimizerExport:
    """What ``to-fp32 --optimizer`` writes.

    Attributes:
        plan: ``<name>.<key>`` tensors, parameter by parameter, each bit for bit the
            consolidated state DeepSpeed saved (fp32 for every layout dsckpt reads).
        keys: the state entries per parameter (``("exp_avg", "exp_avg_sq")`` for Adam).
        groups: the param groups, in the optimizer's order.
        parameters: every parameter of the model once (trainable and frozen, a tied weight
            under its first name), in ``model.parameters()`` order as far as the checkpoint
            records the model's key order; a torch state dict indexes them so.
        frozen: parameters without optimizer state (frozen when the run trained).
    """

    plan: ConsolidationPlan
    keys: tuple[str, ...]
    groups: tuple[ParamGroup, ...]
    parameters: tuple[str, ...]
    frozen: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__``: groups, state keys, frozen and parameter order."""
        groups = [
            {
                **{k: _jsonable(v) for k, v in g.options.items()},
                "step": _jsonable(g.step),
                "params": list(g.params),
            }
            for g in self.groups
        ]
        return {
            "format": "pt",
            "dsckpt.source": self.plan.source,
            GROUPS_KEY: json.dumps(groups),
            STATE_KEYS_KEY: json.dumps(list(self.keys)),
            FROZEN_KEY: json.dumps(list(self.frozen)),
            PARAMETERS_KEY: json.dumps(list(self.parameters)),
        }


def plan_optimizer_export(layout: Layout, master: ConsolidationPlan) -> OptimizerExport:
    """The optimizer state of ``layout`` per parameter name, ready to write.

    Args:
        layout: an opened checkpoint.
        master: its fp32 consolidation plan from the optimizer partitions (not
            ``--from-layers``), the one the weights are written from.

    Raises:
        UnsupportedLayout: the checkpoint keeps no optimizer state per parameter (stage 0,
            a pipeline without ZeRO, a checkpoint saved without optimizer files).
        InconsistentCheckpoint: the ranks disagree on a parameter's group, hyper-parameters
            or step, or a trainable parameter has no state.
    """
    if layout.kind == "universal":
        return _universal_export(layout, master)
    refuse_without_state(layout)
    state = plan_optimizer_state(layout, master)
    if not state.keys:
        raise UnsupportedLayout(
            f"{layout.dir}: the optimizer keeps no state per element (no exp_avg or other "
            "partitioned entry): convert the weights without --optimizer"
        )
    first = state.plans[state.keys[0]]
    tensors: list[OutputTensor] = []
    by_key = {k: {t.name: t for t in state.plans[k].tensors} for k in state.keys}
    for param in first.tensors:
        for key in state.keys:
            t = by_key[key][param.name]
            tensors.append(OutputTensor(f"{param.name}.{key}", t.shape, t.dtype, t.reads))
    frozen = tuple(t.name for t in layout.tensors if t.kind == "frozen")
    _check_all_trainable_have_state(layout, master, {t.name for t in first.tensors}, frozen)
    groups = _param_groups([t.name for t in first.tensors], state.sources, state.steps)
    if _round_robin(layout):
        groups = tuple(
            ParamGroup(g.options, tuple(group_order(g.params, layout.dp, True)), g.step)
            for g in groups
        )
    return OptimizerExport(
        plan=ConsolidationPlan(
            tensors=tuple(tensors), source=f"optimizer state ({', '.join(state.keys)})"
        ),
        keys=state.keys,
        groups=groups,
        parameters=_parameter_order(layout, master, {t.name for t in first.tensors}, frozen),
        frozen=tuple(dict.fromkeys(frozen)),
    )


UNIVERSAL_KEYS = ("exp_avg", "exp_avg_sq")


def _universal_export(layout: Layout, master: ConsolidationPlan) -> OptimizerExport:
    """A universal checkpoint's optimizer state: each parameter's ``zero/<name>/exp_avg.pt``
    and ``exp_avg_sq.pt`` as they are (already whole), the step of its ``step.pt`` (ZeRO-3
    sources keep it per sub-group in ``zero/optimizer_state.pt``), and the param groups that
    file holds (ds_to_universal's copy of the torch optimizer's ``param_groups``).

    Raises:
        InconsistentCheckpoint: a trainable parameter lacks a moment or a step, or the steps
            of one param group disagree.
        UnsupportedLayout: ``zero/optimizer_state.pt`` is missing (its groups are nowhere else).
    """
    info = layout.universal
    assert info is not None
    state_path = layout.dir / ZERO_DIR / OPTIMIZER_STATE_FILE
    if not state_path.is_file() or state_path.is_symlink():
        raise UnsupportedLayout(
            f"{state_path} is missing: the optimizer's param groups are nowhere else; convert "
            "the weights without --optimizer, or copy the file from the ds_to_universal output"
        )
    saved = load_saved(state_path)
    by_name = info.by_name()
    frozen = tuple(t.name for t in layout.tensors if t.kind == "frozen")
    trainable = [t for t in layout.tensors if t.kind == "trainable"]
    written = {t.name: t for t in master.tensors}
    tensors: list[OutputTensor] = []
    lacking = []
    for entry in trainable:
        param, out = by_name.get(entry.name), written.get(entry.name)
        if param is None or out is None:
            continue  # not written with the weights (nothing to pair it with)
        for key in UNIVERSAL_KEYS:
            ref = param.states.get(key)
            if ref is None:
                lacking.append(f"{entry.name}/{key}.pt")
                continue
            reads = (Read(ref, 0, ref.numel, 0),)
            tensors.append(OutputTensor(f"{entry.name}.{key}", out.shape, ref.dtype, reads))
    if lacking:
        raise InconsistentCheckpoint(
            f"{layout.dir / ZERO_DIR}: no {listed(lacking)}: ds_to_universal "
            "writes the moments of every parameter that received a gradient; convert the "
            "weights without --optimizer, or run ds_to_universal again"
        )
    groups = _universal_groups(layout, saved, state_path, [t.name for t in trainable])
    with_state = {t.name.rpartition(".")[0] for t in tensors}
    return OptimizerExport(
        plan=ConsolidationPlan(
            tensors=tuple(tensors),
            source="optimizer state (exp_avg, exp_avg_sq) from the universal checkpoint's zero/",
        ),
        keys=UNIVERSAL_KEYS,
        groups=groups,
        parameters=_parameter_order(layout, master, with_state, frozen),
        frozen=tuple(dict.fromkeys(frozen)),
    )


def _universal_groups(
    layout: Layout, saved: Any, state_path: Any, trainable: list[str]
) -> tuple[ParamGroup, ...]:
    """The torch param groups: hyper-parameters from ``optimizer_state.pt``, members from the
    flat groups (``param_shapes``; ZeRO-3 sub-groups joined by the groups' ``params``), steps
    from the folders (ZeRO-1/2) or the sub-groups' saved state (ZeRO-3)."""
    info = layout.universal
    assert info is not None
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise InconsistentCheckpoint(f"{state_path}: `param_groups` is not a list of groups")
    flat: dict[int, list[str]] = {}
    for entry in layout.tensors:
        if entry.kind == "trainable" and entry.group is not None:
            flat.setdefault(entry.group, []).append(entry.name)
    by_name = info.by_name()
    stage3 = layout.zero_stage == 3
    sub_state: Any = {}
    if stage3:
        osd = saved.get("optimizer_state_dict")
        sub_state = osd.get("state") if isinstance(osd, Mapping) else None
        sub_state = sub_state if isinstance(sub_state, Mapping) else {}
    out = []
    for g, group in enumerate(groups):
        members = list(group.get("params") or []) if stage3 else [g]
        names: list[str] = []
        steps: set[float | int] = set()
        for index in members:
            names += flat.get(int(index), [])
            if stage3:
                step = (sub_state.get(index) or {}).get("step")
                if isinstance(step, SavedTensor):
                    step = read_scalar(tensor_ref(state_path, step))
                if step is not None:
                    steps.add(step)
        if not stage3:
            held = [by_name[n].step for n in names if n in by_name]
            steps = {step for step in held if step is not None}
            if _round_robin(layout):
                names = group_order(names, layout.dp, True)
        if len(steps) > 1:
            raise InconsistentCheckpoint(
                f"{state_path}: optimizer param group {g} holds parameters at different steps "
                f"({sorted(steps)}): the folders come from different conversions"
            )
        options = {}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, SavedTensor):  # a tensor lr (capturable optimizers)
                value = read_scalar(tensor_ref(state_path, value))
            options[key] = value
        out.append(ParamGroup(options, tuple(names), next(iter(steps)) if steps else None))
    grouped = [n for group in out for n in group.params]
    if sorted(grouped) != sorted(trainable):
        raise InconsistentCheckpoint(
            f"{state_path}: its {len(groups)} param group(s) do not cover the trainable "
            "parameters the model files list exactly once: the file is not this checkpoint's"
        )
    return tuple(out)


def refuse_without_state(layout: Layout) -> None:
    """Refuse, before any planning, a checkpoint that keeps no optimizer state per parameter.

    Raises:
        UnsupportedLayout: no ZeRO (or BF16_Optimizer) partitions: stage 0 and pipelines
            without ZeRO keep torch's own state keyed by position, which names no parameter;
            a checkpoint saved without optimizer files has none.
    """
    if layout.zero_sources:
        return
    what = (
        "no optimizer files"
        if layout.optimizer == "none"
        else f"no ZeRO optimizer partitions (ZeRO stage {layout.zero_stage}): its torch "
        "optimizer state is keyed by position and names no parameter"
    )
    raise UnsupportedLayout(
        f"{layout.dir} holds {what}, so there is no optimizer state per parameter to "
        "write: convert the weights without --optimizer"
    )


def _round_robin(layout: Layout) -> bool:
    """Whether ZeRO-1/2 ``round_robin_gradients`` reordered the flat groups: their order (and
    ``param_shapes``) is then not the order the parameters were given to the optimizer."""
    universal = layout.kind == "universal" and layout.zero_stage in (1, 2)
    if not universal and (layout.kind != "zero" or layout.optimizer != "zero"):
        return False
    files = [f for f in layout.files if f.role is Role.MODEL]
    if not files:
        return False
    first = min(files, key=lambda f: (f.mp or 0, f.dp or 0))
    config = (load_saved(layout.dir / first.name) or {}).get("ds_config")
    zero_cfg = config.get("zero_optimization") if isinstance(config, Mapping) else None
    if not isinstance(zero_cfg, Mapping):
        return False
    return config_flag(zero_cfg, "round_robin_gradients", layout.dir / first.name)


def _check_all_trainable_have_state(
    layout: Layout, master: ConsolidationPlan, with_state: set[str], frozen: tuple[str, ...]
) -> None:
    """Every parameter the weights were read from the optimizer partitions for has state:
    a trainable parameter without it would be silently missing from the export."""
    trainable = {t.name for t in layout.tensors if t.kind == "trainable"}
    written = {t.name for t in master.tensors}
    lacking = sorted((trainable & written) - with_state - set(frozen))
    if lacking:
        raise InconsistentCheckpoint(
            f"{layout.dir}: trainable parameter(s) {listed(lacking)} have no "
            "optimizer state in the optimizer files; the files do not match each other"
        )


def _param_groups(
    names: list[str],
    sources: Mapping[str, tuple[GroupState, ...]],
    steps: Mapping[str, float | int | None],
) -> tuple[ParamGroup, ...]:
    """Group the parameters by the torch param group their partitions belong to, checking
    that every rank file agrees on each group's hyper-parameters and step."""
    members: dict[int, list[str]] = {}
    options: dict[int, tuple[dict[str, Any], GroupState]] = {}
    group_steps: dict[int, tuple[float | int | None, str]] = {}
    for name in names:
        states = sources[name]
        index = states[0].param_group
        for s in states:
            if s.param_group != index:
                raise InconsistentCheckpoint(
                    f"{s.path}: parameter {name} is in optimizer param group {s.param_group} "
                    f"here and in group {index} in {states[0].path}"
                )
            opts = _read_options(s)
            seen = options.setdefault(index, (opts, s))
            if _jsonable(seen[0]) != _jsonable(opts):
                raise InconsistentCheckpoint(
                    f"{s.path}: optimizer param group {index} has hyper-parameters "
                    f"{json.dumps(_jsonable(opts))}, {seen[1].path} has "
                    f"{json.dumps(_jsonable(seen[0]))}: the ranks were not saved by one run"
                )
        step = steps.get(name)
        seen_step = group_steps.setdefault(index, (step, name))
        if seen_step[0] != step:
            raise InconsistentCheckpoint(
                f"{states[0].path}: parameter {name} is at optimizer step {step}, "
                f"{seen_step[1]} of the same param group at step {seen_step[0]}"
            )
        members.setdefault(index, []).append(name)
    return tuple(
        ParamGroup(options[g][0], tuple(members[g]), group_steps[g][0]) for g in sorted(members)
    )


def _read_options(state: GroupState) -> dict[str, Any]:
    out = {}
    for key, value in state.options.items():
        if isinstance(value, SavedTensor):  # a tensor lr (capturable optimizers): its value
            value = read_scalar(tensor_ref(state.path, value))
        out[key] = value
    return out


def _parameter_order(
    layout: Layout, master: ConsolidationPlan, with_state: set[str], frozen: tuple[str, ...]
) -> tuple[str, ...]:
    """``model.parameters()`` order: the model's state-dict keys without buffers, each tied
    weight once at its first name (``parameters()`` yields a shared Parameter once)."""
    alias_of = {t.name: t.alias_of for t in layout.tensors if t.alias_of}
    alias_of.update(master.aliases)
    params = with_state | set(frozen)
    keys = list(layout.model_keys) or [t.name for t in master.tensors]
    order: dict[str, None] = {}
    for key in keys:
        name = alias_of.get(key, key)
        if name in params:
            order.setdefault(name, None)
    for name in [t.name for t in master.tensors if t.name in params]:
        order.setdefault(name, None)  # anything the key order left out, in plan order
    return tuple(order)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)
