"""DeepSpeed rank files as write plans: the structures DeepSpeed saves, with lazy tensors.

For a ZeRO reshape (:class:`ZeroRankFiles`) every target rank file's structure is built as
DeepSpeed would pickle it, from the source files' own structures (read without running any of
their code) and the :class:`~dsckpt.plan.zero_reshape.ReshapePlan`; every tensor in it is a meta
tensor standing for byte ranges of the source files. :func:`rank_file_plan` pickles it under
DeepSpeed's class paths and lays it out as a ``torch.save`` zip whose tensor bytes are copies
of those ranges (:func:`~dsckpt.execute.formats.torch_writer.torch_object_file`). Nothing is
written here: the one executor writes the plans.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dsckpt.errors import CorruptFile, InconsistentCheckpoint, UnsupportedLayout
from dsckpt.execute.executor import tensor_memory
from dsckpt.execute.formats.torch_writer import LazyStorages, torch_object_file
from dsckpt.io import dtypes
from dsckpt.io.load import STAND_INS, FragmentAddress, read_tensor, tensor_ref
from dsckpt.plan.fileplan import (
    ByteRange,
    Copy,
    DeferredFile,
    FilePlan,
    WritePlan,
    tag_directory_plan,
)
from dsckpt.plan.universal_reshape import UniversalSource
from dsckpt.plan.zero_reshape import Partition, ReshapePlan, Run, TargetGroup
from dsckpt.plan.zero_source import Source


class DeepSpeedNamesPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Pickles dsckpt's inert stand-ins under DeepSpeed's own import paths.

    The files must unpickle with DeepSpeed's ``torch.load`` into DeepSpeed's classes (loss
    scaler, ZeroStageEnum, fragment_address) without dsckpt importing DeepSpeed, so the GLOBAL
    opcode is written directly instead of being looked up.
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        path = _DEEPSPEED_NAMES.get(obj)
        if path is None:
            super().save_global(obj, name)  # type: ignore[misc]
            return
        module, _, qualname = path.rpartition(".")
        write, memoize = self.write, self.memoize  # type: ignore[attr-defined]
        write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
        memoize(obj)


def _deepspeed_names() -> dict[Any, str]:

    return {cls: path for path, cls in STAND_INS.items() if path.startswith("deepspeed.")}


_DEEPSPEED_NAMES: dict[Any, str] = {}


# Real CRC-32s in every zip record, so zip tools accept the files (torch.load never checks them):
# computed from the source chunks on a worker thread while the kernel copies them
# (dsckpt.formats.crc; bench/bench_crc.py measured the options).
STREAM_CRC32 = True


def rank_file_plan(obj: Any, name: str, lazy: LazyStorages) -> FilePlan:
    """The write plan of one rank file as DeepSpeed's ``torch.save`` would write it: ``lazy``'s
    tensors are copies of their source byte ranges
    (:func:`~dsckpt.execute.formats.torch_writer.torch_object_file`), and dsckpt's stand-ins
    are pickled under DeepSpeed's class paths."""
    if not _DEEPSPEED_NAMES:
        _DEEPSPEED_NAMES.update(_deepspeed_names())
    return torch_object_file(
        name, obj, lazy=lazy, pickler=DeepSpeedNamesPickler, crc32=STREAM_CRC32
    )


class ZeroRankFiles:
    """Plans the rank files of a ZeRO reshape, one file at a time.

    Each rank file's structure is built as DeepSpeed would pickle it, but every tensor in it is
    a meta tensor standing for byte ranges of the source files (a saved record, or the runs of
    a target partition). :func:`rank_file_plan` pickles it into a write plan whose copies are
    those ranges, so memory stays at the pickled structure, whatever the model size.
    """

    def __init__(self, source: Source | UniversalSource, plan: ReshapePlan) -> None:
        import torch

        self.torch = torch
        self.source = source
        self.plan = plan
        self.stack = ExitStack()
        self.fds: dict[Path, int] = {}
        # The structures are built from meta tensors whose bytes are file ranges: nothing is
        # read until save_torch copies them into the output. One registry per output file.
        self.lazy = LazyStorages()
        self._names: dict[str, str] | None = None
        self._source_of: dict[str, int] | None = None

    # --- the directory ------------------------------------------------------------------------

    def write_plan(self, defer: bool = False) -> WritePlan:
        """Every output file planned (nothing is written): the rank files, then ``latest``.

        With ``defer``, ZeRO-3's model-states files are deferred (:class:`DeferredFile`):
        planned by the executor one at a time as it writes them. Each lists an operation per
        parameter (a placeholder record each): holding every rank's grows with the rank count.
        """
        tag = self.source.tag
        files: list[FilePlan | DeferredFile] = []
        for name, build in self._jobs():
            path = f"{tag}/{name}"
            if defer and self._per_parameter(name):
                files.append(DeferredFile(path, functools.partial(self._file, path, build)))
            else:
                files.append(self._file(path, build))
        for source in self.source.expert_files:
            # MoE expert weights do not depend on the DP size: copied byte for byte (the
            # executor opens each again as a regular file when it copies).
            size = os.stat(source).st_size
            whole = (Copy(0, ByteRange(source, 0, size)),) if size else ()
            files.append(FilePlan(f"{tag}/{source.name}", size, whole))
        return tag_directory_plan(tag, files)

    def _per_parameter(self, name: str) -> bool:
        return self.plan.kind == "zero3" and name.endswith("_model_states.pt")

    def _file(self, path: str, build: Callable[[], Any]) -> FilePlan:
        """One rank file's plan, built with its own lazy storages and source descriptors."""
        self.stack, self.fds, self.lazy = ExitStack(), {}, LazyStorages()
        with self.stack:  # sources read while building (strided partitions only)
            file = rank_file_plan(build(), path, self.lazy)
        self.lazy = LazyStorages()  # drop this file's sources
        return file

    def _jobs(self) -> list[tuple[str, Callable[[], Any]]]:
        """``(file name, builder)`` for every output rank file."""
        plan = self.plan
        jobs: list[tuple[str, Callable[[], Any]]] = []
        if plan.kind == "zero3":
            for rank in range(plan.dp):
                jobs.append(
                    (
                        f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                        functools.partial(self._zero3_model_states, rank),
                    )
                )
        else:
            jobs.append(("mp_rank_00_model_states.pt", lambda: self._model_states()))
        prefix = self.source.optim_prefix
        for rank in range(plan.dp):
            jobs.append(
                (
                    f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                    functools.partial(self._optim_states, rank),
                )
            )
        return jobs

    # --- reading ------------------------------------------------------------------------------

    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            fd = os.open(path, os.O_RDONLY)
            self.stack.callback(os.close, fd)
            self.fds[path] = fd
        return self.fds[path]

    def _size(self, path: Path) -> int:
        return os.fstat(self._fd(path)).st_size

    def _pread_into(self, path: Path, offset: int, view: memoryview) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CorruptFile(path, "unexpected end of file while reading a tensor")
            done += n

    def _ref(self, path: Path, tensor: Any) -> Any:

        return tensor_ref(path, tensor)

    def _flat(
        self, dtype: Any, numel: int, runs: Sequence[Run], ref_of: Callable[[Run], Any]
    ) -> Any:
        """A flat target tensor of ``numel`` elements made of ``runs``, zeros elsewhere.

        Normally a lazy tensor: its bytes are copied from the source files when the output is
        written. A strided source (never seen in DeepSpeed's flat partitions) is read into an
        in-memory tensor instead, bounded by that one partition.
        """
        refs = [ref_of(run) for run in runs]
        item = self.torch.empty((), dtype=dtype).element_size()
        for run, ref in zip(runs, refs, strict=True):
            self._check_run(run, ref, numel, dtype)
        if not all(ref.is_contiguous for ref in refs):
            out = self.torch.zeros(numel, dtype=dtype)
            self._fill(out, runs, refs)
            return out
        ranges = [
            Copy(
                run.dst_start * item,
                ByteRange(ref.path, ref.offset + run.src_start * item, run.length * item),
            )
            for run, ref in zip(runs, refs, strict=True)
        ]
        return self.lazy.tensor(dtype, (numel,), ranges)

    @staticmethod
    def _check_run(run: Run, ref: Any, numel: int, dtype: Any) -> None:
        if run.dst_start + run.length > numel:
            raise AssertionError(
                f"plan error: a run ends at {run.dst_start + run.length}, "
                f"past the {numel} elements of its target"
            )
        if run.src_start + run.length > ref.numel:
            raise InconsistentCheckpoint(
                f"{ref.path.name}: a saved partition holds {ref.numel} elements, but the "
                f"layout needs elements up to {run.src_start + run.length}"
            )
        if dtypes.name_of(ref.dtype) != dtypes.name_of(dtype):
            raise InconsistentCheckpoint(
                f"{ref.path.name}: partitions of one group are saved "
                f"in different dtypes ({ref.dtype}, {dtype})"
            )

    def _fill(self, out: Any, runs: Sequence[Run], refs: Sequence[Any]) -> None:
        """Copy each run's elements into the zero-initialised in-memory flat tensor ``out``."""

        raw = tensor_memory(out)  # shares out's memory; torch-only (no numpy needed)
        item = out.element_size()
        for run, ref in zip(runs, refs, strict=True):
            if ref.is_contiguous:
                self._pread_into(
                    ref.path,
                    ref.offset + run.src_start * item,
                    raw[run.dst_start * item : (run.dst_start + run.length) * item],
                )
            else:
                out[run.dst_start : run.dst_start + run.length] = read_tensor(
                    ref, run.src_start, run.length
                )

    def _materialize(
        self, obj: Any, path: Path, shared: dict[int | None, Any] | None = None
    ) -> Any:
        """The pickled structure with every meta tensor replaced by its saved values.

        Tensors that shared a storage within ``obj`` share one again (tied weights, views into a
        flat buffer), so the structure torch.save writes is the one that was read. Separate calls
        never share: two state entries made from one source tensor (the ``step`` of a ZeRO-3
        sub-group split in two) must be two tensors, or DeepSpeed would advance one twice.
        """
        torch = self.torch
        if shared is None:
            shared = {}
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            nbytes = storage.nbytes()
            base = getattr(storage, "_checkpoint_offset", None)
            lazy = shared.get(base) if nbytes else None
            if lazy is None:
                if not nbytes:
                    lazy = self.lazy.storage(0)
                else:
                    if base is None:
                        raise CorruptFile(path, "a tensor has no record offset")
                    if base + nbytes > self._size(path):
                        raise CorruptFile(
                            path, "a tensor record runs past the end of the file (truncated)"
                        )
                    # The saved record, copied into the output when it is written: a
                    # model-states file holding the whole 16-bit model is never resident.
                    lazy = self.lazy.storage(nbytes, [Copy(0, ByteRange(path, base, nbytes))])
                    shared[base] = lazy
            value = self.lazy.view(lazy, obj.dtype, obj.storage_offset(), obj.shape, obj.stride())
            return self._like(obj, value)
        if isinstance(obj, OrderedDict):
            copy = OrderedDict((k, self._materialize(v, path, shared)) for k, v in obj.items())
            # A module state dict carries per-module versions in `_metadata`: keep them.
            for k, v in vars(obj).items():
                setattr(copy, k, self._materialize(v, path, shared))
            return copy
        if type(obj) is dict:
            return {k: self._materialize(v, path, shared) for k, v in obj.items()}
        if type(obj) is list:
            return [self._materialize(v, path, shared) for v in obj]
        if type(obj) is tuple:
            return tuple(self._materialize(v, path, shared) for v in obj)
        return obj

    def _like(self, meta: Any, value: Any) -> Any:
        """``value`` with the tensor class, ``requires_grad`` and attributes of ``meta``."""
        torch = self.torch
        if isinstance(meta, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=meta.requires_grad)
        elif meta.requires_grad and value.is_floating_point():
            value.requires_grad_(True)
        for k, v in getattr(meta, "__dict__", {}).items():
            setattr(value, k, v)
        return value

    # --- ZeRO-1/2 and BF16_Optimizer ----------------------------------------------------------

    def _model_states(self) -> Any:
        path, meta = self.source.model[0]
        sd = self._materialize(meta, path)
        sd["dp_world_size"] = self.plan.dp
        if self.plan.params_reordered:
            sd["param_shapes"] = self._param_shapes(like=sd.get("param_shapes"))
        # AutoEP records its writer's expert-data-parallel size (DP / EP) per layer, twice.
        info = sd.get("universal_checkpoint_info")
        copies = (sd.get("ds_autoep_layers"), info.get("ds_autoep_layers") if info else None)
        for layers in copies:
            for layer in layers or ():
                if (
                    isinstance(layer, dict)
                    and isinstance(layer.get("ep_size"), int)
                    and "expert_data_parallel_world_size" in layer
                ):
                    layer["expert_data_parallel_world_size"] = self.plan.dp // layer["ep_size"]
        return sd

    def _param_shapes(self, like: Any = None) -> list[Any]:
        """``param_shapes`` at the target, shapes as ``torch.Size``, or as the saved ones are
        (``like``: the source's, whose shapes torch's unpickler gives back as plain tuples)."""
        torch = self.torch
        names = self._saved_names()
        saved = next((s for group in like or () for s in group.values()), None)
        # A new object per parameter, as DeepSpeed's are: a plan may hold one shape for many
        # parameters (--ep: every local expert's), which pickle would write once and refer to.
        size = (lambda s: tuple([*s])) if type(saved) is tuple else torch.Size
        return [
            OrderedDict((names.get(n, n), size(s)) for n, s in g.params) for g in self.plan.groups
        ]

    def _saved_names(self) -> Mapping[str, str]:
        """Parameter names as the template model-states pickle holds them (the same objects).

        torch.save writes a string once and refers back to it (pickle's memo) when the same
        object appears again, as some of the names in DeepSpeed's files do; names equal but not
        identical would be written twice, and the file would not be the bytes DeepSpeed writes
        at that size."""
        if self._names is None:
            _, meta = self.source.model[0]
            self._names = {
                n: n
                for key in ("frozen_param_shapes", "param_shapes")
                for shapes in _as_list(meta.get(key))
                for n in shapes
            }
        return self._names

    def _optim_states(self, rank: int) -> Any:
        if isinstance(self.source, UniversalSource) and self.plan.kind != "zero3":
            return self._universal_optim_states(rank)
        if self.plan.kind == "zero3":
            return self._zero3_optim_states(rank)

        path0, sd0 = self.source.optim[0]
        osd0 = sd0["optimizer_state_dict"]
        plan = self.plan
        fp32 = []
        for group in plan.groups:
            part = group.partitions[rank]
            # ZeRO saves the fp32 slice without its tail padding, BF16_Optimizer with it.
            length = part.numel - (
                plan.group_paddings[rank][group.index] if plan.kind == "zero" else 0
            )
            t = self._partition(group, part, None, length)
            fp32.append(self._like(self._src_fp32(0, group.index), t))
        base0 = osd0["base_optimizer_state"]
        state: dict[Any, Any] = {}
        for group in plan.groups:
            index = self._state_index(base0, group.index)
            saved = (base0.get("state") or {}).get(index)
            if saved is None:
                continue
            entry = {}
            for key, value in saved.items():
                if key in self._partitioned_keys(group):
                    part = group.partitions[rank]
                    entry[key] = self._like(value, self._partition(group, part, key))
                else:
                    entry[key] = self._materialize(value, path0)
            state[index] = entry
        base = {
            k: (state if k == "state" else self._materialize(v, path0)) for k, v in base0.items()
        }
        _rename_expert_groups(base.get("param_groups"), plan.groups)
        osd: dict[str, Any] = {}
        for key, value in osd0.items():
            if key == "base_optimizer_state":
                osd[key] = base
            elif key == "single_partition_of_fp32_groups":
                osd[key] = fp32
            elif key == "group_paddings":
                osd[key] = list(plan.group_paddings[rank])
            elif key == "partition_count":
                # Per group: every DP rank, or an expert group's expert-data-parallel size.
                counts = [g.partition_count(plan.dp) for g in plan.groups]
                osd[key] = counts if isinstance(value, (list, tuple)) else plan.dp
            elif key == "param_alignment_paddings":
                osd[key] = [list(g.alignment_paddings or ()) for g in plan.groups]
            elif key == "param_slice_mappings":
                osd[key] = [
                    OrderedDict((n, FragmentAddress(numel=c, start=s)) for n, c, s in m)
                    for m in plan.slice_mappings[rank]
                ]
            else:
                osd[key] = self._materialize(value, path0)
        top = {
            k: (osd if k == "optimizer_state_dict" else self._materialize(v, path0))
            for k, v in sd0.items()
        }
        return top

    def _src_fp32(self, rank: int, index: int) -> Any:
        osd = self.source.optim[rank][1]["optimizer_state_dict"]
        key = "fp32_flat_groups" if self.plan.kind == "zero3" else "single_partition_of_fp32_groups"
        return osd[key][self.source.position(rank, index)]

    def _state_index(self, base: Mapping[str, Any], group: int) -> Any:
        """The torch optimizer state key of flat group ``group`` (its place in param_groups)."""
        if self.plan.kind == "zero3":
            return group
        params = base["param_groups"][group]["params"]
        if len(params) != 1:
            raise InconsistentCheckpoint(
                f"optimizer group {group} holds {len(params)} tensors; "
                "ZeRO-1/2 keeps one flat partition per group"
            )
        return params[0]

    def _source_state(self, rank: int, index: int) -> Mapping[str, Any]:
        base = self.source.optim[rank][1]["optimizer_state_dict"]
        base = base["optimizer_state_dict" if self.plan.kind == "zero3" else "base_optimizer_state"]
        at = self.source.position(rank, index)
        return (base.get("state") or {}).get(self._state_index(base, at)) or {}

    def _partitioned_keys(self, group: TargetGroup) -> tuple[str, ...]:
        """State entries split like the fp32 partition (Adam's moments and the like).

        Decided on source rank 0 as DeepSpeed does: a 1-D tensor as long as the partition. 0-d
        tensors (``step``) and other values are copied. Anything else has no rule to reshape it.
        """
        cache = self.__dict__.setdefault("_keys", {})
        if group.index in cache:
            return cache[group.index]  # type: ignore[no-any-return]
        keys: list[str] = []
        for src in group.sources:
            length = self._src_fp32(0, src).numel()
            if self.plan.kind == "zero":
                length = self.source.facts.groups[src].partition_size
            for key, value in self._source_state(0, src).items():
                if not isinstance(value, self.torch.Tensor) or value.dim() == 0:
                    continue
                if value.dim() == 1 and value.numel() == length:
                    if key not in keys:
                        keys.append(key)
                    continue
                raise UnsupportedLayout(
                    f"optimizer state {key!r} of group {src} has shape {tuple(value.shape)}, "
                    f"neither a scalar nor the partition's {length} elements: reshape does not "
                    "know how this optimizer splits it"
                )
        cache[group.index] = tuple(keys)
        return tuple(keys)

    def _partition(
        self, group: TargetGroup, part: Partition, key: str | None, length: int | None = None
    ) -> Any:
        """One target partition of the fp32 master (``key`` None) or of optimizer state ``key``,
        ``length`` elements long (default: the whole partition, padding included)."""
        numel = part.numel if length is None else length
        if isinstance(self.source, UniversalSource):
            return self._universal_flat(part, key or "fp32", numel)
        probe = (
            self._src_fp32(0, group.sources[0])
            if key is None
            else self._source_state(0, group.sources[0])[key]
        )

        def ref_of(run: Run) -> Any:
            path, _ = self.source.optim[run.src_rank]
            if key is None:
                return self._ref(path, self._src_fp32(run.src_rank, run.src_index))
            value = self._source_state(run.src_rank, run.src_index).get(key)
            if value is None:
                raise InconsistentCheckpoint(
                    f"{path.name}: group {run.src_index} has no "
                    f"optimizer state {key!r} but rank 0 has"
                )
            return self._ref(path, value)

        return self._flat(probe.dtype, numel, part.runs, ref_of)

    # --- from a universal checkpoint (ZeRO-1/2 and BF16_Optimizer) ------------------------------

    def _universal_optim_states(self, rank: int) -> Any:
        """Rank ``rank``'s optimizer file as DeepSpeed's ``state_dict`` would have saved it at
        the target size: the common state from ``zero/optimizer_state.pt`` (what
        ds_to_universal kept of rank 0's), the partitions and Adam's moments cut from the
        parameters' own files, and the bookkeeping the plan worked out for the new size."""
        source = self.source
        assert isinstance(source, UniversalSource)
        torch = self.torch
        plan = self.plan
        state_path, template = source.optim[0]
        saved = template["optimizer_state_dict"]
        fp32, state = [], {}
        for group in plan.groups:
            part = group.partitions[rank]
            # ZeRO saves the fp32 slice without its tail padding, BF16_Optimizer with it.
            length = part.numel - (
                plan.group_paddings[rank][group.index] if plan.kind == "zero" else 0
            )
            master = self._universal_flat(part, "fp32", length)
            fp32.append(master.requires_grad_(True))
            step = source.steps[group.index]
            if step is None:
                raise AssertionError("plan error: a ZeRO-1/2 group without its step tensor")
            # torch's Adam keeps `step` first, then the moments (the order a state dict shows).
            saved_step = Copy(0, ByteRange(step.path, step.offset, step.nbytes))
            entry = {"step": self.lazy.tensor(_torch_dtype(torch, step), step.shape, [saved_step])}
            for key in ("exp_avg", "exp_avg_sq"):  # saved with the padding, as the fp32 is not
                entry[key] = self._universal_flat(part, key, part.numel)
            state[group.index] = entry
        groups = self._materialize(source.optim.param_groups, state_path)
        base = {"state": state, "param_groups": groups}
        osd: dict[str, Any] = {}
        for key, value in saved.items():
            if key == "group_paddings":
                value = list(plan.group_paddings[rank])
            elif key == "partition_count":
                value = [plan.dp] * len(plan.groups)
            elif key == "param_alignment_paddings":
                value = [list(g.alignment_paddings or [0] * len(g.params)) for g in plan.groups]
            else:
                value = self._materialize(value, state_path)
            osd[key] = value
            if key == "clip_grad":
                # DeepSpeed's state_dict puts the sharded entries right after `clip_grad`.
                osd["base_optimizer_state"] = base
                osd["single_partition_of_fp32_groups"] = fp32
        osd.setdefault("base_optimizer_state", base)
        osd.setdefault("single_partition_of_fp32_groups", fp32)
        osd["param_slice_mappings"] = [
            OrderedDict((n, FragmentAddress(numel=c, start=s)) for n, c, s in m)
            for m in plan.slice_mappings[rank]
        ]
        return {
            k: (osd if k == "optimizer_state_dict" else self._materialize(v, state_path))
            for k, v in template.items()
        }

    def _universal_flat(self, part: Partition, key: str, numel: int) -> Any:
        """A target partition of state ``key`` (``fp32``, ``exp_avg``, ``exp_avg_sq``), ``numel``
        elements, cut from the parameters' ``zero/<name>/<key>.pt`` tensors."""
        source = self.source
        assert isinstance(source, UniversalSource)
        refs = source.states.get(key)
        if refs is None:
            raise UnsupportedLayout(
                f"{source.layout.dir}: the optimizer keeps state {key!r} per element, which "
                "ds_to_universal's folders do not hold (only fp32, exp_avg and exp_avg_sq)"
            )

        def ref_of(run: Run) -> Any:
            ref = refs[run.src_index]
            if ref is None:
                raise InconsistentCheckpoint(
                    f"zero/{source.params[run.src_index]}/{key}.pt is missing"
                )
            return ref

        return self._flat(self.torch.float32, numel, part.runs, ref_of)

    # --- ZeRO-3 -------------------------------------------------------------------------------

    def _zero3_model_states(self, rank: int) -> Any:
        path, meta = self.source.model[0]
        # Rank 0's frozen fragments are replaced below: do not read them.
        sd = self._materialize(
            {
                k: (None if k == "frozen_param_fragments" and self.plan.frozen else v)
                for k, v in meta.items()
            },
            path,
        )
        sd["dp_world_size"] = self.plan.dp
        sd["param_shapes"] = self._param_shapes()
        if rank != 0 and sd.get("shared_params") is not None:
            sd["shared_params"] = {}  # DeepSpeed records tied parameters on global rank 0 only
        if self.plan.frozen:
            fragments = OrderedDict()
            layout = self.source.layout
            saved = self._saved_names()
            for frozen in self.plan.frozen:
                refs = layout.frozen_fragments[frozen.name]
                like = meta["frozen_param_fragments"][frozen.name]
                part = frozen.partitions[rank]
                out = self._flat(
                    like.dtype, part.numel, part.runs, functools.partial(_by_rank, refs)
                )
                fragments[saved.get(frozen.name, frozen.name)] = self._like(like, out)
            sd["frozen_param_fragments"] = fragments
        return sd

    def _zero3_optim_states(self, rank: int) -> Any:
        path0, sd0 = self.source.optim[0]
        osd0 = sd0["optimizer_state_dict"]
        torch_osd0 = osd0["optimizer_state_dict"]
        plan = self.plan
        flats, state = [], {}
        for group in plan.groups:
            part = group.partitions[rank]
            like = self._src_fp32(0, group.sources[0])
            flat = self._like(like, self._partition(group, part, None))
            if group.ds_id is not None:
                flat.ds_id = group.ds_id
            elif hasattr(flat, "ds_id"):
                del flat.ds_id
            flats.append(flat)
            first = self._first_source(group)
            saved = self._source_state(0, first)
            if not saved:
                continue
            entry = {}
            for key, value in saved.items():
                if key in self._partitioned_keys(group):
                    entry[key] = self._like(value, self._partition(group, part, key))
                else:
                    entry[key] = self._materialize(value, path0)
            state[group.index] = entry
        param_groups = []
        for g, saved_group in enumerate(torch_osd0["param_groups"]):
            copy = self._materialize(saved_group, path0)
            copy["params"] = [t.index for t in plan.groups if t.param_group == g]
            param_groups.append(copy)
        torch_osd = {
            k: (
                state
                if k == "state"
                else param_groups
                if k == "param_groups"
                else self._materialize(v, path0)
            )
            for k, v in torch_osd0.items()
        }
        osd: dict[str, Any] = {}
        for key, value in osd0.items():
            if key == "optimizer_state_dict":
                osd[key] = torch_osd
            elif key == "fp32_flat_groups":
                osd[key] = flats
            elif key == "partition_count":
                osd[key] = plan.dp
            else:
                osd[key] = self._materialize(value, path0)
        top = {
            k: (osd if k == "optimizer_state_dict" else self._materialize(v, path0))
            for k, v in sd0.items()
        }
        return top

    def _first_source(self, group: TargetGroup) -> int:
        """The source sub-group holding the target sub-group's first parameter: its scalar state
        (``step``) is the new sub-group's."""
        if self._source_of is None:  # asked for every group of every rank file: built once
            self._source_of = {
                name: s
                for s, src in reversed(list(enumerate(self.source.facts.groups)))
                for name, _ in src.params
            }
        return self._source_of.get(group.params[0][0], group.sources[0])


def _rename_expert_groups(param_groups: Any, groups: Sequence[TargetGroup]) -> None:
    """MoE expert groups carry their expert-parallel group's name (``ep_size_2``). torch's
    ``load_state_dict`` puts the saved group's keys back into the live optimizer, and DeepSpeed
    then looks the group's process groups up by that name (BF16_Optimizer's expert gradient
    norm, ZeRO's checkpoint loading): at another expert-parallel size it is the target's
    (``ep_size_M``)."""
    # One string object per name, as DeepSpeed's groups share theirs (pickle writes it once).
    names: dict[str, str] = {}
    for group in groups:
        if not group.label or not isinstance(param_groups, list):
            continue
        saved = param_groups[group.index] if group.index < len(param_groups) else None
        if isinstance(saved, dict) and saved.get("moe") and saved.get("name") != group.label:
            saved["name"] = names.setdefault(group.label, group.label)


def _torch_dtype(torch: Any, ref: Any) -> Any:
    return getattr(torch, dtypes.name_of(ref.dtype))


def _by_rank(refs: Sequence[Any], run: Run) -> Any:
    return refs[run.src_rank]


def _as_list(value: Any) -> list[Any]:
    """``param_shapes`` is a list of dicts; ``frozen_param_shapes`` one dict (or absent)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
