"""Pipeline / Megatron-DeepSpeed 3D checkpoints: discovery of stages, TP ranks and layer files."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch

from dsckpt.errors import UnsupportedLayout
from dsckpt.files import RankFile, Role
from dsckpt.layout import ERROR, Layout, TensorEntry, ZeroSources, _dtype

if TYPE_CHECKING:
    from dsckpt.layout import _Reader
    from dsckpt.plan import ConsolidationPlan


def read_pipeline(reader: _Reader, model_files: list[RankFile]) -> Layout:
    """Discover a pipeline checkpoint: degrees, per-(stage, TP) ZeRO partitions, layer files."""
    if not model_files:
        raise UnsupportedLayout(f"{reader.location.dir} has layer files but no "
                                "mp_rank_*_model_states.pt: the pipeline model states are missing")
    meta = reader._model_meta(model_files)
    dims = meta.get("checkpoint_parallel_dimensions") or {}
    layers = [f for f in reader.files if f.role is Role.LAYER]
    tp_from_layers = 1 + max(f.tp or 0 for f in layers)
    tp = int(dims.get("tp_degree") or tp_from_layers)
    mp = int(meta.get("mp_world_size") or len(model_files))
    pp = int(dims.get("pp_degree") or max(1, mp // tp))
    reader._check_mp_files(meta, model_files)
    if pp * tp != mp:
        reader.note(ERROR, "count-mismatch", f"checkpoint_parallel_dimensions say PP {pp} x TP {tp} "
                    f"but mp_world_size is {mp}")
    if tp_from_layers != tp:
        reader.note(ERROR, "count-mismatch", f"layer files carry {tp_from_layers} TP ranks but the "
                    f"checkpoint records TP {tp}")
    _check_layer_grid(reader, layers, tp)

    sources: dict[int, ZeroSources] = {}
    stage = 0
    optimizer = "torch" if meta.get("optimizer") else "none"
    dp = int(meta.get("dp_world_size") or 1)
    tensors: list[TensorEntry] = []
    for f in sorted(model_files, key=lambda f: f.mp or 0):
        m = f.mp or 0
        shapes_meta = reader.load(f) if m else meta
        if shapes_meta is None:
            continue
        param_shapes = shapes_meta.get("param_shapes")
        if param_shapes and reader.of_role(Role.OPTIM):
            src, optimizer, stage, dp = reader._zero_sources(m, param_shapes)
            if src is not None:
                sources[m] = src
        stage_index, tp_rank = divmod(m, tp)
        if tp_rank == 0:
            tensors.extend(_stage_entries(param_shapes, stage_index, tp))
    reader._check_dp(meta, dp)
    param_dtype = _layer_dtype(reader, layers)
    return reader._layout(kind="pipeline", zero_stage=stage, optimizer=optimizer, pp=pp, tp=tp,
                          dp=dp, meta=meta, tensors=tensors, sources=sources,
                          param_dtype=param_dtype)


def _check_layer_grid(reader: _Reader, layers: list[RankFile], tp: int) -> None:
    by_layer: dict[int, set[int]] = defaultdict(set)
    for f in layers:
        by_layer[f.layer or 0].add(f.tp or 0)
    for layer, ranks in sorted(by_layer.items()):
        for missing in sorted(set(range(tp)) - ranks):
            reader.note(ERROR, "missing-rank-file", f"layer_{layer:02d}-model_{missing:02d}"
                        f"-model_states.pt is missing: layer {layer} has files for TP ranks "
                        f"{sorted(ranks)} of {tp}")


def _stage_entries(param_shapes: Any, stage: int, tp: int) -> list[TensorEntry]:
    entries = []
    for g, group in enumerate(param_shapes or []):
        for name, shape in group.items():
            where = f"stage {stage}" + (f", TP slice of {tp}" if tp > 1 else "")
            entries.append(TensorEntry(name, tuple(shape), "unknown", "trainable", where, group=g))
    return entries


def _layer_dtype(reader: _Reader, layers: list[RankFile]) -> str | None:
    for f in sorted(layers, key=lambda f: (f.layer or 0, f.tp or 0)):
        sd = reader.load(f)
        if isinstance(sd, dict):
            for t in sd.values():
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    return _dtype(t.dtype)
    return None


def plan_pipeline_consolidation(layout: Layout, dtype: str) -> ConsolidationPlan:
    raise UnsupportedLayout(f"{layout.dir} is a pipeline (PP {layout.pp} x TP {layout.tp}) "
                            "checkpoint: consolidating it is not implemented yet")
