"""`verify`: does an output hold what a checkpoint holds, or do two checkpoints hold the same?

Two comparisons, one engine:

* :func:`verify_output` - a consolidated state dict (``.safetensors``, Hugging Face shards with
  an index, a ``torch.save`` ``.bin``/``.pt``, or DeepSpeed's own ``zero_to_fp32`` output) against
  the checkpoint's consolidation plan: names, dtypes, shapes, and every byte.
* :func:`verify_checkpoints` - two DeepSpeed checkpoints (a reshape and its source, say),
  whatever their topologies: the fp32 master weights by name, the optimizer state per parameter
  (:mod:`dsckpt.plan.optim_state`), the step, and the counters and hyper-parameters.

Each side of a comparison is a set of named tensors whose elements can be read in windows: a
tensor stored in an output file (``pread`` of its bytes) or a planned tensor (its reads, cast as
the executor casts). Tensors are compared window by window, so memory stays at two windows
whatever the model size, and nothing is loaded whole.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import time
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsckpt.discover.files import Role, classify
from dsckpt.discover.layout import Layout, open_checkpoint
from dsckpt.errors import CorruptFile, UnsupportedLayout, UsageError
from dsckpt.execute.executor import CAST_CHUNK, _cast, _Sources
from dsckpt.execute.progress import ProgressSink
from dsckpt.io import dtypes
from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef, read_scalar, read_tensor, tensor_ref
from dsckpt.io.regular import open_regular
from dsckpt.io.unpickle import SavedTensor, load_saved
from dsckpt.plan.consolidation import DTYPES, ConsolidationPlan, OutputTensor, plan_consolidation
from dsckpt.plan.model import ConsolidationOptions
from dsckpt.plan.optim_state import plan_optimizer_state
from dsckpt.printable import listed
from dsckpt.sizes import human_bytes

# How many differing names the one-line result shows (the JSON lists them all).
SHOWN = 3
_WIDENINGS = {
    (dtypes.BFLOAT16, dtypes.FLOAT32),
    (dtypes.FLOAT16, dtypes.FLOAT32),
    (dtypes.BFLOAT16, dtypes.FLOAT64),
    (dtypes.FLOAT16, dtypes.FLOAT64),
    (dtypes.FLOAT32, dtypes.FLOAT64),
}
_SAFETENSORS_DTYPES = {d.safetensors_code: d for d in dtypes.ALL if d.safetensors_code}


@dataclass(frozen=True)
class Difference:
    """One way the two sides differ. ``what``: values, dtype, shape, missing, extra, tied,
    step, counter, or state (an optimizer state entry one side lacks)."""

    name: str
    what: str
    detail: str


@dataclass
class VerifyResult:
    """The outcome of a comparison; ``equal`` when there is no difference."""

    mode: str  # "output" | "checkpoints"
    a: Path
    b: Path
    b_format: str
    tensors: int = 0  # tensors compared by value
    nbytes: int = 0  # bytes compared (one side)
    seconds: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counters: list[tuple[str, Any, Any]] = field(default_factory=list)  # (name, a, b)

    @property
    def equal(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        """One line: ``equal: ...`` or ``differ: ...`` with the first differing names."""
        what = "weights and optimizer state, " if self.mode == "checkpoints" else ""
        # No timing here: the line is meant to be compared and grepped (--json has seconds).
        compared = f"{self.tensors} tensors ({what}{human_bytes(self.nbytes)})"
        if self.equal:
            counters = f", {len(self.counters)} counters" if self.counters else ""
            notes = f"; {'; '.join(self.notes)}" if self.notes else ""
            return (
                f"equal: {self.b} ({self.b_format}) matches {self.a}: {compared}{counters}{notes}"
            )
        kinds: dict[str, int] = {}
        for d in self.differences:
            kinds[d.what] = kinds.get(d.what, 0) + 1
        counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        first = listed(
            self.differences,
            SHOWN,
            sep="; ",
            more="; and {} more (--json lists all)",
            each=lambda d: f"{d.name} ({d.what}: {d.detail})",
        )
        return f"differ: {self.b} vs {self.a}: {counts}: {first}"

    def to_json(self) -> dict[str, Any]:
        return {
            "equal": self.equal,
            "mode": self.mode,
            "a": str(self.a),
            "b": str(self.b),
            "b_format": self.b_format,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "seconds": round(self.seconds, 3),
            "differences": [vars(d) for d in self.differences],
            "notes": self.notes,
            "counters": [
                {"name": n, "a": _jsonable(a), "b": _jsonable(b), "equal": a == b}
                for n, a, b in self.counters
            ],
        }


# --- the two sides ---------------------------------------------------------------------------


class _Values(Protocol):
    """A tensor whose elements can be read in windows, as bytes of ``dtype``."""

    @property
    def dtype(self) -> DType: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, start: int, count: int) -> bytes: ...


@dataclass(frozen=True)
class _Stored:
    """A tensor stored in a file: its bytes, read with ``pread``."""

    ref: TensorRef
    files: _Sources

    @property
    def dtype(self) -> DType:
        return self.ref.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    def read(self, start: int, count: int) -> bytes:
        ref = self.ref
        if not ref.is_contiguous:  # never written by dsckpt or zero_to_fp32; read whole
            import torch

            return read_tensor(ref, start, count).view(torch.uint8).numpy().tobytes()
        return _pread(
            self.files.fd(ref.path),
            ref.offset + start * ref.itemsize,
            count * ref.itemsize,
            ref.path,
        )


class _Planned:
    """A tensor as a plan makes it, elements cast to ``dtype`` exactly as the executor casts."""

    def __init__(self, tensor: OutputTensor, dtype: DType, files: _Sources) -> None:
        self.tensor = tensor
        self.dtype = dtype
        self.shape = tensor.shape
        self.files = files
        self._reads = sorted(tensor.reads, key=lambda r: r.dst_start)
        self._starts = [r.dst_start for r in self._reads]

    def read(self, start: int, count: int) -> bytes:
        item = self.dtype.itemsize
        out = bytearray(count * item)  # elements no read covers stay zero, as in the outputs
        end = start + count
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        for read in self._reads[i:]:
            if read.dst_start >= end:
                break
            lo, hi = max(start, read.dst_start), min(end, read.dst_start + read.length)
            if lo >= hi:
                continue
            src = read.source
            first = read.src_start + lo - read.dst_start
            fd = self.files.fd(src.path)
            if src.dtype == self.dtype and src.is_contiguous:
                piece: bytes | memoryview = _pread(
                    fd, src.offset + first * src.itemsize, (hi - lo) * item, src.path
                )
            else:
                piece = _cast(src, first, hi - lo, self.dtype, fd)
            out[(lo - start) * item : (hi - start) * item] = piece
        return bytes(out)


def _pread(fd: int, offset: int, nbytes: int, path: Path) -> bytes:
    parts = []
    while nbytes > 0:
        data = os.pread(fd, nbytes, offset)
        if not data:
            raise CorruptFile(path, "unexpected end of file while reading a tensor (truncated)")
        parts.append(data)
        offset += len(data)
        nbytes -= len(data)
    return b"".join(parts)


# --- reading an output -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredOutput:
    """A consolidated state dict on disk: where each tensor's bytes are."""

    path: Path
    format: str
    files: tuple[Path, ...]
    tensors: Mapping[str, TensorRef]


def open_output(path: Path | str) -> StoredOutput:
    """Locate every tensor of an output without reading tensor data.

    ``path`` is a ``.safetensors`` file, a ``torch.save`` file (``.bin``, ``.pt``, ``.pth``), or a
    directory holding ``model.safetensors.index.json``, ``pytorch_model.bin.index.json``,
    ``model.safetensors`` or ``pytorch_model.bin`` (what dsckpt, ``save_pretrained`` and
    DeepSpeed's ``zero_to_fp32`` write).

    Raises:
        UsageError: nothing to read at ``path``.
        CorruptFile: a file is damaged (a bad safetensors header, an unreadable pickle).
        UnsupportedLayout: a torch file holds something other than a flat dict of tensors.
    """
    path = Path(path)
    if path.is_dir():
        return _open_dir(path)
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"{path} does not exist: give the file or directory to verify")
    # Anything else that is not a directory is opened as a regular file, which refuses (in one
    # line, without blocking) a FIFO, a device or a dangling link.
    if path.suffix.lower() == ".safetensors":
        return StoredOutput(path, "safetensors", (path,), _safetensors(path))
    return StoredOutput(path, "torch", (path,), _torch_file(path))


def _open_dir(path: Path) -> StoredOutput:
    for index, fmt in (
        ("model.safetensors.index.json", "sharded safetensors"),
        ("pytorch_model.bin.index.json", "sharded torch"),
    ):
        if (path / index).is_file():
            return _sharded(path, path / index, fmt)
    for single, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch")):
        if (path / single).is_file():
            one = open_output(path / single)
            return StoredOutput(path, fmt, one.files, one.tensors)
    raise UsageError(
        f"{path} holds no model.safetensors[.index.json] or pytorch_model.bin[.index.json]: "
        "give the output file itself, or the directory to-fp32 or zero_to_fp32 wrote"
    )


def _sharded(path: Path, index: Path, fmt: str) -> StoredOutput:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(index, f"not a shard index ({exc})") from exc
    tensors: dict[str, TensorRef] = {}
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = path / str(shard)
        if not shard_path.is_file():
            raise CorruptFile(index, f"names the shard {shard}, which is missing from {path}")
        files.append(shard_path)
        for name, ref in open_output(shard_path).tensors.items():
            if weight_map.get(name) != shard:
                raise CorruptFile(
                    shard_path, f"holds {name!r}, which the index places in {weight_map.get(name)}"
                )
            tensors[name] = ref
    for name in weight_map.keys() - tensors.keys():
        raise CorruptFile(index, f"places {name!r} in {weight_map[name]}, which does not hold it")
    return StoredOutput(path, fmt, tuple(files), tensors)


def _safetensors(path: Path) -> dict[str, TensorRef]:
    # An output named on the command line is as untrusted as a checkpoint: a FIFO must not block.
    fd = open_regular(path)
    size = os.fstat(fd).st_size
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFile(path, "not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CorruptFile(path, f"safetensors header size {n} runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CorruptFile(path, f"safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptFile(path, "safetensors header is not a JSON object")
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFile(path, f"safetensors entry {name!r} is malformed ({exc})") from exc
        ref = TensorRef(path, base + begin, dtype, shape, _contiguous(shape))
        if end - begin != ref.nbytes or base + end > size:
            raise CorruptFile(
                path,
                f"{name!r}: its data_offsets [{begin}, {end}) do not fit its "
                f"{ref.nbytes} bytes or the file",
            )
        tensors[name] = ref
    return tensors


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def _torch_file(path: Path) -> dict[str, TensorRef]:
    saved = load_saved(path)
    if not isinstance(saved, Mapping):
        raise UnsupportedLayout(
            f"{path} holds a {type(saved).__name__}, not a state dict: verify compares a dict "
            "of tensors"
        )
    tensors = {}
    for name, value in saved.items():
        if not isinstance(value, SavedTensor):
            raise UnsupportedLayout(
                f"{path}: key {name!r} holds a {type(value).__name__}, not a tensor: verify "
                "compares flat state dicts (name -> tensor)"
            )
        tensors[str(name)] = tensor_ref(path, value)
    return tensors


# --- comparing tensors -----------------------------------------------------------------------


class _Comparer:
    """Compares named tensors window by window and collects the result."""

    def __init__(self, result: VerifyResult, progress: ProgressSink) -> None:
        self.result = result
        self.progress = progress

    def values(self, name: str, a: _Values, b: _Values, label: str = "") -> None:
        """Compare the elements of ``a`` and ``b`` (same dtype and shape) byte for byte."""
        item = b.dtype.itemsize
        numel = _numel(b.shape)
        differing, first = 0, -1
        for start in range(0, numel, CAST_CHUNK):
            count = min(CAST_CHUNK, numel - start)
            x, y = a.read(start, count), b.read(start, count)
            if x != y:
                n, at = _count_differing(x, y, item)
                differing += n
                first = start + at if first < 0 else first
            self.progress.advance(count * item)
        self.result.tensors += 1
        self.result.nbytes += numel * item
        if differing:
            where = _index(first, b.shape)
            self.result.differences.append(
                Difference(
                    name,
                    "values",
                    f"{label}{differing} of {numel} elements differ, first at {where}",
                )
            )

    def differ(self, name: str, what: str, detail: str) -> None:
        self.result.differences.append(Difference(name, what, detail))


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _index(flat: int, shape: tuple[int, ...]) -> str:
    coords = []
    for d in reversed(shape):
        flat, r = divmod(flat, d) if d else (flat, 0)
        coords.append(r)
    return "[" + ", ".join(str(c) for c in reversed(coords)) + "]"


def _count_differing(x: bytes, y: bytes, item: int) -> tuple[int, int]:
    """(elements that differ, index of the first) between two equal-length byte strings."""
    try:
        import numpy as np
    except ImportError:  # not a dependency: compare element by element
        bad = [
            i
            for i in range(len(x) // item)
            if x[i * item : (i + 1) * item] != y[i * item : (i + 1) * item]
        ]
        return len(bad), bad[0]
    a = np.frombuffer(x, dtype=np.uint8).reshape(-1, item)
    b = np.frombuffer(y, dtype=np.uint8).reshape(-1, item)
    bad = (a != b).any(axis=1)
    return int(bad.sum()), int(bad.argmax())


# --- CKPT vs OUT -----------------------------------------------------------------------------


def verify_output(
    ckpt: Path | str,
    out: Path | str,
    *,
    tag: str | None = None,
    dtype: str | None = None,
    exclude_frozen: bool = False,
    rules_file: Path | None = None,
    strip_vocab_padding: bool = True,
    from_layers: bool = False,
    progress: ProgressSink | None = None,
) -> VerifyResult:
    """Check that every tensor of the output ``out`` equals what the checkpoint holds.

    Names, dtypes, shapes and bytes are compared against the checkpoint's consolidation plan
    (fp32 master weights, frozen parameters, buffers, tied aliases). An alias present in ``out``
    must equal its canonical tensor; aliases ``out`` omits (as ``save_pretrained`` and
    safetensors do) are notes, not differences, as long as one name of the tied set is present.

    Dtypes: with ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``) every floating tensor must be in
    that dtype and equal the source cast to it as ``to-fp32 --dtype`` casts. Without it, an output
    whose floating tensors are all bf16 (or all fp16) is taken for a ``--dtype`` output; otherwise
    fp32 is expected, and a tensor kept in its saved dtype, or in a lossless widening of it (as
    DeepSpeed's ``zero_to_fp32`` keeps frozen parameters), is compared in the output's dtype and
    reported in a note.

    Raises:
        DsckptError: the checkpoint or the output cannot be read (see the message).
    """
    started = time.perf_counter()
    stored = open_output(out)
    layout = open_checkpoint(ckpt, tag)
    strict = dtype is not None
    if dtype is None:
        dtype = _dtype_of(stored)
    options = ConsolidationOptions(
        dtype,  # type: ignore[arg-type]  # ConsolidationOptions checks it
        exclude_frozen,
        rules_file,
        from_layers,
        strip_vocab_padding,
        # An AutoEP output written with --hf-names carries the fused Hugging Face expert names.
        hf_names=layout.moe is not None
        and layout.moe.autoep
        and any(n.endswith(".experts.gate_up_proj") for n in stored.tensors),
    )
    plan = plan_consolidation(layout, options)
    result = VerifyResult("output", layout.root, stored.path, stored.format)
    if dtype != "fp32" and not strict:
        result.notes.append(f"OUT holds {DTYPES[dtype]}: compared with the weights cast to it")
    progress = progress or ProgressSink()
    progress.start("verifying", sum(r.nbytes for r in stored.tensors.values()))
    by_name = {t.name: t for t in plan.tensors}
    widened: list[str] = []
    with ExitStack() as stack:
        files = _Sources(stack)
        check = _Comparer(result, progress)
        compared: dict[TensorRef, str] = {}
        for name, ref in stored.tensors.items():
            canonical = plan.aliases.get(name, name)
            expected = by_name.get(canonical)
            if expected is None:
                check.differ(
                    name,
                    "extra",
                    f"in OUT ({ref.dtype}, {list(ref.shape)}) but not in the checkpoint",
                )
                progress.advance(ref.nbytes)
                continue
            if ref.shape != expected.shape:
                check.differ(
                    name, "shape", f"OUT {list(ref.shape)}, checkpoint {list(expected.shape)}"
                )
                progress.advance(ref.nbytes)
                continue
            as_dtype = _comparable(expected, ref.dtype, strict)
            if as_dtype is None:
                check.differ(name, "dtype", f"OUT {ref.dtype}, checkpoint {expected.dtype}")
                progress.advance(ref.nbytes)
                continue
            if as_dtype != expected.dtype:
                widened.append(f"{name} ({ref.dtype})")
            if compared.get(ref) == canonical:  # a tied alias sharing its canonical's bytes
                result.tensors += 1
                progress.advance(ref.nbytes)
                continue
            compared[ref] = canonical
            alias = f"tied to {canonical}: " if canonical != name else ""
            check.values(name, _Planned(expected, as_dtype, files), _Stored(ref, files), alias)
    frozen = {t.name for t in layout.tensors if t.kind == "frozen"}
    _missing(plan, stored.tensors.keys(), frozen, result)
    if widened:
        result.notes.append(
            f"{len(widened)} in their saved dtype or a lossless widening of it, compared in "
            f"OUT's dtype: {listed(widened, SHOWN)}"
        )
    result.seconds = time.perf_counter() - started
    return result


def _dtype_of(stored: StoredOutput) -> str:
    """``bf16``/``fp16`` when every floating tensor of the output is in it, else ``fp32``."""
    floating = {r.dtype for r in stored.tensors.values() if r.dtype.is_floating}
    for name, dt in DTYPES.items():
        if floating == {dt} and name != "fp32":
            return name
    return "fp32"


def _comparable(expected: OutputTensor, found: DType, strict: bool) -> DType | None:
    """The dtype to compare in, or None when ``found`` is not a faithful dtype for the values."""
    if found == expected.dtype:
        return found
    if strict or not expected.dtype.is_floating:
        return None
    saved = {r.source.dtype for r in expected.reads}
    if saved and all(s == found or (s, found) in _WIDENINGS for s in saved):
        return found
    return None


def _missing(
    plan: ConsolidationPlan, present: Iterable[str], frozen: set[str], result: VerifyResult
) -> None:
    """Names the plan has and OUT lacks: a difference, unless another name of a tied set holds
    the values (then a note: Hugging Face and safetensors outputs drop tied duplicates)."""
    present = set(present)
    tied: dict[str, list[str]] = {}
    for alias, canonical in plan.aliases.items():
        tied.setdefault(canonical, [canonical]).append(alias)
    omitted: list[str] = []
    for tensor in plan.tensors:
        names = tied.get(tensor.name, [tensor.name])
        absent = [n for n in names if n not in present]
        if not absent:
            continue
        if len(absent) < len(names):
            holder = next(n for n in names if n in present)
            omitted.extend(f"{n} (tied to {holder})" for n in absent)
            continue
        # Only a frozen parameter can be missing on purpose (plans made with --exclude-frozen
        # hold none, so this hint never shows then).
        hint = ", frozen: --exclude-frozen if left out on purpose" if tensor.name in frozen else ""
        for n in absent:
            result.differences.append(
                Difference(n, "missing", f"{tensor.dtype} {list(tensor.shape)} not in OUT{hint}")
            )
    if omitted:
        result.notes.append(
            f"OUT omits {len(omitted)} tied alias(es), as Hugging Face outputs do: "
            + listed(omitted, SHOWN)
        )


# --- CKPT_A vs CKPT_B ------------------------------------------------------------------------


def verify_checkpoints(
    a: Path | str,
    b: Path | str,
    *,
    tag: str | None = None,
    rules_file: Path | None = None,
    progress: ProgressSink | None = None,
) -> VerifyResult:
    """Check that two DeepSpeed checkpoints hold the same training state, whatever their
    topologies: the fp32 master weights (and buffers, frozen parameters, tied aliases) by name,
    the optimizer state of every parameter (``exp_avg``, ``exp_avg_sq``, ...) and its ``step``,
    and the counters and hyper-parameters (``global_steps``, loss scaler, each param group's
    ``lr``, ``betas``, ``eps``, ``weight_decay`` ...), which are also listed in the result.

    Raises:
        UnsupportedLayout: a checkpoint whose optimizer state names no parameter (stage 0
            pipelines) or has no consolidation.
        DsckptError: a checkpoint cannot be read (see the message).
    """
    started = time.perf_counter()
    layout_a = open_checkpoint(a, tag)
    layout_b = open_checkpoint(b)
    result = VerifyResult("checkpoints", layout_a.root, layout_b.root, _topology(layout_b))
    result.notes.append(f"{_topology(layout_a)} vs {_topology(layout_b)}")
    # Megatron's vocabulary padding depends on TP: strip it (as to-fp32 does) on both sides.
    options = ConsolidationOptions(rules_file=rules_file)
    plan_a = plan_consolidation(layout_a, options)
    plan_b = plan_consolidation(layout_b, options)
    pairs: list[tuple[str, ConsolidationPlan, ConsolidationPlan]] = [("", plan_a, plan_b)]
    state_a, state_b = _optimizer_plans(layout_a, plan_a), _optimizer_plans(layout_b, plan_b)
    check_steps = None
    if state_a is not None and state_b is not None:
        for key in dict.fromkeys([*state_a.keys, *state_b.keys]):
            if key not in state_a.keys or key not in state_b.keys:
                side = "A" if key in state_a.keys else "B"
                result.differences.append(
                    Difference(key, "state", f"only checkpoint {side} keeps optimizer state {key}")
                )
                continue
            pairs.append((f"{key} of ", state_a.plans[key], state_b.plans[key]))
        check_steps = (state_a.steps, state_b.steps)
    elif state_a is not None or state_b is not None:
        raise UnsupportedLayout(
            "one checkpoint keeps ZeRO optimizer partitions and the other a stage-0 torch "
            "optimizer state keyed by position: their optimizer state cannot be matched by name"
        )
    progress = progress or ProgressSink()
    progress.start("verifying", sum(p.nbytes for _, p, _ in pairs))
    with ExitStack() as stack:
        files = _Sources(stack)
        check = _Comparer(result, progress)
        for prefix, pa, pb in pairs:
            _compare_plans(prefix, pa, pb, check, files)
        if state_a is None:
            _compare_stage0_state(layout_a, layout_b, check, files)
    if check_steps is not None:
        for name, step in check_steps[0].items():
            other = check_steps[1].get(name, step)
            if other != step:
                result.differences.append(Difference(name, "step", f"A {step}, B {other}"))
    counters_a, counters_b = _counters(layout_a), _counters(layout_b)
    for name in dict.fromkeys([*counters_a, *counters_b]):
        va, vb = counters_a.get(name), counters_b.get(name)
        result.counters.append((name, va, vb))
        if va != vb:
            result.differences.append(Difference(name, "counter", f"A {va!r}, B {vb!r}"))
    result.seconds = time.perf_counter() - started
    return result


def _topology(layout: Layout) -> str:
    stage = {"bf16_optimizer": "BF16_Optimizer"}.get(layout.optimizer, f"ZeRO-{layout.zero_stage}")
    parallel = f"TP {layout.tp} x PP {layout.pp} x " if layout.kind == "pipeline" else ""
    return f"{stage}, {parallel}DP {layout.dp}"


def _optimizer_plans(layout: Layout, master: ConsolidationPlan) -> Any:
    if layout.kind == "universal":
        raise UnsupportedLayout(
            f"{layout.dir} is a universal checkpoint: verify checks its weights against an "
            "output (`dsckpt verify CKPT OUT.safetensors`); comparing its optimizer state with "
            "another checkpoint is not supported yet"
        )
    if not layout.zero_sources:
        if layout.kind == "pipeline":
            raise UnsupportedLayout(
                f"{layout.dir} is a pipeline checkpoint without ZeRO: each stage's torch "
                "optimizer state is keyed by position, not by name, so it cannot be compared "
                "across topologies"
            )
        return None
    return plan_optimizer_state(layout, master)


def _compare_plans(
    prefix: str, a: ConsolidationPlan, b: ConsolidationPlan, check: _Comparer, files: _Sources
) -> None:
    tensors_b = {t.name: t for t in b.tensors}
    names_a = {t.name for t in a.tensors}
    for ta in a.tensors:
        tb = tensors_b.get(ta.name)
        name = prefix + ta.name
        if tb is None:
            check.differ(name, "missing", "in checkpoint A but not in B")
        elif ta.shape != tb.shape:
            check.differ(name, "shape", f"A {list(ta.shape)}, B {list(tb.shape)}")
        elif ta.dtype != tb.dtype:
            check.differ(name, "dtype", f"A {ta.dtype}, B {tb.dtype}")
        else:
            check.values(name, _Planned(ta, ta.dtype, files), _Planned(tb, tb.dtype, files))
            continue
        check.progress.advance(ta.nbytes)
    for tb in b.tensors:
        if tb.name not in names_a:
            check.differ(prefix + tb.name, "extra", "in checkpoint B but not in A")
    if a.aliases != b.aliases:
        for alias in sorted(a.aliases.keys() | b.aliases.keys()):
            if a.aliases.get(alias) != b.aliases.get(alias):
                check.differ(
                    alias,
                    "tied",
                    f"A ties it to {a.aliases.get(alias)}, B to {b.aliases.get(alias)}",
                )


def _compare_stage0_state(a: Layout, b: Layout, check: _Comparer, files: _Sources) -> None:
    """Stage 0: the torch optimizer state is whole in the model states; compare it by position
    (the DP size does not change it)."""
    state_a, state_b = _stage0_state(a), _stage0_state(b)
    for key in dict.fromkeys([*state_a, *state_b]):
        ra, rb = state_a.get(key), state_b.get(key)
        name = f"optimizer.state.{key}"
        if ra is None or rb is None:
            check.differ(name, "state", f"only checkpoint {'A' if rb is None else 'B'} has it")
        elif ra.shape != rb.shape or ra.dtype != rb.dtype:
            check.differ(
                name, "shape", f"A {ra.dtype} {list(ra.shape)}, B {rb.dtype} {list(rb.shape)}"
            )
        else:
            check.values(name, _Stored(ra, files), _Stored(rb, files))


def _stage0_state(layout: Layout) -> dict[str, TensorRef]:
    path, meta = _model_states(layout)
    osd = meta.get("optimizer") or {}
    out = {}
    for index, state in ((osd.get("state") if isinstance(osd, Mapping) else None) or {}).items():
        for key, value in state.items():
            if isinstance(value, SavedTensor):
                out[f"{index}.{key}"] = tensor_ref(path, value)
    return out


def _model_states(layout: Layout) -> tuple[Path, Mapping[str, Any]]:
    files = [f for f in layout.files if f.role in (Role.MODEL, Role.ZERO3_MODEL)]
    first = min(files, key=lambda f: (f.mp or 0, f.dp or 0))
    path = layout.dir / first.name
    return path, load_saved(path)


# Training counters kept in the model states and the optimizer files; the rest there is either
# topology (dp_world_size, partition_count, paddings) or data compared above.
_MODEL_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")
_OPTIM_COUNTERS = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad")


def _counters(layout: Layout) -> dict[str, Any]:
    path, meta = _model_states(layout)
    found: dict[str, Any] = {}
    for key in _MODEL_COUNTERS:
        _flatten(key, meta.get(key), path, found)
    optim = [f for f in layout.files if f.role is Role.OPTIM]
    if optim:
        first = min(optim, key=lambda f: (f.mp or 0, f.dp or 0))
        opath = layout.dir / first.name
        osd = load_saved(opath).get("optimizer_state_dict") or {}
        for key in _OPTIM_COUNTERS:
            _flatten(key, osd.get(key), opath, found)
        base = (
            osd.get("optimizer_state_dict" if layout.zero_stage == 3 else "base_optimizer_state")
            or {}
        )
    else:
        opath, base = path, meta.get("optimizer") or {}
    groups = base.get("param_groups") if isinstance(base, Mapping) else None
    for g, group in enumerate(groups or []):
        for key, value in group.items():
            # Topology, not training state: the flat-group indices, and a MoE expert group's
            # name, which names its expert-parallel group (ep_size_N; reshape --ep changes it).
            if key == "params" or (key == "name" and group.get("moe")):
                continue
            _flatten(f"param_groups[{g}].{key}", value, opath, found)
    return found


def _flatten(name: str, value: Any, path: Path, into: dict[str, Any]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{name}.{k}", v, path, into)
    elif hasattr(value, "__dict__") and not isinstance(value, type):  # loss scaler stand-ins
        for k, v in vars(value).items():
            _flatten(f"{name}.{k}", v, path, into)
    elif isinstance(value, SavedTensor):
        ref = tensor_ref(path, value)
        into[name] = read_scalar(ref) if ref.numel == 1 else f"tensor {list(ref.shape)}"
    elif isinstance(value, list):
        into[name] = tuple(value)
    else:
        into[name] = value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint (a save dir or tag dir), not an output."""
    if not path.is_dir():
        return False
    if (path / "latest").is_file():
        return True
    return any(classify(p) is not None for p in path.iterdir() if p.is_file()) or any(
        p.is_dir() and any(classify(q) is not None for q in p.iterdir() if q.is_file())
        for p in path.iterdir()
    )
