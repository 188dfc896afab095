import json
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsckpt.execute.formats.safetensors_writer import (
    IncompleteOutputError,
    SafetensorsWriter,
    ShardedSafetensorsWriter,
    TensorSpec,
    safetensors_dtype,
    safetensors_layout,
    sharded_safetensors_size,
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


def raw(t):
    """Exact bytes of a tensor (bit-for-bit comparison, NaN included)."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def write_in_random_pieces(writer, sd, seed=1):
    """Split every tensor into up to 3 byte pieces and write all pieces in shuffled order."""
    rnd = random.Random(seed)
    pieces = []
    for name, t in sd.items():
        flat = t.contiguous().reshape(-1)
        n = flat.numel()
        cuts = sorted({0, n, *(rnd.randrange(n + 1) for _ in range(2))}) if n else [0, 0]
        for a, b in zip(cuts, cuts[1:], strict=False):
            pieces.append((name, a * t.element_size(), flat[a:b]))
    rnd.shuffle(pieces)
    for name, offset, piece in pieces:
        writer.write(name, offset, piece)


def test_byte_identical_to_safetensors_save_file(tmp_path):
    sd = sample_state_dict()
    ref, mine = tmp_path / "ref.safetensors", tmp_path / "mine.safetensors"
    save_file(sd, ref, metadata={"format": "pt"})
    with SafetensorsWriter(mine, specs_of(sd)) as w:
        write_in_random_pieces(w, sd)
    assert mine.read_bytes() == ref.read_bytes()


def test_round_trip_bit_for_bit_through_safetensors_readers(tmp_path):
    sd = sample_state_dict()
    path = tmp_path / "out.safetensors"
    with SafetensorsWriter(path, specs_of(sd), metadata={"source": "unit-test"}) as w:
        write_in_random_pieces(w, sd, seed=7)
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


def test_many_threads_share_one_writer(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {f"layer{i}.weight": torch.randn(64, 33, generator=g) for i in range(40)}
    path = tmp_path / "threads.safetensors"
    jobs = []
    for name, t in sd.items():
        flat = t.reshape(-1)
        for a in range(0, flat.numel(), 500):
            jobs.append((name, a * 4, flat[a : a + 500]))
    random.Random(0).shuffle(jobs)
    with SafetensorsWriter(path, specs_of(sd)) as w, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: w.write(*job), jobs))
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_accepts_bytes_like_pieces(tmp_path):
    t = torch.arange(6, dtype=torch.float32)
    path = tmp_path / "b.safetensors"
    with SafetensorsWriter(path, [TensorSpec("t", torch.float32, (2, 3))]) as w:
        w.write("t", 0, raw(t[:2]))  # bytes
        w.write("t", 8, bytearray(raw(t[2:4])))
        w.write("t", 16, t[4:].numpy())  # buffer protocol
    assert torch.equal(load_file(path)["t"], t.reshape(2, 3))


def test_aliases_are_stored_as_copies_written_with_the_canonical(tmp_path):
    wte = torch.randn(4, 3)
    specs = [TensorSpec("wte", torch.float32, (4, 3)), TensorSpec("b", torch.float32, (2,))]
    path = tmp_path / "tied.safetensors"
    with SafetensorsWriter(path, specs, aliases={"lm_head": "wte"}) as w:
        w.write("wte", 24, wte[2:])
        w.write("wte", 0, wte[:2])
        w.write("b", 0, torch.ones(2))
        with pytest.raises(KeyError, match="lm_head"):
            w.write("lm_head", 0, wte)
    loaded = load_file(path)
    assert torch.equal(loaded["lm_head"], wte) and torch.equal(loaded["wte"], wte)


def test_write_errors(tmp_path):
    specs = [TensorSpec("t", torch.float32, (4,))]
    with SafetensorsWriter(tmp_path / "e.safetensors", specs) as w:
        with pytest.raises(ValueError, match=r"is torch.bfloat16 but the output is torch.float32"):
            w.write("t", 0, torch.zeros(4, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match=r"outside its 16 bytes"):
            w.write("t", 8, torch.zeros(3))
        with pytest.raises(ValueError, match="outside"):
            w.write("t", -4, torch.zeros(1))
        with pytest.raises(ValueError, match="contiguous"):
            w.write("t", 0, torch.zeros(4, 2)[:, 0])
        with pytest.raises(KeyError):
            w.write("nope", 0, b"")
        w.write("t", 0, torch.zeros(4))
    with pytest.raises(ValueError, match="closed"):
        w.write("t", 0, torch.zeros(4))
    with pytest.raises(ValueError, match="cannot be stored"):
        safetensors_dtype(torch.complex128)
    with pytest.raises(ValueError, match="str to str"):
        safetensors_layout(specs, metadata={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="duplicate"):
        safetensors_layout(specs + specs)


def test_incomplete_tensor_is_reported_at_close(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    w = SafetensorsWriter(tmp_path / "i.safetensors", specs)
    w.write("a", 0, torch.zeros(4))
    w.write("b", 0, torch.zeros(1))
    w.write("b", 12, torch.zeros(1))
    with pytest.raises(IncompleteOutputError, match=r"'b' .* bytes \[4, 12\) of 16 were never"):
        w.close()
    assert w._fd is None  # closed anyway


def test_leaving_with_an_exception_skips_the_check(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,))]
    with pytest.raises(RuntimeError, match="boom"), SafetensorsWriter(tmp_path / "x", specs):
        raise RuntimeError("boom")


def test_file_is_preallocated_to_its_final_size(tmp_path):
    specs = [TensorSpec("a", torch.float32, (1000,))]
    path = tmp_path / "p.safetensors"
    w = SafetensorsWriter(path, specs)
    assert path.stat().st_size == w.nbytes == w.layout.file_size
    w.close(check=False)


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
    meta = {"dsckpt_aliases": json.dumps({"lm_head": "wte"})}
    with ShardedSafetensorsWriter(
        tmp_path, plan, metadata=meta, index_metadata={"source": "ckpt/global_step3"}
    ) as w:
        write_in_random_pieces(w, sd)
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
    assert (
        sharded_safetensors_size(
            plan, metadata=meta, index_metadata={"source": "ckpt/global_step3"}
        )
        == on_disk
    )


def test_single_shard_output_has_no_index(tmp_path):
    sd = {"a": torch.randn(3), "b": torch.randn(2, 2).bfloat16()}
    plan = plan_shards(specs_of(sd), "5GB")
    with ShardedSafetensorsWriter(tmp_path, plan) as w:
        write_in_random_pieces(w, sd)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(raw(loaded[k]) == raw(v) for k, v in sd.items())
    assert sharded_safetensors_size(plan) == (tmp_path / "model.safetensors").stat().st_size


def test_sharded_incomplete_writes_no_index(tmp_path):
    sd = {"a": torch.randn(300), "b": torch.randn(300)}
    plan = plan_shards(specs_of(sd), 1200)
    w = ShardedSafetensorsWriter(tmp_path, plan)
    w.write("a", 0, sd["a"])
    with pytest.raises(IncompleteOutputError, match="'b'"):
        w.close()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_locate_serves_callers_doing_their_own_io(tmp_path):
    # The executor's Sink protocol: (fd, absolute offset), then os.pwrite/copy_file_range.
    wte, b = torch.randn(4, 3), torch.randn(5).bfloat16()
    src = tmp_path / "src.bin"
    src.write_bytes(raw(wte))
    specs = [TensorSpec("wte", torch.float32, (4, 3)), TensorSpec("b", torch.bfloat16, (5,))]
    path = tmp_path / "located.safetensors"
    with SafetensorsWriter(path, specs, aliases={"lm_head": "wte"}) as w:
        fd, offset = w.locate("wte")
        with open(src, "rb") as f:
            assert os.copy_file_range(f.fileno(), fd, 48, 0, offset) == 48
        w.write("b", 0, b)
        with pytest.raises(KeyError):
            w.locate("lm_head")
    loaded = load_file(path)
    assert torch.equal(loaded["wte"], wte) and torch.equal(loaded["b"], b)
    assert torch.equal(loaded["lm_head"], wte)  # copied from the located tensor at close


def test_sharded_locate_routes_to_the_right_shard(tmp_path):
    sd = {"a": torch.randn(100), "b": torch.randn(100)}
    plan = plan_shards(specs_of(sd), 400)
    with ShardedSafetensorsWriter(tmp_path, plan) as w:
        for name, t in sd.items():
            fd, offset = w.locate(name)
            os.pwrite(fd, raw(t), offset)
    for shard in plan.shards:
        loaded = load_file(tmp_path / shard.filename)
        assert all(torch.equal(loaded[t.name], sd[t.name]) for t in shard.tensors)
