"""to-fp32 and reshape as several processes (dsckpt.execute.distributed): the same bytes as one
process, and one failure line on every rank with nothing committed when a rank fails."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ckpt, free_port

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parents[1] / "_dist_driver.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

Z2 = ckpt("zero", "z2-bf16-dp2")
Z3 = ckpt("zero", "z3-fp32-dp3")
PIPE = ckpt("pipe", "p2t2d2-z1-fp32")
MOE = ckpt("moe", "z2-fp32-ep2x4-dp4-mixed")


def _launch(
    args: list[str], size: int = 3, fault: str = "none"
) -> list[subprocess.CompletedProcess]:
    """``dsckpt ARGS`` as ``size`` processes, the launcher's variables set as torchrun sets them."""
    port = free_port()
    procs = []
    for rank in range(size):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DSCKPT_LOST_AFTER": "3",
        }
        env.pop("DSCKPT_DEBUG", None)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(DRIVER), "cli", fault, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _alone(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(name, None)
    subprocess.run([sys.executable, "-m", "dsckpt", *args], check=True, env=env,
                   capture_output=True)  # fmt: skip


def _same_tree(a: Path, b: Path) -> None:
    if a.is_file():
        assert filecmp.cmp(a, b, shallow=False), (a, b)
        return
    names = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*"))
    for name in names:
        if (a / name).is_file():
            assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.mark.parametrize(
    ("args", "out"),
    [
        (["to-fp32", Z2], "model.safetensors"),
        (["to-fp32", Z2], "model.bin"),
        (["to-fp32", Z2, "--max-shard-size", "1KB"], "hf"),
        (["to-fp32", Z3, "--optimizer"], "hf"),
        (["reshape", Z3, "--dp", "2"], "ckpt"),
        (["reshape", PIPE, "--tp", "1", "--pp", "1", "--dp", "2"], "ckpt"),
        (["reshape", MOE, "--dp", "8"], "ckpt"),
    ],
    ids=[
        "safetensors",
        "bin",
        "shards",
        "optimizer",
        "reshape-zero3",
        "reshape-pipeline",
        "reshape-moe",
    ],
)
def test_shares_of_several_processes_write_the_bytes_of_one(
    tmp_path: Path, args: list, out: str
) -> None:
    head, rest = [str(a) for a in args[:2]], [str(a) for a in args[2:]]
    launched, alone = tmp_path / "launched" / out, tmp_path / "alone" / out
    results = _launch([*head, str(launched), *rest])
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert results[0].stdout.startswith("wrote ")
    assert results[1].stdout == results[2].stdout == ""  # only rank 0 reports
    _alone([*head, str(alone), *rest])
    _same_tree(launched, alone)


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failed_rank_fails_the_run_and_commits_nothing(tmp_path: Path, fault: str) -> None:
    out = tmp_path / "out" / "hf"
    results = _launch(["to-fp32", str(Z2), str(out), "--max-shard-size", "1KB"], fault=fault)
    survivors = [r for rank, r in enumerate(results) if not (fault == "kill" and rank == 1)]
    lines = {r.stderr.strip() for r in survivors}
    assert all(r.returncode == 1 for r in survivors), [r.stderr for r in results]
    assert len(lines) == 1 and "Traceback" not in next(iter(lines)), lines
    (line,) = lines
    if fault == "raise":
        assert line.startswith("error: rank 1 failed: ") and "Input/output error" in line
    else:
        assert results[1].returncode == 9
        assert line.startswith("error: rank 1 stopped responding")
    assert "nothing was committed" in line
    assert list(tmp_path.iterdir()) == []  # no output, no temporaries, not even the parent made


def test_ranks_that_planned_differently_refuse_before_writing(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "m.safetensors"
    procs = []
    for rank, dtype in enumerate(["fp32", "fp32", "bf16"]):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "3",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dsckpt", "to-fp32", str(Z2), str(out), "--dtype", dtype],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ))  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 1 and err.startswith("error: ranks 2 planned a different plan")
    assert list(tmp_path.iterdir()) == []


# What issue 16 names: to-fp32 to one file and sharded, reshape --dp and --tp/--pp/--dp.
LAUNCHED = pytest.mark.parametrize(
    ("args", "out"),
    [
        (["to-fp32", Z3], "model.safetensors"),
        (["to-fp32", Z3, "--max-shard-size", "1KB"], "hf"),
        (["reshape", Z3, "--dp", "2"], "ckpt"),
        (["reshape", PIPE, "--tp", "1", "--pp", "1", "--dp", "2"], "ckpt"),
    ],
    ids=["to-fp32", "to-fp32-shards", "reshape-dp", "reshape-3d"],
)


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DSCKPT_DEBUG", None)
    return subprocess.run(
        [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(free_port()), *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


def _dsckpt() -> str:
    found = shutil.which("dsckpt", path=str(Path(sys.executable).parent))
    assert found is not None
    return found


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun comes with torch")
@LAUNCHED
def test_under_torchrun(tmp_path: Path, args: list, out: str) -> None:
    head, rest = [str(a) for a in args[:2]], [str(a) for a in args[2:]]
    done = _torchrun("--no-python", _dsckpt(), *head, str(tmp_path / "two" / out), *rest)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1
    _alone([*head, str(tmp_path / "one" / out), *rest])
    _same_tree(tmp_path / "two" / out, tmp_path / "one" / out)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun comes with torch")
def test_a_rank_killed_under_torchrun_commits_nothing(tmp_path: Path) -> None:
    """torchrun stops the other rank when one dies: nothing is committed, and what the dead
    run left (its staging) is removed by the next run into the same OUT."""
    out = tmp_path / "out" / "hf"
    args = ["to-fp32", str(Z2), str(out), "--max-shard-size", "1KB"]
    done = _torchrun(str(DRIVER), "cli", "kill", *args)
    assert done.returncode != 0
    assert not out.exists()
    _alone(args)
    assert [p.name for p in tmp_path.rglob("*") if p.parent == out.parent] == ["hf"]
    _alone([*args[:2], str(tmp_path / "one"), *args[3:]])
    _same_tree(out, tmp_path / "one")


@pytest.mark.parametrize(
    ("args", "out"),
    [
        (["to-fp32", Z3, "--max-shard-size", "1KB"], "hf"),
        (["to-fp32", Z2], "model.bin"),
        (["reshape", Z3, "--dp", "2"], "ckpt"),
    ],
    ids=["shards", "bin", "reshape"],
)
def test_workers_on_one_machine_write_the_bytes_of_one_process(
    tmp_path: Path, args: list, out: str
) -> None:
    head, rest = [str(a) for a in args[:2]], [str(a) for a in args[2:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "dsckpt", *head, str(tmp_path / "w" / out), *rest, "--workers", "3"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("wrote "), done.stderr
    _alone([*head, str(tmp_path / "one" / out), *rest])
    _same_tree(tmp_path / "w" / out, tmp_path / "one" / out)


def test_workers_below_one_are_refused(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "dsckpt", "to-fp32", str(Z2), str(tmp_path / "m.safetensors"),
         "--workers", "0"], capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.startswith("error: --workers 0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun comes with torch")
@LAUNCHED
def test_two_nodes_on_one_machine(tmp_path: Path, args: list, out: str) -> None:
    """Two torchrun invocations, one per "node", meeting at a c10d rendezvous on 127.0.0.1."""
    head, rest = [str(a) for a in args[:2]], [str(a) for a in args[2:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dsckpt = _dsckpt()
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "dsckpt-test",
                "--no-python",
                dsckpt,
                *head,
                str(tmp_path / "two" / out),
                *rest,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(stdout.count("wrote ") for stdout, _ in outputs) == 1  # rank 0 alone reports
    _alone([*head, str(tmp_path / "one" / out), *rest])
    _same_tree(tmp_path / "two" / out, tmp_path / "one" / out)
