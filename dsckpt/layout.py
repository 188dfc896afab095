"""Discovery: what a checkpoint holds, read from file names and pickled metadata only.

:func:`open_checkpoint` returns a frozen :class:`Layout`: the kind of checkpoint, its topology,
ZeRO stage, dtypes, every tensor of the consolidated model with how it is partitioned, the byte
locations of the fp32 sources, and findings (missing, stale or inconsistent files). No tensor data
is read except a few 0-d bookkeeping tensors (optimizer ``step``) used to cross-check ranks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsckpt import dtypes, zero
from dsckpt.errors import CheckpointNotFound, CorruptFile
from dsckpt.files import Location, RankFile, Role, locate, scan
from dsckpt.load import TensorRef, read_scalar, tensor_ref
from dsckpt.unpickle import SavedTensor, load_saved

ERROR, WARNING, INFO = "error", "warning", "info"
MODEL_INFO_KEYS = ("args", "checkpoint_info", "universal_checkpoint_info")


@dataclass(frozen=True)
class Finding:
    """Something wrong or notable about the checkpoint. ``code`` is a stable slug for tools."""

    level: str
    code: str
    message: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the consolidated model and where its values come from."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # as saved in the model weights (module dtype), e.g. "bfloat16"
    kind: str  # "trainable" | "frozen" | "buffer" | "tied"
    placement: str  # how it is partitioned or sliced, for people
    group: int | None = None  # optimizer group (ZeRO-1/2) or sub-group (ZeRO-3)
    alias_of: str | None = None

    @property
    def numel(self) -> int:
        return zero.numel(self.shape)


@dataclass(frozen=True)
class ZeroSources:
    """Byte locations of the fp32 master weights of one model-parallel rank, per DP rank."""

    stage: int
    fp32: tuple[tuple[TensorRef, ...], ...]  # [dp][group or sub-group]
    groups: tuple[zero.Zero12Group, ...] = ()  # ZeRO-1/2 and BF16_Optimizer
    zero3: zero.Zero3Layout | None = None


@dataclass(frozen=True)
class Layout:
    """Everything discovery learned about one checkpoint tag."""

    root: Path
    tag: str | None
    dir: Path
    kind: str  # "zero" | "zero3" | "plain" | "pipeline" | "universal"
    zero_stage: int
    optimizer: str  # "zero" | "bf16_optimizer" | "torch" | "none"
    pp: int
    tp: int
    dp: int
    param_dtype: str | None
    master_dtype: str | None
    iteration: int | None
    ds_version: str | None
    files: tuple[RankFile, ...]
    tensors: tuple[TensorEntry, ...]
    findings: tuple[Finding, ...]
    other_tags: tuple[str, ...] = ()
    # Sources for consolidation (not rendered): fp32 partitions per mp rank, and tensors
    # that live whole in a model-states file (buffers, frozen params, stage-0 weights).
    zero_sources: Mapping[int, ZeroSources] = field(default_factory=dict)
    whole: Mapping[str, tuple[TensorRef, ...]] = field(default_factory=dict)
    frozen_fragments: Mapping[str, tuple[TensorRef, ...]] = field(default_factory=dict)
    # Megatron-DeepSpeed's own description of the model (args, checkpoint_info,
    # universal_checkpoint_info), where the run stored it: input to the TP merge rules.
    model_info: Mapping[str, Any] = field(default_factory=dict)
    # Pipelines: stage boundaries over the layer indices (len pp + 1), as far as the files show
    # them (layers without parameters at the very end leave no trace); empty when unknown.
    stage_parts: tuple[int, ...] = ()

    @property
    def world_size(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == ERROR]

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.size for f in self.files)


def open_checkpoint(path: Path | str, tag: str | None = None) -> Layout:
    """Discover a checkpoint: root with ``latest``, root plus ``tag``, or a tag directory.

    Raises:
        CheckpointNotFound: the path holds no checkpoint.
        UnsafeCheckpoint: a file's pickle needs a global outside the allow-list.
        CorruptFile: a file every consolidation needs cannot be read.
    """
    location = locate(Path(path), tag)
    files, unrelated = scan(location)
    reader = _Reader(location, files)
    if unrelated:
        reader.note(
            INFO,
            "unrelated-files",
            f"{location.dir} also holds files DeepSpeed does not "
            f"write, ignored: {', '.join(unrelated[:5])}" + (" ..." if len(unrelated) > 5 else ""),
        )
    if location.other_tags:
        reader.note(
            INFO,
            "several-tags",
            f"{location.root} holds other tags too: "
            f"{', '.join(location.other_tags)}; reading {location.tag!r}"
            + ("" if (location.root / "latest").is_file() else " (no `latest`; pass --tag)"),
        )
    if location.universal:
        return reader.universal()
    if not files:
        raise CheckpointNotFound(
            f"{location.dir} holds no DeepSpeed rank files (*_model_states.pt, *_optim_states.pt)"
        )
    return reader.read()


class _Reader:
    """Reads one tag directory. Collects findings instead of failing where inspect can go on."""

    def __init__(self, location: Location, files: list[RankFile]) -> None:
        self.location = location
        self.files = files
        self.findings: list[Finding] = []
        self._cache: dict[str, Any] = {}

    def note(self, level: str, code: str, message: str) -> None:
        self.findings.append(Finding(level, code, message))

    def path(self, f: RankFile) -> Path:
        return self.location.dir / f.name

    def load(self, f: RankFile, required: bool = False) -> Any:
        """The file's pickle (tensors as :class:`SavedTensor`), or None with an error finding if
        it is damaged."""
        if f.name not in self._cache:
            try:
                self._cache[f.name] = load_saved(self.path(f))
            except CorruptFile as exc:
                if required:
                    raise
                self.note(ERROR, "corrupt-file", str(exc))
                self._cache[f.name] = None
        return self._cache[f.name]

    def of_role(self, role: Role) -> list[RankFile]:
        return [f for f in self.files if f.role is role]

    # --- the kinds ----------------------------------------------------------------------------

    def universal(self) -> Layout:
        params = sorted(p.name for p in (self.location.dir / "zero").iterdir() if p.is_dir())
        self.note(
            INFO,
            "universal",
            f"{self.location.dir} is a DeepSpeed universal checkpoint "
            f"({len(params)} parameter folders under zero/); dsckpt reads native checkpoints",
        )
        return self._layout(
            kind="universal",
            zero_stage=0,
            optimizer="none",
            pp=1,
            tp=1,
            dp=1,
            meta={},
            tensors=[],
            sources={},
        )

    def read(self) -> Layout:
        model_files = self.of_role(Role.MODEL)
        zero3_models = self.of_role(Role.ZERO3_MODEL)
        if self.of_role(Role.LAYER):
            return self._pipeline(model_files)
        if zero3_models:
            return self._zero3(zero3_models)
        if not model_files:
            raise CheckpointNotFound(
                f"{self.location.dir} has optimizer files but no "
                "mp_rank_*_model_states.pt: the model states are missing"
            )
        if not self.of_role(Role.OPTIM):
            return self._plain(model_files)
        return self._zero12(model_files)

    def _model_meta(self, model_files: list[RankFile]) -> dict[str, Any]:
        first = min(model_files, key=lambda f: (f.mp or 0, f.dp or 0))
        meta = self.load(first, required=True)
        if not isinstance(meta, dict) or "module" not in meta:
            raise CheckpointNotFound(
                f"{self.path(first)} is not a DeepSpeed model-states file (no `module` key)"
            )
        return meta

    def _plain(self, model_files: list[RankFile]) -> Layout:
        meta = self._model_meta(model_files)
        self._check_mp_files(meta, model_files)
        module = meta.get("module") or {}
        buffers = set(meta.get("buffer_names") or [])
        whole = {}
        tensors = []
        by_storage: dict[tuple[int, int], str] = {}
        path = self.path(min(model_files, key=lambda f: f.mp or 0))
        for name, t in module.items():
            if not isinstance(t, SavedTensor):
                continue
            ref = tensor_ref(path, t)
            key = (ref.offset, ref.numel)
            if name in buffers:
                kind, placement, alias = "buffer", "whole in model states", None
            elif key in by_storage and ref.numel:
                kind, alias = "tied", by_storage[key]
                placement = f"alias of {alias}"
            else:
                kind, placement, alias = "trainable", "whole in model states", None
                by_storage[key] = name
            whole[name] = (ref,)
            tensors.append(
                TensorEntry(
                    name, tuple(t.shape), dtypes.name_of(t.dtype), kind, placement, alias_of=alias
                )
            )
        optimizer = meta.get("optimizer")
        return self._layout(
            kind="plain",
            zero_stage=0,
            optimizer="torch" if optimizer else "none",
            pp=1,
            tp=len(model_files),
            dp=int(meta.get("dp_world_size") or 1),
            meta=meta,
            tensors=tensors,
            sources={},
            whole=whole,
        )

    def _zero12(self, model_files: list[RankFile]) -> Layout:
        meta = self._model_meta(model_files)
        self._check_mp_files(meta, model_files)
        mp0 = min(f.mp or 0 for f in model_files)
        sources, optim_kind, stage, dp = self._zero_sources(mp0, meta["param_shapes"])
        self._check_dp(meta, dp)
        tensors, whole, frozen = self._model_tensors(
            meta, self.path(next(f for f in model_files if (f.mp or 0) == mp0)), sources, stage
        )
        return self._layout(
            kind="zero",
            zero_stage=stage,
            optimizer=optim_kind,
            pp=1,
            tp=len(model_files),
            dp=dp,
            meta=meta,
            tensors=tensors,
            sources={mp0: sources} if sources else {},
            whole=whole,
            frozen=frozen,
        )

    def _zero3(self, zero3_models: list[RankFile]) -> Layout:
        by_dp = {f.dp: f for f in zero3_models if (f.mp or 0) == 0}
        meta = self._model_meta(zero3_models)
        sources, optim_kind, stage, dp = self._zero_sources(0, meta["param_shapes"])
        self._check_dp(meta, dp)
        self._check_rank_set(
            "model-states",
            {f.dp for f in zero3_models if f.dp is not None},
            dp,
            lambda d: f"zero_pp_rank_{d}_mp_rank_00_model_states.pt",
        )
        steps = {}
        for d, f in sorted(by_dp.items()):
            other = self.load(f)
            if other is not None:
                steps[d] = other.get("global_steps")
        if len(set(steps.values())) > 1:
            self.note(
                ERROR,
                "mixed-runs",
                "ZeRO-3 model-states files come from different "
                f"iterations (global_steps by DP rank: {steps}): copy the files of one save",
            )
        tensors, whole, frozen = self._model_tensors(
            meta, self.path(by_dp.get(0) or zero3_models[0]), sources, stage
        )
        if meta.get("frozen_param_shapes"):
            frozen = {}
            for name in meta["frozen_param_shapes"]:
                refs = []
                for d in range(dp):
                    rank_file = by_dp.get(d)
                    other = self.load(rank_file) if rank_file else None
                    if rank_file is None or other is None:
                        break
                    fragment = other["frozen_param_fragments"][name]
                    refs.append(tensor_ref(self.path(rank_file), fragment))
                frozen[name] = tuple(refs)
        return self._layout(
            kind="zero3",
            zero_stage=3,
            optimizer=optim_kind,
            pp=1,
            tp=1,
            dp=dp,
            meta=meta,
            tensors=tensors,
            sources={0: sources} if sources else {},
            whole=whole,
            frozen=frozen,
        )

    def _pipeline(self, model_files: list[RankFile]) -> Layout:
        from dsckpt.pipeline import read_pipeline  # pipeline discovery lives with the 3D code

        return read_pipeline(self, model_files)

    # --- shared pieces ------------------------------------------------------------------------

    def _layout(
        self,
        *,
        kind: str,
        zero_stage: int,
        optimizer: str,
        pp: int,
        tp: int,
        dp: int,
        meta: Mapping[str, Any],
        tensors: list[TensorEntry],
        sources: Mapping[int, ZeroSources],
        whole: Mapping[str, tuple[TensorRef, ...]] | None = None,
        frozen: Mapping[str, tuple[TensorRef, ...]] | None = None,
        param_dtype: str | None = None,
        stage_parts: tuple[int, ...] = (),
    ) -> Layout:
        master = None
        for src in sources.values():
            if src.fp32 and src.fp32[0]:
                master = dtypes.name_of(src.fp32[0][0].dtype)
                break
        if param_dtype is None:
            param_dtype = next((t.dtype for t in tensors if t.kind == "trainable"), None)
        if master is None and kind == "plain":
            master = param_dtype
        return Layout(
            root=self.location.root,
            tag=self.location.tag,
            dir=self.location.dir,
            kind=kind,
            zero_stage=zero_stage,
            optimizer=optimizer,
            pp=pp,
            tp=tp,
            dp=dp,
            param_dtype=param_dtype,
            master_dtype=master,
            iteration=meta.get("global_steps"),
            ds_version=meta.get("ds_version"),
            files=tuple(self.files),
            tensors=tuple(tensors),
            findings=tuple(self.findings),
            other_tags=self.location.other_tags,
            zero_sources=dict(sources),
            whole=dict(whole or {}),
            frozen_fragments=dict(frozen or {}),
            model_info={k: meta[k] for k in MODEL_INFO_KEYS if meta.get(k) is not None},
            stage_parts=stage_parts,
        )

    def _check_mp_files(self, meta: Mapping[str, Any], model_files: list[RankFile]) -> None:
        mp = meta.get("mp_world_size")
        if mp is not None and mp != len(model_files):
            self.note(
                ERROR,
                "count-mismatch",
                f"model states record mp_world_size={mp} but "
                f"{len(model_files)} mp_rank_*_model_states.pt files are present",
            )

    def _check_dp(self, meta: Mapping[str, Any], dp: int) -> None:
        recorded = meta.get("dp_world_size")
        if recorded is not None and recorded != dp:
            self.note(
                ERROR,
                "count-mismatch",
                f"model states record dp_world_size={recorded} but "
                f"the optimizer files record partition_count={dp}",
            )

    def _check_rank_set(self, what: str, present: set[int], dp: int, name_of: Any) -> None:
        for d in range(dp):
            if d not in present:
                self.note(
                    ERROR,
                    "missing-rank-file",
                    f"{name_of(d)} is missing: the checkpoint was "
                    f"saved by {dp} data-parallel ranks but only {len(present & set(range(dp)))} "
                    f"{what} files are present",
                )
        for d in sorted(present - set(range(dp))):
            self.note(
                ERROR,
                "stale-rank-file",
                f"{name_of(d)} is for DP rank {d}, but the checkpoint "
                f"was saved by {dp} ranks (partition_count={dp}): a stale file from an older "
                "run? move it out of the tag directory",
            )

    def _zero_sources(self, mp: int, param_shapes: Any) -> tuple[ZeroSources | None, str, int, int]:
        """Read the optimizer files of model-parallel rank ``mp``: fp32 partition locations."""
        optim = [f for f in self.of_role(Role.OPTIM) if f.mp == mp]
        prefixes = sorted({f.prefix for f in optim})
        if len(prefixes) > 1:
            self.note(
                ERROR,
                "mixed-prefix",
                "optimizer files with different prefixes are mixed: "
                + ", ".join(repr(p or "(none)") for p in prefixes)
                + ": keep the files of one run (the prefix follows bf16.enabled)",
            )
        by_dp: dict[int, list[RankFile]] = defaultdict(list)
        for f in optim:
            by_dp[f.dp or 0].append(f)
        for d, fs in by_dp.items():
            if len(fs) > 1:
                self.note(
                    ERROR,
                    "duplicate-rank-file",
                    f"DP rank {d} has several optimizer files: " + ", ".join(f.name for f in fs),
                )
        states = {}
        for d, fs in sorted(by_dp.items()):
            sd = self.load(fs[0])
            if sd is None:
                continue
            osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
            if not isinstance(osd, dict):
                self.note(ERROR, "not-optimizer", f"{fs[0].name} holds no optimizer_state_dict")
                continue
            states[d] = (fs[0], osd)
        if not states:
            raise CorruptFile(
                self.location.dir / (optim[0].name if optim else "optimizer files"),
                "no readable optimizer file",
            )
        first_file, first = states[min(states)]
        stage = int(first.get("zero_stage", 1))
        kind = "zero" if "zero_stage" in first else "bf16_optimizer"
        counts = {d: _partition_count(osd) for d, (_, osd) in states.items()}
        dp = counts[min(counts)]
        for what, values in (
            ("partition_count", counts),
            ("zero_stage", {d: osd.get("zero_stage") for d, (_, osd) in states.items()}),
            ("ds_version", {d: osd.get("ds_version") for d, (_, osd) in states.items()}),
        ):
            if len(set(values.values())) > 1:
                self.note(
                    ERROR,
                    "mixed-runs",
                    f"optimizer files disagree on {what} (by DP rank: "
                    f"{values}): files from different runs are mixed; copy one save whole",
                )
        prefix = first_file.prefix
        self._check_rank_set(
            "optimizer",
            set(by_dp),
            dp,
            lambda d: f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt",
        )
        self._check_steps(states)
        shapes = [[(n, tuple(s)) for n, s in group.items()] for group in (param_shapes or [])]
        if stage == 3:
            return self._zero3_sources(states, shapes, dp), kind, 3, dp
        return self._zero12_sources(states, shapes, dp, kind), kind, stage, dp

    def _check_steps(self, states: Mapping[int, tuple[RankFile, dict[str, Any]]]) -> None:
        steps = {}
        for d, (f, osd) in states.items():
            step = _first_step(self.path(f), osd)
            if step is not None:
                steps[d] = step
        if len(set(steps.values())) > 1:
            self.note(
                ERROR,
                "mixed-runs",
                f"optimizer files are at different steps (by DP rank: "
                f"{steps}): shards from different saves are mixed; copy one save whole",
            )

    def _zero12_sources(
        self,
        states: Mapping[int, tuple[RankFile, dict[str, Any]]],
        shapes: list[list[tuple[str, tuple[int, ...]]]],
        dp: int,
        kind: str,
    ) -> ZeroSources | None:
        fp32: list[tuple[TensorRef, ...]] = []
        groups: list[zero.Zero12Group] = []
        _, first = states[min(states)]
        n_groups = len(first["single_partition_of_fp32_groups"])
        if n_groups != len(shapes):
            self.note(
                ERROR,
                "count-mismatch",
                f"model states list {len(shapes)} parameter groups "
                f"but the optimizer files hold {n_groups} fp32 groups",
            )
            return None
        for d in range(dp):
            if d not in states:
                return None
            f, osd = states[d]
            fp32.append(
                tuple(tensor_ref(self.path(f), t) for t in osd["single_partition_of_fp32_groups"])
            )
        aligns = first.get("param_alignment_paddings")
        for g, group_shapes in enumerate(shapes):
            # The slice size per rank, read from rank 0: ZeRO-1/2 save it without its tail
            # padding (group_paddings says how much); BF16_Optimizer saves it whole.
            size = fp32[0][g].numel + (first["group_paddings"][g] if kind == "zero" else 0)
            layout = zero.zero12_group(group_shapes, dp, aligns[g] if aligns else None, size)
            groups.append(layout)
            self._check_zero12_group(g, layout, fp32, states, kind)
        return ZeroSources(
            stage=int(first.get("zero_stage", 1)), fp32=tuple(fp32), groups=tuple(groups)
        )

    def _check_zero12_group(
        self,
        g: int,
        layout: zero.Zero12Group,
        fp32: list[tuple[TensorRef, ...]],
        states: Mapping[int, tuple[RankFile, dict[str, Any]]],
        kind: str,
    ) -> None:
        if layout.padded_numel < layout.data_numel:
            f, _ = states[0]
            self.note(
                ERROR,
                "short-partition",
                f"group {g}: the parameter shapes need "
                f"{layout.data_numel} elements but the {layout.dp} partitions of "
                f"{layout.partition_size} hold only {layout.padded_numel} "
                f"(e.g. {f.name}): the optimizer files do not match the model states",
            )
            return
        for d in range(layout.dp):
            f, osd = states[d]
            saved = fp32[d][g].numel
            expected = layout.partition_size - (layout.tail_padding(d) if kind == "zero" else 0)
            if saved != expected:
                self.note(
                    ERROR,
                    "short-partition",
                    f"{f.name}: group {g} holds {saved} fp32 "
                    f"elements where the parameter shapes need {expected}: the file does not "
                    "belong with the others",
                )

    def _zero3_sources(
        self,
        states: Mapping[int, tuple[RankFile, dict[str, Any]]],
        shapes: list[list[tuple[str, tuple[int, ...]]]],
        dp: int,
    ) -> ZeroSources | None:
        layout = zero.zero3_layout(shapes, dp)
        fp32 = []
        for d in range(dp):
            if d not in states:
                return None
            f, osd = states[d]
            refs = tuple(tensor_ref(self.path(f), t) for t in osd["fp32_flat_groups"])
            if tuple(r.numel for r in refs) != layout.sub_group_numels:
                self.note(
                    ERROR,
                    "short-partition",
                    f"{f.name}: fp32 sub-groups hold "
                    f"{[r.numel for r in refs]} elements where the parameter shapes need "
                    f"{list(layout.sub_group_numels)}: the file does not belong with the others",
                )
                return None
            fp32.append(refs)
        return ZeroSources(stage=3, fp32=tuple(fp32), zero3=layout)

    def _model_tensors(
        self, meta: Mapping[str, Any], path: Path, sources: ZeroSources | None, stage: int
    ) -> tuple[
        list[TensorEntry], dict[str, tuple[TensorRef, ...]], dict[str, tuple[TensorRef, ...]]
    ]:
        """The consolidated tensors: trainable (fp32 partitions), frozen, buffers, tied."""
        module = meta.get("module") or {}
        tensors: list[TensorEntry] = []
        whole: dict[str, tuple[TensorRef, ...]] = {}
        frozen: dict[str, tuple[TensorRef, ...]] = {}

        def module_dtype(name: str) -> str:
            t = module.get(name)
            return dtypes.name_of(t.dtype) if isinstance(t, SavedTensor) else "unknown"

        for name in meta.get("buffer_names") or []:
            if isinstance(module.get(name), SavedTensor):
                t = module[name]
                whole[name] = (tensor_ref(path, t),)
                tensors.append(
                    TensorEntry(
                        name,
                        tuple(t.shape),
                        dtypes.name_of(t.dtype),
                        "buffer",
                        "whole in model states",
                    )
                )
        frozen_shapes = meta.get("frozen_param_shapes")
        if frozen_shapes:
            for name, shape in frozen_shapes.items():
                if stage == 3:
                    per = zero.zero3_partition_numel(
                        zero.numel(tuple(shape)), int(meta.get("dp_world_size") or 1)
                    )
                    placement = f"frozen; ZeRO-3 fragments of {per} per rank"
                else:
                    frag = meta["frozen_param_fragments"][name]
                    frozen[name] = (tensor_ref(path, frag),)
                    placement = "frozen; whole in model states"
                tensors.append(
                    TensorEntry(name, tuple(shape), module_dtype(name), "frozen", placement)
                )
        trainable = {p.name for p in _trainable_params(sources)}
        if not frozen_shapes:
            # ZeRO-1 records no frozen parameters: they exist only in `module`.
            aliases = set((meta.get("shared_params") or {}).keys())
            buffers = set(meta.get("buffer_names") or [])
            for name, t in module.items():
                if (
                    isinstance(t, SavedTensor)
                    and name not in trainable
                    and name not in buffers
                    and name not in aliases
                ):
                    whole[name] = (tensor_ref(path, t),)
                    tensors.append(
                        TensorEntry(
                            name,
                            tuple(t.shape),
                            dtypes.name_of(t.dtype),
                            "frozen",
                            "frozen; whole in model states only",
                        )
                    )
        tensors.extend(self._trainable_entries(sources, module_dtype))
        for alias, canonical in (meta.get("shared_params") or {}).items():
            shape = next((t.shape for t in tensors if t.name == canonical), ())
            tensors.append(
                TensorEntry(
                    alias,
                    tuple(shape),
                    module_dtype(alias),
                    "tied",
                    f"alias of {canonical}",
                    alias_of=canonical,
                )
            )
        return tensors, whole, frozen

    def _trainable_entries(
        self, sources: ZeroSources | None, module_dtype: Any
    ) -> list[TensorEntry]:
        if sources is None:
            return []
        entries = []
        if sources.zero3 is not None:
            dp = sources.zero3.dp
            for p in sources.zero3.params:
                per = zero.zero3_partition_numel(p.numel, dp)
                entries.append(
                    TensorEntry(
                        p.name,
                        p.shape,
                        module_dtype(p.name),
                        "trainable",
                        f"ZeRO-3 sub-group {p.sub_group}: {per} per rank x {dp}",
                        group=p.sub_group,
                    )
                )
            return entries
        for g, layout in enumerate(sources.groups):
            for flat in layout.params:
                ranks = sorted({piece.rank for piece in layout.pieces(flat)})
                where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
                entries.append(
                    TensorEntry(
                        flat.name,
                        flat.shape,
                        module_dtype(flat.name),
                        "trainable",
                        f"group {g} [{flat.offset}, {flat.offset + flat.numel}) on {where}",
                        group=g,
                    )
                )
        return entries


def _trainable_params(sources: ZeroSources | None) -> list[Any]:
    if sources is None:
        return []
    if sources.zero3 is not None:
        return list(sources.zero3.params)
    return [p for g in sources.groups for p in g.params]


def _partition_count(osd: Mapping[str, Any]) -> int:
    count = osd.get("partition_count", 1)
    # ZeRO-1/2 record one count per group (expert groups may differ); the DP size is the largest.
    return int(max(count)) if isinstance(count, (list, tuple)) else int(count)


def _first_step(path: Path, osd: Mapping[str, Any]) -> int | None:
    """The optimizer's step count on this rank (a 0-d tensor read with one pread), if any."""
    base = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict")
    if isinstance(base, list):  # elastic ZeRO-1/2: one lean state per group
        states = base
    elif isinstance(base, dict):
        states = list((base.get("state") or {}).values())
    else:
        return None
    for state in states:
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, SavedTensor):
            return int(read_scalar(tensor_ref(path, step)))
        if isinstance(step, (int, float)):
            return int(step)
    return None

