import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest

import dsckpt.execute.atomic as atomic
from dsckpt.errors import DsckptError, OutputError
from dsckpt.execute.atomic import (
    atomic_output,
    check_disk_space,
    preallocate,
    stale_temporaries,
)
from dsckpt.execute.executor import write_plan_file
from dsckpt.plan.fileplan import FilePlan, Literal
from dsckpt.sizes import exact_bytes

REPO = Path(__file__).resolve().parents[2]


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if ".dsckpt-" in p.name)


def test_file_appears_only_on_success(tmp_path):
    dest = tmp_path / "out.safetensors"
    with atomic_output(dest) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.safetensors.dsckpt-tmp-")
        assert not tmp.exists() and not dest.exists()
        tmp.write_bytes(b"complete")
        assert not dest.exists()
    assert dest.read_bytes() == b"complete"
    assert leftovers(tmp_path) == []


def test_missing_parents_are_created(tmp_path):
    dest = tmp_path / "a" / "b" / "out.bin"
    with atomic_output(dest) as tmp:
        tmp.write_bytes(b"x")
    assert dest.read_bytes() == b"x"


def test_existing_dest_is_refused_without_force(tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"old")
    with pytest.raises(OutputError) as info, atomic_output(dest):
        pytest.fail("the body must not run")
    assert str(info.value) == f"{dest} exists: pass --force to overwrite"
    assert isinstance(info.value, DsckptError)
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_dangling_symlink_counts_as_existing(tmp_path):
    dest = tmp_path / "link"
    dest.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="exists"), atomic_output(dest):
        pass


def test_force_replaces_a_file(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with atomic_output(dest, force=True) as tmp:
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old"  # untouched until the end
    assert dest.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replaces_a_directory(tmp_path, monkeypatch, exchange):
    if not exchange:  # the portable path: move the old tree aside, rename, delete
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "stale-00001-of-00009.safetensors").write_bytes(b"old")
    with atomic_output(dest, force=True, is_dir=True) as tmp:
        assert tmp.is_dir()
        (tmp / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_directory_output(tmp_path):
    dest = tmp_path / "out"
    with atomic_output(dest, is_dir=True) as tmp:
        (tmp / "a.safetensors").write_bytes(b"1")
        assert not dest.exists()
    assert (dest / "a.safetensors").read_bytes() == b"1"


def test_file_and_directory_do_not_replace_each_other(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    single = "is a directory and the output is a single file"
    with pytest.raises(OutputError, match=single), atomic_output(d, force=True):
        pass
    f = tmp_path / "f"
    f.write_bytes(b"keep")
    directory = "is a file and the output is a directory"
    with pytest.raises(OutputError, match=directory), atomic_output(f, force=True, is_dir=True):
        pass
    assert d.is_dir() and f.read_bytes() == b"keep"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_any_exception_removes_the_temporary(tmp_path, exc):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(type(exc)), atomic_output(dest, force=True) as tmp:
        tmp.write_bytes(b"partial")
        raise exc
    assert dest.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_exception_removes_a_temporary_directory(tmp_path):
    with pytest.raises(ValueError), atomic_output(tmp_path / "o", is_dir=True) as tmp:
        (tmp / "x").write_bytes(b"1")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_dest_appearing_meanwhile_is_not_overwritten(tmp_path):
    dest = tmp_path / "out.bin"
    with pytest.raises(OutputError, match="exists"), atomic_output(dest) as tmp:
        tmp.write_bytes(b"mine")
        dest.write_bytes(b"someone else's")
    assert dest.read_bytes() == b"someone else's"
    assert leftovers(tmp_path) == []


def test_nothing_written_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"), atomic_output(tmp_path / "o"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_output_is_fsynced_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1]
    )
    with atomic_output(tmp_path / "o") as tmp:
        tmp.write_bytes(b"1")
    assert events == ["fsync", "rename", "fsync"]  # file, rename, directory


Usage = namedtuple("Usage", "total used free")


def fake_disk(monkeypatch, free):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def test_simulated_enospc_from_pwrite_becomes_one_line_error(tmp_path, monkeypatch):
    dest = tmp_path / "model.safetensors"
    planned = FilePlan(dest.name, 4000, (Literal(0, bytes(4000)),))

    def full_disk(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    fake_disk(monkeypatch, 1234)
    with (
        pytest.raises(OutputError) as info,
        atomic_output(dest, nbytes=4_096_000) as tmp,
    ):
        monkeypatch.setattr(os, "pwrite", full_disk)
        write_plan_file(planned, tmp)
    assert str(info.value) == (
        f"no space left on device writing {dest}: "
        "need 4096000 bytes (4.1 MB), 1234 bytes (1.2 kB) free"
    )
    assert isinstance(info.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_enospc_at_preallocation_fails_before_writing(tmp_path, monkeypatch):
    def no_room(fd, mode, offset, length):
        return -1

    monkeypatch.setattr(atomic, "_libc_fallocate", lambda: no_room)
    monkeypatch.setattr(atomic.ctypes, "get_errno", lambda: errno.ENOSPC)
    dest = tmp_path / "model.bin"
    with (
        pytest.raises(
            OutputError, match=r"no space left on device writing .*model\.bin: need more"
        ),
        atomic_output(dest) as tmp,
    ):
        write_plan_file(FilePlan(dest.name, 40, (Literal(0, bytes(40)),)), tmp)
        pytest.fail("the executor must not write")
    assert list(tmp_path.iterdir()) == []


def test_enospc_wrapped_in_another_exception_is_recognised(tmp_path):
    with pytest.raises(OutputError, match="no space left"), atomic_output(tmp_path / "o") as tmp:
        tmp.write_bytes(b"x")
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("write failed") from e


def test_unsupported_fallocate_leaves_a_sparse_file(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc_fallocate", lambda: lambda *a: -1)
    monkeypatch.setattr(atomic.ctypes, "get_errno", lambda: errno.EOPNOTSUPP)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert preallocate(fd, 10_000) is False
        assert os.fstat(fd).st_size == 10_000
    finally:
        os.close(fd)


def test_preallocate_reserves_blocks(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        if preallocate(fd, 1 << 20):
            assert os.fstat(fd).st_blocks * 512 >= 1 << 20
        assert os.fstat(fd).st_size == 1 << 20
    finally:
        os.close(fd)


def test_check_disk_space(tmp_path, monkeypatch):
    fake_disk(monkeypatch, 5_000_000_000)
    check_disk_space(tmp_path / "not" / "yet" / "there", 4_000_000_000)
    with pytest.raises(OutputError) as info:
        check_disk_space(tmp_path / "out.safetensors", 28_000_000_000)
    assert str(info.value) == (
        f"not enough free space to write {tmp_path / 'out.safetensors'}: need 28000000000 bytes "
        "(28.0 GB), 5000000000 bytes (5.0 GB) free: free some space or choose another output path"
    )


def test_check_disk_space_measures_the_real_filesystem(tmp_path):
    check_disk_space(tmp_path, 1)
    with pytest.raises(OutputError, match="not enough free space"):
        check_disk_space(tmp_path, shutil.disk_usage(tmp_path).free + 10**15)


def test_exact_bytes():
    assert exact_bytes(512) == "512 bytes"
    assert exact_bytes(1500) == "1500 bytes (1.5 kB)"
    assert exact_bytes(28_000_000_000) == "28000000000 bytes (28.0 GB)"


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dsckpt.execute.atomic import atomic_output
    with atomic_output(Path(sys.argv[1])) as tmp:
        tmp.write_bytes(b"half of a checkpoint")
        print(tmp, flush=True)
        time.sleep(60)
    """
)


def start_child(dest):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(dest)], stdout=subprocess.PIPE, text=True, env=env
    )
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists() and tmp.parent == dest.parent
    return proc, tmp


def test_sigterm_cleans_up_and_leaves_nothing_at_dest(tmp_path):
    dest = tmp_path / "out.safetensors"
    proc, tmp = start_child(dest)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not dest.exists() and not tmp.exists()
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_only_a_recognisable_temporary(tmp_path):
    dest = tmp_path / "out.safetensors"
    proc, tmp = start_child(dest)
    assert stale_temporaries(tmp_path) == []  # its process is alive
    proc.kill()
    proc.wait(timeout=30)
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == [tmp.name]
    assert tmp.name.startswith(".out.safetensors.dsckpt-tmp-")
    assert stale_temporaries(tmp_path) == [tmp]


def test_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic_output(tmp_path / "o") as tmp:
        assert signal.getsignal(signal.SIGTERM) is not before
        tmp.write_bytes(b"x")
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_next_run_removes_temporaries_of_a_process_that_is_gone(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead, alive = int(gone.stdout), os.getpid()
    out = tmp_path / "model.safetensors"
    stale = tmp_path / f".model.safetensors.dsckpt-tmp-{dead}-0123abcd"
    live = tmp_path / f".model.safetensors.dsckpt-tmp-{alive}-0123abcd"
    aside = tmp_path / f".model.safetensors.dsckpt-old-{dead}-0123abcd"  # an earlier output
    other = tmp_path / f".other.safetensors.dsckpt-tmp-{dead}-0123abcd"  # another output's
    for path in (stale, live, aside, other):
        path.write_bytes(b"x")
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert not stale.exists() and live.exists() and aside.exists() and other.exists()
