"""Shared test helpers: the fixture corpus written by real DeepSpeed, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"
ZERO = sorted(p.name for p in (FIXTURES / "zero").glob("*/facts.json") for p in [p.parent])
PIPE = sorted(p.name for p in (FIXTURES / "pipe").glob("*/facts.json") for p in [p.parent])
MOE = sorted(p.name for p in (FIXTURES / "moe").glob("*/facts.json") for p in [p.parent])


def facts(kind: str, name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / kind / name / "facts.json").read_text())


def ckpt(kind: str, name: str) -> Path:
    return FIXTURES / kind / name / "ckpt"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous the test starts next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tag_dir(kind: str, name: str) -> Path:
    return ckpt(kind, name) / facts(kind, name)["tag"]


class RunsAShellCommand:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def copy_fixture(tmp_path: Path):
    """Copy a fixture checkpoint into tmp_path so a test may damage it."""

    def copy(kind: str, name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(ckpt(kind, name), dest)
        return dest

    return copy


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """Run the dsckpt CLI in-process at a fixed width with colour off; returns the Result."""
    from dsckpt.cli.app import app

    monkeypatch.setenv("DSCKPT_WIDTH", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("DSCKPT_DEBUG", raising=False)
    runner = CliRunner()

    def run(*args: str | Path):
        return runner.invoke(app, [str(a) for a in args])

    return run


def torchrun_jobs(
    driver: Path, world: int, jobs: list[dict[str, Any]], work: Path, label: str
) -> float:
    """Run ``driver SPEC`` under torchrun with ``world`` CPU ranks, SPEC a JSON file of
    ``{"jobs": jobs}`` (the resume tests drive several DeepSpeed runs per launch); returns the
    wall time. The log is ``work/<label>.log``; its tail is in the error if the launch fails."""
    spec = work / f"{label}.json"
    spec.write_text(json.dumps({"jobs": jobs}, indent=1))
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(world),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(driver),
        str(spec),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }
    start = time.monotonic()
    log = work / f"{label}.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"torchrun {label} exited {proc.returncode}:\n{tail}")
    return time.monotonic() - start


class ResumeRuns:
    """The work directory of a real-DeepSpeed resume proof (its runs, logs and timings).

    :meth:`open` reuses a directory kept from an earlier session (``$ENV=DIR``) when its
    ``timings.json`` says the runs finished there, so the tests check them again without
    launching anything; otherwise the harness runs them and calls :meth:`finish`. Each harness
    subclasses this with loaders for its results.
    """

    def __init__(self, work: Path) -> None:
        self.work = work
        self.timings: dict[str, float] = {}
        self.kept = False  # the runs were made by an earlier session
        self._started = time.monotonic()

    @classmethod
    def open(
        cls: type[_Runs], tmp: pytest.TempPathFactory, env: str, name: str, under: str = ""
    ) -> _Runs:
        """``$env/under`` if ``env`` is set (``under``: a harness sharing one kept directory
        with others), else a new temporary directory ``name``."""
        kept = os.environ.get(env)
        work = (Path(kept) / under if under else Path(kept)) if kept else tmp.mktemp(name)
        runs = cls(work)
        if (work / "timings.json").is_file():
            runs.timings = json.loads((work / "timings.json").read_text())
            runs.kept = True
        else:
            work.mkdir(parents=True, exist_ok=True)
        return runs

    def finish(self, what: str) -> None:
        """Record the timings (and, by their presence, that the runs are complete)."""
        self.timings["total"] = time.monotonic() - self._started
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=1))
        print(f"\n{what} runs:", json.dumps(self.timings), file=sys.stderr)


_Runs = TypeVar("_Runs", bound=ResumeRuns)


def load_output(out: Path) -> dict[str, Any]:
    """The state dict a to-fp32 output holds, whatever its format: one .safetensors or .bin
    file, or a folder of shards with or without Transformers' index (whose weight map must
    name exactly the tensors the shards hold)."""
    import torch
    from safetensors.torch import load_file

    if out.suffix == ".safetensors":
        return load_file(out)
    if out.suffix == ".bin":
        return torch.load(out, weights_only=True, mmap=True)
    if not (out / "model.safetensors.index.json").exists():  # one shard: as transformers names it
        return load_file(out / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged: dict[str, Any] = {}
    for shard in sorted(set(index["weight_map"].values())):
        merged.update(load_file(out / shard))
    assert set(merged) == set(index["weight_map"])
    return merged
