"""Consolidation plans: for every output tensor, which element runs of which source tensors make it.

A plan is data. It is built from a :class:`~dsckpt.discover.model.Layout` without reading any tensor
data, so the executor knows every output's size up front (safetensors headers, progress, disk
space) and can stream the copies in any order or split them across workers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from dsckpt.discover import zero
from dsckpt.discover.layout import Layout, TensorEntry, refuse_errors
from dsckpt.discover.model import ZeroSources
from dsckpt.discover.pipeline import layer_files_exact
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef
from dsckpt.plan.model import DTYPES, ConsolidationOptions, ConsolidationPlan, OutputTensor, Read
from dsckpt.plan.moe_hf import to_hf_names
from dsckpt.plan.pipeline_consolidation import plan_pipeline_consolidation
from dsckpt.printable import listed


def plan_consolidation(
    layout: Layout, options: ConsolidationOptions | None = None
) -> ConsolidationPlan:
    """Plan the consolidated state dict of a ZeRO or plain checkpoint.

    The order follows DeepSpeed's ``zero_to_fp32``: buffers, frozen parameters, trainable
    parameters, then tied aliases. Floating tensors become ``options.dtype``; other buffers keep
    theirs.

    Raises:
        InconsistentCheckpoint: discovery found errors that make the values untrustworthy, or
            the plan's keys are not the model's keys as the checkpoint records them.
        UnsupportedLayout: the layout has no consolidation here (MoE, tensor-parallel
            universal checkpoints).
    """
    options = options or ConsolidationOptions()
    refuse_errors(layout)
    if options.hf_names and (layout.moe is None or not layout.moe.autoep):
        to_hf_names(layout, ConsolidationPlan(tensors=()))  # refuses, naming why
    universal = layout.universal if layout.kind == "universal" else None
    if universal is not None and not options.strip_vocab_padding:
        stripped = [p.name for p in universal.params if p.vocab_rows is not None]
        if stripped:
            raise UnsupportedLayout(
                f"{layout.dir}: the universal checkpoint holds {stripped[0]} without its "
                "vocabulary padding (ds_to_universal drops the rows); leave out "
                "--keep-vocab-padding"
            )
    if layout.kind == "pipeline":
        if not options.from_layers and layer_files_exact(layout):
            # A pipeline without ZeRO in fp32 has no other source: its layer files are the
            # weights, bit for bit, so they are taken without --from-layers (the source says so).
            options = replace(options, from_layers=True)
        plan = plan_pipeline_consolidation(layout, options)
        check_complete(layout, plan)
        return plan
    if layout.tp > 1:
        # Tensor-parallel slices without pipeline layer files carry no names to merge by.
        raise UnsupportedLayout(
            f"{layout.dir} has {layout.tp} model-parallel ranks but no layer files: consolidating "
            "tensor-parallel checkpoints saved without a PipelineModule is not supported yet"
        )
    out_dtype = DTYPES[options.dtype]
    by_kind: dict[str, list[TensorEntry]] = {
        "buffer": [],
        "frozen": [],
        "trainable": [],
        "tied": [],
    }
    for entry in layout.tensors:
        by_kind[entry.kind].append(entry)
    outputs: list[OutputTensor] = []
    for entry in by_kind["buffer"]:
        outputs.append(_whole(entry, layout.whole[entry.name][0], out_dtype))
    if not options.exclude_frozen:
        for entry in by_kind["frozen"]:
            outputs.append(_frozen(layout, entry, out_dtype))
    outputs.extend(_trainable(layout, by_kind["trainable"], out_dtype))
    present = {t.name for t in outputs}
    aliases = {e.name: e.alias_of for e in by_kind["tied"] if e.alias_of in present}
    if layout.kind == "universal":
        # Discovery put each trainable parameter's zero/<name>/fp32.pt in `whole`: the tensor
        # DeepSpeed's load_universal copies into the fp32 master (and the model) unchanged.
        source = "fp32 weights from the universal checkpoint's zero/<param>/fp32.pt"
    elif layout.zero_sources:
        source = "fp32 master weights from the optimizer partitions"
    else:
        source = f"module weights ({layout.param_dtype})"
    plan = ConsolidationPlan(tensors=tuple(outputs), aliases=aliases, source=source)
    check_complete(layout, plan, options.exclude_frozen)
    if options.hf_names:
        # After the completeness check: the model's keys are recorded under AutoEP's names.
        plan = to_hf_names(layout, plan)
    return plan


def check_complete(layout: Layout, plan: ConsolidationPlan, exclude_frozen: bool = False) -> None:
    """Refuse a plan whose keys are not the model's keys as the checkpoint records them
    (``layout.model_keys``), so nothing is written that would load with missing or unexpected
    keys. With ``exclude_frozen`` the frozen parameters are expected to be left out.

    Raises:
        InconsistentCheckpoint: naming the missing and extra keys (the first few and a count).
    """
    names = plan.names()
    written = set(names)
    twice = sorted(n for n, c in Counter(names).items() if c > 1)
    if twice:
        raise InconsistentCheckpoint(
            f"{layout.dir}: the consolidated state dict would hold {_few(twice)} more than once: "
            "the checkpoint's metadata lists them in several places; the files are damaged"
        )
    if not layout.model_keys:
        return  # nothing records the model's keys apart from what the plan was made of
    expected = set(layout.model_keys)
    if exclude_frozen:
        frozen = {t.name for t in layout.tensors if t.kind == "frozen"}
        expected -= frozen | {t.name for t in layout.tensors if t.alias_of in frozen}
    missing = [n for n in layout.model_keys if n in expected and n not in written]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        parts = [
            f"misses {_few(missing)}" if missing else "",
            f"adds {_few(extra)}" if extra else "",
        ]
        raise InconsistentCheckpoint(
            f"{layout.dir}: the consolidated state dict would not match the model's keys as "
            f"{layout.model_keys_from} records them: it "
            + " and ".join(p for p in parts if p)
            + "; the files disagree with each other, so nothing was written"
        )


def _few(names: list[str]) -> str:
    return f"{len(names)} key{'s' if len(names) != 1 else ''} ({listed(names)})"


def _cast_to(saved: DType, out: DType) -> DType:
    return out if saved.is_floating else saved


def _whole(entry: TensorEntry, ref: TensorRef, out_dtype: DType) -> OutputTensor:
    return OutputTensor(
        entry.name, entry.shape, _cast_to(ref.dtype, out_dtype), (Read(ref, 0, ref.numel, 0),)
    )


def _frozen(layout: Layout, entry: TensorEntry, out_dtype: DType) -> OutputTensor:
    if entry.name in layout.whole:  # ZeRO-1: only the module copy exists
        return _whole(entry, layout.whole[entry.name][0], out_dtype)
    fragments = layout.frozen_fragments[entry.name]
    if len(fragments) == 1:  # ZeRO-2: saved whole
        return _whole(entry, fragments[0], out_dtype)
    # ZeRO-3: rank r holds elements [r*c, (r+1)*c) of the zero-padded parameter.
    per_rank = zero.zero3_partition_numel(entry.numel, len(fragments))
    reads = []
    for rank, ref in enumerate(fragments):
        start = rank * per_rank
        length = min(per_rank, entry.numel - start)
        if length > 0:
            reads.append(Read(ref, 0, length, start))
    return OutputTensor(
        entry.name, entry.shape, _cast_to(fragments[0].dtype, out_dtype), tuple(reads)
    )


def _trainable(layout: Layout, entries: list[TensorEntry], out_dtype: DType) -> list[OutputTensor]:
    if not layout.zero_sources:  # plain checkpoint: the module weights are the values
        return [_whole(e, layout.whole[e.name][0], out_dtype) for e in entries]
    if len(layout.zero_sources) != 1:
        raise UnsupportedLayout("several model-parallel ranks: use the pipeline/3D consolidation")
    sources = next(iter(layout.zero_sources.values()))
    outputs = []
    if sources.zero3 is not None:
        for param in sources.zero3.params:
            reads = tuple(
                Read(sources.fp32[p.rank][p.sub_group], p.src_start, p.length, p.dst_start)
                for p in sources.zero3.pieces(param)
            )
            outputs.append(OutputTensor(param.name, param.shape, out_dtype, reads))
        if layout.moe is not None:
            outputs.extend(_experts(layout, sources, out_dtype))
        return outputs
    moe = layout.moe
    expert_groups = moe.expert_group_indices if moe is not None else frozenset()
    for g, group in enumerate(sources.groups):
        if g in expert_groups:
            continue
        for flat in group.params:
            reads = tuple(
                Read(sources.fp32[p.rank][g], p.src_start, p.length, p.dst_start)
                for p in group.pieces(flat)
            )
            outputs.append(OutputTensor(flat.name, flat.shape, out_dtype, reads))
    if moe is not None:
        outputs.extend(_experts(layout, sources, out_dtype))
    return outputs


def _experts(layout: Layout, sources: ZeroSources, out_dtype: DType) -> list[OutputTensor]:
    """The expert tensors under their global names: each EP rank's local parameter, from the
    files of that EP rank only (its partition over the EDP ranks), placed at ``dst_start``
    (AutoEP: the EP ranks' experts one after another in the fused tensor)."""
    assert layout.moe is not None
    reads: dict[str, list[Read]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for param in layout.moe.params:
        group = layout.moe.group(param.group)
        if group is None:
            continue
        files = group.files_of(param.ep_rank)
        if sources.zero3 is not None:
            # ZeRO-3: each parameter split on its own over the EDP ranks
            count = sources.zero3_experts[param.group][0]
            per = zero.zero3_partition_numel(param.flat.numel, count)
            pieces = [
                zero.Piece(
                    k, param.group, param.flat.offset, min(per, param.flat.numel - k * per), k * per
                )
                for k in range(count)
                if k * per < param.flat.numel
            ]
        else:
            pieces = sources.groups[param.group].pieces(param.flat)
        for p in pieces:
            reads.setdefault(param.name, []).append(
                Read(
                    sources.fp32[files[p.rank]][param.group],
                    p.src_start,
                    p.length,
                    param.dst_start + p.dst_start,
                )
            )
        shapes[param.name] = param.shape
    return [OutputTensor(name, shapes[name], out_dtype, tuple(rs)) for name, rs in reads.items()]
