"""Write a synthetic DeepSpeed checkpoint: DeepSpeed's exact files, tiny tensors, huge counts.

    python bench/make_synthetic.py OUT --stage 2 --dp 1024 --params 20000
    python bench/make_synthetic.py OUT --stage 3 --dp 512 --params 20000 --dtype bf16

Real DeepSpeed cannot train a 1,024-rank run on this machine, yet planning must stay cheap when a
checkpoint is huge in *count* (rank files, parameters), not only in bytes. This script writes what
``engine.save_checkpoint`` of DeepSpeed 0.19.8 would write for such a run, without DeepSpeed:
the same file names, the same pickled structures (keys, key order, types, DeepSpeed's classes
under their own import paths, tensors sharing storage where DeepSpeed's do), built with
``torch.save``. ``tests/test_synthetic.py`` holds the files against the real fixtures written by
DeepSpeed. The layouts follow DeepSpeed's save code: ``runtime/engine.py``
(``_common_checkpoint_state``, ``_get_zero_param_shapes``, ``_get_shared_params``),
``runtime/zero/stage_1_and_2.py`` (``state_dict``: flat groups padded to ``2 * dp``, lean fp32
partitions, ``param_slice_mappings``) and ``runtime/zero/stage3.py`` (``_create_fp16_sub_groups``,
per-parameter ``ceil(numel / dp)`` partitions, ``ds_id`` of a sub-group's flat fp32 tensor).

Values are a known function of the parameter and element, so a test can check a consolidation
bit for bit (see :func:`master_value`): trainable parameter ``p``'s fp32 master element ``i`` is
``p + i / 64`` (exact in fp32: shapes stay under 64 elements, ``p`` under 2**18), frozen parameter
``k``'s element ``i`` is ``-(k + 1) - i / 64`` in the model dtype, Adam's moments are the master
divided by 1024 and 4096. Padding is zero (DeepSpeed leaves ZeRO-3 padding uninitialised).

The model is a stack of transformer-like layers with Hugging Face names:
``model.embed_tokens.weight`` (tied to ``lm_head.weight``), then ``model.layers.{L}.{...}``;
a few frozen parameters and two buffers (an fp32 ``inv_freq``, an int64 ``position_ids``) are
spread through it, and parameters alternate between a decay and a no-decay optimizer group.

Speed: a ZeRO-3 run writes one model-states file per rank, each holding an empty placeholder
tensor per parameter (20,000 zip records of ~250 bytes); ``torch.save`` takes ~0.5 s for one, so
1,024 would take minutes. Those files differ only in their zip folder name (the file name) and
the frozen fragments, so one ``torch.save`` per name length (ranks 1, 10, 100, 1000) serves as a
template: the folder name is replaced in place (same length) and each frozen fragment's bytes and
its CRC-32 are patched. The result is byte for byte what ``torch.save`` writes for that rank,
except ``.data/serialization_id`` (a per-save id nobody reads), which is the template's.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import shutil
import struct
import sys
import time
import types
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dsckpt.io.standins import STAND_INS, FragmentAddress, LossScaler, ZeroStageEnum  # noqa: E402

DS_VERSION = "0.19.8"
MAX_NUMEL = 63  # every shape stays under 64 elements, so p + i/64 is exact in fp32
SUFFIXES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM_KEYS = (
    "weight_decay",
    "lr",
    "betas",
    "eps",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
    "params",
)  # torch.optim.AdamW's param_group keys, in its state_dict order


@dataclass(frozen=True)
class Spec:
    """What to generate."""

    stage: int  # 1, 2 or 3
    dp: int
    params: int  # trainable parameters (the tied alias and frozen ones come on top)
    dtype: str = "fp32"  # model dtype: fp32 | bf16
    frozen: int = 2
    groups: int = 2  # optimizer parameter groups (decay / no-decay ...)
    sub_group_size: int | None = None  # ZeRO-3: DeepSpeed's sub_group_size (elements per rank)
    step: int = 3
    tag: str = "global_step3"

    @property
    def model_dtype(self) -> torch.dtype:
        return MODEL_DTYPES[self.dtype]

    @property
    def prefix(self) -> str:
        # DeepSpeed's optimizer files carry bf16_ whenever bf16.enabled, whatever the optimizer.
        return "bf16_" if self.dtype == "bf16" else ""


# --- the model: names, shapes, values -----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One entry of the model's state_dict, in module order."""

    name: str
    kind: str  # trainable | frozen | buffer | tied
    shape: tuple[int, ...]
    index: int  # trainable: p; frozen: k; buffer: b; tied: the canonical's p
    group: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def shape_of(p: int) -> tuple[int, ...]:
    """A small, varied shape (1 to 63 elements; 1-D for the norms) so pieces straddle ranks."""
    if SUFFIXES[p % len(SUFFIXES)].endswith("layernorm.weight"):
        return (1 + (p * 7) % MAX_NUMEL,)
    rows, cols = 1 + p % 7, 1 + (p // 7) % 9
    return (rows, cols)


def model_entries(spec: Spec) -> list[Entry]:
    """The state_dict in module order: embed, layers (frozen params and buffers among them),
    the tied head last, as ``named_parameters`` + buffers of a Hugging Face model give it."""
    entries = [Entry("model.embed_tokens.weight", "trainable", shape_of(1), 0, 0)]
    entries.append(Entry("model.rotary_emb.inv_freq", "buffer", (8,), 0))
    frozen_every = max(1, spec.params // (spec.frozen + 1)) if spec.frozen else 0
    k = 0
    for p in range(1, spec.params):
        layer, suffix = divmod(p - 1, len(SUFFIXES))
        name = f"model.layers.{layer}.{SUFFIXES[suffix]}"
        entries.append(Entry(name, "trainable", shape_of(p), p, p % spec.groups))
        if frozen_every and k < spec.frozen and p % frozen_every == 0:
            entries.append(
                Entry(
                    f"model.layers.{layer}.adapter{k}.weight", "frozen", (3 + k % 5, 2 + k % 4), k
                )
            )
            k += 1
    for rest in range(k, spec.frozen):  # what the layers did not take goes after them
        entries.append(Entry(f"model.norm{rest}.weight", "frozen", (5 + rest % 3,), rest))
    entries.append(Entry("model.position_ids", "buffer", (16,), 1))
    entries.append(Entry("lm_head.weight", "tied", shape_of(1), 0))
    return entries


def master_value(p: int, numel: int) -> torch.Tensor:
    """The fp32 master weights of trainable parameter ``p``: element i is p + i/64 (exact)."""
    return (torch.arange(numel, dtype=torch.float64) / 64 + p).to(torch.float32)


def frozen_value(k: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Frozen parameter ``k``'s weights in the model dtype: -(k + 1) - i/64."""
    return (-(k + 1) - torch.arange(numel, dtype=torch.float64) / 64).to(dtype)


def buffer_value(b: int, numel: int) -> torch.Tensor:
    """Buffers keep their own dtype in every run: an fp32 and an int64 one."""
    if b == 0:
        return 1.0 / (10000 ** (torch.arange(numel, dtype=torch.float32) / numel))
    return torch.arange(numel, dtype=torch.int64)


def expected_state_dict(spec: Spec) -> dict[str, torch.Tensor]:
    """What a consolidation must give: fp32 masters, frozen params in the model dtype, buffers,
    the tied alias equal to its canonical."""
    out: dict[str, torch.Tensor] = {}
    for e in model_entries(spec):
        if e.kind in ("trainable", "tied"):
            out[e.name] = master_value(e.index, e.numel).reshape(e.shape)
        elif e.kind == "frozen":
            out[e.name] = frozen_value(e.index, e.numel, spec.model_dtype).reshape(e.shape)
        else:
            out[e.name] = buffer_value(e.index, e.numel).reshape(e.shape)
    return out


# --- pickling DeepSpeed's classes without DeepSpeed ----------------------------------------------


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


# GLOBAL opcodes of dsckpt's stand-ins -> DeepSpeed's own class paths (torch.save pickles with
# protocol 2: GLOBAL is text, and there are no frames whose lengths a rename would break).
_RENAMES = [
    (_global(cls.__module__, cls.__qualname__), _global(*path.rsplit(".", 1)))
    for path, cls in STAND_INS.items()
    if path.startswith("deepspeed.")
]


class _DeepSpeedPickler(pickle.Pickler):
    """The C pickler, with dsckpt's stand-ins renamed to DeepSpeed's import paths on the way
    out, so the file unpickles into DeepSpeed's classes where DeepSpeed is installed (the
    pure-Python pickler, whose save_global could be overridden, is 10x slower on the
    per-parameter lists a 20,000-parameter optimizer file holds)."""

    def __init__(self, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
        self._target = file
        self._buffer = io.BytesIO()
        super().__init__(self._buffer, protocol, **kwargs)

    def dump(self, obj: Any) -> None:
        super().dump(obj)
        data = self._buffer.getvalue()
        for ours, theirs in _RENAMES:
            data = data.replace(ours, theirs)
        self._target.write(data)


# torch.save takes a pickle *module* (it reads its __name__ and subclasses its Pickler).
_DS_PICKLE = types.ModuleType("deepspeed_names_pickle")
_DS_PICKLE.Pickler = _DeepSpeedPickler  # type: ignore[attr-defined]


def save(obj: Any, path: Path, deepspeed_classes: bool = False) -> None:
    if deepspeed_classes:
        torch.save(obj, path, pickle_module=_DS_PICKLE)
    else:
        torch.save(obj, path)


def loss_scaler() -> LossScaler:
    scaler = LossScaler()
    scaler.cur_scale = 1.0  # fp32 and bf16 runs: DeepSpeed's static scaler at 1.0
    scaler.dynamic = False
    return scaler


def ds_config(spec: Spec) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": spec.stage}
    if spec.stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        if spec.sub_group_size:
            zero["sub_group_size"] = spec.sub_group_size
    config: dict[str, Any] = {
        "train_batch_size": spec.dp,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 1000000,
        "optimizer": {
            "type": "AdamW",
            "params": {"torch_adam": True, "lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-08},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": [0.001] * spec.groups,
                "warmup_max_lr": [0.01] * spec.groups,
                "warmup_num_steps": 10,
                "warmup_type": "linear",
            },
        },
        "zero_optimization": zero,
    }
    if spec.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def param_group(g: int, params: list[int]) -> dict[str, Any]:
    values = {
        "weight_decay": 0.1 if g == 0 else 0.0,
        "lr": 0.01 / (g + 1),
        "betas": (0.9, 0.95),
        "eps": 1e-08,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": True,
        "params": params,
    }
    return {k: values[k] for k in ADAM_KEYS}


def model_states(
    spec: Spec,
    module: dict[str, torch.Tensor],
    param_shapes: list[Any],
    frozen_fragments: dict[str, torch.Tensor],
    shared: dict[str, str],
    entries: list[Entry],
) -> dict[str, Any]:
    """engine._common_checkpoint_state, key for key."""
    return dict(
        module=module,
        buffer_names=[e.name for e in entries if e.kind == "buffer"],
        optimizer=None,
        param_shapes=param_shapes,
        frozen_param_shapes=OrderedDict(
            (e.name, torch.Size(e.shape)) for e in entries if e.kind == "frozen"
        ),
        shared_params=shared,
        frozen_param_fragments=frozen_fragments,
        lr_scheduler={"last_batch_iteration": spec.step - 1},
        data_sampler=None,
        random_ltd=None,
        skipped_steps=0,
        global_steps=spec.step,
        global_samples=spec.step * spec.dp,
        dp_world_size=spec.dp,
        mp_world_size=1,
        checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
        ds_config=ds_config(spec),
        ds_version=DS_VERSION,
    )


def flat_values(params: list[Entry], fn: Any) -> torch.Tensor:
    """Concatenated values of ``params`` (vectorised: element i of param p is fn(p, i))."""
    numels = torch.tensor([e.numel for e in params], dtype=torch.int64)
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    ids = torch.repeat_interleave(torch.tensor([e.index for e in params]), numels)
    starts = torch.repeat_interleave(torch.cumsum(numels, 0) - numels, numels)
    return fn(ids, torch.arange(int(numels.sum())) - starts)


def _master(ids: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return (ids.to(torch.float64) + i.to(torch.float64) / 64).to(torch.float32)


# --- ZeRO-1/2 ------------------------------------------------------------------------------------


def write_zero12(spec: Spec, tag_dir: Path) -> int:
    entries = model_entries(spec)
    dtype = spec.model_dtype
    groups = [
        [e for e in entries if e.kind == "trainable" and e.group == g] for g in range(spec.groups)
    ]
    # The bit16 flat groups: module weights are views into them, as DeepSpeed's params are.
    module_of: dict[str, torch.Tensor] = {}
    flats, sizes = [], []
    for params in groups:
        data = flat_values(params, _master)
        align = 2 * spec.dp  # DeepSpeed's nccl_start_alignment_factor * dp
        padded = -(-data.numel() // align) * align
        flat = torch.zeros(padded, dtype=torch.float32)
        flat[: data.numel()] = data
        flats.append(flat)
        sizes.append(data.numel())
        bit16 = flat.to(dtype)
        offset = 0
        for e in params:
            module_of[e.name] = bit16.narrow(0, offset, e.numel).view(e.shape)
            offset += e.numel
    frozen = OrderedDict()
    module: dict[str, torch.Tensor] = OrderedDict()
    canonical = {}
    for e in entries:
        if e.kind == "trainable":
            module[e.name] = module_of[e.name]
            canonical[e.index] = e.name
        elif e.kind == "frozen":
            module[e.name] = frozen[e.name] = frozen_value(e.index, e.numel, dtype).view(e.shape)
        elif e.kind == "buffer":
            module[e.name] = buffer_value(e.index, e.numel).view(e.shape)
        else:
            module[e.name] = module[canonical[e.index]]
    shared = {e.name: canonical[e.index] for e in entries if e.kind == "tied"}
    shapes = [OrderedDict((e.name, torch.Size(e.shape)) for e in params) for params in groups]
    if spec.stage == 1:
        # ZeRO-1 saves no frozen-parameter records (frozen weights live in `module` only).
        states = model_states(spec, module, shapes, frozen, shared, entries)
        states["frozen_param_shapes"] = states["frozen_param_fragments"] = None
    else:
        states = model_states(spec, module, shapes, frozen, shared, entries)
    save(states, tag_dir / "mp_rank_00_model_states.pt")

    mappings = _slice_mappings(spec, groups, flats)
    for rank in range(spec.dp):
        save(
            _zero12_optim(spec, rank, groups, flats, sizes, mappings[rank]),
            tag_dir / f"{spec.prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            deepspeed_classes=True,
        )
    return spec.dp + 1


def _slice_mappings(
    spec: Spec, groups: list[list[Entry]], flats: list[torch.Tensor]
) -> list[list[OrderedDict[str, FragmentAddress]]]:
    """param_slice_mappings of every rank: the fragment of each parameter in its partition,
    found in one pass over the parameters (not rank x parameter)."""
    out = [[OrderedDict() for _ in groups] for _ in range(spec.dp)]
    for g, params in enumerate(groups):
        size = flats[g].numel() // spec.dp
        offset = 0
        for e in params:
            end = offset + e.numel
            for rank in range(offset // size, (end - 1) // size + 1):
                lo, hi = max(offset, rank * size), min(end, (rank + 1) * size)
                out[rank][g][e.name] = FragmentAddress(numel=hi - lo, start=lo - rank * size)
            offset = end
    return out


def _zero12_optim(
    spec: Spec,
    rank: int,
    groups: list[list[Entry]],
    flats: list[torch.Tensor],
    sizes: list[int],
    mappings: list[Any],
) -> dict[str, Any]:
    """stage_1_and_2.DeepSpeedZeroOptimizer.state_dict of one rank."""
    fp32, state, paddings = [], {}, []
    for g, flat in enumerate(flats):
        size = flat.numel() // spec.dp
        part = flat[rank * size : (rank + 1) * size].clone()
        pad = max(0, min(size, (rank + 1) * size - sizes[g]))
        paddings.append(pad)
        lean = part.narrow(0, 0, size - pad)  # saved without its tail padding, as a view
        lean.requires_grad_(True)
        fp32.append(lean)
        state[g] = {
            "step": torch.tensor(float(spec.step)),
            "exp_avg": part / 1024,
            "exp_avg_sq": part / 4096,
        }
    osd = {
        "loss_scaler": loss_scaler(),
        "dynamic_loss_scale": False,
        "overflow": False,
        "clip_grad": 1.0,
        "base_optimizer_state": {
            "state": state,
            "param_groups": [param_group(g, [g]) for g in range(len(groups))],
        },
        "single_partition_of_fp32_groups": fp32,
        "zero_stage": ZeroStageEnum(spec.stage),
        "group_paddings": paddings,
        "param_alignment_paddings": [[0] * len(params) for params in groups],
        "partition_count": [spec.dp] * len(groups),
        "ds_version": DS_VERSION,
        "param_slice_mappings": mappings,
    }
    return {"optimizer_state_dict": osd, "ds_config": ds_config(spec), "ds_version": DS_VERSION}


# --- ZeRO-3 --------------------------------------------------------------------------------------


def sub_groups(spec: Spec, params: list[Entry]) -> list[list[Entry]]:
    """stage3._create_fp16_sub_groups: cut when a sub-group's partition numel reaches the size."""
    per = [-(-e.numel // spec.dp) for e in params]
    if not spec.sub_group_size or spec.sub_group_size >= sum(per):
        return [params]
    out, current, size = [], [], 0
    for e, n in zip(params, per, strict=True):
        current.append(e)
        size += n
        if size >= spec.sub_group_size or e is params[-1]:
            out.append(current)
            current, size = [], 0
    return out


def _rank_pieces(params: list[Entry], dp: int, fn: Any, numel_of: Any = None) -> torch.Tensor:
    """[dp, sum c]: row r is rank r's flat group, each parameter zero-padded to dp * c and cut
    into dp pieces of c = ceil(numel / dp)."""
    columns = []
    for e in params:
        c = -(-e.numel // dp)
        padded = torch.zeros(dp * c, dtype=torch.float32)
        padded[: e.numel] = fn(e)
        columns.append(padded.view(dp, c))
    return torch.cat(columns, 1) if columns else torch.zeros(dp, 0)


def write_zero3(spec: Spec, tag_dir: Path, stamp: bool = True) -> int:
    entries = model_entries(spec)
    dtype = spec.model_dtype
    # ds_id: DeepSpeed numbers parameters as zero.Init registers them (module order).
    ds_id = {
        e.name: i for i, e in enumerate(e for e in entries if e.kind in ("trainable", "frozen"))
    }
    subs: list[list[Entry]] = []
    group_of_sub: list[int] = []
    for g in range(spec.groups):
        for sub in sub_groups(spec, [e for e in entries if e.kind == "trainable" and e.group == g]):
            subs.append(sub)
            group_of_sub.append(g)
    shapes = [OrderedDict((e.name, torch.Size(e.shape)) for e in sub) for sub in subs]

    # Optimizer files: one fp32 flat tensor per sub-group and its Adam state.
    rows = [_rank_pieces(sub, spec.dp, lambda e: master_value(e.index, e.numel)) for sub in subs]
    for rank in range(spec.dp):
        fp32, state = [], {}
        for s, sub in enumerate(subs):
            flat = rows[s][rank].clone()
            flat.requires_grad_(True)
            flat.ds_id = f"{ds_id[sub[0].name]}_{ds_id[sub[-1].name]}"  # type: ignore[attr-defined]
            fp32.append(flat)
            state[s] = {
                "step": torch.tensor(float(spec.step)),
                "exp_avg": rows[s][rank] / 1024,
                "exp_avg_sq": rows[s][rank] / 4096,
            }
        groups = [
            param_group(g, [s for s, gs in enumerate(group_of_sub) if gs == g])
            for g in range(spec.groups)
        ]
        osd = {
            "zero_stage": ZeroStageEnum(3),
            "loss_scaler": loss_scaler(),
            "dynamic_loss_scale": False,
            "overflow": False,
            "partition_count": spec.dp,
            "optimizer_state_dict": {"state": state, "param_groups": groups},
            "fp32_flat_groups": fp32,
        }
        save(
            {"optimizer_state_dict": osd, "ds_config": ds_config(spec), "ds_version": DS_VERSION},
            tag_dir / f"{spec.prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
            deepspeed_classes=True,
        )

    # Model-states files: every parameter an empty placeholder, buffers whole, this rank's
    # zero-padded slice of each frozen parameter.
    frozen = [e for e in entries if e.kind == "frozen"]
    frozen_rows = {
        e.name: _rank_pieces(
            [e], spec.dp, lambda e: frozen_value(e.index, e.numel, torch.float32)
        ).to(dtype)
        for e in frozen
    }
    placeholders: dict[str, torch.Tensor] = OrderedDict()
    canonical = {}
    for e in entries:
        if e.kind in ("trainable", "frozen"):
            placeholders[e.name] = torch.empty(0, dtype=dtype)
            if e.kind == "trainable":
                canonical[e.index] = e.name
        elif e.kind == "buffer":
            placeholders[e.name] = buffer_value(e.index, e.numel).view(e.shape)
        else:
            placeholders[e.name] = placeholders[canonical[e.index]]
    shared = {e.name: canonical[e.index] for e in entries if e.kind == "tied"}

    def states(rank: int) -> dict[str, Any]:
        fragments = OrderedDict((e.name, frozen_rows[e.name][rank].clone()) for e in frozen)
        # _get_shared_params runs its search on global rank 0 only.
        return model_states(
            spec, placeholders, shapes, fragments, shared if rank == 0 else {}, entries
        )

    name = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
    templates: dict[int, _Template] = {}
    for rank in range(spec.dp):
        width = len(str(rank))
        if rank == 0 or width not in templates or not stamp:
            path = tag_dir / name.format(rank)
            save(states(rank), path)
            if rank:
                templates[width] = _Template(path, [e.name for e in frozen])
            continue
        fragments = [frozen_rows[e.name][rank].contiguous() for e in frozen]
        templates[width].write(tag_dir / name.format(rank), fragments)
    return 2 * spec.dp


class _Template:
    """A saved rank file to stamp out other ranks' files of the same name length.

    The zip folder (the file's stem) is replaced by one of the same length, so every offset
    stays; the frozen fragments are the last ``len(frozen)`` storages torch.save wrote (its
    storage keys follow pickling order, and `frozen_param_fragments` is the last tensor-holding
    key), and their CRC-32s are rewritten in the local and the central headers.
    """

    def __init__(self, path: Path, frozen: list[str]) -> None:
        self.data = path.read_bytes()
        self.stem = path.stem.encode()
        self.patches: list[tuple[int, int, int, int]] = []  # (data, size, local crc, central crc)
        with zipfile.ZipFile(io.BytesIO(self.data)) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            keys = sorted((int(n.rsplit("/", 1)[1]), n) for n in infos if "/data/" in n)
            central = self._central_offsets(zf.start_dir, len(infos))  # type: ignore[attr-defined]
        for _, record in keys[len(keys) - len(frozen) :]:
            info = infos[record]
            local = info.header_offset
            name_len, extra_len = struct.unpack_from("<HH", self.data, local + 26)
            self.patches.append(
                (
                    local + 30 + name_len + extra_len,
                    info.file_size,
                    local + 14,
                    central[record] + 16,
                )
            )

    def _central_offsets(self, start: int, count: int) -> dict[str, int]:
        offsets, pos = {}, start
        for _ in range(count):
            n, e, c = struct.unpack_from("<HHH", self.data, pos + 28)
            offsets[self.data[pos + 46 : pos + 46 + n].decode()] = pos
            pos += 46 + n + e + c
        return offsets

    def write(self, path: Path, fragments: list[torch.Tensor]) -> None:
        out = bytearray(self.data.replace(self.stem + b"/", path.stem.encode() + b"/"))
        for (start, size, local_crc, central_crc), tensor in zip(
            self.patches, fragments, strict=True
        ):
            raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            assert len(raw) == size, (path, size, len(raw))
            out[start : start + size] = raw
            crc = zlib.crc32(raw)
            struct.pack_into("<I", out, local_crc, crc)
            struct.pack_into("<I", out, central_crc, crc)
        path.write_bytes(out)


# --- entry points --------------------------------------------------------------------------------


@dataclass
class Made:
    spec: Spec
    path: Path
    files: int
    seconds: float
    bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def make(spec: Spec, out: Path | str, force: bool = False, stamp: bool = True) -> Made:
    """Write ``spec``'s checkpoint as a save_dir (``latest`` + the tag folder) at ``out``.

    ``stamp=False`` torch.saves every ZeRO-3 model-states file instead of stamping them from
    templates (slow at scale; the tests compare both).
    """
    out = Path(out)
    if spec.params > 2**18 or spec.params < 2:
        raise ValueError("--params must be in [2, 262144] (values p + i/64 stay exact in fp32)")
    if spec.stage == 3 and spec.dtype not in MODEL_DTYPES:
        raise ValueError(f"--dtype {spec.dtype}: choose fp32 or bf16")
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (pass --force to replace it)")
        shutil.rmtree(out)
    tag_dir = out / spec.tag
    tag_dir.mkdir(parents=True)
    started = time.perf_counter()
    files = write_zero3(spec, tag_dir, stamp) if spec.stage == 3 else write_zero12(spec, tag_dir)
    (out / "latest").write_text(spec.tag)
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in tag_dir.iterdir())
    made = Made(spec, out, files, seconds, size)
    (out / "synthetic.json").write_text(
        json.dumps(
            {**asdict(spec), "files": files, "seconds": round(seconds, 2), "bytes": size}, indent=1
        )
    )
    return made


# -- pipelines: real DeepSpeed runs ------------------------------------------------------------
#
# A Megatron-DeepSpeed pipeline checkpoint with hundreds of layer files needs no synthesis: the
# fixtures' own model (tests/fixtures/train_pipe.py, a GPT of hidden size 6) trains on CPU with
# any layer count in seconds, so these are DeepSpeed's own saves (one optimizer step), made
# exactly as tests/fixtures/pipe's are, only with more layers. DeepSpeed is a test dependency.

TRAIN_PIPE = REPO / "tests" / "fixtures" / "train_pipe.py"


@dataclass(frozen=True)
class PipeSpec:
    """A pipeline checkpoint: ``layers`` transformer layers (layer files: ``layers + 2`` per TP
    rank: embedding, the layers, final norm; the tied embedding's second use has none)."""

    layers: int
    pp: int = 2
    tp: int = 2
    dp: int = 1
    zero_stage: int = 1
    dtype: str = "fp32"

    @property
    def layer_files(self) -> int:
        return (self.layers + 2) * self.tp


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_pipeline(spec: PipeSpec, out: Path | str, force: bool = False) -> Made:
    """Train ``spec``'s pipeline for one step under torchrun (CPU, gloo) and save it at ``out``."""
    import subprocess

    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (pass --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    world = spec.pp * spec.tp * spec.dp
    started = time.perf_counter()
    for _ in range(3):  # another process may take the free port meanwhile
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            f"--master_port={_free_port()}",
            str(TRAIN_PIPE),
            f"--pp={spec.pp}",
            f"--tp={spec.tp}",
            f"--dtype={spec.dtype}",
            f"--zero-stage={spec.zero_stage}",
            f"--num-layers={spec.layers}",
            "--steps=1",
            f"--save={out / 'ckpt'}",
        ]
        with open(out / "train.log", "w") as log:
            done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode == 0:
            break
    else:
        raise RuntimeError(f"train_pipe.py failed (exit {done.returncode}): see {out}/train.log")
    seconds = time.perf_counter() - started
    tag_dirs = [d for d in (out / "ckpt").iterdir() if d.is_dir()]
    files = sum(1 for d in tag_dirs for _ in d.iterdir())
    size = sum(p.stat().st_size for d in tag_dirs for p in d.iterdir())
    zero_spec = Spec(stage=spec.zero_stage, dp=spec.dp, params=2)  # Made's record of the run
    made = Made(zero_spec, out / "ckpt", files, seconds, size)
    (out / "synthetic.json").write_text(
        json.dumps({**asdict(spec), "files": files, "seconds": round(seconds, 2), "bytes": size})
    )
    return made


def _iter_args(argv: list[str] | None) -> Iterator[argparse.Namespace]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path, help="the save_dir to create")
    ap.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    ap.add_argument("--dp", type=int, default=None, help="8 (ZeRO) or 1 (--layers)")
    ap.add_argument("--params", type=int, default=200, help="trainable parameters")
    ap.add_argument("--dtype", choices=sorted(MODEL_DTYPES), default="fp32")
    ap.add_argument("--frozen", type=int, default=2)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--sub-group-size", type=int, default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument(
        "--layers",
        type=int,
        help="a Megatron-DeepSpeed pipeline checkpoint of this many transformer layers instead, "
        "saved by real DeepSpeed (--pp, --tp; --dp, --dtype and --stage 0/1 apply)",
    )
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    yield ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    for args in _iter_args(argv):
        if args.layers:
            pipe = PipeSpec(
                args.layers, args.pp, args.tp, args.dp or 1, min(args.stage, 1), args.dtype
            )
            made = make_pipeline(pipe, args.out, force=args.force)
            print(f"wrote {made.path}: {made.files} files in {made.seconds:.1f} s")
            continue
        spec = Spec(
            stage=args.stage,
            dp=args.dp or 8,
            params=args.params,
            dtype=args.dtype,
            frozen=args.frozen,
            groups=args.groups,
            sub_group_size=args.sub_group_size,
        )
        made = make(spec, args.out, force=args.force)
        print(
            f"wrote {made.path}: {made.files} files, {made.bytes / 1e6:,.1f} MB "
            f"in {made.seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
