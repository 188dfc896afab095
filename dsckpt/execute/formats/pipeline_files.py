"""Pipeline / Megatron-DeepSpeed rank files as write plans, for ``reshape --tp/--pp/--dp``.

:class:`PipelineRankFiles` builds every target file's structure (layer files, model states,
ZeRO-1 optimizer states) from the source files' own structures and the
:class:`~dsckpt.plan.pipeline_reshape.PipelinePlan`: tensors are meta tensors standing for the
byte ranges of the source files their elements come from, so each file becomes a write plan
(:func:`~dsckpt.execute.formats.deepspeed_files.rank_file_plan`) and nothing is written here.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsckpt.discover import zero
from dsckpt.discover.files import Role
from dsckpt.errors import InconsistentCheckpoint, UnsupportedLayout
from dsckpt.execute.formats.deepspeed_files import rank_file_plan
from dsckpt.execute.formats.torch_writer import LazyStorages
from dsckpt.io import dtypes
from dsckpt.io.load import FragmentAddress, TensorRef, load_mapped, tensor_ref
from dsckpt.io.unpickle import load_saved
from dsckpt.plan.fileplan import ByteRange, Copy, FilePlan, WritePlan, tag_directory_plan
from dsckpt.plan.model import Read
from dsckpt.plan.pipeline_consolidation import (
    LocalSlice,
    clip_reads,
    compose_reads,
    replicas_agree,
)
from dsckpt.plan.pipeline_reshape import ARG_DEGREES, PipelinePlan, TargetStage
from dsckpt.plan.zero_reshape import slice_mapping, zero12_group_paddings


class PipelineRankFiles:
    """Plans the target files of a pipeline reshape. Partitions and re-split layer tensors are
    lazy: each is a list of byte ranges of the source files (:class:`dsckpt.plan.consolidation.Read`
    runs composed through the TP plan and the ZeRO pieces) that become copies in the file's
    write plan, so memory does not grow with the model."""

    def __init__(self, plan: PipelinePlan) -> None:
        import torch

        self.torch = torch
        self.plan = plan
        self.source = plan.source
        self.layout = plan.source.layout
        self.lazy = LazyStorages()
        self._metas: dict[Path, Any] = {}
        self._mapped: dict[Path, Any] = {}

    # --- the directory ------------------------------------------------------------------------

    def write_plan(self, tag: str) -> WritePlan:
        """Every target file planned (nothing is written): layer, model and optimizer files,
        then ``latest``."""
        plan, dst = self.plan, self.plan.dst
        self.tag = tag
        self.files: list[FilePlan] = []
        for stage in plan.stages:
            for t in range(dst.tp):
                for layer in stage.layers:
                    if layer in self.source.layer_files:  # a tied module's other uses have none
                        self._layer_file(layer, t)
                self._model_file(stage, t)
                self._optim_files(stage, t)
        return tag_directory_plan(tag, self.files)

    def _save(self, obj: Any, name: str) -> None:
        self.files.append(rank_file_plan(obj, f"{self.tag}/{name}", self.lazy))

    def _meta(self, path: Path) -> Any:
        """A source file's structure, tensors located but not read (torch-free reader)."""

        if path not in self._metas:
            self._metas[path] = load_saved(path)
        return self._metas[path]

    def _mapped_file(self, path: Path) -> Any:
        """A template file with real (memory-mapped) tensors: its small values are copied."""

        if path not in self._mapped:
            self._mapped[path] = load_mapped(path)
        return self._mapped[path]

    def _template_mp(self, stage: TargetStage, tp_rank: int) -> int:
        """The source model-parallel rank whose files serve as templates for a target one
        (scalars, RNG states, hyperparameters): the stage its first parameter comes from."""
        first = stage.groups[0][0]
        return self._source_stage(first, stage.stage) * self.layout.tp + min(
            tp_rank, self.layout.tp - 1
        )

    def _lazy_tensor(self, dtype: Any, shape: Sequence[int], reads: Sequence[Read]) -> Any:
        """A tensor of ``shape`` whose elements are ``reads`` of source files (zeros elsewhere)."""
        ranges = []
        for r in reads:
            if not r.source.is_contiguous:
                raise UnsupportedLayout(
                    f"{r.source.path.name}: a saved tensor is a strided view, "
                    "which reshape does not re-split"
                )
            item = r.source.itemsize
            ranges.append(
                Copy(
                    r.dst_start * item,
                    ByteRange(r.source.path, r.source.offset + r.src_start * item, r.length * item),
                )
            )
        return self.lazy.tensor(dtype, tuple(shape), ranges)

    # --- where values are ---------------------------------------------------------------------

    def _source_stage(self, name: str, target_stage: int) -> int:
        """The source stage whose copy of ``name`` to take (tied modules live on several)."""
        stages = self.source.params[name].stages
        return target_stage if target_stage in stages else min(stages)

    def _flat_ref(self, mp: int, dp_rank: int, g: int, key: str) -> TensorRef:
        """The saved flat partition of group ``g`` on (``mp``, ``dp_rank``): the fp32 master or
        optimizer state ``key``."""

        fp32 = self.layout.zero_sources[mp].fp32[dp_rank][g]
        if key == "fp32":
            return fp32
        base = self._meta(fp32.path)["optimizer_state_dict"]["base_optimizer_state"]
        value = base["state"][_state_index(base, g, fp32.path)].get(key)
        if value is None:
            raise InconsistentCheckpoint(
                f"{fp32.path.name}: group {g} has no optimizer state {key!r}"
            )
        return tensor_ref(fp32.path, value)

    def _source_slice(self, name: str, key: str, stage: int, tp_rank: int) -> LocalSlice:
        """Where source TP rank ``tp_rank``'s slice of ``name`` lies in that (stage, TP rank)'s
        DP partitions."""
        mp = stage * self.layout.tp + tp_rank
        group = self.layout.zero_sources[mp].groups[self.source.params[name].group]
        param = next(p for p in group.params if p.name == name)
        g = self.source.params[name].group
        runs = tuple(
            Read(
                self._flat_ref(mp, piece.rank, g, key),
                piece.src_start,
                piece.length,
                piece.dst_start,
            )
            for piece in group.pieces(param)
        )
        return LocalSlice(param.shape, runs)

    def _target_reads(self, name: str, key: str, stage: int, tp_rank: int) -> list[Read]:
        """Reads making target TP rank ``tp_rank``'s slice of ``name`` (flattened)."""
        src_stage = self._source_stage(name, stage)
        tp_plan = self.plan.tp_plans.get(name)
        if tp_plan is None:
            return list(self._source_slice(name, key, src_stage, tp_rank).runs)
        per_rank = [self._source_slice(name, key, src_stage, r) for r in range(self.layout.tp)]
        if key == "fp32" and tp_plan.combine == "copy" and not replicas_agree(per_rank):
            raise InconsistentCheckpoint(
                f"{name}: the TP rules call it replicated, but its TP ranks hold different "
                "values, so no single copy is right; if it is in fact partitioned, pass a rules "
                'file with kind "split" for it (--rules)'
            )
        return compose_reads(tp_plan, per_rank, tp_rank)

    # --- files --------------------------------------------------------------------------------

    def _layer_file(self, layer: int, tp_rank: int) -> None:

        name = f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"
        src_dir = self.layout.dir
        if not self.plan.tp_plans:  # names keep the global layer index: the file is unchanged
            size = (src_dir / name).stat().st_size
            whole = Copy(0, ByteRange(src_dir / name, 0, size))
            self.files.append(FilePlan(f"{self.tag}/{name}", size, (whole,) if size else ()))
            return
        paths = [
            src_dir / f"layer_{layer:02d}-model_{r:02d}-model_states.pt"
            for r in range(self.layout.tp)
        ]
        metas = [self._meta(path) for path in paths]
        out = OrderedDict()
        for key, param in self.source.layer_files[layer].items():
            refs = [tensor_ref(path, meta[key]) for path, meta in zip(paths, metas, strict=True)]
            per_rank = [LocalSlice(ref.shape, (Read(ref, 0, ref.numel, 0),)) for ref in refs]
            tp_plan = self.plan.tp_plans[param]
            shape = tp_plan.dst_shapes[tp_rank]
            value = self._lazy_tensor(
                dtypes.to_torch(refs[0].dtype), shape, compose_reads(tp_plan, per_rank, tp_rank)
            )
            out[key] = value.requires_grad_(metas[0][key].requires_grad)
        for k, v in vars(metas[0]).items():  # module versions in `_metadata`
            setattr(out, k, copy.deepcopy(v))
        self._save(out, name)

    def _model_file(self, stage: TargetStage, tp_rank: int) -> None:
        torch = self.torch
        plan, dst, layout = self.plan, self.plan.dst, self.layout
        src_mp = self._template_mp(stage, tp_rank)
        template = self._mapped_file(layout.dir / f"mp_rank_{src_mp:02d}_model_states.pt")
        sd = dict(template)
        sd["param_shapes"] = [
            OrderedDict((n, torch.Size(plan.local_shape(n, tp_rank))) for n in names)
            for names in stage.groups
        ]
        sd["dp_world_size"] = dst.dp
        sd["mp_world_size"] = dst.pp * dst.tp
        if isinstance(sd.get("checkpoint_parallel_dimensions"), Mapping):
            sd["checkpoint_parallel_dimensions"] = {
                **sd["checkpoint_parallel_dimensions"],
                "pp_degree": dst.pp,
                "tp_degree": dst.tp,
            }
        padded = self._padded_vocab()
        if sd.get("args") is not None:
            args = copy.copy(sd["args"])
            for attr, axis in ARG_DEGREES.items():
                if hasattr(args, attr):
                    setattr(args, attr, getattr(dst, axis))
            if hasattr(args, "world_size"):
                args.world_size = dst.world_size
            if padded is not None and hasattr(args, "padded_vocab_size"):
                args.padded_vocab_size = padded
            sd["args"] = args
        for key in ("checkpoint_info", "universal_checkpoint_info"):
            info = sd.get(key)
            if padded is not None and isinstance(info, Mapping) and "padded_vocab_size" in info:
                sd[key] = {**info, "padded_vocab_size": padded}
        mp = stage.stage * dst.tp + tp_rank
        self._save(sd, f"mp_rank_{mp:02d}_model_states.pt")

    def _padded_vocab(self) -> int | None:
        """The padded vocabulary at the target TP, when a vocabulary parameter shows it."""
        for tp_plan in self.plan.tp_plans.values():
            if tp_plan.rule.kind == "vocab" and tp_plan.dim is not None:
                return int(tp_plan.dst_shapes[0][tp_plan.dim]) * self.plan.dst.tp
        return None

    def _optim_files(self, stage: TargetStage, tp_rank: int) -> None:

        torch = self.torch
        plan, dst, layout = self.plan, self.plan.dst, self.layout
        kind = self.source.kind
        mp = stage.stage * dst.tp + tp_rank
        src_mp = self._template_mp(stage, tp_rank)
        template_path = layout.zero_sources[src_mp].fp32[0][0].path
        template = self._mapped_file(template_path)
        osd0 = template["optimizer_state_dict"]
        base0 = osd0["base_optimizer_state"]
        state_keys = [
            k
            for k, v in base0["state"][_state_index(base0, 0, template_path)].items()
            if isinstance(v, torch.Tensor) and v.dim() == 1
        ]
        # Each group's flat buffer as reads, padded to 2*dp as ZeRO-1 and BF16_Optimizer do.
        numels = [
            [zero.numel(plan.local_shape(n, tp_rank)) for n in names] for names in stage.groups
        ]
        sizes = [zero.zero12_partition_size(sum(counts), dst.dp) for counts in numels]
        flats: list[dict[str, tuple[Any, list[Read]]]] = []
        for g, names in enumerate(stage.groups):
            per_key = {}
            for key in ("fp32", *state_keys):
                reads: list[Read] = []
                offset = 0
                for n, count in zip(names, numels[g], strict=True):
                    reads.extend(
                        Read(r.source, r.src_start, r.length, offset + r.dst_start)
                        for r in self._target_reads(n, key, stage.stage, tp_rank)
                    )
                    offset += count
                per_key[key] = (dtypes.to_torch(self._flat_ref(src_mp, 0, 0, key).dtype), reads)
            flats.append(per_key)
        prefix = next((f.prefix for f in layout.files if f.role is Role.OPTIM), "")
        for d in range(dst.dp):
            paddings = [
                zero12_group_paddings(sum(counts), sum(counts), size, dst.dp, kind)[d]
                for counts, size in zip(numels, sizes, strict=True)
            ]

            def part(g: int, key: str, length: int, d: int = d) -> Any:
                dtype, reads = flats[g][key]
                start = d * sizes[g]
                return self._lazy_tensor(
                    dtype, (length,), clip_reads(tuple(reads), start, length, 0)
                )

            osd: dict[str, Any] = {}
            for key, value in osd0.items():
                if key == "base_optimizer_state":
                    state = {}
                    for g in range(len(flats)):
                        index = _state_index(base0, g, template_path)
                        state[index] = {
                            k: (
                                part(g, k, sizes[g])
                                if k in state_keys
                                else v.clone()
                                if isinstance(v, torch.Tensor)
                                else v
                            )
                            for k, v in base0["state"][index].items()
                        }
                    osd[key] = {**value, "state": state}
                elif key == "single_partition_of_fp32_groups":
                    # ZeRO saves its slice without the tail padding, BF16_Optimizer with it.
                    osd[key] = [
                        part(
                            g, "fp32", sizes[g] - (paddings[g] if kind == "zero" else 0)
                        ).requires_grad_(value[g].requires_grad)
                        for g in range(len(flats))
                    ]
                elif key == "group_paddings":
                    osd[key] = paddings
                elif key == "partition_count":
                    osd[key] = [dst.dp] * len(flats)
                elif key == "param_alignment_paddings":
                    osd[key] = [[0] * len(names) for names in stage.groups]
                elif key == "param_slice_mappings":
                    osd[key] = [
                        OrderedDict(
                            (n, FragmentAddress(numel=c, start=s))
                            for n, c, s in slice_mapping(names, numels[g], None, d, sizes[g])
                        )
                        for g, names in enumerate(stage.groups)
                    ]
                else:
                    osd[key] = value
            top = {k: (osd if k == "optimizer_state_dict" else v) for k, v in template.items()}
            self._save(top, f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")


def _state_index(base: Mapping[str, Any], group: int, path: Path) -> Any:
    """The torch optimizer state key of flat group ``group`` (ZeRO-1 keeps one tensor per group)."""
    params = base["param_groups"][group]["params"]
    if len(params) != 1:
        raise InconsistentCheckpoint(
            f"{path.name}: optimizer group {group} holds {len(params)} "
            "tensors; ZeRO-1 keeps one flat partition per group"
        )
    return params[0]
