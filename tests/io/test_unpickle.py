"""The torch-free reader: same structure, tensors and byte offsets as torch's own loader, no torch.

Every fixture file is read twice, by :func:`dsckpt.io.unpickle.load_saved` and by
:func:`dsckpt.io.load.load_meta` (torch's restricted unpickler, meta tensors), and the results are
compared value by value; the bytes at each :class:`SavedTensor`'s offset are compared with the
tensor torch maps from the same file.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import enum
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FIXTURES, RunsAShellCommand

from dsckpt.errors import CorruptFile, UnsafeCheckpoint, UnsupportedLayout, UsageError
from dsckpt.io import dtypes
from dsckpt.io.load import load_mapped, load_meta, tensor_ref
from dsckpt.io.unpickle import Device, SavedStorage, SavedTensor, load_saved

REPO = Path(__file__).parents[2]
FILES = sorted(FIXTURES.rglob("*.pt"))
# One test per fixture checkpoint (zero/z2-bf16-dp2, pipe/p2t2d2-z1-fp32, ...), all its files.
GROUPS = sorted({"/".join(p.relative_to(FIXTURES).parts[:2]) for p in FILES})


def _pairs(ours: Any, theirs: Any, where: str) -> Iterator[tuple[str, Any, Any]]:
    """Walk both results in step, asserting the same structure; yield tensor/storage pairs."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, SavedTensor), where
        yield where, ours, theirs
    elif isinstance(theirs, torch.storage.TypedStorage):
        assert isinstance(ours, SavedStorage), where
        yield where, ours, theirs
    elif isinstance(theirs, torch.Size):
        assert type(ours) is tuple and ours == tuple(theirs), where
    elif isinstance(theirs, torch.dtype):
        assert ours is dtypes.from_torch(theirs), where
    elif isinstance(theirs, torch.device):
        assert isinstance(ours, Device) and str(ours) == str(theirs), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        for key in theirs:
            yield from _pairs(ours[key], theirs[key], f"{where}[{key!r}]")
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            yield from _pairs(a, b, f"{where}[{i}]")
    elif isinstance(theirs, np.ndarray):
        assert type(ours) is np.ndarray and ours.dtype == theirs.dtype, where
        assert np.array_equal(ours, theirs), where
    elif isinstance(theirs, enum.Enum):
        assert ours is theirs, where
    elif isinstance(theirs, argparse.Namespace) or type(theirs).__module__.startswith("dsckpt"):
        # Namespace, the DeepSpeed stand-ins (dataclasses and plain attribute holders)
        assert type(ours) is type(theirs), where
        yield from _pairs(vars(ours), vars(theirs), f"{where}.")
    else:
        assert type(ours) is type(theirs), where
        same_nan = isinstance(theirs, float) and math.isnan(theirs) and math.isnan(ours)
        assert same_nan or ours == theirs, where


def _compare(path: Path) -> int:
    """Compare load_saved with load_meta for one file; the number of tensors compared."""
    ours, theirs = load_saved(path), load_meta(path)
    record_of_key: dict[str, int] = {}
    key_of_record: dict[int, str] = {}
    count = 0
    for where, saved, meta in _pairs(ours, theirs, path.name):
        if isinstance(meta, torch.storage.TypedStorage):
            assert saved.nbytes == meta._untyped_storage.nbytes(), where
            assert saved.record_offset == meta._untyped_storage._checkpoint_offset, where
            continue
        count += 1
        assert saved.dtype is dtypes.from_torch(meta.dtype), where
        assert saved.shape == tuple(meta.shape), where
        assert saved.stride == meta.stride(), where
        assert saved.storage_offset == meta.storage_offset(), where
        assert saved.requires_grad == meta.requires_grad, where
        assert saved.is_parameter == isinstance(meta, torch.nn.Parameter), where
        assert set(saved.attrs) == set(vars(meta)), where
        list(_pairs(saved.attrs, vars(meta), f"{where} attrs"))
        assert saved.offset == tensor_ref(path, meta).offset, where
        assert saved.storage_numel * saved.dtype.itemsize == meta.untyped_storage().nbytes()
        assert saved.numel() == meta.numel() and saved.dim() == meta.dim(), where
        assert saved.nbytes == meta.nbytes and saved.element_size() == meta.element_size()
        assert saved.is_contiguous() == meta.is_contiguous(), where
        assert saved.is_floating_point() == meta.is_floating_point(), where
        for name, value in vars(meta).items():
            assert getattr(saved, name) == value, where
        # Tied weights and views: one storage key per record, and back.
        record = meta.untyped_storage()._checkpoint_offset
        assert record_of_key.setdefault(saved.storage_key, record) == record, where
        assert key_of_record.setdefault(record, saved.storage_key) == saved.storage_key, where
    return count


def _compare_bytes(path: Path) -> None:
    """The bytes at each SavedTensor's offset are the tensor torch maps from the file."""
    raw = path.read_bytes()
    for where, saved, real in _pairs(load_saved(path), load_mapped(path), path.name):
        if isinstance(saved, SavedStorage):
            start = saved.record_offset
            assert raw[start : start + saved.nbytes] == bytes(real._untyped_storage), where
            continue
        torch_dtype = dtypes.to_torch(saved.dtype)
        span = raw[saved.offset : saved.offset + saved.span_bytes]
        if saved.numel() == 0:
            assert real.numel() == 0, where
            continue
        flat = torch.frombuffer(bytearray(span), dtype=torch_dtype)
        mine = torch.as_strided(flat, saved.shape, saved.stride)
        as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (mine, real.detach())]
        assert torch.equal(*as_bytes), where


@pytest.mark.parametrize("group", GROUPS)
def test_every_fixture_file_reads_as_torch_reads_it(group: str) -> None:
    files = [p for p in FILES if "/".join(p.relative_to(FIXTURES).parts[:2]) == group]
    assert files
    for path in files:
        _compare(path)
        _compare_bytes(path)


def test_the_fixtures_cover_what_checkpoints_hold() -> None:
    """The corpus really exercises the interesting cases (else the comparison proves little)."""
    seen: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SavedTensor):
            seen.add(f"dtype {value.dtype}")
            seen.update(f"attr {k}" for k in value.attrs)
            if value.requires_grad:
                seen.add("requires_grad")
        elif isinstance(value, dict):
            seen.add(type(value).__name__)
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        else:
            seen.add(type(value).__name__)
            if isinstance(value, argparse.Namespace):
                walk(vars(value))

    for path in FILES:
        walk(load_saved(path))
    assert {"dtype float32", "dtype bfloat16", "dtype float16", "dtype int64"} <= seen
    assert {"attr ds_id", "requires_grad", "OrderedDict", "Namespace", "ndarray"} <= seen
    assert {"DType", "ZeroStageEnum", "LossScaler", "DynamicLossScaler", "FragmentAddress"} <= seen


def _everything_torch_save_writes() -> dict[str, Any]:
    base = torch.arange(24, dtype=torch.float32)
    flat = torch.ones(8, dtype=torch.bfloat16, requires_grad=True)
    flat.ds_id = "1_1"  # type: ignore[attr-defined]  # ZeRO-3 flat groups carry one
    param = torch.nn.Parameter(torch.randn(2, 3))
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    return {
        "base": base,
        "view": base[5:17].view(3, 4),
        "transposed": base.view(4, 6).t(),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 5, dtype=torch.float16),
        "flat": flat,
        "param": param,
        "frozen": torch.nn.Parameter(torch.ones(4), requires_grad=False),
        "tied": [param, param],
        "f8": torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn),
        "f8b": torch.linspace(-2, 2, 6).to(torch.float8_e5m2),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
        "ints": [torch.arange(3, dtype=t) for t in (torch.int8, torch.int16, torch.int32)],
        "mask": torch.tensor([True, False, True]),
        "c64": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64),
        "storage": torch.arange(4, dtype=torch.uint8).untyped_storage(),
        "size": torch.Size([2, 3]),
        "device": torch.device("cuda", 1),
        "cpu": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "set": {1, 2},
        "complex": 1 + 2j,
        "bytes": b"\x00\xffab",
        "bytearray": bytearray(b"xyz"),
        "counter": collections.Counter("aab"),
        "ordered": collections.OrderedDict(b=1, a=2),
        "nested": (1, 2.5, None, True, "s", float("nan")),
    }


def test_everything_torch_save_writes_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "everything.pt"
    torch.save(_everything_torch_save_writes(), path)
    assert _compare(path) >= 15
    _compare_bytes(path)
    ours = load_saved(path)
    assert ours["param"].is_parameter and ours["param"].tensor_model_parallel is True
    assert ours["tied"][0].storage_key == ours["tied"][1].storage_key == ours["param"].storage_key
    assert ours["view"].storage_key == ours["base"].storage_key
    assert ours["view"].offset == ours["base"].offset + 5 * 4
    assert not ours["transposed"].is_contiguous()
    assert ours["flat"].ds_id == "1_1" and not ours["flat"].is_parameter
    assert str(ours["device"]) == "cuda:1" and str(ours["dtype"]) == "bfloat16"
    with pytest.raises(TypeError, match="immutable"):  # what a pickle's BUILD would call
        ours["base"].__setstate__({"offset": 0})


def test_a_framed_pickle_protocol_reads_too(tmp_path: Path) -> None:
    # torch's weights_only unpickler refuses protocol 4 (FRAME); ours reads it the same as 2.
    paths = [tmp_path / "p2.pt", tmp_path / "p4.pt"]
    everything = _everything_torch_save_writes()
    for protocol, path in zip((2, 4), paths, strict=True):
        torch.save(everything, path, pickle_protocol=protocol)
    p2, p4 = (load_saved(path) for path in paths)
    assert list(p2) == list(p4)
    for key, value in p2.items():
        if isinstance(value, SavedTensor):
            other = p4[key]
            assert (value.dtype, value.shape, value.stride, value.attrs) == (
                other.dtype,
                other.shape,
                other.stride,
                other.attrs,
            )
            data = [
                path.read_bytes()[t.offset : t.offset + t.span_bytes]
                for path, t in zip(paths, (value, other), strict=True)
            ]
            assert data[0] == data[1], key


def test_a_pickle_that_would_run_a_command_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": RunsAShellCommand(marker)}, evil)
    with pytest.raises(UnsafeCheckpoint, match=r"`posix\.system`.*not on dsckpt's allow-list"):
        load_saved(evil)
    assert not marker.exists()


def _torch_zip(path: Path, pickle_bytes: bytes, **zip_options: Any) -> Path:
    """A zip laid out as torch.save lays it out, holding a hand-written pickle."""
    with zipfile.ZipFile(path, "w", **zip_options) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
    return path


def test_a_pickle_cannot_change_an_allowed_class(tmp_path: Path) -> None:
    # GLOBAL argparse.Namespace, BUILD (None, {"__repr__": set}): sets a class attribute.
    pkl = b"\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00__repr__c__builtin__\nset\ns\x86b."
    path = _torch_zip(tmp_path / "x.pt", pkl)
    before = dict(vars(argparse.Namespace))
    with pytest.raises(UnsafeCheckpoint, match="change the class `Namespace`"):
        load_saved(path)
    assert dict(vars(argparse.Namespace)) == before


def test_a_pickle_cannot_change_a_dtype(tmp_path: Path) -> None:
    pkl = b"\x80\x02ctorch\nfloat32\nN}X\x08\x00\x00\x00itemsizeK\x08s\x86b."
    with pytest.raises(CorruptFile, match="unreadable pickle"):
        load_saved(_torch_zip(tmp_path / "x.pt", pkl))
    assert dtypes.FLOAT32.itemsize == 4


def test_tensor_kinds_it_does_not_read_are_unsupported_not_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "sparse.pt"
    torch.save({"s": torch.eye(3).to_sparse()}, path)
    with pytest.raises(UnsupportedLayout, match="_rebuild_sparse_tensor"):
        load_saved(path)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04truncated"])
def test_files_that_are_not_torch_zips_are_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CorruptFile, match="x.pt"):
        load_saved(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file_is_corrupt(tmp_path: Path, keep: float) -> None:
    source = max(FILES, key=lambda p: p.stat().st_size)
    path = tmp_path / source.name
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptFile, match=source.name):
        load_saved(path)


def test_a_zip_without_data_pkl_or_with_compression_is_corrupt(tmp_path: Path) -> None:
    empty_zip = tmp_path / "empty.pt"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("archive/version", "3")
    with pytest.raises(CorruptFile, match="no archive/data.pkl"):
        load_saved(empty_zip)
    packed = _torch_zip(tmp_path / "packed.pt", b"\x80\x02}.", compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(CorruptFile, match="compressed"):
        load_saved(packed)


def test_a_missing_storage_record_is_corrupt(tmp_path: Path) -> None:
    source = max(FILES, key=lambda p: p.stat().st_size)
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(path, "w") as new:
        for info in old.infolist():
            if "/data/" not in info.filename:
                new.writestr(info, old.read(info))
    with pytest.raises(CorruptFile, match="storage record data/0"):
        load_saved(path)


def test_loading_every_fixture_never_imports_torch() -> None:
    script = (
        "import sys, pathlib\n"
        "from dsckpt.io.unpickle import load_saved\n"
        f"files = sorted(pathlib.Path({str(FIXTURES)!r}).rglob('*.pt'))\n"
        "for path in files:\n"
        "    load_saved(path)\n"
        "assert len(files) > 100, len(files)\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO)
    timing = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import dsckpt.io.unpickle"],
        check=True,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    imported = [line.rsplit("|", 1)[-1].strip() for line in timing.stderr.splitlines()]
    assert "dsckpt.io.unpickle" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy")]


def test_saved_tensors_copy_and_pickle(tmp_path: Path) -> None:
    import copy
    import pickle

    path = tmp_path / "t.pt"
    torch.save({"p": torch.nn.Parameter(torch.ones(2))}, path)
    tensor = load_saved(path)["p"]
    for clone in (copy.deepcopy(tensor), pickle.loads(pickle.dumps(tensor))):
        assert isinstance(clone, SavedTensor)
        assert (clone.offset, clone.shape, clone.is_parameter) == (
            tensor.offset,
            tensor.shape,
            True,
        )
    assert "Parameter float32[2]" in repr(tensor)


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", dtypes.ALL, ids=str)
def test_each_dtype_matches_torch_and_safetensors(dtype: dtypes.DType) -> None:
    from safetensors.torch import _TYPES  # the codes safetensors itself uses

    torch_dtype = dtypes.to_torch(dtype)
    assert str(torch_dtype) == f"torch.{dtype}"
    assert dtypes.from_torch(torch_dtype) is dtype
    assert dtypes.by_name(dtype.name) is dtype is dtypes.by_name(f"torch.{dtype.name}")
    assert torch.empty((), dtype=torch_dtype).element_size() == dtype.itemsize
    assert torch_dtype.is_floating_point == dtype.is_floating
    if dtype.safetensors_code is not None:
        assert _TYPES[dtype.safetensors_code] == torch_dtype


def test_legacy_storage_names_match_torch() -> None:
    for torch_dtype, name in torch.storage._dtype_to_storage_type_map().items():
        if name.startswith("Q"):  # quantized
            continue
        assert dtypes.from_storage_type(name) is dtypes.from_torch(torch_dtype)
        assert dtypes.from_storage_type(f"torch.{name}") is dtypes.from_torch(torch_dtype)
    assert dtypes.from_storage_type("torch.storage.UntypedStorage") is dtypes.UINT8
    assert dtypes.by_name("half") is dtypes.FLOAT16 and dtypes.by_name("float") is dtypes.FLOAT32
    with pytest.raises(UsageError, match="unknown dtype 'fp33'"):
        dtypes.by_name("fp33")
    with pytest.raises(UsageError):
        dtypes.from_storage_type("QInt8Storage")


def test_the_bench_script_runs(tmp_path: Path) -> None:
    script = REPO / "bench" / "bench_unpickle.py"
    if not script.exists():  # pragma: no cover
        pytest.skip("no bench script")
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--repeat",
            "1",
            "--files",
            "2",
            "--no-big",
            "--synthetic",
            "50",
            "--no-fresh",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    ).stdout
    assert "load_saved" in out


def test_damaged_pickles_raise_only_dsckpt_errors(tmp_path: Path) -> None:
    """Byte flips all over data.pkl: each load succeeds or fails with a DsckptError."""
    import random

    from dsckpt.errors import DsckptError

    source = next(p for p in FILES if p.name == "mp_rank_00_model_states.pt")
    with zipfile.ZipFile(source) as archive:
        names = archive.namelist()
        contents = {name: archive.read(name) for name in names}
    pkl_name = next(n for n in names if n.endswith("/data.pkl"))
    rng = random.Random(0)
    path = tmp_path / "damaged.pt"
    for _ in range(300):
        pkl = bytearray(contents[pkl_name])
        for _ in range(rng.randint(1, 3)):
            pkl[rng.randrange(len(pkl))] = rng.randrange(256)
        with zipfile.ZipFile(path, "w") as archive:
            for name in names:
                archive.writestr(name, bytes(pkl) if name == pkl_name else contents[name])
        with contextlib.suppress(DsckptError):
            load_saved(path)
