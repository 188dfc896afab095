"""AutoEP consolidation plans under the Hugging Face model's own names (``--hf-names``).

DeepSpeed's AutoEP replaces each Mixtral ``MixtralSparseMoeBlock`` (``model.layers.N.mlp``) by a
layer whose parameters are named ``router.gate.weight`` and ``experts.w1`` (gate), ``experts.w3``
(up), ``experts.w2`` (down), each ``[E, ...]``; it also registers the router a second time as
``gate.gate.weight``. The installed transformers' Mixtral names them ``gate.weight``,
``experts.gate_up_proj`` ``[E, 2F, H]`` = ``cat(w1, w3, dim=1)`` and ``experts.down_proj`` = ``w2``.

The mapping is data (:data:`AUTOEP_TO_MIXTRAL`) and pure element arithmetic on the plan: the
concatenation along dim 1 interleaves per expert (expert ``e``'s ``w1`` rows, then its ``w3``
rows), so each read of ``w1``/``w3`` is split at expert boundaries and moved; no tensor is
computed in memory.
"""

from __future__ import annotations

from dataclasses import replace

from dsckpt.discover.layout import Layout
from dsckpt.errors import UnsupportedLayout
from dsckpt.plan.model import ConsolidationPlan, OutputTensor, Read

# AutoEP name (relative to the MoE block) -> the Hugging Face Mixtral name; None: an alias the
# Hugging Face model does not have. The fused gate/up pair is handled by FUSED.
AUTOEP_TO_MIXTRAL: dict[str, str | None] = {
    "router.gate.weight": "gate.weight",
    "gate.gate.weight": None,
    "experts.w2": "experts.down_proj",
}
# (first, second) -> fused name: cat(first, second, dim=1)
FUSED = (("experts.w1", "experts.w3"), "experts.gate_up_proj")


def to_hf_names(layout: Layout, plan: ConsolidationPlan) -> ConsolidationPlan:
    """``plan`` with AutoEP's MoE names mapped to the Hugging Face model's.

    Raises:
        UnsupportedLayout: the checkpoint is not an AutoEP one (nothing to map), or a block
            lacks one of the tensors the mapping needs.
    """
    moe = layout.moe
    if moe is None or not moe.autoep:
        raise UnsupportedLayout(
            f"{layout.dir}: --hf-names maps DeepSpeed AutoEP's MoE names back to the Hugging "
            "Face model's; this checkpoint has no AutoEP layers, its names are already the "
            "model's: drop --hf-names"
        )
    by_name = {t.name: t for t in plan.tensors}
    renamed: dict[str, str] = {}
    dropped: set[str] = set()
    fused: dict[str, OutputTensor] = {}  # first tensor's name -> fused output
    consumed: set[str] = set()
    for layer in moe.layers:
        block = layer.module
        for rel, hf in AUTOEP_TO_MIXTRAL.items():
            name = f"{block}.{rel}"
            if hf is None:
                dropped.add(name)
            elif name in by_name:
                renamed[name] = f"{block}.{hf}"
        (first_rel, second_rel), fused_rel = FUSED
        first, second = f"{block}.{first_rel}", f"{block}.{second_rel}"
        if first not in by_name or second not in by_name:
            raise UnsupportedLayout(
                f"{layout.dir}: AutoEP block {block} lacks {first} or {second}: "
                "--hf-names cannot build its experts.gate_up_proj"
            )
        fused[first] = _cat_dim1(f"{block}.{fused_rel}", by_name[first], by_name[second])
        consumed.add(second)
    tensors: list[OutputTensor] = []
    for t in plan.tensors:
        if t.name in fused:
            tensors.append(fused[t.name])
        elif t.name in consumed or t.name in dropped:
            continue
        elif t.name in renamed:
            tensors.append(replace(t, name=renamed[t.name]))
        else:
            tensors.append(t)
    aliases = {
        renamed.get(a, a): renamed.get(c, c) for a, c in plan.aliases.items() if a not in dropped
    }
    return replace(plan, tensors=tuple(tensors), aliases=aliases)


def _cat_dim1(name: str, a: OutputTensor, b: OutputTensor) -> OutputTensor:
    """``cat(a, b, dim=1)`` of two ``[E, F, ...]`` tensors as reads: per expert ``e``, a's
    ``F * rest`` elements then b's."""
    if a.shape != b.shape or len(a.shape) < 2 or a.dtype != b.dtype:
        raise UnsupportedLayout(
            f"{a.name} {list(a.shape)} and {b.name} {list(b.shape)} cannot be concatenated "
            f"into {name}"
        )
    per = a.numel // a.shape[0]  # elements of one expert's slice
    reads: list[Read] = []
    for which, source in enumerate((a, b)):
        for read in source.reads:
            done = 0
            while done < read.length:
                at = read.dst_start + done
                expert, inner = divmod(at, per)
                length = min(read.length - done, per - inner)
                dst = expert * 2 * per + which * per + inner
                reads.append(Read(read.source, read.src_start + done, length, dst))
                done += length
    shape = (a.shape[0], 2 * a.shape[1], *a.shape[2:])
    return OutputTensor(name, shape, a.dtype, tuple(sorted(reads, key=lambda r: r.dst_start)))
