"""save_torch: any structure torch.save takes, written in one pass with lazy file-range tensors."""

import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dsckpt.execute.formats.torch_writer import (
    LazyStorages,
    pickle_for_torch,
    save_torch,
)
from dsckpt.plan.fileplan import ByteRange, Copy


def _structure():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(24, generator=g)
    sd = OrderedDict(w=flat[:12].view(3, 4), b=flat[12:16], tied=None)
    sd["tied"] = sd["w"]
    sd._metadata = OrderedDict({"": {"version": 1}, "lin": {"version": 2}})
    p = torch.nn.Parameter(torch.randn(5, generator=g), requires_grad=False)
    p.ds_id = 7
    q = torch.randn(3, generator=g).bfloat16().requires_grad_(True)
    q.note = "kept"
    return {
        "module": sd,
        "view": flat[2:20:3],  # strided view into the same storage
        "param": p,
        "attr": q,
        "step": torch.tensor(3.0),
        "ints": torch.arange(-3, 4),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
        "nested": [p, (1, "x", None), {"again": flat}],
        "scalars": {"lr": 1e-3, "betas": (0.9, 0.999)},
    }


def _storages(obj, path="", out=None):
    """``path -> storage data_ptr`` of every non-empty tensor, to compare sharing."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        if obj.numel():
            out[path] = obj.untyped_storage().data_ptr()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _storages(v, f"{path}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _storages(v, f"{path}[{i}]", out)
    return out


def _groups(obj):
    by_ptr = {}
    for path, ptr in _storages(obj).items():
        by_ptr.setdefault(ptr, set()).add(path)
    return sorted(sorted(g) for g in by_ptr.values())


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b), where
        assert (a.dtype, a.shape, a.stride(), a.storage_offset(), a.requires_grad) == (
            b.dtype,
            b.shape,
            b.stride(),
            b.storage_offset(),
            b.requires_grad,
        ), where
        assert vars(a) == vars(b), where
        assert torch.equal(
            a.detach().view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a.detach(),
            b.detach().view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b.detach(),
        ), where
        return
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, "__dict__", {}) == getattr(b, "__dict__", {}), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("crc32", [True, False])
def test_in_memory_structure_loads_as_torch_save_wrote_it(tmp_path: Path, crc32: bool) -> None:
    obj = _structure()
    torch.save(obj, tmp_path / "ref.pt")
    size = save_torch(obj, tmp_path / "ours.pt", crc32=crc32)
    assert size == (tmp_path / "ours.pt").stat().st_size
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    for kwargs in ({"weights_only": False}, {"weights_only": True}, {"mmap": True}):
        ours = torch.load(tmp_path / "ours.pt", **kwargs)
        _same(ref, ours)
        assert _groups(ours) == _groups(ref)  # shared storages stay shared
        assert ours["nested"][0] is ours["param"]
        assert ours["module"]["tied"] is ours["module"]["w"]
    with zipfile.ZipFile(tmp_path / "ours.pt") as z:
        names = [i.filename.split("/", 1)[1] for i in z.infolist()]
        assert names[:4] == ["data.pkl", ".format_version", ".storage_alignment", "byteorder"]
        assert names[-2:] == ["version", ".data/serialization_id"]
        if crc32:
            assert z.testzip() is None


def test_lazy_tensors_copy_file_ranges_and_zero_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = torch.arange(64, dtype=torch.float32)
    src.write_bytes(b"junk" * 5 + bytes(data.numpy()))  # element 0 at byte 20
    lazy = LazyStorages()
    storage = lazy.storage(64 * 4, [Copy(0, ByteRange(src, 20, 64 * 4))])
    whole = lazy.view(storage, torch.float32, 0, (8, 8), (8, 1))
    part = lazy.view(storage, torch.float32, 8, (4,), (2,))  # a strided view of it
    # elements 10..13 at 2, 40..41 at 6; the rest of the 10 elements are zeros
    padded = lazy.tensor(
        torch.float32,
        (10,),
        [Copy(8, ByteRange(src, 20 + 40, 16)), Copy(24, ByteRange(src, 20 + 160, 8))],
    )
    param = torch.nn.Parameter(padded, requires_grad=False)
    param.ds_id = 3
    obj = OrderedDict(whole=whole, part=part, param=param, mem=torch.ones(2))
    seen: list[int] = []
    save_torch(obj, tmp_path / "out.pt", lazy=lazy, progress=seen.append)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(got["whole"], data.view(8, 8))
    assert torch.equal(got["part"], data[8:16:2])
    assert got["part"].untyped_storage().data_ptr() == got["whole"].untyped_storage().data_ptr()
    expected = torch.zeros(10)
    expected[2:6], expected[6:8] = data[10:14], data[40:42]
    assert type(got["param"]) is torch.nn.Parameter and got["param"].ds_id == 3
    assert not got["param"].requires_grad and torch.equal(got["param"].data, expected)
    assert sum(seen) == 64 * 4 + 16 + 8
    with zipfile.ZipFile(tmp_path / "out.pt") as z:
        assert z.testzip() is None


def test_a_pickler_class_decides_the_global_names(tmp_path: Path) -> None:
    class Marker:
        def __init__(self) -> None:
            self.value = 1

    class Renaming(pickle._Pickler):  # type: ignore[name-defined,misc]
        def save_global(self, obj, name=None):
            if obj is Marker:
                self.write(pickle.GLOBAL + b"collections\nOrderedDict\n")
                self.memoize(obj)
                return
            super().save_global(obj, name)

    data, storages = pickle_for_torch({"m": Marker(), "t": torch.ones(3)}, Renaming)
    assert b"collections\nOrderedDict\n" in data and len(storages) == 1
    assert b"_rebuild_tensor_v2" in data


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LazyStorages"):
        save_torch({"t": torch.empty(3, device="meta")}, tmp_path / "a.pt")
    base = torch.zeros(4)
    with pytest.raises(ValueError, match="view one storage"):
        save_torch({"a": base, "b": base.view(torch.int32)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="outside"):
        LazyStorages().storage(8, [Copy(4, ByteRange(tmp_path, 0, 8))])


def test_memory_stays_flat_whatever_the_tensor_size(tmp_path: Path) -> None:
    """A 384 MB lazy tensor is written without the process growing by anything near it."""
    script = f"""
import os, resource, torch
from pathlib import Path
from dsckpt.execute.formats.torch_writer import LazyStorages, save_torch
from dsckpt.plan.fileplan import ByteRange, Copy
src = Path({str(tmp_path / "src.bin")!r})
n = 384 << 20
with open(src, "wb") as f:
    f.truncate(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lazy = LazyStorages()
t = lazy.tensor(torch.float32, (n // 4,), [Copy(0, ByteRange(src, 0, n))])
save_torch({{"t": t}}, {str(tmp_path / "out.pt")!r}, lazy=lazy)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    grown_mb = int(done.stdout.split()[-1])
    assert grown_mb < 64, grown_mb
    assert torch.load(tmp_path / "out.pt", mmap=True)["t"].shape == (96 << 20,)
