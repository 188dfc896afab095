"""Universal checkpoints: what DeepSpeed's ``ds_to_universal`` writes, read without DeepSpeed.

A universal tag directory holds ``zero/<parameter name>/`` folders, each with the full,
unpartitioned optimizer state of one parameter (``fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``
and, for ZeRO-1/2 sources, ``step.pt``), ``zero/optimizer_state.pt`` (the optimizer's common
state and ``param_groups``), and the source run's model-states files copied as they were
(``mp_rank_MM_model_states.pt``, or every ``zero_pp_rank_D_mp_rank_00_model_states.pt`` of a
ZeRO-3 run). The model files say which parameters exist and their shapes (``param_shapes``),
and hold the buffers and frozen weights, which the ``zero/`` folders do not hold faithfully
(``ds_to_universal`` also gives every ``module`` tensor of a ZeRO-1/2 run a ``fp32.pt`` folder,
cast to float32, integer buffers included).

``fp32.pt`` is ``{"param": tensor, "cat_dim": d}`` (ZeRO-1/2 sources, the parameter's shape) or a
bare flat tensor (ZeRO-3 sources). A Megatron embedding marked ``vocab_tensor`` is saved without
its vocabulary padding rows. Keys that change how the tensor maps onto the model otherwise
(fused sub-parameters, averaged or expert tensors) are refused: they come from Megatron or MoE
runs this reader does not cover yet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsckpt.discover import checks, zero
from dsckpt.discover.checks import At, BadMetadata
from dsckpt.discover.files import RankFile, Role
from dsckpt.discover.model import ERROR, WARNING, Level, TensorEntry
from dsckpt.errors import CorruptFile
from dsckpt.io import dtypes
from dsckpt.io.load import TensorRef, read_scalar, tensor_ref
from dsckpt.io.unpickle import SavedTensor, load_saved
from dsckpt.printable import listed

if TYPE_CHECKING:
    from dsckpt.discover.layout import Layout, ModelMeta, Reader, TensorEntry

ZERO_DIR = "zero"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
TENSOR_STATES = ("fp32", "exp_avg", "exp_avg_sq")
STATE_FILES = {f"{s}.pt" for s in (*TENSOR_STATES, "step")}
PARAM_KEY = "param"
# Keys of a ``fp32.pt`` dict that do not change what the tensor is for a model at the saved TP
# size: ``cat_dim`` only says how TP slices were joined (DeepSpeed's loader splits on it again).
HARMLESS_KEYS = {PARAM_KEY, "cat_dim"}
# Megatron-DeepSpeed's embedding: saved without the vocabulary padding (the rows past
# `original_vocab_size`); DeepSpeed's loader pads it back with zeros to the model's rows.
VOCAB_KEY = "vocab_tensor"


class _Unsupported(Exception):
    """A state file records a mapping onto the model this reader does not implement."""


@dataclass(frozen=True)
class UniversalParam:
    """One ``zero/<name>/`` folder: which states it holds and where their values are."""

    name: str
    shape: tuple[int, ...]  # as the model files record it
    trainable: bool  # listed in param_shapes (False: a copy of a `module` tensor)
    states: Mapping[str, TensorRef] = field(default_factory=dict)  # fp32, exp_avg, exp_avg_sq
    step: float | int | None = None
    bytes_on_disk: int = 0
    vocab_rows: int | None = None  # rows kept of a vocabulary tensor saved without padding
    step_ref: TensorRef | None = None  # step.pt's tensor, when saved as one (copied by reshape)


@dataclass(frozen=True)
class UniversalInfo:
    """What discovery read under ``zero/``, for inspect and the plans."""

    params: tuple[UniversalParam, ...]
    source_stage: int | None  # ZeRO stage of the run the checkpoint was converted from
    param_groups: int | None  # len(param_groups) in zero/optimizer_state.pt
    bytes_on_disk: int = 0
    # Megatron-DeepSpeed's `universal_checkpoint_info` (TP/PP patterns, vocabulary sizes), the
    # entries that are plain names, numbers or lists of patterns; empty when not recorded.
    patterns: Mapping[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, UniversalParam]:
        return {p.name: p for p in self.params}


def read_universal(reader: Reader) -> Layout:
    """Discover a universal tag directory (see the module docstring); problems are findings."""
    return _Universal(reader).read()


class _Universal:
    def __init__(self, reader: Reader) -> None:
        self.r = reader
        self.dir = reader.location.dir
        self.zero_dir = self.dir / ZERO_DIR
        self.groups: dict[str, int] = {}  # parameter -> its param_shapes group

    def note(self, level: Level, code: str, message: str) -> None:
        self.r.note(level, code, message)

    # --- the model files ----------------------------------------------------------------------

    def read(self) -> Layout:
        model_files = self.r.of_role(Role.MODEL)
        zero3_models = self.r.of_role(Role.ZERO3_MODEL)
        if (
            self.r.of_role(Role.OPTIM)
            or self.r.of_role(Role.LAYER)
            or (model_files and zero3_models)
        ):
            self.note(
                ERROR,
                "unrelated-files",
                f"{self.dir} holds native optimizer or layer files, or model-states files of "
                "two kinds, beside `zero/`: ds_to_universal copies one run's model-states files "
                "only; the folder mixes two checkpoints",
            )
        metas = self._metas(zero3_models or model_files)
        if not metas:
            return self._empty(
                f"{self.dir} is a universal checkpoint (it has `zero/`) without the model-states "
                "files ds_to_universal copies beside it (*model_states.pt): they name the "
                "parameters and hold the buffers; copy them from the source checkpoint"
            )
        meta = metas[0]
        stage3 = bool(zero3_models)
        pp = meta.pp_degree or 1
        tp = meta.tp_degree or (meta.mp_world_size or 1) // pp
        if tp > 1:
            self.note(
                ERROR,
                "unsupported-universal",
                f"{meta.file.name} records tensor parallelism {tp}: universal checkpoints "
                "of tensor-parallel runs are not supported yet",
            )
        if not stage3:
            self.r.check_mp_files(meta, model_files)
        if stage3:
            dp = meta.dp_world_size or len(metas)
            self.r._check_rank_set(
                "model-states",
                {m.file.dp for m in metas if m.file.dp is not None},
                dp,
                lambda d: f"zero_pp_rank_{d}_mp_rank_00_model_states.pt",
            )
        trainable = self._trainable_shapes(metas, stage3)
        opt_stage, groups = self._optimizer_state()
        stage = 3 if stage3 else opt_stage
        tensors, whole, frozen = self._model_tensors(meta, metas, trainable, stage3)
        module_copies = {t.name for t in tensors if t.kind != "trainable"}
        params = self._folders(trainable, module_copies)
        info = UniversalInfo(
            params=tuple(params),
            source_stage=stage,
            param_groups=groups,
            bytes_on_disk=sum(p.bytes_on_disk for p in params) + self._optimizer_state_size(),
            patterns=_recorded_patterns(meta.raw.get("universal_checkpoint_info")),
        )
        self._check_steps(params)
        self._check_tied_stages(meta, pp, trainable)
        entries = self._placed(tensors, info)
        by_name = info.by_name()
        for name in trainable:
            p = by_name.get(name)
            if p is not None and "fp32" in p.states:
                whole[name] = (p.states["fp32"],)
        layout = self.r.make_layout(
            kind="universal",
            zero_stage=stage or 0,
            optimizer="universal",
            pp=pp,
            tp=tp,
            dp=meta.dp_world_size or 1,
            meta=meta,
            tensors=entries,
            sources={},
            whole=whole,
            frozen=frozen,
            model_keys=self._model_keys(meta, tensors),
            model_keys_from=f"`module` and `param_shapes` of {meta.file.name}",
            universal=info,
        )
        # The fp32 states are the master weights (checked to be float32 folder by folder).
        master = "float32" if any(p.states.get("fp32") for p in params) else None
        return replace(layout, master_dtype=master)

    def _empty(self, why: str) -> Layout:
        self.note(ERROR, "missing-rank-file", why)
        return self.r.make_layout(
            kind="universal",
            zero_stage=0,
            optimizer="universal",
            pp=1,
            tp=1,
            dp=1,
            meta=None,
            tensors=[],
            sources={},
            universal=UniversalInfo(params=(), source_stage=None, param_groups=None),
        )

    def _metas(self, files: list[RankFile]) -> list[ModelMeta]:
        """The checked metadata of every model file, rank order (stage/mp first, then dp)."""
        out = []
        for f in sorted(files, key=lambda f: (f.mp or 0, f.dp or 0)):
            raw = self.r.load(f)
            if raw is None:
                continue  # damaged: a finding already
            if not isinstance(raw, dict) or "module" not in raw:
                self.r.missing_key(f, "module")
                continue
            if raw.get("num_experts") is not None or raw.get("ds_autoep_layers") is not None:
                self.note(
                    ERROR,
                    "unsupported-moe",
                    f"{f.name} records a mixture-of-experts model: MoE universal checkpoints "
                    "are not supported yet",
                )
            out.append(self.r.model_meta(f, raw))
        return out

    def _trainable_shapes(self, metas: list[ModelMeta], stage3: bool) -> dict[str, tuple[int, ...]]:
        """Every optimizer parameter and its full shape, in flat-buffer order. ZeRO-3 ranks all
        record the same shapes (rank 0's are used); pipeline stages each record their own."""
        shapes: dict[str, tuple[int, ...]] = {}
        for meta in metas[:1] if stage3 else metas:
            if meta.param_shapes is None:
                if meta.raw.get("param_shapes") is None:
                    self.r.missing_key(meta.file, "param_shapes")
                continue
            for g, group in enumerate(meta.param_shapes):
                for name, shape in group:
                    self.groups.setdefault(name, g)
                    if shapes.setdefault(name, shape) != shape:
                        self.note(
                            ERROR,
                            "bad-metadata",
                            f"{meta.file.name}: `param_shapes` gives {name!r} the shape "
                            f"{list(shape)} where another model file gives {list(shapes[name])}",
                        )
        return shapes

    def _model_tensors(
        self,
        meta: ModelMeta,
        metas: list[ModelMeta],
        trainable: Mapping[str, tuple[int, ...]],
        stage3: bool,
    ) -> tuple[
        list[TensorEntry], dict[str, tuple[TensorRef, ...]], dict[str, tuple[TensorRef, ...]]
    ]:
        """Buffers, frozen weights and tied aliases from the model files (DeepSpeed's universal
        loader leaves them as the model was built; they are the source run's values), then the
        trainable parameters."""
        path = self.r.path(meta.file)
        module = self.r.module_tensors(meta)
        tensors: list[TensorEntry] = []
        whole: dict[str, tuple[TensorRef, ...]] = {}
        frozen: dict[str, tuple[TensorRef, ...]] = {}

        run_dtype = _run_dtype(meta.raw.get("ds_config"))

        def dtype_of(name: str) -> str:
            t = module.get(name)
            # Pipelines keep no `module` (the layer files are not copied): the run's config
            # says which dtype the model had.
            return dtypes.name_of(t.dtype) if t is not None else run_dtype

        self.r.buffers(meta, module, whole, tensors)
        if meta.frozen_shapes is None:
            # ZeRO-1 records no frozen parameters: they exist only in `module`.
            buffers = set(meta.buffer_names)
            for name, t in module.items():
                if name in trainable or name in buffers or name in meta.shared:
                    continue
                whole[name] = (tensor_ref(path, t),)
                tensors.append(
                    TensorEntry(
                        name, tuple(t.shape), dtype_of(name), "frozen", "whole in model states"
                    )
                )
        else:
            dp = len(metas) if stage3 else 1
            for name, shape in meta.frozen_shapes.items():
                refs = self._frozen_refs(name, shape, metas if stage3 else [meta], dp)
                if refs is None:
                    continue
                frozen[name] = refs
                where = (
                    f"ZeRO-3 fragments of {zero.zero3_partition_numel(zero.numel(shape), dp)} "
                    "per model file"
                    if stage3
                    else "whole in model states"
                )
                tensors.append(TensorEntry(name, shape, dtype_of(name), "frozen", where))
        for name, shape in trainable.items():
            group = self.groups.get(name)
            tensors.append(TensorEntry(name, shape, dtype_of(name), "trainable", "", group=group))
        tensors.extend(self.r._aliases(meta, tensors, dtype_of))
        return tensors, whole, frozen

    def _frozen_refs(
        self, name: str, shape: tuple[int, ...], metas: list[ModelMeta], dp: int
    ) -> tuple[TensorRef, ...] | None:
        """ZeRO-2: the whole frozen tensor; ZeRO-3: rank r's ``ceil(numel/dp)`` slice per file."""
        numel = zero.numel(shape)
        per = numel if dp == 1 else zero.zero3_partition_numel(numel, dp)
        refs = []
        for m in metas:
            fragment = m.frozen_fragments.get(name)
            if fragment is None:
                return None  # its missing key is a finding already
            # ZeRO-2 saves the whole tensor; ZeRO-3 a zero-padded piece of `per` elements.
            if fragment.numel() < per or (dp == 1 and fragment.numel() != numel):
                self.note(
                    ERROR,
                    "short-partition",
                    f"{m.file.name}: `frozen_param_fragments.{name}` holds {fragment.numel()} "
                    f"elements where {per} are needed for {list(shape)} over {dp} rank(s)",
                )
                return None
            refs.append(tensor_ref(self.r.path(m.file), fragment))
        return tuple(refs)

    @staticmethod
    def _model_keys(meta: ModelMeta, tensors: list[TensorEntry]) -> tuple[str, ...]:
        """The state-dict keys a consolidation must write: `module`'s keys (ZeRO-1/2/3), or,
        for pipelines (no `module`), what the model files list."""
        keys = [k for k, v in meta.module.items() if isinstance(v, SavedTensor)]
        if keys:
            return tuple(keys)
        return tuple(t.name for t in tensors)

    # --- zero/ ----------------------------------------------------------------------------------

    def _optimizer_state(self) -> tuple[int | None, int | None]:
        """The source's ZeRO stage and the number of param groups, from optimizer_state.pt."""
        path = self.zero_dir / OPTIMIZER_STATE_FILE
        if not path.is_file() or path.is_symlink():
            self.note(
                WARNING,
                "missing-state",
                f"{path} is missing: DeepSpeed's load_universal needs it to resume "
                "(consolidating the weights does not)",
            )
            return None, None
        at = At(path)
        try:
            raw = checks.mapping(load_saved(path), at)
            stage = raw.get("zero_stage")
            # DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1) records no stage; ds_to_universal
            # takes a missing one as 1 too.
            stage = 1 if stage is None else checks.integer(stage, at / "zero_stage", 1, 3)
            groups = raw.get("param_groups")
            if groups is None and isinstance(raw.get("optimizer_state_dict"), dict):
                groups = raw["optimizer_state_dict"].get("param_groups")
            if not isinstance(groups, (list, tuple)):
                at.missing("param_groups")
            return stage, len(groups)
        except BadMetadata as exc:
            self.note(ERROR, exc.code, str(exc))
        except CorruptFile as exc:
            self.note(ERROR, "corrupt-file", str(exc))
        return None, None

    def _optimizer_state_size(self) -> int:
        path = self.zero_dir / OPTIMIZER_STATE_FILE
        return path.stat().st_size if path.is_file() else 0

    def _folders(
        self, trainable: Mapping[str, tuple[int, ...]], module_copies: set[str]
    ) -> list[UniversalParam]:
        """Read every folder under zero/: each trainable parameter must have one with fp32.pt;
        a folder for a name the model files do not know is an error."""
        entries = {}
        try:
            with os.scandir(self.zero_dir) as it:
                found = list(it)
        except OSError as exc:
            self.note(ERROR, "corrupt-file", f"{self.zero_dir} cannot be listed: {exc.strerror}")
            found = []
        for e in found:
            if e.name == OPTIMIZER_STATE_FILE:
                continue
            if not e.is_dir(follow_symlinks=False):
                self.note(
                    ERROR,
                    "extra-param-file",
                    f"{self.zero_dir / e.name} is not a parameter folder (a file or a link): "
                    "ds_to_universal writes only folders and optimizer_state.pt there",
                )
                continue
            entries[e.name] = Path(e.path)
        extra = sorted(n for n in entries if n not in trainable and n not in module_copies)
        if extra:
            self.note(
                ERROR,
                "extra-param-folder",
                f"{self.zero_dir} holds folders for {len(extra)} name(s) the model files do "
                f"not list ({listed(extra, 4)}): another model's state was mixed in, or the "
                "model files are not this checkpoint's",
            )
        missing = [n for n in trainable if n not in entries]
        if missing:
            self.note(
                ERROR,
                "missing-param-folder",
                f"{self.zero_dir} has no folder for {len(missing)} trainable parameter(s) "
                f"({listed(missing, 4)}) that `param_shapes` lists: the conversion was "
                "incomplete or the folders were moved; run ds_to_universal again",
            )
        params = []
        for name, shape in trainable.items():
            if name in entries:
                params.append(self._folder(name, shape, entries[name], trainable=True))
        for name in sorted(n for n in entries if n in module_copies and n not in trainable):
            params.append(UniversalParam(name, (), False, bytes_on_disk=_size(entries[name])))
        return params

    def _folder(
        self, name: str, shape: tuple[int, ...], folder: Path, trainable: bool
    ) -> UniversalParam:
        states: dict[str, TensorRef] = {}
        step: float | int | None = None
        step_ref: TensorRef | None = None
        size = 0
        vocab: set[int | None] = set()
        unsupported: list[str] = []
        with os.scandir(folder) as it:
            files = sorted(it, key=lambda e: e.name)
        for e in files:
            path = Path(e.path)
            if e.name not in STATE_FILES or not e.is_file(follow_symlinks=False):
                self.note(
                    ERROR,
                    "extra-param-file",
                    f"{path}: ds_to_universal writes only "
                    f"{', '.join(sorted(STATE_FILES))} (regular files) in a parameter folder",
                )
                continue
            size += e.stat(follow_symlinks=False).st_size
            key = e.name.removesuffix(".pt")
            try:
                raw = load_saved(path)
                if key == "step":
                    step = self._step(raw, At(path))
                    step_ref = tensor_ref(path, raw) if isinstance(raw, SavedTensor) else None
                else:
                    states[key], rows = self._state_tensor(raw, At(path), shape)
                    vocab.add(rows)
            except _Unsupported as exc:
                unsupported.append(f"{e.name} {exc}")
            except BadMetadata as exc:
                self.note(ERROR, exc.code, str(exc))
            except CorruptFile as exc:  # (a file that would run code is refused outright)
                self.note(ERROR, "corrupt-file", str(exc))
        if unsupported:
            self.note(
                ERROR,
                "unsupported-universal",
                f"{folder}: {'; '.join(unsupported[:2])}: such parameters (Megatron fused "
                "sub-parameters, averaged or expert tensors) are not supported yet",
            )
            return UniversalParam(name, shape, trainable, {}, step, size)
        if len(vocab) > 1:
            self.note(
                ERROR,
                "bad-metadata",
                f"{folder}: the state files disagree on the vocabulary rows they keep: the "
                "folder mixes two conversions",
            )
        if not any(e.name == "fp32.pt" for e in files):  # (a damaged one is a finding already)
            self.note(
                ERROR,
                "missing-param-folder",
                f"{folder / 'fp32.pt'} is missing: the parameter's fp32 weights are nowhere else",
            )
        lacking = [s for s in ("exp_avg", "exp_avg_sq") if s not in states]
        if lacking and "fp32" in states:
            self.note(
                WARNING,
                "missing-state",
                f"{folder} has no {' or '.join(f'{s}.pt' for s in lacking)}: DeepSpeed "
                "writes them only for parameters that received a gradient; load_universal "
                "cannot resume Adam from it",
            )
        rows = next(iter(vocab)) if len(vocab) == 1 else None
        return UniversalParam(name, shape, trainable, states, step, size, rows, step_ref)

    def _state_tensor(
        self, raw: Any, at: At, shape: tuple[int, ...]
    ) -> tuple[TensorRef, int | None]:
        """The state's tensor, checked against the model's shape, and the rows it keeps when
        it is a vocabulary tensor saved without padding."""
        vocab = False
        if isinstance(raw, dict):
            unknown = sorted(str(k) for k in raw if k not in HARMLESS_KEYS | {VOCAB_KEY})
            if unknown:
                raise _Unsupported(f"records {', '.join(unknown)}")
            if "cat_dim" in raw:
                checks.integer(raw["cat_dim"], at / "cat_dim", 0, 8)
            if VOCAB_KEY in raw:
                if not isinstance(raw[VOCAB_KEY], bool):
                    (at / VOCAB_KEY).fail(f"is {type(raw[VOCAB_KEY]).__name__}, not a bool")
                vocab = raw[VOCAB_KEY]
            t = checks.tensor(checks.field(raw, PARAM_KEY, at), at / PARAM_KEY)
            where = at / PARAM_KEY
        else:
            t = checks.tensor(raw, at)
            where = at
        if t.dtype.name != "float32":
            where.fail(f"is {t.dtype.name}; ds_to_universal saves optimizer state as float32")
        if vocab:
            # Only the padding rows may be gone: same row width, no more rows than the model.
            if (
                len(t.shape) != len(shape)
                or not shape
                or t.shape[1:] != shape[1:]
                or (t.shape[0] > shape[0])
            ):
                where.fail(
                    f"is a vocabulary tensor of shape {list(t.shape)} that does not fit the "
                    f"model's {list(shape)} (only padding rows may be left out)"
                )
            return tensor_ref(at.path, t), t.shape[0]
        if t.numel() != zero.numel(shape):
            where.fail(
                f"holds {t.numel()} elements ({list(t.shape)}) where the model files give "
                f"the parameter the shape {list(shape)} ({zero.numel(shape)} elements)"
            )
        return tensor_ref(at.path, t), None

    @staticmethod
    def _step(raw: Any, at: At) -> float | int:
        if isinstance(raw, SavedTensor):
            if raw.numel() != 1:
                at.fail(f"is a tensor of {raw.numel()} elements where a step count belongs")
            value = read_scalar(tensor_ref(at.path, raw))
            if isinstance(value, bool):
                at.fail("is a bool where a step count belongs")
            return checks.number(value, at)
        return checks.number(raw, at)

    def _check_steps(self, params: list[UniversalParam]) -> None:
        steps = {p.name: p.step for p in params if p.step is not None}
        if len(set(steps.values())) > 1:
            by_step: dict[float | int, list[str]] = {}
            for name, s in steps.items():
                by_step.setdefault(s, []).append(name)
            per_step = "; ".join(
                f"step {s}: {listed(names)}" for s, names in sorted(by_step.items())
            )
            self.note(
                ERROR,
                "mixed-runs",
                f"{self.zero_dir}: parameter folders disagree on step.pt ({per_step}): folders "
                "from different conversions are mixed; convert one save again",
            )

    def _check_tied_stages(
        self, meta: ModelMeta, pp: int, trainable: Mapping[str, tuple[int, ...]]
    ) -> None:
        """A pipeline's tied module is held by the first and the last stage, and only its tied
        weight is kept in sync. ds_to_universal skips the later stages' copies only for names
        matching `pipeline_replicated_parameter_patterns`; without them every stage writes the
        same folder and the last one written wins, so the module's other parameters (position
        embeddings) can be a stale copy. DeepSpeed's loader would load that copy too."""
        tied = [n for n in trainable if n.startswith("tied_modules.")]
        info = meta.raw.get("universal_checkpoint_info")
        patterns = (
            info.get("pipeline_replicated_parameter_patterns") if isinstance(info, dict) else None
        )
        if pp > 1 and tied and not patterns:
            self.note(
                WARNING,
                "stale-tied-copy",
                f"{meta.file.name} records no `pipeline_replicated_parameter_patterns`, so "
                f"ds_to_universal wrote the tied-module parameters ({', '.join(tied[:2])}"
                f"{', ...' if len(tied) > 2 else ''}) from whichever stage came last: only the "
                "tied weight itself is kept in sync between stages; the others may be the last "
                "stage's copy, not the first stage's. They are written as the folder holds "
                "them (what load_universal loads); convert the native checkpoint if that matters",
            )

    def _placed(self, tensors: list[TensorEntry], info: UniversalInfo) -> list[TensorEntry]:
        """The entries with their placement: which zero/ states each trainable one holds."""
        by_name = info.by_name()
        out = []
        for t in tensors:
            if t.kind != "trainable":
                out.append(t)
                continue
            p = by_name.get(t.name)
            if p is None:
                where = "missing from zero/"
            else:
                held = [s for s in TENSOR_STATES if s in p.states]
                step = f", step {_show_step(p.step)}" if p.step is not None else ""
                where = f"zero/: {' '.join(held) or 'no state'}{step}"
                if p.vocab_rows is not None:
                    # The consolidated tensor is what the folder holds: the padding is gone.
                    where += f"; vocabulary without padding ({t.shape[0]} -> {p.vocab_rows} rows)"
                    t = replace(t, shape=(p.vocab_rows, *t.shape[1:]))
            out.append(replace(t, placement=where))
        return out


def _recorded_patterns(info: Any) -> dict[str, Any]:
    """The plain entries of ``universal_checkpoint_info``: what inspect can show as it is."""
    if not isinstance(info, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in info.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[key] = list(value)
    return out


def _run_dtype(config: Any) -> str:
    if not isinstance(config, dict):
        return "unknown"
    for key, name in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16")):
        section = config.get(key)
        if isinstance(section, dict) and section.get("enabled") is True:
            return name
    return "float32"


def _show_step(step: float | int) -> str:
    return str(int(step)) if float(step).is_integer() else str(step)


def _size(folder: Path) -> int:
    total = 0
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total
