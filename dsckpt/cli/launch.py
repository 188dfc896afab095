"""Commands as processes of a ``torchrun`` / ``srun`` launch, or of ``--workers N`` on this
machine (docs/large-checkpoints.md)."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dsckpt.errors import UsageError
from dsckpt.execute.distributed import World, launched, world_from_env

# How long rank 0 waits for local workers to end after it has (they end right after it).
_WORKER_EXIT_SECONDS = 60


@contextmanager
def as_launched(
    workers: int = 1,
    command: Callable[..., None] | None = None,
    params: dict[str, Any] | None = None,
) -> Iterator[bool]:
    """Run the command as this process's share when a launcher started several (it set
    ``RANK``/``WORLD_SIZE``, or an srun step has several tasks), or with ``workers`` > 1 as
    rank 0 of that many local processes running ``command`` (the Typer command function) with
    this invocation's ``params``. Yields whether this process reports: rank 0 shows the
    progress bar and the result, the others stay quiet."""
    world = world_from_env()
    if workers < 1:
        raise UsageError(f"--workers {workers}: give 1 or more processes")
    if world is not None or workers == 1 or command is None:
        with launched(world):
            yield world is None or world.is_leader
        return
    with _local_workers(workers, command, params or {}) as local, launched(local):
        yield True


@contextmanager
def _local_workers(
    count: int, command: Callable[..., None], params: dict[str, Any]
) -> Iterator[World]:
    """Start ranks 1..count-1 of this command on this machine; this process is rank 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    world = World(0, count, "127.0.0.1", port)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited state
    children = []
    for rank in range(1, count):
        env = {"RANK": str(rank), "WORLD_SIZE": str(count), "MASTER_ADDR": world.host,
               "MASTER_PORT": str(port)}  # fmt: skip
        child = spawn.Process(target=_worker, args=(env, command, params), daemon=True)
        child.start()
        children.append(child)
    try:
        yield world
    finally:
        for child in children:
            child.join(_WORKER_EXIT_SECONDS)
            if child.is_alive():
                child.kill()
                child.join()


def _worker(env: dict[str, str], command: Callable[..., None], params: dict[str, Any]) -> None:
    """One local worker: the command as rank ``env["RANK"]``. Rank 0 reports every rank's
    failure in its own line, so a worker prints nothing and only sets its exit status."""
    os.environ.update(env)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        command(**params)
    except BaseException:
        os._exit(1)
