"""Reading a mixture-of-experts checkpoint into :class:`~dsckpt.discover.moe.MoeLayout`.

Built on the layout :class:`~dsckpt.discover.layout.Reader` (as pipeline discovery is): the
expert files are parsed for their keys and tensor locations (no tensor data), the optimizer
files' expert groups are matched to ``param_shapes`` order by their names and the parameters
they list, and every expert parameter is placed in the consolidated state dict.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dsckpt.discover import checks
from dsckpt.discover.checks import At, BadMetadata
from dsckpt.discover.files import RankFile, Role
from dsckpt.discover.model import ERROR, WARNING, ZeroSources, missing_files_hint
from dsckpt.discover.moe import (
    AUTOEP_FUSED,
    NATIVE_EXPERT,
    ExpertGroup,
    ExpertParam,
    MoeLayer,
    MoeLayout,
    ep_size_of_group,
    expert_file_name,
    global_target,
)
from dsckpt.discover.zero import FlatParam
from dsckpt.io.load import TensorRef, tensor_ref
from dsckpt.io.unpickle import SavedTensor
from dsckpt.printable import listed

if TYPE_CHECKING:
    from dsckpt.discover.layout import ModelMeta, OptimMeta, Reader


def moe_recorded(raw: Mapping[str, Any]) -> bool:
    """The model states say the model has MoE layers (native ``num_experts`` or AutoEP's
    ``ds_autoep_layers``)."""
    return raw.get("num_experts") is not None or raw.get("ds_autoep_layers") is not None


@dataclass(frozen=True)
class ExpertFiles:
    """The MoE layers as the model states and expert files show them (EP not yet known for
    native layers) and the tensors of every expert file, by key."""

    layers: tuple[MoeLayer, ...]
    tensors: Mapping[str, TensorRef]


# A MoE layer before its EP size is known: ordinal, module (None: from the expert files),
# num_experts, ep_size (0: from the optimizer groups), group name, autoep
_Draft = tuple[int, str | None, int, int, str, bool]


def read_expert_files(reader: Reader, meta: ModelMeta, expect_files: bool = True) -> ExpertFiles:
    """The MoE layers and their expert files; missing, extra or mismatched files are findings.

    Without ``expect_files`` (AutoEP ZeRO-3, whose experts live in the ZeRO-3 shards only) an
    expert file is a stale leftover and none is missing."""
    at = At(reader.path(meta.file))
    autoep_raw = meta.raw.get("ds_autoep_layers")
    present: dict[tuple[int, int], RankFile] = {
        (f.layer or 0, f.expert or 0): f for f in reader.of_role(Role.EXPERT) if (f.mp or 0) == 0
    }
    dp = meta.dp_world_size or 0
    drafts: list[_Draft] = []
    if autoep_raw is not None:
        no_entries: list[_Draft] = []
        drafts.extend(reader.checked(lambda: _autoep_entries(autoep_raw, at), no_entries))
    else:
        no_counts: list[int] = []
        counts = reader.checked(
            lambda: _num_experts(meta.raw.get("num_experts"), at / "num_experts"), no_counts
        )
        drafts.extend((ordinal, None, n, 0, "", False) for ordinal, n in enumerate(counts))
    layers: list[MoeLayer] = []
    tensors: dict[str, TensorRef] = {}
    missing: list[str] = []
    expected: set[tuple[int, int]] = set()
    for ordinal, module, num, ep, group_name, autoep in drafts:
        files = tuple(expert_file_name(ordinal, e) for e in range(num))
        keys: list[tuple[str, ...]] = []
        modules: set[str] = set()
        for e in range(num):
            if expect_files:
                expected.add((ordinal, e))
            f = present.get((ordinal, e)) if expect_files else None
            if f is None:
                if expect_files:
                    missing.append(files[e])
                keys.append(())
                continue
            saved = _expert_tensors(reader, f)
            keys.append(tuple(saved))
            for key, t in saved.items():
                tensors[key] = tensor_ref(reader.path(f), t)
            if autoep:
                want = {f"{module}.experts.{w}.{e}" for w in AUTOEP_FUSED}
                if saved and set(saved) != want:
                    _mismatch(reader, f, sorted(set(saved) ^ want)[:2], "AutoEP expert keys")
            else:
                for key in saved:
                    found = NATIVE_EXPERT.match(key)
                    if found is None or int(found["id"]) != e:
                        _mismatch(reader, f, [key], f"keys of global expert {e}")
                        break
                    modules.add(found["module"])
        if not autoep:
            if len(modules) > 1:
                reader.note(
                    ERROR,
                    "expert-mismatch",
                    f"the expert files of MoE layer {ordinal} name several modules "
                    f"({', '.join(sorted(modules))}): files of different runs are mixed",
                )
            module = min(modules) if modules else f"<MoE layer {ordinal}>"
        edp = dp // ep if ep and dp else 0
        layers.append(
            MoeLayer(
                ordinal=ordinal,
                module=module or "",
                num_experts=num,
                ep_size=ep,
                edp_size=edp,
                group_name=group_name or (f"ep_size_{ep}" if ep else ""),
                autoep=autoep,
                files=files if expect_files else (),
                keys=tuple(keys),
            )
        )
    if missing:
        reader.note(
            ERROR,
            "missing-expert-file",
            f"{listed(missing)} {'is' if len(missing) == 1 else 'are'} missing from "
            f"{reader.location.dir}: "
            f"{meta.file.name} records {len(layers)} MoE layer(s) with "
            f"{[layer.num_experts for layer in layers]} experts, one file each; "
            + missing_files_hint(reader.location.dir),
        )
    extra = sorted(set(present) - expected)
    if extra:
        names = [present[k].name for k in extra]
        reader.note(
            ERROR,
            "stale-expert-file",
            f"{listed(names)}: expert file(s) the model "
            f"states do not account for ({meta.file.name} records "
            f"{[layer.num_experts for layer in layers]} experts per MoE layer): a stale file "
            "from another run? move it out of the tag directory",
        )
    return ExpertFiles(layers=tuple(layers), tensors=tensors)


def _num_experts(value: Any, at: At) -> list[int]:
    if isinstance(value, (list, tuple)):
        return checks.int_list(value, at, 1, checks.MAX_RANKS)
    return [checks.integer(value, at, 1, checks.MAX_RANKS)]


def _autoep_entries(value: Any, at: At) -> list[_Draft]:
    if not isinstance(value, (list, tuple)):
        at.fail("is not a list of per-layer records")
    out: list[_Draft] = []
    for i, entry in enumerate(value):
        where = at / i
        checks.mapping(entry, where)
        ordinal = checks.integer(checks.field(entry, "moe_layer_id", where), where / "moe_layer_id")
        module = checks.name(checks.field(entry, "module_path", where), where / "module_path")
        num = checks.integer(
            checks.field(entry, "num_experts", where), where / "num_experts", 1, checks.MAX_RANKS
        )
        ep = checks.integer(checks.field(entry, "ep_size", where), where / "ep_size", 1, num)
        name = entry.get("ep_group_name")
        out.append((ordinal, module, num, ep, name if isinstance(name, str) else "", True))
    if [o[0] for o in out] != list(range(len(out))):
        at.fail(f"numbers its layers {[o[0] for o in out]}, not 0, 1, ... in order")
    return out


def _expert_tensors(reader: Reader, f: RankFile) -> dict[str, SavedTensor]:
    raw = reader.load(f)
    reader.drop(f)
    if raw is None:
        return {}
    try:
        mapping = checks.mapping(raw, At(reader.path(f)))
        return {
            checks.name(k, At(reader.path(f))): checks.tensor(v, At(reader.path(f)) / str(k))
            for k, v in mapping.items()
        }
    except BadMetadata as exc:
        reader.note(ERROR, exc.code, str(exc))
        return {}


def _mismatch(reader: Reader, f: RankFile, keys: list[str], what: str) -> None:
    reader.note(
        ERROR,
        "expert-mismatch",
        f"{f.name} holds {', '.join(keys)}, which is not among the {what} its name says: "
        "the file was renamed or comes from another run",
    )


# --- optimizer groups -------------------------------------------------------------------------


def is_expert_group(state: OptimMeta, g: int) -> bool:
    """Group ``g`` of an optimizer file holds expert parameters (DeepSpeed marks them
    ``moe: True`` and names them ``ep_size_N``)."""
    moe = state.group_moe[g] if state.group_moe and g < len(state.group_moe) else False
    name = state.group_names[g] if state.group_names and g < len(state.group_names) else None
    return bool(moe) or ep_size_of_group(name) is not None


def align_expert_groups(
    reader: Reader,
    states: Mapping[int, OptimMeta],
    shapes: list[list[tuple[str, tuple[int, ...]]]],
    dp: int,
) -> tuple[dict[int, OptimMeta], list[ExpertGroup]] | None:
    """Every file's groups in ``param_shapes`` order, and the expert groups; None (with a
    finding) when a file's groups cannot be matched.

    Dense groups keep their order in every file. Expert groups are matched by name and by the
    parameters the file's ``param_slice_mappings`` lists (local names, a subset of the group's
    ``param_shapes`` entry): their order comes from a Python set and can differ per file.
    """
    if 0 not in states:
        return None
    first = states[0]
    n = len(shapes)
    canon_names = [_group_name(first, g) for g in range(n)]
    expert_idx = [g for g in range(min(n, len(first.fp32))) if is_expert_group(first, g)]
    groups: list[ExpertGroup] = []
    eps: dict[int, int] = {}
    for g in expert_idx:
        edp = first.counts[g] if g < len(first.counts) else 0
        ep = ep_size_of_group(canon_names[g]) or (dp // edp if edp else 0)
        if not ep or ep * edp != dp:
            reader.note(
                ERROR,
                "expert-group-mismatch",
                f"{first.file.name}: expert group {g} ({canon_names[g]!r}) is partitioned over "
                f"{edp} ranks, which with {dp} data-parallel ranks is not an expert-parallel size "
                f"{ep or '?'} x expert-data-parallel size: the metadata is damaged",
            )
            return None
        eps[g] = ep
    aligned: dict[int, OptimMeta] = {}
    order_of: dict[int, list[int]] = {}
    for d, state in states.items():
        order = _file_order(reader, state, shapes, canon_names, expert_idx, first)
        if order is None:
            return None
        order_of[d] = order
        aligned[d] = _permuted(state, order)
    for g in expert_idx:
        groups.append(
            ExpertGroup(
                index=g,
                name=canon_names[g] or "",
                ep_size=eps[g],
                edp_size=dp // eps[g],
                layers=(),
                file_index=tuple(order_of[d][g] if d in order_of else g for d in range(dp)),
            )
        )
    return aligned, groups


def _group_name(state: OptimMeta, g: int) -> str | None:
    return state.group_names[g] if state.group_names and g < len(state.group_names) else None


def _file_order(
    reader: Reader,
    state: OptimMeta,
    shapes: list[list[tuple[str, tuple[int, ...]]]],
    canon_names: list[str | None],
    expert_idx: list[int],
    first: OptimMeta,
) -> list[int] | None:
    """order[g] = the position in ``state``'s file of canonical group ``g``."""
    n = len(shapes)
    if len(state.fp32) != n:
        return list(range(n))  # the group count mismatch is reported by the caller
    mine = [h for h in range(n) if is_expert_group(state, h)]
    # Dense groups come first in every file, in one order; only the expert groups' order (a
    # Python set's) may differ between files.
    if mine != expert_idx:
        reader.note(
            ERROR,
            "expert-group-mismatch",
            f"{state.file.name} holds expert optimizer groups at positions {mine} where "
            f"{first.file.name} holds them at {expert_idx}: the files come from different runs",
        )
        return None
    order = list(range(n))
    free = list(mine)
    for g in expert_idx:
        local = {name for name, _ in shapes[g]}
        candidates = []
        for h in free:
            if _group_name(state, h) != canon_names[g]:
                continue
            named = (
                state.slice_names[h] if state.slice_names and h < len(state.slice_names) else None
            )
            if named is not None and not set(n for n in named if n is not None) <= local:
                continue
            if state.counts[h] != first.counts[g]:
                continue
            candidates.append(h)
        if not candidates:
            reader.note(
                ERROR,
                "expert-group-mismatch",
                f"{state.file.name}: no optimizer group matches expert group {g} "
                f"({canon_names[g]!r}, {len(local)} parameters, partition_count "
                f"{first.counts[g]}) of {first.file.name}: the files come from different runs",
            )
            return None
        order[g] = candidates[0]
        free.remove(candidates[0])
    return order


def _permuted(state: OptimMeta, order: list[int]) -> OptimMeta:
    if order == list(range(len(order))):
        return state

    def pick(values: Any) -> Any:
        return None if values is None else tuple(values[h] for h in order)

    return replace(
        state,
        counts=pick(state.counts),
        fp32=pick(state.fp32),
        group_paddings=pick(state.group_paddings) if state.group_paddings else (),
        alignment=pick(state.alignment),
        slice_names=pick(state.slice_names),
        group_names=pick(state.group_names),
        group_moe=pick(state.group_moe),
    )


# --- the whole record ---------------------------------------------------------------------


def finish_zero3(
    reader: Reader, found: ExpertFiles, sources: ZeroSources | None, dp: int
) -> MoeLayout:
    """The MoE layout of an AutoEP ZeRO-3 checkpoint: each expert sub-group (partitioned over
    fewer ranks than DP, ``ds_zero_partition_groups``) is an :class:`ExpertGroup` whose
    partition ranks are the DP ranks ``R, R + ep, ...`` of its EP rank ``R``."""
    groups: list[ExpertGroup] = []
    first = reader.optim_states.get(0)
    if sources is not None and first is not None and first.partition_groups is not None:
        for s, (count, _) in sources.zero3_experts.items():
            ep = dp // count if count and dp % count == 0 else 0
            name = first.partition_groups[s][3]
            if not ep or (ep_size_of_group(name) not in (None, ep)):
                reader.note(
                    ERROR,
                    "expert-group-mismatch",
                    f"ZeRO-3 sub-group {s} ({name}) is partitioned over {count} of {dp} ranks, "
                    "which is not its expert-data-parallel size: the metadata is damaged",
                )
                continue
            groups.append(
                ExpertGroup(
                    index=s,
                    name=name,
                    ep_size=ep,
                    edp_size=count,
                    layers=(),
                    file_index=tuple([s] * dp),
                )
            )
        _check_partition_ranks(reader, groups)
    return finish_zero12(reader, found, groups, sources, dp)


def _check_partition_ranks(reader: Reader, groups: list[ExpertGroup]) -> None:
    """Each file's ``ds_zero_partition_groups`` must place it where the EP arithmetic does."""
    for group in groups:
        for d, state in reader.optim_states.items():
            pg = state.partition_groups
            if pg is None or group.index >= len(pg):
                continue
            _, rank, ranks, _ = pg[group.index]
            want = group.files_of(group.ep_rank_of(d))
            if rank != group.edp_rank_of(d) or ranks != want:
                reader.note(
                    ERROR,
                    "expert-group-mismatch",
                    f"{state.file.name}: `ds_zero_partition_groups[{group.index}]` places it "
                    f"at rank {rank} of {list(ranks)}, where expert parallelism {group.ep_size} "
                    f"puts DP rank {d} at rank {group.edp_rank_of(d)} of {list(want)}",
                )


def finish_zero12(
    reader: Reader,
    found: ExpertFiles,
    groups: list[ExpertGroup],
    sources: ZeroSources | None,
    dp: int,
) -> MoeLayout:
    """The MoE layout of a ZeRO-1/2 checkpoint: native layers get their EP size from the expert
    group holding them, and every local expert parameter its consolidated key."""
    layers = {layer.ordinal: layer for layer in found.layers}
    probe = MoeLayout(autoep=any(x.autoep for x in found.layers), layers=found.layers)
    by_group: dict[int, set[int]] = defaultdict(set)
    if sources is not None:
        for group in groups:
            for flat in group_flats(sources, group.index):
                layer = probe.layer_of(flat.name)
                if layer is None:
                    reader.note(
                        ERROR,
                        "expert-group-mismatch",
                        f"expert optimizer group {group.index} ({group.name!r}) holds "
                        f"{flat.name}, which is in no MoE layer the expert files show",
                    )
                    continue
                by_group[group.index].add(layer.ordinal)
                current = layers[layer.ordinal]
                if current.autoep and current.ep_size != group.ep_size:
                    reader.note(
                        ERROR,
                        "expert-group-mismatch",
                        f"MoE layer {layer.module} records EP size {current.ep_size} but its "
                        f"experts are in optimizer group {group.index} ({group.name!r}) of EP "
                        f"size {group.ep_size}: the metadata is damaged",
                    )
                elif current.ep_size not in (0, group.ep_size):
                    reader.note(
                        ERROR,
                        "expert-group-mismatch",
                        f"MoE layer {layer.module} has experts in groups of EP sizes "
                        f"{current.ep_size} and {group.ep_size}: the metadata is damaged",
                    )
                layers[layer.ordinal] = replace(
                    current,
                    ep_size=group.ep_size,
                    edp_size=group.edp_size,
                    group_name=group.name or current.group_name,
                )
    for layer in layers.values():
        if layer.ep_size == 0 and sources is not None:
            reader.note(
                ERROR,
                "expert-group-mismatch",
                f"the experts of MoE layer {layer.ordinal} ({layer.module}) are in no expert "
                "optimizer group: the optimizer files do not belong with the expert files",
            )
        elif layer.ep_size and layer.num_experts % layer.ep_size:
            reader.note(
                ERROR,
                "expert-group-mismatch",
                f"MoE layer {layer.module} has {layer.num_experts} experts, which EP size "
                f"{layer.ep_size} does not divide: the metadata is damaged",
            )
    final = tuple(layers[k] for k in sorted(layers))
    groups = [replace(g, layers=tuple(sorted(by_group[g.index]))) for g in groups]
    params = _expert_params(reader, final, groups, sources) if sources is not None else []
    _check_keys(reader, final, params)
    return MoeLayout(
        autoep=probe.autoep,
        layers=final,
        groups=tuple(groups),
        params=tuple(params),
        aliases=autoep_aliases(final),
    )


def group_flats(sources: ZeroSources, index: int) -> tuple[FlatParam, ...]:
    """The parameters of expert group (ZeRO-3: sub-group) ``index`` with their flat offsets."""
    if sources.zero3 is not None:
        return sources.zero3_experts[index][1] if index in sources.zero3_experts else ()
    return sources.groups[index].params


def _expert_params(
    reader: Reader,
    layers: tuple[MoeLayer, ...],
    groups: list[ExpertGroup],
    sources: ZeroSources,
) -> list[ExpertParam]:
    probe = MoeLayout(autoep=False, layers=layers)
    out = []
    for group in groups:
        for ep_rank in range(group.ep_size):
            for flat in group_flats(sources, group.index):
                layer = probe.layer_of(flat.name)
                if layer is None or not layer.ep_size:
                    continue  # a finding already
                target = global_target(layer, flat.name, flat.shape, ep_rank)
                if target is None:
                    reader.note(
                        ERROR,
                        "expert-group-mismatch",
                        f"expert optimizer group {group.index} lists {flat.name} "
                        f"{list(flat.shape)}, which is not a local expert parameter of "
                        f"{layer.module} ({layer.n_local} experts per EP rank)",
                    )
                    continue
                name, shape, dst = target
                out.append(
                    ExpertParam(
                        group=group.index,
                        ep_rank=ep_rank,
                        layer=layer.ordinal,
                        flat=flat,
                        name=name,
                        shape=shape,
                        dst_start=dst,
                    )
                )
    return out


def _check_keys(reader: Reader, layers: tuple[MoeLayer, ...], params: list[ExpertParam]) -> None:
    """The optimizer's expert parameters must be the expert files' keys (native: one to one)."""
    if not params:
        return
    from_optim = {p.name for p in params}
    for layer in layers:
        if layer.autoep:
            continue
        in_files = {k for keys in layer.keys for k in keys}
        mine = {n for n in from_optim if n.startswith(layer.module + ".")}
        if not in_files:
            continue  # missing files are a finding already
        odd = sorted(in_files ^ mine)
        if odd:
            reader.note(
                ERROR,
                "expert-mismatch",
                f"MoE layer {layer.module}: the expert files and the optimizer's expert groups "
                f"disagree on {len(odd)} key(s) ({', '.join(odd[:2])}): frozen expert "
                "parameters, or files of different runs; dsckpt cannot tell where their "
                "values come from",
            )


def autoep_aliases(layers: tuple[MoeLayer, ...]) -> tuple[tuple[str, str], ...]:
    """AutoEP registers each router under its Hugging Face name too: ``mlp.gate.gate.weight``
    is ``mlp.router.gate.weight`` (one Parameter, saved twice, recorded nowhere)."""
    return tuple(
        (f"{layer.module}.gate.gate.weight", f"{layer.module}.router.gate.weight")
        for layer in layers
        if layer.autoep
    )


def finish_plain(reader: Reader, found: ExpertFiles, dp: int) -> MoeLayout:
    """The MoE layout without ZeRO: EP sizes from the ``expp_rank`` optimizer files' expert
    group names (all layers get that size when the files name one; unknown otherwise)."""
    expp = sorted(
        (f for f in reader.of_role(Role.EXPP_OPTIM) if (f.mp or 0) == 0), key=lambda f: f.ep or 0
    )
    sizes: set[int] = set()
    if expp:
        raw = reader.load(expp[0])
        reader.drop(expp[0])
        optim = raw.get("optimizer") if isinstance(raw, dict) else None
        param_groups = optim.get("param_groups") if isinstance(optim, dict) else None
        for group in param_groups if isinstance(param_groups, list) else []:
            if isinstance(group, dict):
                size = ep_size_of_group(
                    group.get("name") if isinstance(group.get("name"), str) else None
                )
                if size:
                    sizes.add(size)
    ep = next(iter(sizes)) if len(sizes) == 1 else 0
    layers = tuple(
        replace(
            layer,
            ep_size=layer.ep_size or ep,
            edp_size=layer.edp_size or (dp // ep if ep else 0),
            group_name=layer.group_name or (f"ep_size_{ep}" if ep else ""),
        )
        for layer in found.layers
    )
    largest = max(sizes, default=len(expp))
    ranks = {f.ep or 0 for f in expp}
    missing = [r for r in range(largest) if r not in ranks]
    if missing:
        reader.note(
            WARNING,
            "missing-rank-file",
            f"{listed(missing, each=lambda r: f'expp_rank_{r}_mp_rank_00_optim_states.pt')} "
            f"{'is' if len(missing) == 1 else 'are'} missing: the optimizer state of those "
            "expert-parallel ranks is gone (the weights are complete)",
        )
    stale = sorted(r for r in ranks if r >= largest)
    if stale:
        reader.note(
            ERROR,
            "stale-rank-file",
            f"expp_rank_{stale[0]}_mp_rank_00_optim_states.pt is for expert-parallel rank "
            f"{stale[0]}, but the largest expert-parallel size is {largest}: a stale file "
            "from another run? move it out of the tag directory",
        )
    return MoeLayout(
        autoep=any(x.autoep for x in layers),
        layers=layers,
        expp_files=tuple(f.name for f in expp),
        aliases=autoep_aliases(layers),
    )
