"""The multi-process protocol (dsckpt.execute.distributed): agreement, failures, lost ranks.

Each rank is a separate process talking to the leader's TCPStore, as under torchrun or srun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from dsckpt.errors import UsageError
from dsckpt.execute.distributed import World, balance, world_from_env

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).parents[1] / "_dist_driver.py"


def _run(scenario: str, size: int = 3) -> list[dict]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(DRIVER), scenario, str(rank), str(size), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(size)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        results.append(json.loads(out) if out.strip() else {"exit": proc.returncode})
    return results


def test_every_share_written_then_the_leader_commits_once() -> None:
    results = _run("ok")
    assert [r["error"] for r in results] == [None, None, None]
    assert results[0]["events"] == ["staging /tmp/staging-x", "wrote", "commit"]
    assert results[1]["events"] == results[2]["events"] == ["staging /tmp/staging-x", "wrote"]


def test_a_failing_rank_fails_every_rank_with_its_line_and_nothing_is_committed() -> None:
    results = _run("fail")
    errors = {r["error"] for r in results}
    assert len(errors) == 1, errors
    (error,) = errors
    assert error.startswith("rank 1 failed:") and "No space left on device" in error
    assert "commit" not in results[0]["events"] and "discard" in results[0]["events"]


def test_ranks_that_planned_differently_refuse_before_writing() -> None:
    results = _run("disagree")
    for r in results:
        assert r["error"] and r["error"].startswith("ranks 2 planned a different plan")
        assert r["events"] == []


def test_a_killed_rank_is_named_and_nothing_is_committed() -> None:
    results = _run("killed")
    assert results[1] == {"exit": 9}
    for r in (results[0], results[2]):
        assert r["error"].startswith("rank 1 stopped responding during writing"), r
        assert "commit" not in r["events"]
    assert "discard" in results[0]["events"]


def test_a_killed_leader_is_named_by_the_others() -> None:
    results = _run("leader-killed")
    assert results[0] == {"exit": 9}
    for r in results[1:]:
        assert r["error"].startswith("rank 0 "), r
        assert "commit" not in r["events"]


def test_balance_splits_by_bytes_deterministically() -> None:
    sizes = [5, 1, 9, 3, 3, 7, 2, 8]
    shares = balance(sizes, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes)
    assert shares == balance(sizes, 3) and all(share == sorted(share) for share in shares)
    assert balance([4], 3) == [[0], [], []]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),
        ({"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"},
         World(1, 4, "n1", 1234)),
        ({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "MASTER_ADDR": "n0"},
         World(3, 8, "n0", 29500)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, None),  # a batch script, not an srun step
    ],
)  # fmt: skip
def test_the_world_comes_from_the_launcher(env: dict, expected: World | None) -> None:
    assert world_from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "n"}, "RANK='4'"),
        ({"RANK": "-1", "WORLD_SIZE": "4", "MASTER_ADDR": "n"}, "RANK='-1'"),
        ({"RANK": "0", "WORLD_SIZE": "x", "MASTER_ADDR": "n"}, "WORLD_SIZE='x'"),
        ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "MASTER_ADDR is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n", "MASTER_PORT": "0"}, "MASTER_PORT"),
    ],
)
def test_a_malformed_launch_is_one_line(env: dict, said: str) -> None:
    with pytest.raises(UsageError, match=said):
        world_from_env(env)
