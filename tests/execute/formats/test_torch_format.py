"""torch.save zip files planned from specs (torch_file) and written by the one executor."""

import os
import random
import struct
import zipfile
import zlib

import pytest
import torch
from _memory import in_memory, raw, write

from dsckpt.execute.formats.sharding import TensorSpec
from dsckpt.execute.formats.torch_writer import crc32_combine, torch_file, torch_layout


def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "wte": torch.randn(6, 4, generator=g),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "f16": torch.randn(5, generator=g).half(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 4),
        "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(7.5),
        "empty": torch.zeros(0, 3),
        "zero_mid": torch.zeros(2, 0, 5),
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),  # pickled via _v3
        "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
        "nan": torch.tensor([float("nan"), -0.0, float("-inf")]),
    }


def specs_of(sd):
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def with_alias(sd, alias="lm_head", canonical="wte"):
    out = dict(sd)
    out[alias] = out[canonical]
    return out


def test_same_bytes_as_torch_save_but_the_serialization_id(tmp_path):
    sd = sample_state_dict()
    ref, mine = tmp_path / "ckpt.pt", tmp_path / "mine.pt"
    torch.save(with_alias(sd), ref)
    write(
        torch_file(mine.name, in_memory(sd), aliases={"lm_head": "wte"}, archive_name="ckpt"), mine
    )
    a, b = ref.read_bytes(), mine.read_bytes()
    assert len(a) == len(b)
    za, zb = zipfile.ZipFile(ref), zipfile.ZipFile(mine)
    names = [i.filename for i in za.infolist()]
    assert names == [i.filename for i in zb.infolist()]
    assert names[-1] == "ckpt/.data/serialization_id"
    for name in names[:-1]:
        assert za.read(name) == zb.read(name), name  # data.pkl included: same pickle
    # Outside the serialization id and its two CRC fields, every byte is the same.
    sid = zb.getinfo(names[-1])
    name_len, extra_len = struct.unpack("<HH", b[sid.header_offset + 26 : sid.header_offset + 30])
    start = sid.header_offset + 30 + name_len + extra_len  # its data
    allowed = set(range(start, start + 40)) | set(range(start + 44, start + 48))  # data, DD crc
    last_central = b.rindex(b"PK\x01\x02")  # the last central-directory entry is the id's
    allowed |= set(range(last_central + 16, last_central + 20))
    diff = {i for i in range(len(a)) if a[i] != b[i]}
    assert diff <= allowed


def test_loads_with_weights_only_and_mmap_bit_for_bit(tmp_path):
    sd = sample_state_dict()
    path = tmp_path / "model.bin"
    write(torch_file(path.name, in_memory(sd, 3), aliases={"lm_head": "wte"}), path)
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert list(loaded) == [*sd, "lm_head"]  # state-dict order, alias last
        for name, t in sd.items():
            assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
            assert loaded[name].stride() == t.stride(), name
            assert raw(loaded[name]) == raw(t), name
        # the alias shares the canonical tensor's storage, as in DeepSpeed's state dicts
        assert loaded["lm_head"] is loaded["wte"]
        assert (
            loaded["lm_head"].untyped_storage().data_ptr()
            == loaded["wte"].untyped_storage().data_ptr()
        )


def test_zip_crcs_are_real(tmp_path):
    sd = sample_state_dict()
    path = tmp_path / "crc.pt"
    write(torch_file(path.name, in_memory(sd)), path)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        for info in z.infolist():
            assert zlib.crc32(z.read(info.filename)) == info.CRC
            assert info.compress_type == zipfile.ZIP_STORED


def test_data_is_64_byte_aligned_and_layout_is_deterministic(tmp_path):
    sd = sample_state_dict()
    layout = torch_layout(specs_of(sd))
    assert all(r.data_offset % 64 == 0 for r in layout.records)
    assert torch_layout(specs_of(sd)) == layout
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.pt")
        write(torch_file(paths[-1].name, in_memory(sd, i)), paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_torch_offset_computing_reader_agrees(tmp_path, monkeypatch):
    # torch can compute storage offsets from its writer's rules instead of reading local
    # headers; with TORCH_SERIALIZATION_DEBUG=1 it asserts they match the real ones.
    from torch.utils.serialization import config

    sd = sample_state_dict()
    path = tmp_path / "offsets.pt"
    write(torch_file(path.name, in_memory(sd)), path)
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    before = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True
    try:
        loaded = torch.load(path, weights_only=True, mmap=True)
    finally:
        config.load.calculate_storage_offsets = before
    assert all(raw(loaded[k]) == raw(v) for k, v in sd.items())


@pytest.mark.skipif(not hasattr(torch.serialization, "skip_data"), reason="needs torch>=2.6")
def test_zip64_layout_matches_torch_beyond_4_gib(tmp_path):
    # torch.save under skip_data writes headers only (sparse file): a cheap reference for
    # the zip64 layout of a >4 GiB storage and of records after the 4 GiB mark.
    big = 4_400_000_000
    sd = {
        "small": torch.zeros(3),
        "big": torch.empty(big, dtype=torch.uint8),
        "after": torch.zeros(2),
    }
    ref = tmp_path / "big.pt"
    with torch.serialization.skip_data():
        torch.save(sd, ref)
    layout = torch_layout(specs_of(sd), archive_name="big")
    with zipfile.ZipFile(ref) as z, open(ref, "rb") as f:
        infos = z.infolist()
        assert layout.file_size == f.seek(0, os.SEEK_END)
        assert [r.name.decode() for r in layout.records] == [i.filename for i in infos]
        for rec, info in zip(layout.records, infos, strict=True):
            assert rec.header_offset == info.header_offset, info.filename
            f.seek(rec.header_offset)
            assert f.read(len(rec.local_header)) == rec.local_header, info.filename
            f.seek(rec.data_offset + rec.size)
            assert f.read(rec.descriptor_size) == rec.descriptor(info.CRC), info.filename
            if rec.payload is not None and not info.filename.endswith("serialization_id"):
                assert z.read(info.filename) == rec.payload, info.filename
        tail = layout.tail([i.CRC for i in infos])
        f.seek(layout.central_offset)
        assert f.read() == tail
    assert layout.records[5].zip64 and layout.records[6].zip64  # data/1 (big), data/2 (after)


def test_crc32_combine_matches_zlib():
    rnd = random.Random(0)
    data = rnd.randbytes(100_000)
    for _ in range(50):
        cut = rnd.randrange(len(data) + 1)
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)
    assert crc32_combine(0, zlib.crc32(b"xyz"), 3) == zlib.crc32(b"xyz")
    assert crc32_combine(zlib.crc32(b"xyz"), 0, 0) == zlib.crc32(b"xyz")


def test_layout_errors():
    with pytest.raises(ValueError, match="bad alias"):
        torch_layout([TensorSpec("a", torch.float32, (2,))], aliases={"b": "c"})
    with pytest.raises(ValueError, match="duplicate"):
        torch_layout([TensorSpec("a", torch.float32, (2,))] * 2)
