"""Safetensors files planned from specs (safetensors_file) and written by the one executor."""

import json
import struct

import pytest
import torch
from _memory import in_memory, raw, write
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsckpt.execute.executor import run
from dsckpt.execute.formats import sharded_safetensors_plan
from dsckpt.execute.formats.safetensors_writer import (
    TensorSpec,
    safetensors_dtype,
    safetensors_file,
    safetensors_layout,
)
from dsckpt.execute.formats.sharding import plan_shards


def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),  # odd byte count: tests alignment
        "f16": torch.randn(11, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.randint(-(2**40), 2**40, (4,), generator=g),
        "i32": torch.randint(-1000, 1000, (3,), dtype=torch.int32, generator=g),
        "i16": torch.randint(-1000, 1000, (3,), dtype=torch.int16, generator=g),
        "i8": torch.randint(-100, 100, (5,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=g),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    sd["f8"] = torch.randn(9, generator=g).to(torch.float8_e4m3fn)
    sd["f8e5"] = torch.randn(9, generator=g).to(torch.float8_e5m2)
    sd["u16"] = torch.arange(7, dtype=torch.int32).to(torch.uint16)
    sd["u32"] = torch.arange(7, dtype=torch.int64).to(torch.uint32)
    sd["u64"] = torch.arange(7, dtype=torch.int64).to(torch.uint64)
    sd["c64"] = torch.randn(3, dtype=torch.complex64, generator=g)
    return sd


def specs_of(sd):
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def test_byte_identical_to_safetensors_save_file(tmp_path):
    sd = sample_state_dict()
    ref, mine = tmp_path / "ref.safetensors", tmp_path / "mine.safetensors"
    save_file(sd, ref, metadata={"format": "pt"})
    write(safetensors_file(mine.name, in_memory(sd)), mine)
    assert mine.read_bytes() == ref.read_bytes()


def test_round_trip_bit_for_bit_through_safetensors_readers(tmp_path):
    sd = sample_state_dict()
    path = tmp_path / "out.safetensors"
    write(safetensors_file(path.name, in_memory(sd, 7), metadata={"source": "unit-test"}), path)
    loaded = load_file(path)
    assert set(loaded) == set(sd)
    for name, t in sd.items():
        assert loaded[name].dtype == t.dtype, name
        assert loaded[name].shape == t.shape, name
        assert raw(loaded[name]) == raw(t), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "unit-test"}
        assert raw(f.get_tensor("bf16")) == raw(sd["bf16"])
        assert f.get_slice("f32")[1:3].tolist() == sd["f32"][1:3].tolist()


def test_header_is_padded_and_every_tensor_aligned(tmp_path):
    sd = sample_state_dict()
    layout = safetensors_layout(specs_of(sd))
    (n,) = struct.unpack("<Q", layout.header[:8])
    assert n % 8 == 0 and len(layout.header) == 8 + n
    header = json.loads(layout.header[8:])
    assert next(iter(header)) == "__metadata__"
    for name, (offset, size) in layout.offsets.items():
        assert offset % sd[name].element_size() == 0, name
        assert size == sd[name].numel() * sd[name].element_size()
        start, end = header[name]["data_offsets"]
        assert (offset - 8 - n, size) == (start, end - start)
    # the layout does not depend on the order of the specs
    assert safetensors_layout(specs_of(sd)[::-1]) == layout


def test_aliases_are_stored_as_copies_of_the_canonical(tmp_path):
    wte = torch.randn(4, 3)
    path = tmp_path / "tied.safetensors"
    file = safetensors_file(
        path.name, in_memory({"wte": wte, "b": torch.ones(2)}), aliases={"lm_head": "wte"}
    )
    assert len(file.derived) == 1  # the alias: a duplicate of the canonical tensor's bytes
    write(file, path)
    loaded = load_file(path)
    assert torch.equal(loaded["lm_head"], wte) and torch.equal(loaded["wte"], wte)


def test_layout_errors():
    specs = [TensorSpec("t", torch.float32, (4,))]
    with pytest.raises(ValueError, match="bad alias"):
        safetensors_layout(specs, aliases={"a": "nope"})
    with pytest.raises(ValueError, match="cannot be stored"):
        safetensors_dtype(torch.complex128)
    with pytest.raises(ValueError, match="str to str"):
        safetensors_layout(specs, metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="duplicate"):
        safetensors_layout(specs + specs)


def test_the_planned_size_is_the_file_size(tmp_path):
    path = tmp_path / "p.safetensors"
    file = safetensors_file(path.name, in_memory({"a": torch.randn(1000)}))
    assert file.size == safetensors_layout([TensorSpec("a", torch.float32, (1000,))]).file_size
    write(file, path)
    assert path.stat().st_size == file.size


def test_sharded_output_with_index(tmp_path):
    g = torch.Generator().manual_seed(5)
    sd = {
        "wte": torch.randn(50, 10, generator=g),  # 2000 bytes
        "h.0.w": torch.randn(20, 10, generator=g),  # 800
        "h.0.b": torch.randn(10, generator=g).bfloat16(),  # 20
        "h.1.w": torch.randn(20, 10, generator=g),  # 800
        "ln.w": torch.randn(10, generator=g),  # 40
    }
    plan = plan_shards(specs_of(sd), 1000, aliases={"lm_head": "wte"})
    assert [s.names for s in plan.shards] == [
        ("wte", "lm_head"),
        ("h.0.w", "h.0.b"),
        ("h.1.w", "ln.w"),
    ]
    meta = {"dsckpt_aliases": json.dumps({"lm_head": "wte"}), "source": "ckpt/global_step3"}
    planned = sharded_safetensors_plan(
        in_memory(sd), 1000, aliases={"lm_head": "wte"}, metadata=meta
    )
    assert [f.name for f in planned.files][:-1] == [s.filename for s in plan.shards]
    run(planned, tmp_path, force=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {
        "metadata": {
            "dsckpt_aliases": '{"lm_head": "wte"}',
            "source": "ckpt/global_step3",
            "total_size": 3660,
        },
        "weight_map": {
            "h.0.b": "model-00002-of-00003.safetensors",
            "h.0.w": "model-00002-of-00003.safetensors",
            "h.1.w": "model-00003-of-00003.safetensors",
            "lm_head": "model-00001-of-00003.safetensors",
            "ln.w": "model-00003-of-00003.safetensors",
            "wte": "model-00001-of-00003.safetensors",
        },
    }
    # load as transformers does: follow the weight map
    merged = {}
    for name, filename in index["weight_map"].items():
        with safe_open(tmp_path / filename, framework="pt") as f:
            assert f.metadata() == {"format": "pt", **meta}
            merged[name] = f.get_tensor(name)
    assert all(raw(merged[k]) == raw(v) for k, v in sd.items())
    assert torch.equal(merged["lm_head"], sd["wte"])
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert planned.size == on_disk


def test_single_shard_output_has_no_index(tmp_path):
    sd = {"a": torch.randn(3), "b": torch.randn(2, 2).bfloat16()}
    files = sharded_safetensors_plan(in_memory(sd), "5GB")
    run(files, tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(raw(loaded[k]) == raw(v) for k, v in sd.items())
    assert files.size == (tmp_path / "model.safetensors").stat().st_size
