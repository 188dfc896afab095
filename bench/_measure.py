"""Shared helpers for the benchmarks: measured subprocesses, cache control, tables.

Each tool runs as its own child process so that its wall time and memory are its own. Memory is
taken two ways, because neither alone tells the whole story:

* ``peak_rss``: the kernel's exact high-water mark from ``os.wait4`` (``ru_maxrss``). For a process
  tree the kernel reports the largest *single* process, not the sum, so it undercounts tools that
  fan out to worker processes (``ds_to_universal``) or several ranks (torchrun).
  Linux also folds the RSS of the process that forked the child into the child's ``ru_maxrss``
  (the pre-exec copy of the parent's memory counts): a child of this benchmark, which holds torch
  and compared tensors, would report at least the benchmark's own size. So every tool is started
  by a small stdlib-only launcher (``python -I -S _measure.py --launch``, ~10 MB), the way
  ``/usr/bin/time`` does it, and that launcher does the ``wait4``.
* ``tree_rss``: the sum over the process tree, sampled every 20 ms from ``/proc/PID/status``.
  Sampling can miss a spike shorter than the interval, but it sees every worker at once. It is an
  upper bound: a forked worker's copy-on-write pages count in the parent and in the worker (exact
  sharing needs ``smaps_rollup``, whose 70 ms per read of a 3 GB process would load the CPU that
  is being measured). ``peak_anon`` is the anonymous part (heap, tensors) of the largest process:
  file pages a tool maps with ``mmap`` count in RSS too, yet belong to the page cache.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = Path("/tmp/dsckpt-bench")
SAMPLE_SECONDS = 0.02
MB = 1_000_000
# A CPU-only DeepSpeed needs no GPU probing. Thread counts are left as users would have them: both
# tools run one at a time, each with the whole machine.
QUIET_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Measurement:
    """One measured child process (and its descendants)."""

    wall_s: float
    peak_rss: int  # bytes, exact, largest single process of the tree
    tree_rss: int  # bytes, sampled, sum over the tree (an upper bound, see above)
    peak_anon: int  # bytes, sampled, anonymous memory of the largest process
    returncode: int


class CommandFailed(RuntimeError):
    pass


def bin_path(name: str) -> str:
    """An executable next to this interpreter (the venv), else the first one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **QUIET_ENV, **(extra or {})}


def _proc_tree(root: int) -> list[int]:
    """The pid and every descendant, read from /proc (children lists of every thread)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:  # the process ended between listing and reading
            continue
    return pids


def _rss_of(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) of one process in bytes; zeros once it has gone."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


class _TreeSampler(threading.Thread):
    """Polls the child's process tree: the largest summed RSS and single-process anon RSS seen."""

    def __init__(self, pid: int, skip_root: bool = False) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.skip_root = skip_root  # the launcher is not part of what is measured
        self.peak_rss = 0
        self.peak_anon = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pids = _proc_tree(self.pid)
            sizes = [_rss_of(p) for p in (pids[1:] if self.skip_root else pids)]
            self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
            self.peak_anon = max(self.peak_anon, *(s[1] for s in sizes), 0)
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_measured(
    cmd: Sequence[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> Measurement:
    """Run ``cmd`` with output to ``log``; wall time, exact and sampled peak memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = log.with_suffix(".rusage.json")
    launcher = [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--launch", str(result)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*launcher, "--", *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or child_env(),
            cwd=cwd,
        )
        sampler = _TreeSampler(proc.pid, skip_root=True)
        sampler.start()
        proc.wait()
        sampler.stop()
    if proc.returncode != 0 and not result.exists():
        raise CommandFailed(f"the launcher failed ({proc.returncode}); see {log}")
    usage = json.loads(result.read_text())
    result.unlink()
    if check and usage["returncode"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise CommandFailed(f"exit {usage['returncode']}: {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return Measurement(
        wall_s=usage["wall_s"],
        peak_rss=usage["maxrss"],
        tree_rss=sampler.peak_rss,
        peak_anon=sampler.peak_anon,
        returncode=usage["returncode"],
    )


def _launch(result: str, cmd: list[str]) -> int:
    """Run ``cmd``, reap it with ``os.wait4`` and write its wall time and ``ru_maxrss``.

    Runs in the small launcher process, so the child inherits ~10 MB, not the benchmark's size;
    ``wait4`` returns this child's own ``rusage``, which ``getrusage(RUSAGE_CHILDREN)`` cannot
    (it is a running maximum over every child so far).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
    with open(result, "w") as fh:
        json.dump({"wall_s": wall, "maxrss": usage.ru_maxrss * 1024, "returncode": code}, fh)
    return 0


def drop_caches() -> bool:
    """Empty the page cache (needs root); False where the sandbox forbids it."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dsckpt_has(command: str) -> bool:
    """Whether the installed ``dsckpt`` offers ``command`` (others may still be writing it)."""
    try:
        exe = bin_path("dsckpt")
    except FileNotFoundError:
        return False
    done = subprocess.run([exe, command, "--help"], capture_output=True, env=child_env())
    return done.returncode == 0


def alternating(names: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """ABAB...: every round runs each tool once, so a shared machine's slow drifts hit all alike."""
    for round_no in range(repeats):
        for name in names:
            yield round_no, name


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / MB:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table (pastes into issues and terminals alike)."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


if __name__ == "__main__":
    # python -I -S _measure.py --launch RESULT.json -- CMD...   (see run_measured)
    if len(sys.argv) < 5 or sys.argv[1] != "--launch" or sys.argv[3] != "--":
        raise SystemExit("usage: _measure.py --launch RESULT.json -- CMD...")
    raise SystemExit(_launch(sys.argv[2], sys.argv[4:]))
