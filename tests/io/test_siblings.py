"""The sibling reader (ZeRO-3's per-rank model-states files, issue 16) takes its shortcuts only
where they are sound: a rank file that differs from the ones read before anywhere a full read
looks is read in full, with the full reader's verdict and message.

The files are bench/make_synthetic.py's (DeepSpeed's exact format): rank 0 records
``shared_params``, ranks 1.. do not, so ranks 2.. share rank 1's parse; each is checked against
what :func:`dsckpt.io.unpickle.load_saved` says of the same file.
"""

from __future__ import annotations

import shutil
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from make_synthetic import Spec, make  # noqa: E402

from dsckpt.discover.layout import open_checkpoint  # noqa: E402
from dsckpt.errors import DsckptError  # noqa: E402
from dsckpt.io import unpickle  # noqa: E402
from dsckpt.io.regular import open_regular  # noqa: E402
from dsckpt.io.unpickle import SavedTensor, SiblingReader, load_saved  # noqa: E402

DP = 12  # ranks 1 and 10 are torch.save's own, the others stamped from them (make_synthetic)
NAME = "zero_pp_rank_{}_mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("siblings")
    return make(Spec(stage=3, dp=DP, params=60, frozen=2), root / "z3").path


def tag(ckpt: Path) -> Path:
    return ckpt / "global_step3"


def warm(ckpt: Path) -> SiblingReader:
    """A reader that has read ranks 0-2 (rank 0's and rank 1's parses, rank 1's shape)."""
    reader = SiblingReader()
    for d in range(3):
        reader.read(tag(ckpt) / NAME.format(d))
    return reader


def fragments(value: Any, saved: Any = None) -> list[tuple[str, int, tuple[int, ...]]]:
    out = []
    for name, t in value["frozen_param_fragments"].items():
        t = saved.locate(t) if saved is not None else t
        assert isinstance(t, SavedTensor)
        out.append((name, t.offset, t.shape))
    return out


def full_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files the record-by-record zip reader reads from now on."""
    seen: list[str] = []
    own = unpickle._read_archive
    monkeypatch.setattr(
        unpickle, "_read_archive", lambda path, fd: seen.append(path.name) or own(path, fd)
    )
    return seen


def test_every_rank_reads_as_load_saved_reads_it_with_shortcuts(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = full_reads(monkeypatch)
    parses: list[str] = []
    own = unpickle._unpickle
    monkeypatch.setattr(
        unpickle, "_unpickle", lambda path, *a: parses.append(path.name) or own(path, *a)
    )
    reader = SiblingReader()
    read = {d: reader.read(tag(ckpt) / NAME.format(d)) for d in range(DP)}
    # Parsed: rank 0 and rank 1 (rank 0 alone records shared_params); read record by record:
    # the first file of each shape (rank 0; rank 1, whose data.pkl has another length; rank 10,
    # whose folder name has).
    assert parses == [NAME.format(0), NAME.format(1)]
    assert seen == [NAME.format(d) for d in (0, 1, 10)]
    for d, saved in read.items():
        path = tag(ckpt) / NAME.format(d)
        full = load_saved(path)
        assert saved.value.keys() == full.keys()
        assert saved.value["global_steps"] == full["global_steps"]
        assert fragments(saved.value, saved) == fragments(full)
        assert saved.records == unpickle._read_archive_fd(path, open_regular(path))[1]
        assert (saved.shared_with is None) == (d < 2)


def mutated(ckpt: Path, tmp: Path, change: Callable[[bytearray, Any], None]) -> Path:
    """Rank 3's file, changed in place by ``change(data, archive)``."""
    source = tag(ckpt) / NAME.format(3)
    out = tmp / source.name
    shutil.copyfile(source, out)
    archive = unpickle._read_archive(out, open_regular(out))
    data = bytearray(out.read_bytes())
    change(data, archive)
    out.write_bytes(bytes(data))
    return out


def _entry(archive: Any, suffix: str) -> int:
    """The absolute offset of the central entry of the record whose name ends with suffix."""
    i = next(i for i, r in enumerate(archive.records) if r.name.endswith(suffix))
    return archive.directory_start + archive.entries_at[i]


def _pkl_crc(data: bytearray, archive: Any) -> None:
    """Rewrite data.pkl's CRC-32 in the central directory after its bytes changed."""
    i = next(i for i, r in enumerate(archive.records) if r.name.endswith("/data.pkl"))
    start = archive.starts[i]
    crc = zlib.crc32(bytes(data[start : start + archive.records[i].size]))
    at = _entry(archive, "/data.pkl") + 16
    data[at : at + 4] = crc.to_bytes(4, "little")


def _in_pkl(old: bytes, new: bytes) -> Callable[[bytearray, Any], None]:
    def change(data: bytearray, archive: Any) -> None:
        at = data.index(old)
        data[at : at + len(new)] = new
        _pkl_crc(data, archive)

    return change


def _central(suffix: str, offset: int, value: bytes) -> Callable[[bytearray, Any], None]:
    def change(data: bytearray, archive: Any) -> None:
        at = _entry(archive, suffix) + offset
        data[at : at + len(value)] = value

    return change


def _local(suffix: str, offset: int, value: bytes) -> Callable[[bytearray, Any], None]:
    def change(data: bytearray, archive: Any) -> None:
        record = next(r for r in archive.records if r.name.endswith(suffix))
        at = record.header_offset + offset
        data[at : at + len(value)] = value

    return change


def _rename(suffix: str, new_suffix: bytes) -> Callable[[bytearray, Any], None]:
    def change(data: bytearray, archive: Any) -> None:
        at = _entry(archive, suffix) + 46
        record = next(r for r in archive.records if r.name.endswith(suffix))
        name = record.name.encode()
        assert len(new_suffix) <= len(name)
        data[at + len(name) - len(new_suffix) : at + len(name)] = new_suffix

    return change


def _global_step(step: int) -> Callable[[bytearray, Any], None]:
    def change(data: bytearray, archive: Any) -> None:
        # The key, its memo put (4 bytes), then BININT1 3 (make_synthetic's step).
        at = data.index(b"global_steps") + len(b"global_steps")
        at = data.index(b"K\x03", at, at + 8)
        data[at + 1] = step
        _pkl_crc(data, archive)

    return change


def _fragment_data(data: bytearray, archive: Any) -> None:
    # The last storages are the frozen fragments (make_synthetic's _Template): their data (and
    # CRC fields) differ per rank anyway; a different value there is not a different layout.
    key = max(archive.storages, key=int)
    start, size = archive.storages[key]
    data[start : start + size] = bytes(b ^ 0x5A for b in data[start : start + size])


# One change each: (the change, whether the reader may still share rank 1's parse)
CHANGES: dict[str, tuple[Callable[[bytearray, Any], None], bool]] = {
    "one placeholder's name in data.pkl": (_in_pkl(b"lm_head.weight", b"lm_head.wEight"), False),
    "global_steps in data.pkl": (_global_step(4), False),
    "data.pkl bytes, CRC not updated": (_local("/data.pkl", 200, b"\x00\x01\x02"), False),
    "data.pkl's CRC field": (_central("/data.pkl", 16, b"\x01\x02\x03\x04"), False),
    "a compressed record": (_central("/data/7", 10, b"\x08"), False),
    "an encrypted record": (_central("/data/7", 8, b"\x01"), False),
    "a record's size": (_central("/data/7", 20, b"\x05"), False),
    "a record's offset": (_central("/data/9", 42, b"\x00\x00"), False),
    "a local header's signature": (_local("/data/7", 0, b"PK\x05\x05"), False),
    "a local header's extra length": (_local("/data/7", 28, b"\xff\x7f"), False),
    "a record renamed into a duplicate": (_rename("/data/17", b"/data/16"), False),
    "a record renamed into a duplicate by case": (_rename("/data.pkl", b"/DATA.pkl"), False),
    "a record in another folder": (_rename("/data/7", b"X/data/7"), False),
    "the byteorder": (_local("/byteorder", 0, b"PK\x03\x05"), False),
    "a frozen fragment's values": (_fragment_data, True),
}


def _outcome(read: Callable[[Path], Any], path: Path) -> Any:
    try:
        return read(path)
    except DsckptError as exc:
        return type(exc), str(exc)


@pytest.mark.parametrize("case", list(CHANGES))
def test_a_rank_file_differing_from_its_siblings_is_judged_as_alone(
    ckpt: Path, tmp_path: Path, case: str
) -> None:
    change, may_share = CHANGES[case]
    path = mutated(ckpt, tmp_path, change)
    reader = warm(ckpt)
    got = _outcome(reader.read, path)
    alone = _outcome(load_saved, path)
    if isinstance(alone, tuple):
        assert got == alone
        return
    assert not isinstance(got, tuple), got
    assert (got.shared_with is not None) == may_share
    assert got.value.keys() == alone.keys()
    assert fragments(got.value, got) == fragments(alone)
    if not may_share:
        assert got.value is not reader.read(tag(ckpt) / NAME.format(4)).value


def test_the_changes_do_change_what_load_saved_sees(ckpt: Path, tmp_path: Path) -> None:
    """Each change above is one a full read notices (an error or another value), but the
    frozen fragment's: otherwise the test above would prove nothing."""
    rank3 = load_saved(tag(ckpt) / NAME.format(3))
    for case, (change, may_share) in CHANGES.items():
        target = tmp_path / case.replace(" ", "_").replace("'", "")
        target.mkdir()
        alone = _outcome(load_saved, mutated(ckpt, target, change))
        if may_share:
            continue
        assert isinstance(alone, tuple) or (
            list(alone["module"]) != list(rank3["module"])
            or alone["global_steps"] != rank3["global_steps"]
        ), case


def test_a_rank_with_another_global_step_is_caught_by_discovery(ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    path = tag(copy) / NAME.format(5)
    archive = unpickle._read_archive(path, open_regular(path))
    data = bytearray(path.read_bytes())
    _global_step(4)(data, archive)
    path.write_bytes(bytes(data))
    assert load_saved(path)["global_steps"] == 4
    layout = open_checkpoint(copy)
    text = " ".join(f.message for f in layout.findings)
    assert "global_steps" in text and NAME.format(5) in text, text


def test_a_corrupt_rank_file_is_a_finding_naming_it(ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    path = tag(copy) / NAME.format(7)
    data = bytearray(path.read_bytes())
    archive = unpickle._read_archive(path, open_regular(path))
    at = _entry(archive, "/data/7") + 10
    data[at] = 8
    path.write_bytes(bytes(data))
    layout = open_checkpoint(copy)
    assert NAME.format(7) in layout.unreadable
    assert any("compressed" in f.message and NAME.format(7) in f.message for f in layout.findings)


def test_discovery_takes_the_same_fragments_as_a_full_read(ckpt: Path) -> None:
    layout = open_checkpoint(ckpt)
    assert layout.frozen_fragments
    for name, refs in layout.frozen_fragments.items():
        assert len(refs) == DP
        for d, ref in enumerate(refs):
            path = tag(ckpt) / NAME.format(d)
            fragment = load_saved(path)["frozen_param_fragments"][name]
            assert (ref.path, ref.offset, ref.shape) == (path, fragment.offset, fragment.shape)
