"""Discovery: what a checkpoint holds, read from file names and pickled metadata only.

:func:`open_checkpoint` returns a frozen :class:`Layout`: the kind of checkpoint, its topology,
ZeRO stage, dtypes, every tensor of the consolidated model with how it is partitioned, the byte
locations of the fp32 sources, and findings (missing, stale or inconsistent files). No tensor data
is read except a few 0-d bookkeeping tensors (optimizer ``step``) used to cross-check ranks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from dsckpt.discover import checks, zero
from dsckpt.discover.checks import At, BadMetadata
from dsckpt.discover.files import Location, RankFile, Role, UnsupportedFile, locate, survey
from dsckpt.discover.model import (
    ERROR,
    INFO,
    WARNING,
    CheckpointKind,
    Finding,
    Layout,
    Level,
    OptimizerKind,
    TensorEntry,
    TensorKind,
    ZeroSources,
    first_error,
    missing_files_hint,
)
from dsckpt.discover.moe import MoeLayout
from dsckpt.discover.moe_read import (
    ExpertFiles,
    align_expert_groups,
    finish_plain,
    finish_zero3,
    finish_zero12,
    moe_recorded,
    read_expert_files,
)
from dsckpt.discover.pipeline import read_pipeline
from dsckpt.errors import (
    CheckpointNotFound,
    CorruptFile,
    UnsupportedLayout,
)
from dsckpt.io import dtypes
from dsckpt.io.load import TensorRef, read_scalar, tensor_ref
from dsckpt.io.unpickle import SavedTensor, SiblingReader, load_saved
from dsckpt.printable import listed

if TYPE_CHECKING:
    from dsckpt.discover.universal import UniversalInfo

T = TypeVar("T")

MODEL_INFO_KEYS = ("args", "checkpoint_info", "universal_checkpoint_info")


def refuse_errors(layout: Layout) -> None:
    """Raise if discovery found an error: the one gate every command that writes passes.

    Raises:
        UnsupportedLayout: files or features dsckpt does not read yet (MoE), reported first.
        InconsistentCheckpoint: any other error finding (see :func:`first_error`).
    """
    error = first_error(layout.findings)
    if error is not None:
        raise error


def open_checkpoint(
    path: Path | str, tag: str | None = None, step: int | None = None, *, partial: bool = False
) -> Layout:
    """Discover a checkpoint: root with ``latest``, root plus ``tag``, or a tag directory; a
    Hugging Face Trainer ``output_dir`` reads its newest ``checkpoint-N`` (``step`` picks another).

    With ``partial`` (inspect), a file every layout needs that cannot be read (the model states)
    does not raise: the layout holds what the file names say (kind ``"unreadable"``), the error
    as a finding and the file in ``unreadable``.

    Raises:
        CheckpointNotFound: the path holds no checkpoint.
        UnsafeCheckpoint: a file's pickle needs a global outside the allow-list.
        CorruptFile: a file every consolidation needs cannot be read.
    """
    location = locate(Path(path), tag, step)
    found = survey(location)
    files, unrelated = found.rank_files, found.unrelated
    reader = Reader(location, files)
    reader.unsupported_files(found.unsupported)
    if unrelated:
        reader.note(
            INFO,
            "unrelated-files",
            f"{location.dir} also holds files DeepSpeed does not "
            f"write, ignored: {listed(unrelated, 5)}",
        )
    if location.picked:
        reader.note(
            INFO,
            "trainer-checkpoint",
            f"{location.root.parent} is a Trainer output_dir: reading {location.picked}"
            "; pass --step N for another",
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
        if reader.findings and reader.findings[0].code == "unsupported-files":
            raise UnsupportedLayout(reader.findings[0].message)  # nothing else was read
        raise CheckpointNotFound(
            f"{location.dir} holds no DeepSpeed rank files (*_model_states.pt, *_optim_states.pt)"
        )
    if not partial:
        return reader.read()
    try:
        return reader.read()
    except CorruptFile as exc:
        return reader.unreadable_layout(exc)


@dataclass(frozen=True)
class ModelMeta:
    """The checked metadata of a model-states file (see :mod:`dsckpt.checks`)."""

    file: RankFile
    raw: Mapping[str, Any]
    module: Mapping[str, Any]
    param_shapes: list[list[tuple[str, tuple[int, ...]]]] | None
    buffer_names: list[str]
    frozen_shapes: dict[str, tuple[int, ...]] | None
    frozen_fragments: dict[str, SavedTensor]
    shared: dict[str, str]
    dp_world_size: int | None
    mp_world_size: int | None
    global_steps: int | None
    ds_version: str | None
    tp_degree: int | None
    pp_degree: int | None


# Who wrote an optimizer file: ZeRO-1/2/3, or DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16).
OptimFileKind = Literal["zero", "bf16_optimizer"]


@dataclass(frozen=True)
class OptimMeta:
    """The checked metadata of one ZeRO-1/2/3 or BF16_Optimizer optimizer file."""

    file: RankFile
    kind: OptimFileKind
    stage: int
    counts: tuple[int, ...]  # partition_count, per group (ZeRO-3: one)
    fp32: tuple[SavedTensor, ...]  # per group (ZeRO-1/2) or sub-group (ZeRO-3)
    group_paddings: tuple[int, ...]
    alignment: tuple[tuple[int, ...], ...] | None
    ds_version: str | None
    step: float | int | None
    # Per group, the parameter names this rank's param_slice_mappings lists, in its order (None
    # for an entry that is not a dict or list of names); None without param_slice_mappings.
    slice_names: tuple[tuple[str | None, ...] | None, ...] | None = None
    # Per group, the `name` and `moe` flag of base_optimizer_state's param_groups (MoE expert
    # groups are `ep_size_N`, moe True); None when the file has no such list.
    group_names: tuple[str | None, ...] | None = None
    group_moe: tuple[bool, ...] | None = None
    # ZeRO-3 (AutoEP): `ds_zero_partition_groups`, per sub-group (partition_count,
    # partition_rank, partition_ranks, group name); None when the file has none.
    partition_groups: tuple[tuple[int, int, tuple[int, ...], str], ...] | None = None

    @property
    def dp(self) -> int:
        # Expert groups may be partitioned over fewer ranks; the DP size is the largest count.
        return max(self.counts)


class Reader:
    """Reads one tag directory. Collects findings instead of failing where inspect can go on.

    Its public methods are what other discovery modules build on (:mod:`dsckpt.discover.pipeline`
    reads pipeline checkpoints with them); underscored ones are this module's own.
    """

    def __init__(self, location: Location, files: list[RankFile]) -> None:
        self.location = location
        self.files = files
        self.findings: list[Finding] = []
        self._cache: dict[str, Any] = {}
        self.unreadable: list[str] = []
        self._seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        # MoE: set by the ZeRO-1/2 reader before zero_sources, which matches the expert groups
        self._moe = False
        self.expert_groups: list[Any] = []
        # The checked optimizer metadata zero_sources read (MoE discovery looks at it again)
        self.optim_states: Mapping[int, OptimMeta] = {}

    def note(self, level: Level, code: str, message: str) -> None:
        self.findings.append(Finding(level, code, message))

    def drop(self, f: RankFile) -> None:
        """Forget ``f``'s parse once what is needed of it is kept."""
        self._cache.pop(f.name, None)

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
                self.unreadable.append(f.name)
                self._cache[f.name] = None
        return self._cache[f.name]

    def _shared(self, value: tuple[Any, ...]) -> tuple[Any, ...]:
        """One object for equal tuples: every ZeRO-1/2 rank file repeats the same per-parameter
        paddings (an int per parameter per group), 500 MB over 1,024 ranks x 20,000 params
        when each rank keeps its own copy. Equal is compared, not assumed (C-speed)."""
        return self._seen.setdefault(value, value)

    def checked(self, check: Callable[[], T], default: T) -> T:
        """``check()``, or ``default`` with an error finding when a value fails its check."""
        try:
            return check()
        except BadMetadata as exc:
            self.note(ERROR, exc.code, str(exc))
            return default

    def missing_key(self, f: RankFile, key: str) -> None:
        """An error finding: ``f`` lacks ``key``, which DeepSpeed always writes."""
        try:
            At(self.path(f)).missing(key)
        except BadMetadata as exc:
            self.note(ERROR, exc.code, str(exc))

    def of_role(self, role: Role) -> list[RankFile]:
        return [f for f in self.files if f.role is role]

    def unsupported_files(self, found: list[UnsupportedFile]) -> None:
        """Record files named like DeepSpeed's that no layout here reads: a writing command must
        refuse the checkpoint rather than drop the tensors they hold."""
        if not found:
            return
        files = listed(found, 4, "; ", "; and {} more", each=lambda f: f"{f.name} ({f.why})")
        self.note(
            ERROR,
            "unsupported-files",
            f"{self.location.dir} holds {len(found)} file(s) dsckpt does not read yet: "
            f"{files}; it writes nothing from a checkpoint whose files it does not all "
            "understand (inspect still shows the rest)",
        )

    # --- the kinds ----------------------------------------------------------------------------

    def universal(self) -> Layout:
        from dsckpt.discover.universal import read_universal

        return read_universal(self)

    def unreadable_layout(self, exc: CorruptFile) -> Layout:
        """What the file names alone say, when a file every layout needs cannot be read."""
        self.note(ERROR, "corrupt-file", str(exc))
        self.unreadable.append(exc.path.name)
        model = [f for f in self.files if f.role in (Role.MODEL, Role.ZERO3_MODEL)]
        optim = self.of_role(Role.OPTIM)
        return self.make_layout(
            kind="unreadable",
            zero_stage=0,
            optimizer="unknown",
            pp=1,
            tp=max(1, len({f.mp for f in model})),
            dp=max(1, len({f.dp for f in optim})),
            meta=None,
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
                f"{self.location.dir} has optimizer files but no model-states files "
                "(mp_rank_MM_model_states.pt; under ZeRO-3 zero_pp_rank_D_mp_rank_MM_model_states"
                ".pt, one per DP rank): they are missing; " + missing_files_hint(self.location.dir)
            )
        if not self.of_role(Role.OPTIM):
            return self._plain(model_files)
        return self._zero12(model_files)

    @staticmethod
    def first_model_file(model_files: list[RankFile]) -> RankFile:
        return min(model_files, key=lambda f: (f.mp or 0, f.dp or 0))

    def first_model_meta(self, model_files: list[RankFile]) -> ModelMeta:
        first = self.first_model_file(model_files)
        raw = self.load(first, required=True)
        if not isinstance(raw, dict) or "module" not in raw:
            raise CheckpointNotFound(
                f"{self.path(first)} is not a DeepSpeed model-states file (no `module` key)"
            )
        if moe_recorded(raw) and self.of_role(Role.LAYER):
            # Pipeline stages would hold the experts in layer files of their own naming.
            self.note(
                ERROR,
                "unsupported-moe",
                f"{first.name} records a mixture-of-experts model in a pipeline (layer_XX-model_"
                "YY files): pipeline + MoE checkpoints are not supported (nothing here maps "
                "experts onto pipeline stages)",
            )
        elif not moe_recorded(raw):
            strays = self.of_role(Role.EXPERT) + self.of_role(Role.EXPP_OPTIM)
            if strays:
                self.note(
                    ERROR,
                    "stale-expert-file",
                    f"{listed(strays, each=lambda f: f.name)}"
                    f": mixture-of-experts file(s), but {first.name} records no MoE layers "
                    "(`num_experts`): stale files from another run? move them out of the tag "
                    "directory",
                )
        return self.model_meta(first, raw)

    def model_meta(self, f: RankFile, raw: Mapping[str, Any]) -> ModelMeta:
        """Check the values of a model-states file; a bad one is an error finding and its
        default, so inspect shows the rest."""
        at = At(self.path(f))
        c = self.checked

        def optional(key: str, check: Callable[[Any, At], T]) -> T | None:
            value = raw.get(key)
            return None if value is None else c(lambda: check(value, at / key), None)

        module = raw.get("module")
        module = (
            {} if module is None else c(lambda: dict(checks.mapping(module, at / "module")), {})
        )
        frozen_shapes = optional("frozen_param_shapes", checks.shape_map)
        fragments: dict[str, SavedTensor] = {}
        if frozen_shapes:
            fragments = c(lambda: self._fragments(raw, frozen_shapes, at), {})
        empty: Mapping[Any, Any] = {}
        dims = c(
            lambda: checks.mapping(
                raw.get("checkpoint_parallel_dimensions") or {},
                at / "checkpoint_parallel_dimensions",
            ),
            empty,
        )
        dims_at = at / "checkpoint_parallel_dimensions"
        version = raw.get("ds_version")
        return ModelMeta(
            file=f,
            raw=raw,
            module=module,
            param_shapes=optional("param_shapes", checks.shape_groups),
            buffer_names=optional("buffer_names", checks.names) or [],
            frozen_shapes=frozen_shapes,
            frozen_fragments=fragments,
            shared=optional("shared_params", checks.name_map) or {},
            dp_world_size=optional("dp_world_size", checks.count),
            mp_world_size=optional("mp_world_size", checks.count),
            global_steps=optional("global_steps", checks.integer),
            ds_version=version if isinstance(version, str) else None,
            tp_degree=None
            if dims.get("tp_degree") is None
            else c(lambda: checks.count(dims["tp_degree"], dims_at / "tp_degree"), None),
            pp_degree=None
            if dims.get("pp_degree") is None
            else c(lambda: checks.count(dims["pp_degree"], dims_at / "pp_degree"), None),
        )

    @staticmethod
    def _fragments(
        raw: Mapping[str, Any], frozen_shapes: Mapping[str, Any], at: At
    ) -> dict[str, SavedTensor]:
        saved = checks.mapping(
            checks.field(raw, "frozen_param_fragments", at), at / "frozen_param_fragments"
        )
        out = {}
        for name in frozen_shapes:
            if name not in saved:
                (at / "frozen_param_fragments").missing(name)
            out[name] = checks.tensor(saved[name], at / "frozen_param_fragments" / name)
        return out

    def _plain(self, model_files: list[RankFile]) -> Layout:
        meta = self.first_model_meta(model_files)
        self.check_mp_files(meta, model_files)
        found: ExpertFiles | None = None
        moe: MoeLayout | None = None
        if moe_recorded(meta.raw):
            found = read_expert_files(self, meta)
            moe = finish_plain(self, found, meta.dp_world_size or 1)
            meta = replace(meta, shared={**meta.shared, **dict(moe.aliases)})
            if moe.autoep:
                self.note(
                    ERROR,
                    "unsupported-moe",
                    f"{meta.file.name}: AutoEP without ZeRO: its fused expert tensors are not "
                    "assembled from the per-expert files yet; save with ZeRO stage 1 or 2",
                )
        buffers = set(meta.buffer_names)
        whole = {}
        tensors = []
        # Tied weights are the same view of one storage: same storage, offset, shape, strides
        # and dtype. A transposed or sliced view of another tensor's storage is its own tensor.
        by_view: dict[tuple[Any, ...], str] = {}
        path = self.path(meta.file)
        kind: TensorKind
        for name, t in self.module_tensors(meta).items():
            ref = tensor_ref(path, t)
            view = (t.storage_key, t.storage_offset, t.shape, t.stride, t.dtype.name)
            if name in buffers:
                kind, placement, alias = "buffer", "whole in model states", None
            elif view in by_view and t.numel():
                kind, alias = "tied", by_view[view]
                placement = f"alias of {alias}"
            else:
                kind, placement, alias = "trainable", "whole in model states", None
                by_view.setdefault(view, name)
            whole[name] = (ref,)
            tensors.append(
                TensorEntry(
                    name, tuple(t.shape), dtypes.name_of(t.dtype), kind, placement, alias_of=alias
                )
            )
        model_keys = None
        if found is not None and moe is not None and not moe.autoep:
            for layer in moe.layers:
                for e, keys in enumerate(layer.keys):
                    for key in keys:
                        ref = found.tensors[key]
                        whole[key] = (ref,)
                        tensors.append(
                            TensorEntry(
                                key,
                                ref.shape,
                                dtypes.name_of(ref.dtype),
                                "trainable",
                                f"expert {e} of MoE layer {layer.ordinal}: "
                                f"whole in {layer.files[e]}",
                            )
                        )
            model_keys = self.module_keys(meta) + moe.expert_keys()
        return self.make_layout(
            kind="plain",
            zero_stage=0,
            optimizer="torch" if meta.raw.get("optimizer") else "none",
            pp=1,
            tp=len(model_files),
            dp=meta.dp_world_size or 1,
            meta=meta,
            tensors=tensors,
            sources={},
            whole=whole,
            model_keys=model_keys,
            model_keys_from=f"`module` of {meta.file.name} and the expert files"
            if model_keys
            else "",
            moe=moe,
        )

    def module_keys(self, meta: ModelMeta) -> tuple[str, ...]:
        return tuple(k for k, v in meta.module.items() if isinstance(v, SavedTensor))

    def module_tensors(self, meta: ModelMeta) -> dict[str, SavedTensor]:
        """The tensors of ``module``, each checked; other values (a module's extra state) are a
        warning, since no consolidation can carry them."""
        at = At(self.path(meta.file), "module")
        out = {}
        extra = []
        for name, value in meta.module.items():
            if not isinstance(value, SavedTensor):
                extra.append(str(name))
                continue
            try:
                out[name] = checks.tensor(value, at / name)
            except BadMetadata as exc:
                self.note(ERROR, exc.code, str(exc))
        if extra:
            self.note(
                WARNING,
                "not-a-tensor",
                f"{meta.file.name}: `module` holds values that are not tensors "
                f"({listed(extra)}: extra state?); "
                "they are left out of every output",
            )
        return out

    def _zero12(self, model_files: list[RankFile]) -> Layout:
        meta = self.first_model_meta(model_files)
        self.check_mp_files(meta, model_files)
        self.require_shapes(meta)
        mp0 = meta.file.mp or 0
        found = None
        if moe_recorded(meta.raw):
            found = read_expert_files(self, meta)
            self._moe = True
        sources, optim_kind, stage, dp = self.zero_sources(
            mp0, meta.param_shapes, meta.dp_world_size
        )
        self.check_dp(meta, dp)
        moe = None
        model_keys = None
        if found is not None:
            if len(model_files) > 1:
                self.note(
                    ERROR,
                    "unsupported-moe",
                    f"{self.location.dir}: a mixture-of-experts model with "
                    f"{len(model_files)} model-parallel ranks: MoE with tensor parallelism is "
                    "not supported",
                )
            moe = finish_zero12(self, found, self.expert_groups, sources, dp)
            meta = replace(meta, shared={**meta.shared, **dict(moe.aliases)})
            model_keys = self.module_keys(meta) + moe.expert_keys()
        tensors, whole, frozen = self._model_tensors(meta, sources, stage, dp, moe)
        if found is not None:
            # Expert tensors are saved in the model dtype in their own files (AutoEP: one per
            # expert of a fused tensor, `<key>.<E>`).
            saved = {k: dtypes.name_of(r.dtype) for k, r in found.tensors.items()}
            tensors = [
                replace(t, dtype=saved.get(t.name) or saved.get(f"{t.name}.0") or t.dtype)
                if t.dtype == "unknown"
                else t
                for t in tensors
            ]
        return self.make_layout(
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
            model_keys=model_keys,
            model_keys_from=f"`module` of {meta.file.name} and the expert files"
            if model_keys
            else "",
            moe=moe,
        )

    def require_shapes(self, meta: ModelMeta) -> None:
        if meta.raw.get("param_shapes") is None:  # (a bad value is a finding already)
            self.missing_key(meta.file, "param_shapes")

    def _zero3(self, zero3_models: list[RankFile]) -> Layout:
        by_dp = {f.dp: f for f in zero3_models if (f.mp or 0) == 0}
        # Every rank's file holds a placeholder per parameter (20,000 zip records at 20,000
        # parameters) and, but for rank 0's, the same data.pkl: the sibling reader checks each
        # zip by comparison with one it read in full, and parses each distinct data.pkl once.
        siblings = SiblingReader()
        first = self.first_model_file(zero3_models)
        if first.name not in self._cache:
            self._cache[first.name] = siblings.read(self.path(first)).value
        findings = len(self.findings)
        meta = self.first_model_meta(zero3_models)
        # A file sharing another's parse (a byte-identical data.pkl) has that file's findings;
        # where it had none, its checked values are that file's, its frozen fragments located
        # in it below. By the path of the file parsed: its checked values, if it had no findings.
        clean: dict[Path, ModelMeta] = {}
        if len(self.findings) == findings:
            clean[self.path(meta.file)] = meta
        found = None
        if moe_recorded(meta.raw):
            if meta.raw.get("ds_autoep_layers") is None:
                self.note(
                    ERROR,
                    "unsupported-moe",
                    f"{meta.file.name} records native mixture-of-experts layers saved with "
                    "ZeRO-3, which DeepSpeed itself refuses: the files are not a checkpoint "
                    "dsckpt knows how to read",
                )
            else:
                # AutoEP ZeRO-3 saves no expert files: the experts are in the ZeRO-3 shards.
                found = read_expert_files(self, meta, expect_files=False)
                self._moe = True
        self.require_shapes(meta)
        sources, optim_kind, stage, dp = self.zero_sources(0, meta.param_shapes, meta.dp_world_size)
        self.check_dp(meta, dp)
        self._check_rank_set(
            "model-states",
            {f.dp for f in zero3_models if f.dp is not None},
            dp,
            lambda d: f"zero_pp_rank_{d}_mp_rank_00_model_states.pt",
        )
        metas: dict[int, ModelMeta] = {}
        for d, f in sorted(by_dp.items()):
            if f == meta.file:
                metas[d or 0] = meta
                continue
            try:
                saved = siblings.read(self.path(f))
            except CorruptFile as exc:
                self.note(ERROR, "corrupt-file", str(exc))
                self.unreadable.append(f.name)
                continue
            if not isinstance(saved.value, dict):
                continue
            shared = clean.get(saved.shared_with) if saved.shared_with else None
            if shared is not None:
                checked = replace(shared, file=f)
            else:
                findings = len(self.findings)
                checked = self.model_meta(f, saved.value)
                if saved.shared_with is None and len(self.findings) == findings:
                    clean[saved.path] = checked
            # Keep what is used below, not the file's whole parse: each rank's file holds a
            # placeholder per parameter, gigabytes over a thousand ranks.
            metas[d or 0] = replace(
                checked,
                raw={},
                module={},
                param_shapes=None,
                frozen_fragments={
                    name: saved.locate(t) for name, t in checked.frozen_fragments.items()
                },
            )
        self._cache.pop(first.name, None)
        self.disagree(
            {m.file.name: m.global_steps for m in metas.values() if m.global_steps is not None},
            "ZeRO-3 model-states",
            "global_steps",
        )
        moe = None
        model_keys = None
        if found is not None:
            moe = finish_zero3(self, found, sources, dp)
            meta = replace(meta, shared={**meta.shared, **dict(moe.aliases)})
            model_keys = self.module_keys(meta) + moe.expert_keys()
        tensors, whole, frozen = self._model_tensors(meta, sources, stage, dp, moe)
        if moe is not None:
            # The experts are in no module entry; their dtype is the model's (the router's).
            known = next((t.dtype for t in tensors if t.dtype != "unknown"), "unknown")
            tensors = [replace(t, dtype=known) if t.dtype == "unknown" else t for t in tensors]
        if meta.frozen_shapes:
            frozen = {}
            for name, shape in meta.frozen_shapes.items():
                per = zero.zero3_partition_numel(zero.numel(shape), dp)
                refs = []
                for d in range(dp):
                    m = metas.get(d)
                    fragment = m.frozen_fragments.get(name) if m else None
                    if m is None or fragment is None:
                        break
                    if fragment.numel() < per:
                        self.note(
                            ERROR,
                            "short-partition",
                            f"{m.file.name}: `frozen_param_fragments.{name}` holds "
                            f"{fragment.numel()} elements where ZeRO-3 saves {per} "
                            f"(ceil({zero.numel(shape)}/{dp})): the file does not belong",
                        )
                        break
                    refs.append(tensor_ref(self.path(m.file), fragment))
                frozen[name] = tuple(refs)
        return self.make_layout(
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
            model_keys=model_keys,
            model_keys_from=f"`module` of {meta.file.name} and `ds_autoep_layers`"
            if model_keys
            else "",
            moe=moe,
        )

    def _pipeline(self, model_files: list[RankFile]) -> Layout:
        return read_pipeline(self, model_files)

    # --- shared pieces ------------------------------------------------------------------------

    def make_layout(
        self,
        *,
        kind: CheckpointKind,
        zero_stage: int,
        optimizer: OptimizerKind,
        pp: int,
        tp: int,
        dp: int,
        meta: ModelMeta | None,
        tensors: list[TensorEntry],
        sources: Mapping[int, ZeroSources],
        whole: Mapping[str, tuple[TensorRef, ...]] | None = None,
        frozen: Mapping[str, tuple[TensorRef, ...]] | None = None,
        param_dtype: str | None = None,
        stage_parts: tuple[int, ...] = (),
        model_keys: tuple[str, ...] | None = None,
        model_keys_from: str = "",
        universal: UniversalInfo | None = None,
        moe: MoeLayout | None = None,
    ) -> Layout:
        master = None
        for src in sources.values():
            if src.fp32 and src.fp32[0]:
                master = dtypes.name_of(src.fp32[0][0].dtype)
                break
        if param_dtype is None:
            param_dtype = next((t.dtype for t in tensors if t.kind == "trainable"), None)
        if param_dtype is None and self.unreadable and meta is not None:
            # The trainable tensors are unknown (their optimizer files are unreadable), but the
            # module still says what dtype the parameters are kept in.
            buffers = set(meta.buffer_names)
            param_dtype = next(
                (
                    dtypes.name_of(t.dtype)
                    for name, t in meta.module.items()
                    if isinstance(t, SavedTensor) and t.dtype.is_floating and name not in buffers
                ),
                None,
            )
        if master is None and kind == "plain":
            master = param_dtype
        raw = meta.raw if meta is not None else {}
        if model_keys is None and meta is not None:
            model_keys = tuple(k for k, v in meta.module.items() if isinstance(v, SavedTensor))
            model_keys_from = f"`module` of {meta.file.name}"
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
            iteration=meta.global_steps if meta is not None else None,
            ds_version=meta.ds_version if meta is not None else None,
            files=tuple(self.files),
            tensors=tuple(tensors),
            findings=tuple(self.findings),
            other_tags=self.location.other_tags,
            picked=self.location.picked,
            step=self.location.step,
            zero_sources=dict(sources),
            whole=dict(whole or {}),
            frozen_fragments=dict(frozen or {}),
            model_info={k: raw[k] for k in MODEL_INFO_KEYS if raw.get(k) is not None},
            stage_parts=stage_parts,
            model_keys=model_keys or (),
            model_keys_from=model_keys_from,
            unreadable=tuple(self.unreadable),
            universal=universal,
            moe=moe,
        )

    def check_mp_files(self, meta: ModelMeta, model_files: list[RankFile]) -> None:
        mp = meta.mp_world_size
        if mp is not None and mp != len(model_files):
            absent = [m for m in range(mp) if m not in {f.mp for f in model_files}]
            if absent and len(model_files) < mp:
                names = listed(absent, each=lambda m: f"mp_rank_{m:02d}_model_states.pt")
                self.note(
                    ERROR,
                    "missing-rank-file",
                    f"{names} {'is' if len(absent) == 1 else 'are'} missing from "
                    f"{self.location.dir}: the model states record mp_world_size={mp} but only "
                    f"{len(model_files)} mp_rank_*_model_states.pt files are present; "
                    + missing_files_hint(self.location.dir),
                )
                return
            self.note(
                ERROR,
                "count-mismatch",
                f"model states record mp_world_size={mp} but "
                f"{len(model_files)} mp_rank_*_model_states.pt files are present",
            )

    def check_dp(self, meta: ModelMeta, dp: int) -> None:
        recorded = meta.dp_world_size
        if recorded is not None and recorded != dp:
            self.note(
                ERROR,
                "count-mismatch",
                f"{meta.file.name} records dp_world_size={recorded} but "
                f"the optimizer files record partition_count={dp}",
            )

    def _check_rank_set(self, what: str, present: set[int], dp: int, name_of: Any) -> None:
        missing = [d for d in range(dp) if d not in present]
        if missing:
            self.note(
                ERROR,
                "missing-rank-file",
                f"{listed(missing, each=name_of)} {'is' if len(missing) == 1 else 'are'} missing "
                f"from {self.location.dir}: the checkpoint was saved by {dp} data-parallel ranks "
                f"but only {dp - len(missing)} {what} files are present; "
                + missing_files_hint(self.location.dir),
            )
        for d in sorted(present - set(range(dp))):
            self.note(
                ERROR,
                "stale-rank-file",
                f"{name_of(d)} is for DP rank {d}, but the checkpoint "
                f"was saved by {dp} ranks (partition_count={dp}): a stale file from an older "
                "run? move it out of the tag directory",
            )

    def disagree(self, values: Mapping[str, Any], noun: str, what: str) -> None:
        """An error naming the files that do not belong when ``values`` (file -> value) differ:
        the minority against the majority, or every file when no value has a majority."""
        if len(set(values.values())) <= 1:
            return
        tally = Counter(values.values()).most_common()
        common, n_common = tally[0]

        def has(value: Any, plural: bool) -> str:
            if isinstance(value, tuple):
                value = list(value)
            if what == "step":
                return f"{'are' if plural else 'is'} at step {value}"
            return f"{'record' if plural else 'records'} {what}={value}"

        if n_common > tally[1][1]:
            odd = sorted(name for name, v in values.items() if v != common)
            plural = len(odd) > 1
            names = listed(odd, 4)
            message = (
                f"{names} {has(values[odd[0]], plural)}"
                + (" (and others)" if len({values[n] for n in odd}) > 1 else "")
                + f" where the other {n_common} {noun} files {has(common, True)}: "
                + ("they come" if plural else "it comes")
                + " from another save; copy one save whole"
            )
        else:
            every = ", ".join(f"{name} {has(v, False)}" for name, v in sorted(values.items()))
            message = (
                f"{noun} files disagree on {what}: {every}: files from different runs or "
                "saves are mixed; copy one save whole"
            )
        self.note(ERROR, "mixed-runs", message)

    def optim_meta(self, f: RankFile, raw: Any) -> OptimMeta | None:
        """Check an optimizer file's values; None (with a finding) when one is bad."""
        at = At(self.path(f))
        if not isinstance(raw, dict) or not isinstance(raw.get("optimizer_state_dict"), dict):
            self.missing_key(f, "optimizer_state_dict")
            return None
        return self.checked(lambda: self._optim_meta(f, raw["optimizer_state_dict"], at), None)

    def _optim_meta(self, f: RankFile, osd: Mapping[str, Any], top: At) -> OptimMeta:
        at = top / "optimizer_state_dict"
        stage_value = osd.get("zero_stage")
        kind: OptimFileKind = "bf16_optimizer" if stage_value is None else "zero"
        stage = 1 if stage_value is None else checks.integer(stage_value, at / "zero_stage", 1, 3)
        raw_counts = checks.field(osd, "partition_count", at)
        if isinstance(raw_counts, (list, tuple)):
            counts = tuple(
                checks.integer(c, at / "partition_count" / i, 1, checks.MAX_RANKS)
                for i, c in enumerate(raw_counts)
            )
            if not counts:
                (at / "partition_count").fail("is an empty list")
        else:
            counts = (checks.count(raw_counts, at / "partition_count"),)
        if stage == 3:
            fp32 = checks.tensor_list(
                checks.field(osd, "fp32_flat_groups", at), at / "fp32_flat_groups", flat=True
            )
            paddings: tuple[int, ...] = ()
            alignment = None
        else:
            fp32 = checks.tensor_list(
                checks.field(osd, "single_partition_of_fp32_groups", at),
                at / "single_partition_of_fp32_groups",
                flat=True,
            )
            paddings = tuple(
                checks.int_list(checks.field(osd, "group_paddings", at), at / "group_paddings")
            )
            for key, n in (("group_paddings", len(paddings)), ("partition_count", len(counts))):
                if n != len(fp32):
                    (at / key).fail(f"has {n} entries for {len(fp32)} fp32 groups")
            aligns = osd.get("param_alignment_paddings")
            alignment = None
            if aligns is not None:
                if not isinstance(aligns, (list, tuple)) or len(aligns) != len(fp32):
                    (at / "param_alignment_paddings").fail(
                        f"is not a list of {len(fp32)} per-group lists"
                    )
                alignment = tuple(
                    self._shared(tuple(checks.int_list(a, at / "param_alignment_paddings" / g)))
                    for g, a in enumerate(aligns)
                )
        version = osd.get("ds_version")
        return OptimMeta(
            file=f,
            kind=kind,
            stage=stage,
            counts=counts,
            fp32=tuple(fp32),
            group_paddings=paddings,
            alignment=alignment,
            ds_version=version if isinstance(version, str) else None,
            step=self._first_step(f, osd, at),
            slice_names=_slice_names(osd.get("param_slice_mappings")),
            group_names=_group_field(osd, "name"),
            group_moe=_moe_flags(osd),
            partition_groups=_partition_groups(osd.get("ds_zero_partition_groups"), at, len(fp32))
            if stage == 3 and osd.get("ds_zero_partition_groups") is not None
            else None,
        )

    def _first_step(self, f: RankFile, osd: Mapping[str, Any], at: At) -> float | int | None:
        """The optimizer's step count on this rank (a 0-d tensor read with one pread), if any."""
        key = "base_optimizer_state" if "base_optimizer_state" in osd else "optimizer_state_dict"
        base = osd.get(key)
        if isinstance(base, list):  # elastic ZeRO-1/2: one lean state per group
            states = list(enumerate(base))
        elif isinstance(base, dict) and isinstance(base.get("state"), dict):
            states = list(base["state"].items())
        else:
            return None
        for index, state in states:
            step = state.get("step") if isinstance(state, dict) else None
            if step is None:
                continue
            where = (at / key / "state" if isinstance(base, dict) else at / key) / index / "step"
            if isinstance(step, SavedTensor):
                if step.numel() != 1:
                    where.fail(f"is a tensor of {step.numel()} elements, not a step count")
                try:
                    value = read_scalar(tensor_ref(self.path(f), step))
                except ValueError as exc:
                    where.fail(f"cannot be read as a number ({exc})")
                return checks.number(value, where)
            return checks.number(step, where)
        return None

    def zero_sources(
        self,
        mp: int,
        param_shapes: list[list[tuple[str, tuple[int, ...]]]] | None,
        meta_dp: int | None = None,
    ) -> tuple[ZeroSources | None, OptimFileKind, int, int]:
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
        states: dict[int, OptimMeta] = {}
        for d, fs in sorted(by_dp.items()):
            sd = self.load(fs[0])
            self._cache.pop(fs[0].name, None)  # the checked OptimMeta is what is kept
            if sd is None:
                continue
            state = self.optim_meta(fs[0], sd)
            if state is not None:
                states[d] = state
        if not states:
            if any(f.level == ERROR for f in self.findings):  # inspect shows what is wrong
                return None, "zero", 1, meta_dp or len(by_dp)
            raise CorruptFile(
                self.location.dir / (optim[0].name if optim else "optimizer files"),
                "no readable optimizer file",
            )
        first = states[min(states)]
        dp = first.dp
        if self._moe and param_shapes is not None:
            aligned = align_expert_groups(self, states, param_shapes, dp)
            if aligned is not None:
                states, self.expert_groups = aligned
                first = states[min(states)]
        for what, values in (
            (
                "partition_count",
                {
                    s.file.name: s.counts if len(s.counts) > 1 else s.counts[0]
                    for s in states.values()
                },
            ),
            ("zero_stage", {s.file.name: s.stage for s in states.values()}),
            ("ds_version", {s.file.name: s.ds_version for s in states.values()}),
            ("step", {s.file.name: s.step for s in states.values() if s.step is not None}),
        ):
            self.disagree(values, "optimizer", what)
        if len(set(first.counts)) > 1 and not self._moe:
            self.note(
                ERROR,
                "unsupported-moe",
                f"{first.file.name}: optimizer groups are partitioned over different numbers of "
                f"ranks (partition_count={list(first.counts)}): expert parallelism (MoE) is not "
                "supported yet",
            )
        prefix = first.file.prefix
        self.optim_states = states
        self._check_rank_set(
            "optimizer",
            set(by_dp),
            dp,
            lambda d: f"{prefix}zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt",
        )
        if not self._check_master_dtype(states):
            return None, first.kind, first.stage, dp
        shapes = param_shapes or []
        if first.stage == 3:
            return self._zero3_sources(states, shapes, dp), first.kind, 3, dp
        return self._zero12_sources(states, shapes, dp, first.kind), first.kind, first.stage, dp

    def _check_master_dtype(self, states: Mapping[int, OptimMeta]) -> bool:
        """The fp32 master must be floating point, one dtype in every group of every rank."""
        ok = True
        key = (
            "fp32_flat_groups"
            if states[min(states)].stage == 3
            else ("single_partition_of_fp32_groups")
        )
        seen: dict[str, list[str]] = defaultdict(list)
        for state in states.values():
            for g, t in enumerate(state.fp32):
                where = f"{state.file.name}: `optimizer_state_dict.{key}[{g}]`"
                if not t.dtype.is_floating:
                    self.note(
                        ERROR,
                        "master-dtype",
                        f"{where} is {t.dtype}, not floating point: it cannot be the fp32 "
                        "master weights; the file is damaged or not a DeepSpeed optimizer file",
                    )
                    ok = False
                seen[t.dtype.name].append(where)
        if len(seen) > 1:
            tally = sorted(seen.items(), key=lambda kv: -len(kv[1]))
            odd = [f"{w} is {dtype}" for dtype, wheres in tally[1:] for w in wheres[:2]]
            self.note(
                ERROR,
                "master-dtype",
                f"the master weights mix dtypes: {'; '.join(odd[:3])} where "
                f"{len(tally[0][1])} others are {tally[0][0]}: files from different runs?",
            )
            return False
        if ok and seen and "float32" not in seen:
            self.note(
                WARNING,
                "master-dtype",
                f"the master weights are {next(iter(seen))}, not float32 "
                "(a low-precision master option?): outputs carry that precision",
            )
        return ok

    def _zero12_sources(
        self,
        states: Mapping[int, OptimMeta],
        shapes: list[list[tuple[str, tuple[int, ...]]]],
        dp: int,
        kind: OptimFileKind,
    ) -> ZeroSources | None:
        first = states[min(states)]
        n_groups = len(first.fp32)
        if n_groups != len(shapes):
            self.note(
                ERROR,
                "count-mismatch",
                f"model states list {len(shapes)} parameter groups "
                f"but {first.file.name} holds {n_groups} fp32 groups",
            )
            return None
        if any(len(s.fp32) != n_groups for s in states.values()):
            self.disagree(
                {s.file.name: len(s.fp32) for s in states.values()},
                "optimizer",
                "the number of fp32 groups",
            )
            return None
        for s in states.values():
            for g, (pads, group) in enumerate(zip(s.alignment or (), shapes, strict=False)):
                if len(pads) != len(group):
                    self.note(
                        ERROR,
                        "bad-metadata",
                        f"{s.file.name}: `optimizer_state_dict.param_alignment_paddings"
                        f"[{g}]` has {len(pads)} entries for the {len(group)} parameters of "
                        f"group {g} in param_shapes: the files do not belong together",
                    )
                    return None
        fp32: list[tuple[TensorRef, ...]] = []
        for d in range(dp):
            if d not in states:
                return None
            s = states[d]
            fp32.append(tuple(tensor_ref(self.path(s.file), t) for t in s.fp32))
        groups: list[zero.Zero12Group] = []
        experts = {e.index: e for e in self.expert_groups}
        for g, group_shapes in enumerate(shapes):
            # The slice size per rank, read from rank 0: ZeRO-1/2 save it without its tail
            # padding (group_paddings says how much); BF16_Optimizer saves it whole.
            size = fp32[0][g].numel + (first.group_paddings[g] if kind == "zero" else 0)
            # An expert group is split over its expert-data-parallel ranks only: file d holds
            # EDP rank d // ep's slice of EP rank d % ep's experts.
            expert = experts.get(g)
            layout = zero.zero12_group(
                group_shapes,
                expert.edp_size if expert else dp,
                first.alignment[g] if first.alignment else None,
                size,
            )
            groups.append(layout)
            self._check_zero12_group(
                g, layout, fp32, states, kind, expert.edp_rank_of if expert else None
            )
        return ZeroSources(
            stage=first.stage,
            fp32=tuple(fp32),
            groups=tuple(groups),
            slice_names=tuple(states[d].slice_names for d in range(dp)),
        )

    def _check_zero12_group(
        self,
        g: int,
        layout: zero.Zero12Group,
        fp32: list[tuple[TensorRef, ...]],
        states: Mapping[int, OptimMeta],
        kind: OptimFileKind,
        partition_rank: Callable[[int], int] | None = None,
    ) -> None:
        """Each file's slice of group ``g`` must have the size the layout gives its partition
        rank (``partition_rank(d)``; the DP rank itself for dense groups)."""
        if layout.padded_numel < layout.data_numel:
            self.note(
                ERROR,
                "short-partition",
                f"group {g}: the parameter shapes need "
                f"{layout.data_numel} elements but the {layout.dp} partitions of "
                f"{layout.partition_size} hold only {layout.padded_numel} "
                f"(e.g. {states[0].file.name}): the optimizer files do not match the model states",
            )
            return
        for d in range(len(fp32) if partition_rank else layout.dp):
            rank = partition_rank(d) if partition_rank else d
            saved = fp32[d][g].numel
            expected = layout.partition_size - (layout.tail_padding(rank) if kind == "zero" else 0)
            if saved != expected:
                self.note(
                    ERROR,
                    "short-partition",
                    f"{states[d].file.name}: group {g} holds {saved} fp32 "
                    f"elements where the parameter shapes need {expected}: the file does not "
                    "belong with the others",
                )

    def _zero3_sources(
        self,
        states: Mapping[int, OptimMeta],
        shapes: list[list[tuple[str, tuple[int, ...]]]],
        dp: int,
    ) -> ZeroSources | None:
        experts = self._zero3_expert_sub_groups(states, shapes, dp)
        # Expert sub-groups are laid out on their own (over their expert-DP ranks), not here.
        layout = zero.zero3_layout(
            [[] if s in experts else group for s, group in enumerate(shapes)], dp
        )
        numels = list(layout.sub_group_numels)
        for sub, (count, flats) in experts.items():
            last = flats[-1] if flats else None
            numels[sub] = last.offset + zero.zero3_partition_numel(last.numel, count) if last else 0
        layout = replace(layout, sub_group_numels=tuple(numels))
        fp32 = []
        for d in range(dp):
            if d not in states:
                return None
            s = states[d]
            refs = tuple(tensor_ref(self.path(s.file), t) for t in s.fp32)
            if tuple(r.numel for r in refs) != layout.sub_group_numels:
                self.note(
                    ERROR,
                    "short-partition",
                    f"{s.file.name}: fp32 sub-groups hold "
                    f"{[r.numel for r in refs]} elements where the parameter shapes need "
                    f"{list(layout.sub_group_numels)}: the file does not belong with the others",
                )
                return None
            fp32.append(refs)
        return ZeroSources(stage=3, fp32=tuple(fp32), zero3=layout, zero3_experts=experts)

    def _zero3_expert_sub_groups(
        self,
        states: Mapping[int, OptimMeta],
        shapes: list[list[tuple[str, tuple[int, ...]]]],
        dp: int,
    ) -> dict[int, tuple[int, tuple[zero.FlatParam, ...]]]:
        """AutoEP ZeRO-3: the sub-groups partitioned over fewer ranks than DP (its expert
        sub-groups, per ``ds_zero_partition_groups``), each parameter split on its own into
        ``ceil(numel / count)`` pieces, concatenated in ``param_shapes`` order."""
        first = states.get(0)
        if not self._moe or first is None or first.partition_groups is None:
            return {}
        out = {}
        for s, (count, _, _, _) in enumerate(first.partition_groups):
            if count == dp or s >= len(shapes):
                continue
            flats = []
            offset = 0
            for name, shape in shapes[s]:
                flats.append(zero.FlatParam(name, tuple(shape), offset))
                offset += zero.zero3_partition_numel(zero.numel(shape), count)
            out[s] = (count, tuple(flats))
        return out

    def buffers(
        self,
        meta: ModelMeta,
        module: Mapping[str, SavedTensor],
        whole: dict[str, tuple[TensorRef, ...]],
        tensors: list[TensorEntry],
    ) -> None:
        """The buffers ``buffer_names`` lists, each whole in ``module`` (added to ``whole`` and
        ``tensors``); a name ``module`` lacks is an error finding."""
        path = self.path(meta.file)
        for name in meta.buffer_names:
            t = module.get(name)
            if t is None:
                self.note(
                    ERROR,
                    "missing-key",
                    f"{meta.file.name}: `buffer_names` lists {name!r} but `module` holds no "
                    "tensor of that name: the file is damaged or incomplete",
                )
                continue
            whole[name] = (tensor_ref(path, t),)
            tensors.append(
                TensorEntry(
                    name, tuple(t.shape), dtypes.name_of(t.dtype), "buffer", "whole in model states"
                )
            )

    def _model_tensors(
        self,
        meta: ModelMeta,
        sources: ZeroSources | None,
        stage: int,
        dp: int,
        moe: MoeLayout | None = None,
    ) -> tuple[
        list[TensorEntry], dict[str, tuple[TensorRef, ...]], dict[str, tuple[TensorRef, ...]]
    ]:
        """The consolidated tensors: trainable (fp32 partitions), frozen, buffers, tied."""
        path = self.path(meta.file)
        module = self.module_tensors(meta)
        tensors: list[TensorEntry] = []
        whole: dict[str, tuple[TensorRef, ...]] = {}
        frozen: dict[str, tuple[TensorRef, ...]] = {}

        def module_dtype(name: str) -> str:
            t = module.get(name)
            return dtypes.name_of(t.dtype) if t is not None else "unknown"

        self.buffers(meta, module, whole, tensors)
        for name, shape in (meta.frozen_shapes or {}).items():
            if stage == 3:
                per = zero.zero3_partition_numel(zero.numel(shape), dp)
                placement = f"frozen; ZeRO-3 fragments of {per} per rank"
            else:
                fragment = meta.frozen_fragments.get(name)
                if fragment is None:
                    continue  # its missing key is a finding already
                if fragment.numel() != zero.numel(shape):
                    self.note(
                        ERROR,
                        "short-partition",
                        f"{meta.file.name}: `frozen_param_fragments.{name}` holds "
                        f"{fragment.numel()} elements where `frozen_param_shapes` says "
                        f"{list(shape)}: the file is damaged",
                    )
                    continue
                frozen[name] = (tensor_ref(path, fragment),)
                placement = "frozen; whole in model states"
            tensors.append(TensorEntry(name, shape, module_dtype(name), "frozen", placement))
        trainable = {p.name for p in _trainable_params(sources)}
        if meta.frozen_shapes is None:
            # ZeRO-1 records no frozen parameters: they exist only in `module`. (From ZeRO-2 on
            # they are recorded, so a module tensor found nowhere else is missing, not frozen.)
            buffers = set(meta.buffer_names)
            for name, t in module.items():
                if name not in trainable and name not in buffers and name not in meta.shared:
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
        tensors.extend(self._trainable_entries(sources, module_dtype, moe))
        tensors.extend(self._aliases(meta, tensors, module_dtype, sources is not None))
        return tensors, whole, frozen

    def _aliases(
        self,
        meta: ModelMeta,
        tensors: list[TensorEntry],
        module_dtype: Any,
        trainable_known: bool = True,
    ) -> list[TensorEntry]:
        """Tied names from ``shared_params``: each must name a tensor that is not itself an
        alias (which also rules out cycles) and must not shadow one.

        Without ``trainable_known`` (the optimizer partitions that list the trainable tensors are
        unreadable, missing or inconsistent: an error finding already) an alias of a tensor not
        seen is left out, not reported: the tensor may well be among the unread ones, and one
        cause should make one error."""
        by_name = {t.name: t for t in tensors}
        out = []
        for alias, canonical in meta.shared.items():
            if not trainable_known and canonical not in by_name:
                continue
            problem = None
            if alias in by_name:
                problem = f"aliases {alias!r}, which is a tensor of its own"
            elif canonical in meta.shared:
                problem = f"points at {canonical!r}, itself an alias (a chain or a cycle)"
            elif canonical not in by_name:
                problem = f"points at {canonical!r}, which the checkpoint does not hold"
            if problem is not None:
                self.note(
                    ERROR,
                    "bad-metadata",
                    f"{meta.file.name}: `shared_params.{alias}` {problem}: the file is damaged",
                )
                continue
            out.append(
                TensorEntry(
                    alias,
                    by_name[canonical].shape,
                    module_dtype(alias),
                    "tied",
                    f"alias of {canonical}",
                    alias_of=canonical,
                )
            )
        return out

    def _trainable_entries(
        self, sources: ZeroSources | None, module_dtype: Any, moe: MoeLayout | None = None
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
            if moe is not None:
                entries.extend(_expert_entries(moe, sources))
            return entries
        expert_groups = moe.expert_group_indices if moe else frozenset()
        for g, layout in enumerate(sources.groups):
            if g in expert_groups:
                continue
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
        if moe is not None:
            entries.extend(_expert_entries(moe, sources))
        return entries


def _expert_entries(moe: MoeLayout, sources: ZeroSources) -> list[TensorEntry]:
    """One entry per consolidated expert tensor (AutoEP: per fused tensor, all EP ranks)."""
    out: dict[str, TensorEntry] = {}
    for p in moe.params:
        group = moe.group(p.group)
        if group is None:
            continue
        files = group.files_of(p.ep_rank)
        where = f"rank {files[0]}" if len(files) == 1 else f"ranks {', '.join(map(str, files))}"
        placement = (
            f"expert group {p.group} ({group.name}), EP rank {p.ep_rank}: on {where}"
            if not moe.autoep
            else f"expert group {p.group} ({group.name}): {group.ep_size} EP ranks"
        )
        if p.name not in out:
            out[p.name] = TensorEntry(
                p.name, p.shape, "unknown", "trainable", placement, group=p.group
            )
    return list(out.values())


def _slice_names(mappings: Any) -> tuple[tuple[str | None, ...] | None, ...] | None:
    """The names each group's ``param_slice_mappings`` lists, in order (a non-name as None)."""
    if not isinstance(mappings, (list, tuple)):
        return None
    return tuple(
        tuple(n if isinstance(n, str) else None for n in m)
        if isinstance(m, (Mapping, list, tuple))
        else None
        for m in mappings
    )


def _partition_groups(
    value: Any, at: At, n_sub_groups: int
) -> tuple[tuple[int, int, tuple[int, ...], str], ...]:
    """ZeRO-3 AutoEP's per-sub-group partitioning (``ds_zero_partition_groups``), checked."""
    where = at / "ds_zero_partition_groups"
    if not isinstance(value, (list, tuple)) or len(value) != n_sub_groups:
        where.fail(f"is not a list of {n_sub_groups} per-sub-group records")
    out = []
    for i, entry in enumerate(value):
        here = where / i
        checks.mapping(entry, here)
        if checks.integer(checks.field(entry, "sub_group", here), here / "sub_group") != i:
            (here / "sub_group").fail(f"is not {i}: the records are out of order")
        count = checks.count(checks.field(entry, "partition_count", here), here / "partition_count")
        rank = checks.integer(
            checks.field(entry, "partition_rank", here), here / "partition_rank", 0, count - 1
        )
        ranks = checks.int_list(
            checks.field(entry, "partition_ranks", here),
            here / "partition_ranks",
            0,
            checks.MAX_RANKS,
        )
        if len(ranks) != count:
            (here / "partition_ranks").fail(f"lists {len(ranks)} ranks for partition_count {count}")
        names = entry.get("group_names")
        name = (
            names[0]
            if isinstance(names, (list, tuple)) and names and isinstance(names[0], str)
            else ""
        )
        out.append((count, rank, tuple(ranks), name))
    return tuple(out)


def _param_groups(osd: Mapping[str, Any]) -> list[Any] | None:
    base = osd.get("base_optimizer_state")
    groups = base.get("param_groups") if isinstance(base, dict) else None
    return groups if isinstance(groups, list) else None


def _group_field(osd: Mapping[str, Any], key: str) -> tuple[str | None, ...] | None:
    """Per optimizer param group, its string ``key`` (None where absent or not a string)."""
    groups = _param_groups(osd)
    if groups is None:
        return None
    return tuple(
        g.get(key) if isinstance(g, dict) and isinstance(g.get(key), str) else None for g in groups
    )


def _moe_flags(osd: Mapping[str, Any]) -> tuple[bool, ...] | None:
    groups = _param_groups(osd)
    if groups is None:
        return None
    return tuple(isinstance(g, dict) and g.get("moe") is True for g in groups)


def _trainable_params(sources: ZeroSources | None) -> list[Any]:
    if sources is None:
        return []
    if sources.zero3 is not None:
        return list(sources.zero3.params)
    return [p for g in sources.groups for p in g.params]
