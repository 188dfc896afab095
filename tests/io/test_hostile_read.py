"""Hostile and careless INPUT files: refused with one line, never a hang, a crash or a blow-up.

Issue 10, reading side. Each class is tested through the API (the typed error, naming the file)
and, for representatives, through the CLI in a subprocess (exit 1, one line on stderr naming the
file, nothing written, the input unchanged, bounded time). Crafted files come from
tests/io/_hostile.py; real ones are copies of DeepSpeed-written fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from _hostile import (
    REPO,
    TUPLE_BOMB_USES,
    Entry,
    build_zip,
    deep_lists,
    deep_tuples,
    dict_laughs,
    flood,
    hex_int,
    huge_binunicode8,
    huge_frame,
    int_digits,
    list_laughs,
    long4,
    measure,
    numpy_ndarray_call,
    numpy_object_array_lying_about_shape,
    numpy_reconstruct_huge,
    numpy_shared_dtype_flipped,
    numpy_structured_dtype,
    self_list,
    self_namespace,
    tensor,
    torch_like,
    torch_size,
    tuple_bomb_as,
    write_torch_like,
)
from conftest import ckpt

from dsckpt.discover.files import Location, locate, read_latest, scan, survey
from dsckpt.discover.layout import open_checkpoint
from dsckpt.errors import (
    CheckpointNotFound,
    CorruptFile,
    DsckptError,
    UnreadableFile,
    UnsafeCheckpoint,
)
from dsckpt.io.load import load_meta, read_full, tensor_ref
from dsckpt.io.regular import open_regular
from dsckpt.io.unpickle import load_saved

FIXTURE = ("zero", "z2-fp32-dp2")
RANK = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
# Generous wall-clock limits: the test machine's cores are shared; CPU time is what is bounded.
HANG = 120


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of a real ZeRO-2 checkpoint (root with `latest` and global_step3/)."""
    dest = tmp_path / "ckpt"
    shutil.copytree(ckpt(*FIXTURE), dest)
    return dest


def _tag_dir(root: Path) -> Path:
    return root / (root / "latest").read_text()


def _snapshot(path: Path) -> dict[str, str]:
    """Every entry under path: a hash for regular files, the kind for anything else."""
    seen = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            seen[str(p)] = f"link {os.readlink(p)}"
        elif p.is_fifo():
            seen[str(p)] = "fifo"
        elif p.is_file():
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            seen[str(p)] = "dir"
    return seen


def _cli(*args: str | Path, timeout: float = HANG) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    env.pop("DSCKPT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "dsckpt", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def _refused_by_cli(root: Path, out_dir: Path, names: str) -> None:
    """inspect and to-fp32 both exit 1 with one stderr line naming ``names``; nothing written,
    the checkpoint unchanged."""
    before = _snapshot(root)
    out = out_dir / "out.safetensors"
    for args in (("inspect", root), ("to-fp32", root, out)):
        done = _cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        assert len(lines) == 1 and names in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert not out.exists() and not list(out_dir.glob("*.safetensors*"))
    assert _snapshot(root) == before


# -- 1. regular files only, never blocking -----------------------------------------------------


def _replace(path: Path, make: str, target: Path | None = None) -> None:
    path.unlink()
    if make == "fifo":
        os.mkfifo(path)
    elif make == "dir":
        path.mkdir()
    elif make == "devzero":
        path.symlink_to("/dev/zero")
    elif make == "loop":
        path.symlink_to(path.name)
    elif make == "dangling":
        path.symlink_to(path.parent / "gone" / path.name)
    else:
        raise ValueError(make)


NOT_FILES = {
    "fifo": "FIFO",
    "dir": "is a directory",
    "devzero": "character device",
    "loop": "symbolic link loop",
    "dangling": "dangling symbolic link",
}


@pytest.mark.parametrize("make", sorted(NOT_FILES))
def test_a_rank_file_that_is_not_a_regular_file_is_refused(root: Path, make: str) -> None:
    rank = _tag_dir(root) / RANK
    _replace(rank, make)
    with pytest.raises(UnreadableFile, match=NOT_FILES[make]) as caught:
        open_checkpoint(root)
    assert str(rank) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("make", ["fifo", "dir", "devzero"])
def test_cli_refuses_a_rank_file_that_is_not_a_regular_file(
    root: Path, tmp_path: Path, make: str
) -> None:
    _replace(_tag_dir(root) / RANK, make)
    _refused_by_cli(root, tmp_path, RANK)


@pytest.mark.parametrize(
    ("make", "said"),
    [("fifo", "FIFO"), ("dir", "directory"), ("devzero", "link"), ("dangling", "link")],
)
def test_a_latest_that_is_not_a_regular_file_is_refused(root: Path, make: str, said: str) -> None:
    _replace(root / "latest", make)
    with pytest.raises(UnreadableFile, match=f"latest: is a .*{said}.*pass --tag"):
        locate(root)


def test_cli_refuses_a_fifo_latest_without_blocking(root: Path, tmp_path: Path) -> None:
    _replace(root / "latest", "fifo")
    _refused_by_cli(root, tmp_path, "latest")


def test_verify_refuses_a_fifo_output_without_blocking(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    os.mkfifo(out)
    done = _cli("verify", root, out)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "FIFO" in lines[0] and "model.safetensors" in lines[0]


def test_a_fifo_swapped_in_after_the_check_is_caught_on_the_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_stat = os.stat
    # The name looked like a regular file when checked; by the open it is a FIFO.
    monkeypatch.setattr(
        "dsckpt.discover.files.os.stat",
        lambda p, **kw: real_stat(regular if p == fifo else p, **kw),
    )
    with pytest.raises(UnreadableFile, match="FIFO"):
        open_regular(fifo)  # O_NONBLOCK: returns at once, fstat refuses


def test_a_rank_file_linked_to_a_regular_file_elsewhere_is_read(root: Path, tmp_path: Path) -> None:
    """Decision: links to regular files are followed for reading (checkpoints live on shared
    drives and get linked); the link must end at a regular file."""
    shared = tmp_path / "shared"
    shared.mkdir()
    rank = _tag_dir(root) / RANK
    shutil.move(rank, shared / RANK)
    rank.symlink_to(shared / RANK)
    layout = open_checkpoint(root)
    assert RANK in {f.name for f in layout.files} and not layout.errors


def test_a_linked_latest_is_refused(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "tag.txt"
    elsewhere.write_text((root / "latest").read_text())
    (root / "latest").unlink()
    (root / "latest").symlink_to(elsewhere)
    with pytest.raises(UnreadableFile, match="symbolic link"):
        locate(root)


def test_linked_directories_are_tags_only_when_named(root: Path, tmp_path: Path) -> None:
    """Looking for tags (no `latest`) never follows a link out of the checkpoint; a linked tag
    directory named by --tag or `latest` is followed."""
    elsewhere = tmp_path / "elsewhere"
    shutil.move(_tag_dir(root), elsewhere)
    (root / "latest").unlink()
    (root / "global_step3").symlink_to(elsewhere)
    with pytest.raises(CheckpointNotFound, match="no DeepSpeed checkpoint files"):
        locate(root)
    assert locate(root, "global_step3").dir == root / "global_step3"
    (root / "latest").write_text("global_step3")
    assert locate(root).tag == "global_step3"


def test_listing_and_reading_errors_are_one_line_naming_the_path(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag_dir = _tag_dir(root)

    def no_listing(path: object) -> object:
        raise PermissionError(13, "Permission denied", str(path))

    with monkeypatch.context() as patch:
        patch.setattr("dsckpt.discover.files.os.scandir", no_listing)
        with pytest.raises(UnreadableFile, match="cannot be listed: permission denied") as caught:
            open_checkpoint(root)
        assert str(root) in str(caught.value)
    real_open = os.open

    def refuse(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(RANK):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("dsckpt.discover.files.os.open", refuse)
    with pytest.raises(UnreadableFile, match=f"{RANK}: cannot be read: permission denied"):
        load_saved(tag_dir / RANK)


def test_tensor_reads_open_regular_files_only(root: Path) -> None:
    path = _tag_dir(root) / MODEL
    ref = tensor_ref(path, next(iter(load_saved(path)["module"].values())))
    read_full(ref)
    _replace(path, "fifo")
    with pytest.raises(UnreadableFile, match="FIFO"):
        read_full(ref)


# -- 2. tags -----------------------------------------------------------------------------------

BAD_TAGS = {
    b"/etc": "is a path",
    b"/": "is a path",
    b"..": "not a directory name",
    b".": "not a directory name",
    b"../global_step3": "is a path",
    b"": "is empty",
    b"\n": "is empty",
    b"global_step3\x1b[31m": "control characters",
    b"global\x00step3": "control characters",
    b"a" * 300: "300 bytes long",
    b"\xff\xfeglobal": "not UTF-8",
    b"x" * 5000: "over 4 KiB",
}


@pytest.mark.parametrize("content", list(BAD_TAGS), ids=lambda c: repr(c[:20]))
def test_a_latest_naming_anything_but_one_directory_is_refused(root: Path, content: bytes) -> None:
    (root / "latest").write_bytes(content)
    with pytest.raises(CheckpointNotFound, match=BAD_TAGS[content]) as caught:
        locate(root)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


@pytest.mark.parametrize(
    "tag", [t.decode("utf-8", "surrogateescape") for t in BAD_TAGS if len(t) < 500]
)
def test_a_tag_option_naming_anything_but_one_directory_is_refused(root: Path, tag: str) -> None:
    with pytest.raises(CheckpointNotFound, match="--tag names the tag"):
        locate(root, tag)


def test_cli_refuses_a_latest_pointing_outside(root: Path, tmp_path: Path) -> None:
    (root / "latest").write_text("../../../etc")
    _refused_by_cli(root, tmp_path, "latest")


def test_a_latest_with_a_trailing_newline_is_fine(root: Path) -> None:
    (root / "latest").write_text("global_step3\n")
    assert read_latest(root / "latest") == "global_step3"
    assert locate(root).tag == "global_step3"


def test_a_huge_latest_is_judged_by_its_first_bytes(root: Path) -> None:
    with (root / "latest").open("wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB of zeros
    with pytest.raises(CheckpointNotFound, match="over 4 KiB"):
        locate(root)


# -- 3. zips -----------------------------------------------------------------------------------


def _pickle_of(value: object) -> bytes:
    import pickle

    return pickle.dumps(value, protocol=2)


def _zip_cases() -> dict[str, tuple[bytes, str]]:
    good = torch_like(_pickle_of({"a": 1}))
    evil = _pickle_of({"a": 2})
    cases: dict[str, tuple[bytes, str]] = {}
    cases["duplicate data.pkl"] = (
        build_zip([*good, Entry(b"archive/data.pkl", evil)]),
        "two records named 'archive/data.pkl'",
    )
    cases["data.pkl twice, by case"] = (
        build_zip([*good, Entry(b"archive/DATA.pkl", evil)]),
        "two records named",
    )
    zip64 = Entry(b"archive/data.pkl", good[0].data, central_size=0xFFFFFFFF)
    cases["zip64 extra missing"] = (build_zip([zip64, *good[1:]]), "malformed zip64 extra")
    short = Entry(
        b"archive/data.pkl",
        good[0].data,
        central_size=0xFFFFFFFF,
        central_extra=struct.pack("<HH", 1, 8) + b"\x00" * 4,
    )
    cases["zip64 extra past its field"] = (build_zip([short, *good[1:]]), "malformed zip64")
    too_few = Entry(
        b"archive/data.pkl",
        good[0].data,
        central_size=0xFFFFFFFF,
        central_extra=struct.pack("<HHI", 1, 4, 0),
    )
    cases["zip64 extra too short"] = (build_zip([too_few, *good[1:]]), "malformed zip64")
    cases["undecodable name"] = (
        build_zip([*good, Entry(b"archive/data/\xff\xfe", b"1234")]),
        "not valid UTF-8",
    )
    cases["records overlapping"] = (
        build_zip([*good, Entry(b"archive/data/0", b"1234", central_offset=0)]),
        "overlap",
    )
    zip_bytes = build_zip(good)
    cd_start = len(zip_bytes) - 22 - sum(46 + len(e.name) for e in good)
    cases["record over the directory"] = (
        build_zip([*good[:-1], Entry(good[-1].name, good[-1].data, central_size=cd_start)]),
        "overlaps the zip directory",
    )
    cases["size past the end"] = (
        build_zip([*good[:-1], Entry(good[-1].name, good[-1].data, central_size=1 << 31)]),
        "runs past the end",
    )
    cases["compressed storage"] = (
        build_zip([*good, Entry(b"archive/data/0", b"1234", method=8)]),
        "compressed",
    )
    cases["absurd count"] = (build_zip(good, count=0xFFFE), "not a torch zip")
    return cases


ZIP_CASES = _zip_cases()


@pytest.mark.parametrize("case", list(ZIP_CASES))
@pytest.mark.parametrize("reader", [load_saved, load_meta], ids=["load_saved", "load_meta"])
def test_damaged_zips_are_refused_by_both_readers(
    tmp_path: Path, case: str, reader: object
) -> None:
    data, reason = ZIP_CASES[case]
    path = tmp_path / MODEL
    path.write_bytes(data)
    with pytest.raises(CorruptFile, match=reason) as caught:
        reader(path)  # type: ignore[operator]
    assert str(path) in str(caught.value)


def test_the_duplicate_zip_torch_would_misread_is_refused_by_the_cli(
    root: Path, tmp_path: Path
) -> None:
    model = _tag_dir(root) / MODEL
    with zipfile.ZipFile(model) as real:
        entries = [Entry(i.filename.encode(), real.read(i)) for i in real.infolist()]
    first = next(e for e in entries if e.name.endswith(b"data.pkl"))
    model.write_bytes(build_zip([*entries, Entry(first.name, _pickle_of({"module": {}}))]))
    _refused_by_cli(root, tmp_path, MODEL)


def test_a_data_pkl_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    from dsckpt.io.unpickle import MAX_PICKLE_BYTES

    path = tmp_path / MODEL
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\0" * (MAX_PICKLE_BYTES + 1))
    with pytest.raises(UnsafeCheckpoint, match=f"data.pkl' is {MAX_PICKLE_BYTES + 1} bytes"):
        load_saved(path)


# -- 4. pickle resource bounds -------------------------------------------------------------------

CPU_LIMIT = 6.0  # seconds; the worst case measured is ~2 s on an idle core
RSS_LIMIT = 600  # MB of peak RSS for the whole reader process (interpreter included)


def _bounded(path: Path, error: str, match: str = "", how: str = "load_saved") -> None:
    result = measure(path, how)
    assert result["error"] == error, result
    assert match in result["message"] and str(path) in result["message"], result
    assert "\n" not in result["message"]
    assert result["cpu"] < CPU_LIMIT, result
    if how == "load_saved":
        assert result["maxrss_mb"] < RSS_LIMIT, result


BOMBS = {
    "list laughs": (list_laughs, "UnsafeCheckpoint", "when walked"),
    "dict and tuple laughs": (dict_laughs, "UnsafeCheckpoint", "when walked"),
    "deep lists": (deep_lists, "UnsafeCheckpoint", "more than 100 deep"),
    "deep tuples": (deep_tuples, "UnsafeCheckpoint", "more than 100 deep"),
    "list holding itself": (self_list, "UnsafeCheckpoint", "cycle"),
    "namespace holding itself": (self_namespace, "UnsafeCheckpoint", "cycle"),
    "LONG4 of 8 MB": (long4, "UnsafeCheckpoint", "integer"),
    "INT of a million digits": (int_digits, "UnsafeCheckpoint", "integer"),
    "LONG of a million hex digits": (hex_int, "UnsafeCheckpoint", "integer"),
    "BINUNICODE8 of 2**62": (huge_binunicode8, "CorruptFile", "unreadable pickle"),
    "FRAME of 2**62": (huge_frame, "CorruptFile", "unreadable pickle"),
    "torch.Size of 2**80 elements": (lambda: torch_size((2**40, 2**40)), "CorruptFile", "Size"),
    "torch.Size of 2**70": (lambda: torch_size((2**70,)), "CorruptFile", "Size"),
    "storage of 10**15 bytes": (lambda: tensor(10**15, (4,), (1,)), "CorruptFile", "holds 16"),
    "stride 0 over 10**12 elements": (
        lambda: tensor(4, (10**12,), (0,)),
        "UnsupportedLayout",
        "repeats",
    ),
    "stride 0 over 2**80 elements": (
        lambda: tensor(4, (2**40, 2**40), (0, 0)),
        "UnsupportedLayout",
        "repeats",
    ),
    "tensor past its storage": (lambda: tensor(4, (5,), (1,)), "CorruptFile", "runs past"),
    **{
        f"tuple bomb as {use}": (lambda use=use: tuple_bomb_as(use), "UnsafeCheckpoint", "tuple")
        for use in TUPLE_BOMB_USES
    },
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_pickle_bombs_are_judged_in_bounded_time_and_memory(tmp_path: Path, name: str) -> None:
    build, error, match = BOMBS[name]
    path = write_torch_like(tmp_path / MODEL, build(), {"0": b"\0" * 16})
    _bounded(path, error, match)


@pytest.mark.parametrize(
    "opcode",
    [b"\x8f", b"}", b"(", b"N", b"\x94", b"\x8c\x02ab", b"J\x00\x00\x01\x00", b"]a"],
    ids=["EMPTY_SET", "EMPTY_DICT", "MARK", "NONE", "MEMOIZE", "short str", "BININT", "lists"],
)
def test_opcode_floods_stay_under_the_memory_bound(tmp_path: Path, opcode: bytes) -> None:
    """32 MiB of the cheapest opcode that allocates most: refused by the budget, well under
    1 GB (measured worst, empty sets: ~350 MB)."""
    path = write_torch_like(tmp_path / MODEL, flood(opcode))
    _bounded(path, "UnsafeCheckpoint", "steps to build")


def test_a_torch_size_of_ten_to_the_eighteen_is_only_a_number(tmp_path: Path) -> None:
    """A Size fits int64 and allocates nothing in the reader; whether it matches the file's
    tensors is discovery's check (layout)."""
    path = write_torch_like(tmp_path / MODEL, torch_size((10**18,)))
    assert load_saved(path) == (10**18,)


NUMPY = {
    "object array lying about its shape": (numpy_object_array_lying_about_shape, "items"),
    "_reconstruct of 10**9": (numpy_reconstruct_huge, "_reconstruct"),
    "ndarray called": (numpy_ndarray_call, "not callable"),
    "structured dtype": (numpy_structured_dtype, "dtype"),
}


@pytest.mark.parametrize("name", list(NUMPY))
@pytest.mark.parametrize("how", ["load_saved", "load_meta"])
def test_numpy_reconstructors_are_checked_before_numpy_runs(
    tmp_path: Path, name: str, how: str
) -> None:
    """numpy trusts its pickled state (a lying object array crashes the interpreter); neither
    reader lets it see one, since load_meta (reshape's) reads with dsckpt's reader first."""
    pytest.importorskip("numpy")
    build, match = NUMPY[name]
    path = write_torch_like(tmp_path / MODEL, build())
    _bounded(path, "CorruptFile", match, how)


def test_numpy_dtypes_are_never_the_shared_ones(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    path = write_torch_like(tmp_path / MODEL, numpy_shared_dtype_flipped())
    flipped = load_saved(path)
    assert flipped.byteorder == ">" and np.dtype("f8").byteorder == "="


def test_real_numpy_values_still_read(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    import pickle

    values = {
        "rng": np.random.RandomState(3).get_state(),
        "objects": np.array(["a", None, 3], dtype=object),
        "scalar": np.float32(2.5),
        "big_endian": np.arange(4, dtype=">u4"),
        "big_endian_dtype": np.dtype(">u4"),
        "void": np.zeros(2, dtype="V3"),
    }
    pkl = pickle.dumps(values, protocol=2)
    theirs = pickle.loads(pkl)
    ours = load_saved(write_torch_like(tmp_path / MODEL, pkl))
    assert np.array_equal(ours["rng"][1], values["rng"][1])
    assert list(ours["objects"]) == ["a", None, 3] and ours["scalar"] == np.float32(2.5)
    assert ours["big_endian"].dtype == theirs["big_endian"].dtype
    assert list(ours["big_endian"]) == [0, 1, 2, 3]
    assert ours["big_endian_dtype"] == np.dtype(">u4") and ours["void"].dtype == np.dtype("V3")


def test_a_large_real_state_dict_stays_inside_the_budget(tmp_path: Path) -> None:
    """50k tensors with their param_shapes, as a big DeepSpeed model file holds them: read,
    with room to spare (the budget is set for ~115k)."""
    torch = pytest.importorskip("torch")
    module = {f"layers.{i}.weight": torch.zeros(2) for i in range(50_000)}
    path = tmp_path / MODEL
    torch.save({"module": module, "param_shapes": [{k: v.shape for k, v in module.items()}]}, path)
    result = measure(path)
    assert result["error"] is None, result
    assert result["cpu"] < CPU_LIMIT, result


def test_cli_refuses_a_pickle_bomb_in_a_real_checkpoint(root: Path, tmp_path: Path) -> None:
    model = _tag_dir(root) / MODEL
    write_torch_like(model, list_laughs())
    _refused_by_cli(root, tmp_path, MODEL)


def test_damaged_pickles_raise_only_dsckpt_errors_within_bounds(tmp_path: Path) -> None:
    """Random bytes after a protocol header: every outcome a DsckptError or a value."""
    import random

    rng = random.Random(10)
    path = tmp_path / MODEL
    for _ in range(300):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        write_torch_like(path, b"\x80\x02" + body)
        with contextlib.suppress(DsckptError):
            load_saved(path)


# -- 5. DeepSpeed names dsckpt does not read yet -------------------------------------------------

# MoE expert files (layer_L_expert_E_..., expp_rank_R_...) are rank files now (docs/moe.md):
# discovery checks them against the model states' `num_experts`.
UNSUPPORTED = {
    "expert_3_mp_rank_00_model_states.pt": "older naming",
    "layer_05-model_states.pt": "without a tensor-parallel rank",
    "layer_05-model_00-expert_01-model_states.pt": "other axes",
    "something_else_optim_states.pt": "of a kind dsckpt does not know",
}
UNRELATED = [
    "tokenizer.json",
    "config.json",
    "zero_to_fp32.py",
    "ref_live.pt",
    "trainer_state.json",
]


def test_unsupported_deepspeed_files_are_told_apart_from_unrelated_ones(root: Path) -> None:
    tag_dir = _tag_dir(root)
    for name in [*UNSUPPORTED, *UNRELATED]:
        (tag_dir / name).write_bytes(b"x")
    (tag_dir / "zero").mkdir()  # a directory not named like a rank file: skipped
    location = locate(root)
    found = survey(location)
    assert {f.name: f.why for f in found.unsupported}.keys() == UNSUPPORTED.keys()
    for f in found.unsupported:
        assert UNSUPPORTED[f.name] in f.why
    assert found.unrelated == sorted(UNRELATED)
    assert {f.name for f in found.rank_files} == {
        p.name for p in tag_dir.glob("*_states.pt")
    } - set(UNSUPPORTED)
    # scan() keeps its shape: unsupported names are among the unrelated ones, as before.
    rank_files, unrelated = scan(location)
    assert rank_files == found.rank_files
    assert unrelated == sorted([*UNRELATED, *UNSUPPORTED])


def test_unsupported_files_need_not_be_regular(root: Path) -> None:
    """They are refused by discovery whatever they are; listing them opens nothing."""
    moe = _tag_dir(root) / "expert_0_mp_rank_00_model_states.pt"
    os.mkfifo(moe)
    found = survey(Location(root, "global_step3", _tag_dir(root)))
    assert [f.name for f in found.unsupported] == [moe.name]
