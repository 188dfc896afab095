"""Nothing lost, nothing outside OUT, valid outputs (issue 10, output side).

* One policy for every writing command: an OUT that is, contains or sits inside the checkpoint
  (any spelling: relative, ``..``, symlinks, tag directory as CKPT and root as OUT), or would
  replace a file that is read, is refused before anything is written; beside the tag directory
  in the root is allowed (Hugging Face Trainer's ``checkpoint-N/model.safetensors``).
* ``--force`` on a directory OUT writes dsckpt's own files and removes only stale files of its
  own naming; everything else is kept. An empty directory needs no ``--force``. A failure at any
  step of the commit never leaves an index naming a missing or foreign shard.
* ``reshape`` copies only regular files of the tag directory, never a symlink's target, a FIFO
  or a device, and says what it skipped.
* File-system errors on the write path are one line naming the path; a failing clean-up never
  hides them.
* Every zip reshape writes passes ``zipfile`` checks (real CRC-32s); safetensors outputs open
  with the safetensors library.

Every refusal is checked through the CLI: exit code 1, one line on stderr, and the whole of
tmp_path (checkpoint copy included) byte-identical afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import ckpt
from safetensors import safe_open
from safetensors.numpy import load_file

Z2 = ("zero", "z2-fp32-dp2")
PIPE = ("pipe", "p2t2d1-z1-fp32")


# --------------------------------------------------------------------------- helpers


def snapshot(top: Path) -> dict[str, str]:
    """Every entry under ``top``: files by content digest, links by target, dirs and others."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(top))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def fails_cleanly(result, top: Path, before: dict[str, str], *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(top) == before
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """tmp_path/home/ckpt: a copy of a ZeRO-2 checkpoint (root with `latest`, tag global_step3)."""
    import shutil

    shutil.copytree(ckpt(*Z2), tmp_path / "home" / "ckpt", symlinks=True)
    return tmp_path / "home"


@pytest.fixture
def pipe_home(tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(ckpt(*PIPE), tmp_path / "home" / "ckpt", symlinks=True)
    return tmp_path / "home"


WRITERS = {
    "to-fp32 safetensors": ("to-fp32", "{out}.safetensors"),
    "to-fp32 bin": ("to-fp32", "{out}.bin"),
    "to-fp32 dir": ("to-fp32", "{out}"),
    "reshape --dp": ("reshape", "{out}", "--dp", "3"),
}


def command(kind: str, ckpt_path: Path | str, out: str) -> list[str]:
    cmd, out_pattern, *rest = WRITERS[kind]
    return [cmd, str(ckpt_path), out_pattern.format(out=out), *rest, "--force"]


# --------------------------------------------------------------------------- 2. overlap policy


@pytest.mark.parametrize("kind", ["to-fp32 dir", "reshape --dp"])
@pytest.mark.parametrize(
    ("spelling", "needle"),
    [
        ("home/ckpt", "is the checkpoint"),
        ("home/ckpt/", "is the checkpoint"),
        ("home/../home/ckpt", "is the checkpoint"),
        ("home/ckpt/global_step3/..", "is the checkpoint"),
        ("link-to-ckpt", "is the checkpoint"),
        ("home", "contains the checkpoint"),
        (".", "contains the checkpoint"),
        ("home/ckpt/global_step3", "is its tag directory"),
        ("link-to-ckpt/global_step3", "is its tag directory"),
        ("home/ckpt/global_step3/sub", "inside the tag directory"),
        ("home/ckpt/latest", "would replace"),
    ],
)
def test_out_overlapping_the_checkpoint_is_refused(
    cli, home: Path, monkeypatch, kind: str, spelling: str, needle: str
) -> None:
    top = home.parent
    (top / "link-to-ckpt").symlink_to(home / "ckpt", target_is_directory=True)
    monkeypatch.chdir(top)
    before = snapshot(top)
    args = command(kind, "home/ckpt", "OUT").copy()
    args[2] = spelling
    fails_cleanly(cli(*args), top, before, needle)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_tag_directory_as_ckpt_and_root_as_out(cli, home: Path, kind: str) -> None:
    """`to-fp32 home/ckpt/global_step3 home/ckpt --force` must not touch the checkpoint."""
    top = home.parent
    before = snapshot(top)
    args = command(kind, home / "ckpt" / "global_step3", str(home / "ckpt"))
    if kind.startswith("to-fp32 ") and kind != "to-fp32 dir":
        args[2] = str(home / "ckpt" / "global_step3" / Path(args[2]).name)  # inside the tag dir
    fails_cleanly(cli(*args), top, before, "the checkpoint")


@pytest.mark.parametrize("kind", ["to-fp32 safetensors", "to-fp32 bin"])
def test_out_symlink_to_a_rank_file_is_refused(cli, home: Path, kind: str) -> None:
    top = home.parent
    suffix = ".safetensors" if "safetensors" in kind else ".bin"
    rank = home / "ckpt" / "global_step3" / "mp_rank_00_model_states.pt"
    (top / f"out{suffix}").symlink_to(rank)
    before = snapshot(top)
    fails_cleanly(
        cli("to-fp32", home / "ckpt", top / f"out{suffix}", "--force"), top, before,
        "would replace", "mp_rank_00_model_states.pt",
    )  # fmt: skip


def test_out_through_a_symlinked_parent_into_the_tag_directory(cli, home: Path) -> None:
    top = home.parent
    (top / "sneaky").symlink_to(home / "ckpt" / "global_step3", target_is_directory=True)
    before = snapshot(top)
    fails_cleanly(
        cli("to-fp32", home / "ckpt", top / "sneaky" / "m.safetensors", "--force"),
        top, before, "inside the tag directory",
    )  # fmt: skip


def test_another_tag_directory_is_not_written_over(cli, home: Path) -> None:
    import shutil

    top = home.parent
    shutil.copytree(home / "ckpt" / "global_step3", home / "ckpt" / "global_step2")
    before = snapshot(top)
    for args in (
        ("to-fp32", home / "ckpt", home / "ckpt" / "global_step2", "--force"),
        ("reshape", home / "ckpt", home / "ckpt" / "global_step2", "--dp", "3", "--force"),
    ):
        fails_cleanly(cli(*args), top, before, "global_step2")


def test_beside_the_tag_directory_is_allowed(cli, home: Path) -> None:
    """Hugging Face Trainer users write checkpoint-N/model.safetensors: allowed, inputs kept."""
    root = home / "ckpt"
    before = snapshot(root)
    result = cli("to-fp32", root, root / "model.safetensors")
    assert result.exit_code == 0, result.output
    assert "embed.weight" in load_file(root / "model.safetensors")
    result = cli("reshape", root, root / "resharded", "--dp", "3", "-q")
    assert result.exit_code == 0, result.output
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before))[:2] == ["model.safetensors", "resharded"]


def test_refuse_overlap_api(home: Path) -> None:
    from dsckpt.errors import OutputError
    from dsckpt.execute.output_guard import refuse_overlap

    root, tag = home / "ckpt", home / "ckpt" / "global_step3"
    refuse_overlap(root / "model.safetensors", root=root, tag_dir=tag)
    refuse_overlap(home / "elsewhere", root=root, tag_dir=tag)
    for bad in (root, tag, home, tag / "x", root / "latest", tag / "mp_rank_00_model_states.pt"):
        with pytest.raises(OutputError):
            refuse_overlap(bad, root=root, tag_dir=tag)
    # a tag directory given as the checkpoint: root == tag_dir, everything inside is refused
    with pytest.raises(OutputError, match="inside the checkpoint"):
        refuse_overlap(tag / "m.safetensors", root=tag, tag_dir=tag)


# --------------------------------------------------------------------------- 1. --force on a dir


def shard_dir_is_valid(out: Path, expected_keys: set[str]) -> list[str]:
    """The directory's loadable state (as transformers finds it) is complete and consistent:
    the index, if there, lists existing complete shards; else model.safetensors."""
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        files = sorted(set(data["weight_map"].values()))
        assert set(data["weight_map"]) == expected_keys
        for name in files:
            with safe_open(out / name, "np") as f:  # header validity
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    assert data["weight_map"][key] == name
                    f.get_tensor(key)
        assert not (out / "model.safetensors").exists(), "a stale single file shadows the shards"
        return files
    with safe_open(out / "model.safetensors", "np") as f:
        assert set(f.keys()) == expected_keys
    return ["model.safetensors"]


def keys_of(home: Path) -> set[str]:
    from dsckpt.api.consolidation import plan_for

    return set(plan_for(home / "ckpt").names())


USER_FILES = {
    "config.json": '{"model_type": "gpt2"}',
    "tokenizer.json": "{}",
    "model-notes.txt": "mine",
    "model-00001-of-00002.bin": "not dsckpt's naming",
    "pytorch_model.bin": "old torch weights",
}


def test_force_keeps_files_dsckpt_does_not_write(cli, home: Path) -> None:
    out = home / "hf"
    out.mkdir()
    for name, text in USER_FILES.items():
        (out / name).write_text(text)
    before = snapshot(home)
    fails_cleanly(cli("to-fp32", home / "ckpt", out), home, before, "--force", "not empty")
    result = cli("to-fp32", home / "ckpt", out, "--max-shard-size", "200", "--force")
    assert result.exit_code == 0, result.output
    for name, text in USER_FILES.items():
        assert (out / name).read_text() == text
    keys = keys_of(home)
    shards = shard_dir_is_valid(out, keys)
    assert len(shards) > 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*USER_FILES, *shards, "model.safetensors.index.json"]
    )


def test_stale_shards_of_dsckpt_naming_are_removed(cli, home: Path) -> None:
    out, keys = home / "hf", keys_of(home)
    (home / "hf").mkdir()
    (out / "config.json").write_text("{}")
    assert cli("to-fp32", home / "ckpt", out, "--max-shard-size", "200", "--force").exit_code == 0
    many = shard_dir_is_valid(out, keys)
    assert cli("to-fp32", home / "ckpt", out, "--max-shard-size", "600", "--force").exit_code == 0
    fewer = shard_dir_is_valid(out, keys)
    assert len(fewer) < len(many)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", *fewer, "model.safetensors.index.json"]
    )
    # sharded -> single file: the shards and the index go, model.safetensors alone remains
    assert cli("to-fp32", home / "ckpt", out, "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    shard_dir_is_valid(out, keys)
    # single file -> shards: the single file goes (transformers would load it first)
    assert cli("to-fp32", home / "ckpt", out, "--max-shard-size", "200", "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", *many, "model.safetensors.index.json"]
    )


def test_empty_directory_needs_no_force(cli, home: Path) -> None:
    (home / "hf").mkdir()
    (home / "rs").mkdir()
    assert cli("to-fp32", home / "ckpt", home / "hf").exit_code == 0
    assert (home / "hf" / "model.safetensors").is_file()
    assert cli("reshape", home / "ckpt", home / "rs", "--dp", "3", "-q").exit_code == 0
    assert sorted(p.name for p in (home / "rs").iterdir()) == ["global_step3", "latest"]


def test_a_file_of_dsckpt_naming_that_is_a_directory_is_refused(cli, home: Path) -> None:
    out = home / "hf"
    (out / "model.safetensors").mkdir(parents=True)
    (out / "model.safetensors" / "x").write_text("mine")
    before = snapshot(home)
    fails_cleanly(cli("to-fp32", home / "ckpt", out, "--force"), home, before, "is a directory")


@pytest.mark.parametrize("fail_at", range(6))
def test_a_failure_at_any_commit_step_leaves_a_consistent_directory(
    cli, home: Path, monkeypatch, fail_at: int
) -> None:
    """Renames fail one after the other (the old index moved aside, each shard, the new index):
    whatever happened, the directory's index never names a missing or foreign shard, nothing
    staged is left, and the user's file is kept."""
    from dsckpt.execute import atomic

    out, keys = home / "hf", keys_of(home)
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert cli("to-fp32", home / "ckpt", out, "--max-shard-size", "200", "--force").exit_code == 0
    real_rename, real_replace, calls = os.rename, os.replace, []

    def counting(fn):
        def run(src, dst, *a, **k):
            calls.append(dst)
            if len(calls) == fail_at + 1:
                raise OSError(errno.EIO, "Input/output error", str(dst))
            return fn(src, dst, *a, **k)

        return run

    monkeypatch.setattr(atomic.os, "rename", counting(real_rename))
    monkeypatch.setattr(atomic.os, "replace", counting(real_replace))
    result = cli("to-fp32", home / "ckpt", out, "--max-shard-size", "400", "--force")
    monkeypatch.undo()
    assert result.exit_code == 1 and "I/O error" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert (out / "config.json").read_text() == "{}"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    index = out / "model.safetensors.index.json"
    if index.exists() or (out / "model.safetensors").exists():
        shard_dir_is_valid(out, keys)


def test_consolidate_api_into_directory_keeps_user_files(home: Path) -> None:
    import dsckpt

    out = home / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    dsckpt.consolidate(home / "ckpt", out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# --------------------------------------------------------------------------- 3. extra files


def hostile_extras(tag: Path) -> None:
    (tag / "notes.txt").write_text("keep me")
    (tag / "passwd").symlink_to("/etc/passwd")
    (tag / "environ").symlink_to("/proc/self/environ")
    (tag / "dirlink").symlink_to("/etc", target_is_directory=True)
    os.mkfifo(tag / "pipe")
    (tag / "subdir").mkdir()


@pytest.mark.parametrize(
    ("fixture", "args"),
    [("home", ("--dp", "3")), ("pipe_home", ("--tp", "1", "--pp", "1"))],
)
def test_reshape_copies_only_regular_extra_files(
    cli, request, fixture: str, args: tuple[str, ...]
) -> None:
    home = request.getfixturevalue(fixture)
    root = home / "ckpt"
    hostile_extras(root / "global_step3")
    before = snapshot(root)
    out = home / "out"
    result = subprocess.run(  # a FIFO that blocked would hang: bound it
        [sys.executable, "-m", "dsckpt", "reshape", str(root), str(out), *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "NO_COLOR": "1",
             "DSCKPT_WIDTH": "300"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tag = out / "global_step3"
    assert (tag / "notes.txt").read_text() == "keep me"
    for name in ("passwd", "environ", "dirlink", "pipe", "subdir"):
        assert not os.path.lexists(tag / name), name
        assert name in result.stdout
    assert "warning: not copied" in result.stdout
    passwd = Path("/etc/passwd").read_bytes()
    for f in tag.iterdir():
        assert passwd not in f.read_bytes()
    assert snapshot(root) == before


def test_copy_extra_files_unit(tmp_path: Path) -> None:
    from dsckpt.execute.checkpoint_dir import copy_extra_files

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    hostile_extras(src)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    names = sorted(p.name for p in src.iterdir())
    copied, skipped = copy_extra_files(src, names, dst)
    assert copied == ["big.bin", "notes.txt"]
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert sorted(s.split(" ")[0] for s in skipped) == [
        "dirlink", "environ", "passwd", "pipe", "subdir"
    ]  # fmt: skip
    assert "pipe (a FIFO)" in skipped and "passwd (a symbolic link)" in skipped


# --------------------------------------------------------------------------- 4. file-system errors


@pytest.mark.parametrize("kind", list(WRITERS))
def test_parent_is_a_file(cli, home: Path, kind: str) -> None:
    (home / "afile").write_text("x")
    before = snapshot(home)
    line = fails_cleanly(
        cli(*command(kind, home / "ckpt", str(home / "afile" / "out"))), home, before,
        "Not a directory", "afile",
    )  # fmt: skip
    assert "choose another" in line


@pytest.mark.parametrize("kind", list(WRITERS))
def test_name_too_long(cli, home: Path, kind: str) -> None:
    before = snapshot(home)
    fails_cleanly(
        cli(*command(kind, home / "ckpt", str(home / ("n" * 300)))), home, before,
        "too long",
    )  # fmt: skip


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_output_open_fails(cli, home: Path, monkeypatch, kind: str, code: int) -> None:
    """os.open of the output (a temporary inside or beside OUT) fails as on a read-only or
    forbidden directory; sources still open."""
    real_open = os.open
    out = home / "out"

    def fake_open(path, flags, *a, **k):
        name = os.fspath(path)[len(str(home)) + 1 :].lstrip(".")
        if name.startswith("out") and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    before = snapshot(home)
    line = fails_cleanly(
        cli(*command(kind, home / "ckpt", str(out))), home, before, os.strerror(code)
    )
    assert str(out) in line


@pytest.mark.parametrize("kind", ["to-fp32 safetensors", "to-fp32 dir", "reshape --dp"])
def test_commit_rename_fails_readonly(cli, home: Path, monkeypatch, kind: str) -> None:
    from dsckpt.execute import atomic

    def refuse(src, dst, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(dst))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    monkeypatch.setattr(atomic.os, "rename", refuse)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    before = snapshot(home)
    fails_cleanly(
        cli(*command(kind, home / "ckpt", str(home / "out"))), home, before, "read-only", "writable"
    )


def test_failing_cleanup_does_not_hide_the_first_error(cli, home: Path, monkeypatch) -> None:
    from dsckpt.execute import atomic

    def refuse(src, dst, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(dst))

    def cannot_remove(path):
        raise OSError(errno.EBUSY, "Device or resource busy", os.fspath(path))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    monkeypatch.setattr(atomic, "_remove", cannot_remove)
    result = cli("to-fp32", home / "ckpt", home / "out.safetensors")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Read-only file system" in lines[0], result.stderr


def test_source_read_errors_are_not_output_errors(tmp_path: Path) -> None:
    from dsckpt.execute.atomic import output_error

    dest = tmp_path / "out.safetensors"
    assert output_error(OSError(errno.EACCES, "denied", "/data/ckpt/rank.pt"), dest) is None
    mapped = output_error(
        OSError(errno.EACCES, "denied", str(tmp_path / ".out.tmp")), dest, [tmp_path / ".out.tmp"]
    )
    assert mapped is not None and "Permission denied" not in str(mapped)  # strerror as given
    assert "denied" in str(mapped) and str(dest) in str(mapped)
    assert output_error(OSError(errno.ENOSPC, "full"), dest) is not None


# --------------------------------------------------------------------------- 5. valid zips


def zip_ok(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None, path
        names = z.namelist()
        assert len(names) == len(set(names))
    result = subprocess.run(
        [sys.executable, "-m", "zipfile", "-t", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0 and "Done testing" in result.stdout, result


@pytest.mark.parametrize(
    "name", ["z1-bf16-dp2", "z2-fp32-dp2", "z2-fp16-dp3", "z3-fp32-dp3", "z1-bf16-dp4-padrank"]
)
def test_reshape_dp_zips_pass_zip_checks(cli, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    assert (
        cli(
            "reshape", ckpt("zero", name), out, "--dp", "2" if "dp3" in name else "3", "-q"
        ).exit_code
        == 0
    )
    files = sorted((out / (out / "latest").read_text()).iterdir())
    assert files
    for f in files:
        zip_ok(f)


@pytest.mark.parametrize("args", [("--dp", "4"), ("--dp", "4", "--ep", "1")])
def test_moe_reshape_zips_pass_zip_checks(cli, tmp_path: Path, args: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    assert cli("reshape", ckpt("moe", "z2-fp32-ep2-dp2"), out, *args, "-q").exit_code == 0
    files = sorted((out / (out / "latest").read_text()).iterdir())
    assert any("expert" in f.name for f in files)
    for f in files:
        zip_ok(f)


@pytest.mark.parametrize(
    "args", [("--tp", "1"), ("--pp", "1", "--dp", "2"), ("--tp", "1", "--pp", "2")]
)
def test_reshape_3d_zips_pass_zip_checks(cli, tmp_path: Path, args: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    result = cli("reshape", ckpt(*PIPE), out, *args, "-q")
    assert result.exit_code == 0, result.output
    for f in sorted((out / "global_step3").iterdir()):
        zip_ok(f)


def test_to_fp32_outputs_are_valid(cli, tmp_path: Path) -> None:
    src = ckpt("zero", "z3-fp32-dp3")
    assert cli("to-fp32", src, tmp_path / "m.bin").exit_code == 0
    zip_ok(tmp_path / "m.bin")
    assert cli("to-fp32", src, tmp_path / "m.safetensors").exit_code == 0
    with safe_open(tmp_path / "m.safetensors", "np") as f:
        assert f.metadata()["format"] == "pt"
    assert cli("to-fp32", src, tmp_path / "hf", "--max-shard-size", "200").exit_code == 0
    from dsckpt.api.consolidation import plan_for

    shard_dir_is_valid(tmp_path / "hf", set(plan_for(src).names()))


def test_crc_copier_with_holes_and_chunks(tmp_path: Path) -> None:
    from dsckpt.execute.formats.crc import CrcCopier, zero_crc

    data = os.urandom(5 << 20)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(dst, 7 << 20)
        with CrcCopier(chunk=1 << 20) as c:
            parts = [(None, 1 << 20), *c.copy(src, 0, dst, 1 << 20, len(data)), (None, 1 << 20)]
            crc = c.crc_of(parts)
            again = c.crc_of(c.crc_file(dst, 0, 7 << 20))
    finally:
        os.close(src)
        os.close(dst)
    expected = zlib.crc32(bytes(1 << 20) + data + bytes(1 << 20))
    assert crc == expected == again
    assert all(zero_crc(n) == zlib.crc32(bytes(n)) for n in (0, 1, 5, 4097, 1 << 20))


def test_save_torch_overlapping_ranges_get_the_crc_of_the_bytes_written(tmp_path: Path) -> None:
    import torch

    from dsckpt.execute.formats.torch_writer import LazyStorages, save_torch
    from dsckpt.plan.fileplan import ByteRange, Copy

    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 64)
    lazy = LazyStorages()
    ranges = [
        Copy(0, ByteRange(src, 0, 4096)),
        Copy(1024, ByteRange(src, 8192, 2048)),  # overlap
        Copy(6000, ByteRange(src, 100, 100)),
    ]  # after a hole
    t = lazy.tensor(torch.uint8, (8192,), ranges)
    save_torch({"t": t}, tmp_path / "out.pt", lazy=lazy)
    zip_ok(tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)["t"]
    raw = src.read_bytes()
    want = bytearray(8192)
    want[0:4096] = raw[0:4096]
    want[1024:3072] = raw[8192:10240]
    want[6000:6100] = raw[100:200]
    assert bytes(got.numpy()) == bytes(want)


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "x\0y"])
def test_atomic_entries_names_stay_inside(tmp_path: Path, name: str) -> None:
    from dsckpt.errors import OutputError
    from dsckpt.execute.atomic import atomic_entries

    entries = atomic_entries(tmp_path / "out", [name, "latest"], dirs={name})
    with pytest.raises(OutputError, match="single file name"), entries:
        pass
    assert list(tmp_path.iterdir()) == []
