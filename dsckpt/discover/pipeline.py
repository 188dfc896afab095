"""Pipeline / Megatron-DeepSpeed 3D checkpoints: discovery of stages, TP ranks and layer files."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dsckpt.discover.files import RankFile, Role
from dsckpt.discover.model import (
    ERROR,
    WARNING,
    Layout,
    OptimizerKind,
    TensorEntry,
    ZeroSources,
    missing_files_hint,
)
from dsckpt.errors import UnsupportedLayout
from dsckpt.io import dtypes
from dsckpt.io.unpickle import SavedTensor
from dsckpt.printable import listed

if TYPE_CHECKING:
    from dsckpt.discover.layout import Reader


def read_pipeline(reader: Reader, model_files: list[RankFile]) -> Layout:
    """Discover a pipeline checkpoint: degrees, per-(stage, TP) ZeRO partitions, layer files."""
    if not model_files:
        raise UnsupportedLayout(
            f"{reader.location.dir} has layer files but no "
            "mp_rank_*_model_states.pt: the pipeline model states are missing"
        )
    meta = reader.first_model_meta(model_files)
    layers = [f for f in reader.files if f.role is Role.LAYER]
    tp_from_layers = 1 + max(f.tp or 0 for f in layers)
    tp = meta.tp_degree or tp_from_layers
    mp = meta.mp_world_size or len(model_files)
    pp = meta.pp_degree or max(1, mp // tp)
    reader.check_mp_files(meta, model_files)
    if pp * tp != mp:
        reader.note(
            ERROR,
            "count-mismatch",
            f"checkpoint_parallel_dimensions say PP {pp} x TP {tp} but mp_world_size is {mp}",
        )
    if tp_from_layers != tp:
        reader.note(
            ERROR,
            "count-mismatch",
            f"layer files carry {tp_from_layers} TP ranks but the checkpoint records TP {tp}",
        )
    _check_layer_grid(reader, layers, tp)
    for f in sorted(layers, key=lambda f: (f.layer or 0, f.tp or 0)):
        # Every layer file's pickle (metadata only, no tensor data): a damaged one is an error
        # here, named once, rather than a surprise in the middle of a reshape.
        reader.load(f)

    sources: dict[int, ZeroSources] = {}
    stage = 0
    optimizer: OptimizerKind = "torch" if meta.raw.get("optimizer") else "none"
    dp = meta.dp_world_size or 1
    tensors: list[TensorEntry] = []
    first_layer: dict[int, int] = {}
    last_named = 0
    steps: dict[str, int] = {}
    for f in sorted(model_files, key=lambda f: f.mp or 0):
        m = f.mp or 0
        raw = reader.load(f) if m else meta.raw
        if not isinstance(raw, dict):
            if raw is not None:
                reader.missing_key(f, "module")
            continue
        stage_meta = reader.model_meta(f, raw) if m else meta
        if stage_meta.global_steps is not None:
            steps[f.name] = stage_meta.global_steps
        param_shapes = stage_meta.param_shapes
        if reader.of_role(Role.OPTIM):
            if param_shapes is None:
                reader.require_shapes(stage_meta)
            else:
                src, optimizer, stage, dp = reader.zero_sources(m, param_shapes, dp)
                if src is not None:
                    sources[m] = src
        stage_index, tp_rank = divmod(m, tp)
        if tp_rank == 0:
            entries = _stage_entries(param_shapes, stage_index, tp)
            tensors.extend(entries)
            indices = [
                int(e.name.split(".", 1)[0]) for e in entries if e.name.split(".", 1)[0].isdigit()
            ]
            if indices:
                first_layer[stage_index] = min(indices)
                last_named = max([last_named, *indices])
    if any(t.name.split(".", 1)[0].isdigit() for t in tensors):
        _check_named_layers(reader, layers, tensors, tp)
    else:
        _check_layer_gaps(reader, layers)
    reader.disagree(steps, "model-states", "global_steps")
    reader.check_dp(meta, dp)
    param_dtype = _layer_dtype(reader, layers)
    keys = _model_keys(reader, tensors, layers, literal_names(meta.raw))
    return reader.make_layout(
        kind="pipeline",
        zero_stage=stage,
        optimizer=optimizer,
        pp=pp,
        tp=tp,
        dp=dp,
        meta=meta,
        tensors=tensors,
        sources=sources,
        param_dtype=param_dtype,
        stage_parts=_stage_parts(first_layer, layers, pp, last_named),
        model_keys=keys,
        model_keys_from="param_shapes and the TP rank 0 layer files",
    )


def _model_keys(
    reader: Reader, tensors: list[TensorEntry], layers: list[RankFile], literal: set[str]
) -> tuple[str, ...]:
    """Every tensor the pipeline's files record, named as the consolidated model names them:
    ``param_shapes`` (the optimizer's parameters) and every tensor of the TP rank 0 layer files
    (buffers and frozen parameters too), tied-module copies folded into their one name."""
    names = dict.fromkeys(t.name for t in tensors)
    known = set(names) | literal
    for f in sorted(layers, key=lambda f: f.layer or 0):
        if f.tp:
            continue
        sd = reader.load(f)
        for key, value in sd.items() if isinstance(sd, dict) else ():
            if isinstance(value, SavedTensor):
                names.setdefault(layer_key_name(f.layer, str(key), known), None)
    return tuple(names)


def layer_key_name(layer: int | None, key: str, known: set[str]) -> str:
    """``<layer>.<key>``, or the ``tied_modules.*`` name when ``param_shapes`` lists the tensor
    under its tied module (Megatron's embedding, held by the first and the last stage)."""
    plain = f"{layer}.{key}"
    if plain in known:
        return plain
    match = [n for n in known if n.startswith("tied_modules.") and n.endswith("." + key)]
    return match[0] if len(match) == 1 else plain


def _stage_parts(
    first_layer: dict[int, int], layers: list[RankFile], pp: int, last_named: int
) -> tuple[int, ...]:
    """Stage boundaries: each stage starts at its first layer named in ``param_shapes``."""
    if sorted(first_layer) != list(range(pp)):
        return ()
    end = max([last_named] + [f.layer or 0 for f in layers]) + 1
    return (0, *(first_layer[s] for s in range(1, pp)), end)


def _layer_file(layer: int, tp_rank: int) -> str:
    return f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def _check_layer_grid(reader: Reader, layers: list[RankFile], tp: int) -> None:
    """Every layer that has a file must have one per TP rank."""
    by_layer: dict[int, set[int]] = defaultdict(set)
    for f in layers:
        by_layer[f.layer or 0].add(f.tp or 0)
    where = reader.location.dir
    for layer, ranks in sorted(by_layer.items()):
        for missing in sorted(set(range(tp)) - ranks):
            reader.note(
                ERROR,
                "missing-rank-file",
                f"{_layer_file(layer, missing)} is missing from {where}: layer {layer} has files "
                f"for TP ranks {sorted(ranks)} of {tp}; " + missing_files_hint(where),
            )


def _check_named_layers(
    reader: Reader, layers: list[RankFile], tensors: list[TensorEntry], tp: int
) -> None:
    """Every layer whose parameters ``param_shapes`` names must have its layer files: a layer
    missing on every TP rank leaves no gap in the grid check, yet a reshape needs its files."""
    have = {f.layer for f in layers}
    named = sorted(
        {int(head) for head in (t.name.split(".", 1)[0] for t in tensors) if head.isdigit()}
    )
    absent = [layer for layer in named if layer not in have]
    if not absent:
        return
    where = reader.location.dir
    files = [_layer_file(layer, r) for layer in absent for r in range(tp)]
    reader.note(
        ERROR,
        "missing-rank-file",
        f"{listed(files)} {'is' if len(files) == 1 else 'are'} missing from {where}: param_shapes "
        f"lists parameters of layer{'s' if len(absent) > 1 else ''} "
        f"{', '.join(map(str, absent))} but no layer file holds them; " + missing_files_hint(where),
    )


def _check_layer_gaps(reader: Reader, layers: list[RankFile]) -> None:
    """Without ``param_shapes`` (no ZeRO) the files alone say which layers exist: a layer index
    missing between two that have files is a layer without parameters (a function) or a lost
    file; only the user can tell, so it is a warning, and layer files are not taken silently."""
    have = sorted({f.layer for f in layers if f.layer is not None})
    if not have:
        return
    gaps = [layer for layer in range(have[0], have[-1] + 1) if layer not in have]
    if gaps:
        where = reader.location.dir
        reader.note(
            WARNING,
            "layer-gap",
            f"{where} has no layer file for layer{'s' if len(gaps) > 1 else ''} "
            f"{', '.join(map(str, gaps))} between layers that have them "
            f"(e.g. {_layer_file(gaps[0], 0)}): a layer without parameters has none, but if "
            "these have parameters their files are missing; " + missing_files_hint(where),
        )


def _stage_entries(
    param_shapes: list[list[tuple[str, tuple[int, ...]]]] | None, stage: int, tp: int
) -> list[TensorEntry]:
    entries = []
    for g, group in enumerate(param_shapes or []):
        for name, shape in group:
            where = f"stage {stage}" + (f", TP slice of {tp}" if tp > 1 else "")
            entries.append(TensorEntry(name, tuple(shape), "unknown", "trainable", where, group=g))
    return entries


def _layer_dtype(reader: Reader, layers: list[RankFile]) -> str | None:
    for f in sorted(layers, key=lambda f: (f.layer or 0, f.tp or 0)):
        sd = reader.load(f)
        if isinstance(sd, dict):
            for t in sd.values():
                if isinstance(t, SavedTensor) and t.is_floating_point():
                    return dtypes.name_of(t.dtype)
    return None


def layer_files_exact(layout: Layout) -> bool:
    """Whether a pipeline's layer files hold exactly the weights a consolidation wants.

    Without ZeRO there are no fp32 partitions: in an fp32 run the optimizer updates the module's
    own float32 parameters, which the layer files save whole, so they are the weights, bit for
    bit. (A bf16/fp16 run keeps fp32 master weights elsewhere, which the layer files round.)
    A layer-gap warning (layer files possibly missing) makes them not certain enough to take
    without being asked.
    """
    return (
        layout.kind == "pipeline"
        and not layout.zero_sources
        and not any(f.role is Role.OPTIM for f in layout.files)
        and layout.param_dtype == "float32"
        and not any(f.code == "layer-gap" for f in layout.findings)
    )


def literal_names(model_info: Mapping[str, Any]) -> set[str]:
    """Parameter names that Megatron's universal_checkpoint_info spells out as plain literals."""
    names = set()
    info = model_info.get("universal_checkpoint_info")
    for patterns in (info if isinstance(info, Mapping) else {}).values():
        for pattern in patterns if isinstance(patterns, list) else []:
            literal = pattern.replace("\\.", ".")
            if isinstance(pattern, str) and not re.search(r"[\\^$*+?()\[\]{}|]", literal):
                names.add(literal)
    return names
