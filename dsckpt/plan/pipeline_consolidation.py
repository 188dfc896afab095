"""Consolidation plans for pipeline / Megatron-DeepSpeed 3D checkpoints.

Each parameter's TP slices combine as its rule says (:mod:`dsckpt.plan.tp_rules`); each slice is
read from the fp32 ZeRO partitions of its (stage, TP rank), or from the layer files with
``from_layers``. The slice records and read composition are shared with the pipeline reshape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsckpt.discover import zero
from dsckpt.discover.files import Role
from dsckpt.discover.model import Layout
from dsckpt.discover.pipeline import layer_files_exact, layer_key_name, literal_names
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.load import read_bytes, tensor_ref
from dsckpt.io.unpickle import SavedTensor, load_saved
from dsckpt.plan.model import DTYPES, ConsolidationOptions, ConsolidationPlan, OutputTensor, Read
from dsckpt.plan.tp_rules import load_rules
from dsckpt.printable import listed


def plan_pipeline_consolidation(layout: Layout, options: ConsolidationOptions) -> ConsolidationPlan:
    """Plan one full state dict from TP slices and PP stages, named as ``param_shapes`` names them.

    Each parameter's TP slices combine as its rule says (see :mod:`dsckpt.plan.tp_rules`); each
    slice is itself read from the fp32 ZeRO partitions of its (stage, TP rank), or from the layer
    files with ``from_layers``. Tied modules are taken from the first stage that holds them.
    """
    info = layout.model_info
    vocab = (info.get("checkpoint_info") or {}).get("original_vocab_size")
    rules = load_rules(
        options.rules_file,
        info.get("universal_checkpoint_info"),
        model_args=info.get("args"),
        facts={"original_vocab_size": vocab} if vocab else None,
    )
    from_layers = options.from_layers
    slices = _layer_slices(layout) if from_layers else _zero_slices(layout)
    out_dtype = DTYPES[options.dtype]
    outputs = []
    diverged = []
    for name, per_rank in slices.items():
        shapes = [local.shape for local in per_rank]
        tp_plan = rules.merge_plan(name, shapes, strip_padding=options.strip_vocab_padding)
        if tp_plan.combine == "copy" and not replicas_agree(per_rank):
            diverged.append(name)
        reads = compose_reads(tp_plan, per_rank)
        outputs.append(OutputTensor(name, tuple(tp_plan.full_shape), out_dtype, tuple(reads)))
    if diverged:
        raise InconsistentCheckpoint(
            f"{len(diverged)} tensor(s) the rules call replicated differ across TP ranks "
            f"({listed(diverged)}), so no single full "
            "tensor exists and dsckpt will not pick a copy silently; if they are in fact "
            'partitioned, pass --rules with kind "split" for them'
        )
    if not from_layers:
        source = "fp32 master weights from the optimizer partitions"
    elif layer_files_exact(layout):
        source = LAYERS_EXACT
    else:
        source = "layer files (model dtype, upcast)"
    return ConsolidationPlan(tensors=tuple(outputs), source=source)


@dataclass(frozen=True)
class LocalSlice:
    """One TP rank's slice of a parameter: its local shape and the flat runs that hold it."""

    shape: tuple[int, ...]
    runs: tuple[Read, ...]  # dst_start = element offset inside the local (flattened) slice


def replicas_agree(per_rank: list[LocalSlice]) -> bool:
    """Whether every TP rank holds the same bytes for a replicated tensor (read in full: such
    tensors are norms, biases and position embeddings, small next to the split weights)."""
    first = _slice_bytes(per_rank[0])
    return all(first == _slice_bytes(other) for other in per_rank[1:])


def _slice_bytes(local: LocalSlice) -> bytes:
    return b"".join(read_bytes(r.source, r.src_start, r.length) for r in local.runs)


LAYERS_EXACT = "layer files (float32; without ZeRO they are the trained weights, exact)"


def _zero_slices(layout: Layout) -> dict[str, list[LocalSlice]]:
    """Per parameter, per TP rank: where its fp32 slice lives in that rank's ZeRO partitions."""
    if not layout.zero_sources:
        if any(f.code == "layer-gap" for f in layout.findings):
            why = (
                "its layer files are the weights, but some may be missing (`dsckpt inspect` "
                "says which): pass --from-layers to take the layer files as they are"
            )
        else:
            why = (
                f"its layer files hold {layout.param_dtype} weights, which the fp32 master "
                "weights of the run were rounded to: pass --from-layers to take them anyway "
                "(upcast, not the fp32 master values)"
            )
        raise UnsupportedLayout(
            f"{layout.dir} has no ZeRO optimizer partitions to take fp32 master weights from "
            f"and {why}"
        )
    slices: dict[str, list[LocalSlice]] = {}
    for stage in range(layout.pp):
        for tp_rank in range(layout.tp):
            sources = layout.zero_sources.get(stage * layout.tp + tp_rank)
            if sources is None:
                raise UnsupportedLayout(
                    f"stage {stage}, TP rank {tp_rank} has no readable optimizer partitions"
                )
            for g, group in enumerate(sources.groups):
                for param in group.params:
                    if (
                        stage > 0
                        and param.name.startswith("tied_modules.")
                        and param.name in slices
                        and len(slices[param.name]) == layout.tp
                    ):
                        continue  # a tied module's first stage copy is the one kept in sync
                    runs = tuple(
                        Read(sources.fp32[p.rank][g], p.src_start, p.length, p.dst_start)
                        for p in group.pieces(param)
                    )
                    slices.setdefault(param.name, []).append(LocalSlice(param.shape, runs))
    return slices


def _layer_slices(layout: Layout) -> dict[str, list[LocalSlice]]:
    """Per parameter, per TP rank: the layer file tensor (saved whole, in the model dtype)."""
    tied = tied_names(layout)
    slices: dict[str, list[LocalSlice]] = {}
    layer_files = sorted(
        (f for f in layout.files if f.role is Role.LAYER), key=lambda f: (f.layer or 0, f.tp or 0)
    )
    for f in layer_files:
        path = layout.dir / f.name
        for key, tensor in (load_saved(path) or {}).items():
            if not isinstance(tensor, SavedTensor):
                continue
            name = tied.get((f.layer, key), f"{f.layer}.{key}")
            ref = tensor_ref(path, tensor)
            slices.setdefault(name, []).append(
                LocalSlice(tuple(tensor.shape), (Read(ref, 0, ref.numel, 0),))
            )
    return slices


def tied_names(layout: Layout) -> dict[tuple[int | None, str], str]:
    """(layer, key) -> tied_modules name, for layers whose parameters param_shapes lists as tied."""
    known = {t.name for t in layout.tensors} | literal_names(layout.model_info)
    tied = {}
    for f in layout.files:
        if f.role is Role.LAYER and f.tp == 0:
            for key in load_saved(layout.dir / f.name) or {}:
                name = layer_key_name(f.layer, key, known)
                if name.startswith("tied_modules.") and f"{f.layer}.{key}" not in known:
                    tied[(f.layer, key)] = name
    return tied


def compose_reads(tp_plan: Any, per_rank: list[LocalSlice], dst_rank: int = 0) -> list[Read]:
    """Flat element reads for target TP rank ``dst_rank``'s tensor (the merged tensor when the
    plan merges): TP pieces along ``dim`` over each source rank's runs; padding is not read."""
    if tp_plan.combine == "mean":
        raise UnsupportedLayout(
            f"{tp_plan.rule.pattern}: averaging replicated TP copies is not "
            "supported here; use a `replicated` rule"
        )
    full = tuple(tp_plan.dst_shapes[dst_rank])
    if tp_plan.combine == "copy" or tp_plan.dim is None:
        local = per_rank[tp_plan.pieces[dst_rank][0].src]
        return clip_reads(local.runs, 0, zero.numel(full), 0)
    dim = tp_plan.dim
    outer = zero.numel(full[:dim])
    inner = zero.numel(full[dim + 1 :])
    reads = []
    for piece in tp_plan.pieces[dst_rank]:
        local = per_rank[piece.src]
        local_dim = local.shape[dim]
        for o in range(outer):
            src = (o * local_dim + piece.src_start) * inner
            dst = (o * full[dim] + piece.dst_start) * inner
            reads.extend(clip_reads(local.runs, src, piece.length * inner, dst))
    return reads


def clip_reads(runs: tuple[Read, ...], start: int, count: int, dst: int) -> list[Read]:
    """The parts of ``runs`` covering local elements ``[start, start+count)``, placed at ``dst``."""
    out = []
    end = start + count
    for run in runs:
        lo = max(start, run.dst_start)
        hi = min(end, run.dst_start + run.length)
        if lo < hi:
            out.append(
                Read(run.source, run.src_start + lo - run.dst_start, hi - lo, dst + lo - start)
            )
    return out
