"""Running one conversion as several processes, across nodes, under ``torchrun`` or ``srun``.

Every process discovers and plans the same checkpoint (planning is deterministic), then writes a
disjoint share of the output; one process, the leader (rank 0), commits the output only once every
share is written. The processes coordinate through torch.distributed's key-value store (the
``TCPStore`` that ``torchrun`` and ``init_process_group`` use), hosted by the leader: no
process group, no GPU, no DeepSpeed, no extra service.

Why a store and heartbeats rather than a collective barrier: shares take minutes, and a barrier
cannot tell a slow rank from a dead one without a timeout longer than the slowest share. Each rank
instead bumps a heartbeat counter every second while it works; the leader declares a rank lost
once its counter stops moving, names it, and commits nothing. A rank that fails reports its error
line, so every process ends with the same one-line message.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from dsckpt.errors import DsckptError, UsageError
from dsckpt.printable import listed

T = TypeVar("T")

DEFAULT_PORT = 29500
_BEAT_SECONDS = 1.0
# A rank whose heartbeat has not moved for this long is lost (killed, or its node went away).
LOST_AFTER_SECONDS = float(os.environ.get("DSCKPT_LOST_AFTER", "30"))
_CONNECT_TIMEOUT = timedelta(seconds=float(os.environ.get("DSCKPT_CONNECT_TIMEOUT", "300")))
_MAX_WORLD = 1 << 16


class DistributedError(DsckptError):
    """A multi-process run failed: a rank failed or was lost, or the ranks disagree."""


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process run, as the launcher describes it."""

    rank: int
    size: int
    host: str
    port: int

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


_LAUNCHED: contextvars.ContextVar[World | None] = contextvars.ContextVar(
    "dsckpt_launched_world", default=None
)


@contextmanager
def launched(world: World | None) -> Iterator[None]:
    """Run the conversions inside as this process's share of ``world`` (the CLI enters this
    with :func:`world_from_env`; a library caller decides for itself: a training script
    already under torchrun must not turn one process's conversion into a collective)."""
    token = _LAUNCHED.set(world)
    try:
        yield
    finally:
        _LAUNCHED.reset(token)


def launched_world() -> World | None:
    """The run this process is part of, inside :func:`launched`; None otherwise."""
    return _LAUNCHED.get()


def world_from_env(env: Mapping[str, str] = os.environ) -> World | None:
    """The run this process belongs to, or None when it runs alone.

    ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``; ``srun`` sets
    ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS`` (the leader's address must then be given as
    ``MASTER_ADDR``, as for any torch.distributed job under Slurm).
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        rank_name, size_name = "RANK", "WORLD_SIZE"
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        # The tasks of this srun step: a batch script's own shell is a one-task step, so
        # dsckpt run there directly (not through srun) stays one process.
        rank_name, size_name = "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"
    else:
        return None
    size = _env_int(env, size_name, 1, _MAX_WORLD)
    rank = _env_int(env, rank_name, 0, size - 1)
    if size == 1:
        return None
    host = env.get("MASTER_ADDR", "")
    if not host:
        raise UsageError(
            f"{size_name}={size} but MASTER_ADDR is not set: export MASTER_ADDR=<the first node's "
            "host name> (torchrun sets it; under srun, e.g. the first name of "
            "`scontrol show hostnames $SLURM_JOB_NODELIST`)"
        )
    port = _env_int(env, "MASTER_PORT", 1, 65535) if "MASTER_PORT" in env else DEFAULT_PORT
    return World(rank, size, host, port)


def _env_int(env: Mapping[str, str], name: str, low: int, high: int) -> int:
    text = env.get(name, "")
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise UsageError(f"{name}={text!r} is not a whole number from {low} to {high}")
    return int(text)


def balance(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Split item indices into ``parts`` shares of nearly equal total size.

    Largest first, each to the share with the least so far (ties to the lower share), so every
    process computes the same split; each share lists its items in their original order.
    """
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(parts), key=lambda p: (loads[p], p))
        shares[target].append(item)
        loads[target] += sizes[item]
    return [sorted(share) for share in shares]


class Coordinator:
    """The store-backed agreement, hand-off and commit protocol of one run.

    Every rank calls the same methods in the same order; the leader decides and publishes, the
    others wait for its decision. Any rank that leaves with an error posts it under ``abort``,
    which every waiting rank checks, so no rank waits for one that has given up.
    """

    def __init__(self, world: World, store: Any) -> None:
        self.world = world
        self._store = store
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._unsent = 0  # bytes this rank wrote since the last beat
        self._local: Callable[[int], None] | None = None
        self._counted = 0  # other ranks' bytes the leader's bar has shown
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        key = f"beat/{self.world.rank}"
        while not self._stop.is_set():
            try:
                self._store.add(key, 1)
                self._share_progress()
            except Exception:  # the leader is gone; the waiting side reports it
                return
            self._stop.wait(_BEAT_SECONDS)

    def progress(self, local: Callable[[int], None] | None) -> Callable[[int], None] | None:
        """The progress callback for this process's share. The leader's bar (``local``) counts
        the bytes of every rank: the others' arrive through the store, once a second."""
        if self.world.is_leader:
            self._local = local
            return local

        def advance(nbytes: int) -> None:
            with self._lock:
                self._unsent += nbytes

        return advance

    def _share_progress(self) -> None:
        with self._lock:
            unsent, self._unsent = self._unsent, 0
        if not self.world.is_leader:
            if unsent:
                self._store.add("progress", unsent)
            return
        if self._local is not None:  # the leader: the others' bytes since the last beat
            total = self._store.add("progress", 0)
            if total > self._counted:
                self._local(total - self._counted)
                self._counted = total

    # -- steps -----------------------------------------------------------------------------------

    def agree(self, what: str, value: str) -> None:
        """Refuse (on every rank) unless all ranks hold the same ``value`` (a plan digest)."""
        values = self.gather(f"agree/{what}", value)
        if not self.world.is_leader:
            self._expect(f"agree/{what}")
            return
        differing = [r for r, v in enumerate(values) if v != values[0]]
        problem = (
            f"ranks {_ranks(differing)} planned a different {what} than rank 0 (different "
            "inputs, options or dsckpt versions): give every rank the same command, files and "
            "installation"
            if differing
            else ""
        )
        self._publish(f"agree/{what}", "!" + problem if problem else "=")
        if problem:
            raise DistributedError(problem)

    def gather(self, step: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``step``, on the leader; an empty list on other ranks."""
        self._store.set(f"{step}/{self.world.rank}", value)
        if not self.world.is_leader:
            return []
        keys = [f"{step}/{r}" for r in range(self.world.size)]
        self._wait_for(keys, step)
        return [self._store.get(k).decode() for k in keys]

    def hand_out(
        self,
        step: str,
        make: Callable[[], T],
        encode: Callable[[T], str],
        decode: Callable[[str], T],
    ) -> T:
        """The leader makes a value (a staging path, say) and every rank receives it; if making
        it fails, every rank raises the leader's error."""
        if self.world.is_leader:
            value = make()  # a failure reaches the others through abort
            self._publish(step, "=" + encode(value))
            return value
        return decode(self._expect(step))

    def report(self, error: BaseException | None) -> None:
        """Post this rank's share result.

        The leader returns once every share is in, raising the first failure (it must then
        commit nothing), and calls :meth:`committed` once the output is in place; every other
        rank returns only after that, or raises the failure that ended the run.
        """
        if not self.world.is_leader:
            self._share_progress()  # the last bytes, before the leader's bar closes
        self._store.set(f"done/{self.world.rank}", _error_line(error) if error else "")
        if not self.world.is_leader:
            self._expect("done")
            if error is not None:
                raise error
            return
        keys = [f"done/{r}" for r in range(self.world.size)]
        self._wait_for(keys, "writing")
        self._share_progress()
        reports = [self._store.get(k).decode() for k in keys]
        failed = [(r, line) for r, line in enumerate(reports) if line]
        if failed:
            rank, line = failed[0]
            more = f" (and ranks {_ranks([r for r, _ in failed[1:]])})" if failed[1:] else ""
            raise DistributedError(f"rank {rank} failed{more}: {line}; nothing was committed")

    def committed(self) -> None:
        """The leader has put the output in place: the other ranks may end."""
        self._publish("done", "=")

    def leave(self, error: BaseException | None) -> None:
        """End this rank's part. A rank leaving with an error posts it for the others; the
        leader, which hosts the store, stays until every other rank has left or is lost."""
        try:
            if error is not None:
                self._store.compare_set("abort", "", _failure_line(self.world.rank, error))
            if self.world.is_leader:
                bye = [f"bye/{r}" for r in range(1, self.world.size)]
                self._wait_for(bye, "shutdown", abort=False)
            else:
                self._store.set(f"bye/{self.world.rank}", "")
        except DistributedError:
            pass  # a rank lost at shutdown: its error, if any, is already reported
        except Exception:
            pass  # the store is gone with the leader: nothing left to tell
        finally:
            self._stop.set()
            self._beat.join()

    # -- waiting -------------------------------------------------------------------------------

    def _publish(self, step: str, verdict: str) -> None:
        self._store.set(f"{step}/verdict", verdict)

    def _expect(self, step: str) -> str:
        """The leader's verdict on ``step`` (what follows ``=``); its refusal is raised."""
        try:
            self._wait_for([f"{step}/verdict"], step, watch=[0])
            answer = self._store.get(f"{step}/verdict").decode()
        except DistributedError:
            raise
        except Exception as exc:  # the store lives in the leader's process
            raise DistributedError(
                f"rank 0 (the leader, on {self.world.host}) was lost during {step}: "
                f"{_error_line(exc)}; nothing was committed"
            ) from exc
        if answer.startswith("!"):
            raise DistributedError(answer[1:])
        return answer[1:]

    def _wait_for(
        self, keys: list[str], step: str, watch: Sequence[int] | None = None, abort: bool = True
    ) -> None:
        """Wait for ``keys``, one per watched rank unless ``watch`` names the ranks (the
        leader's verdict: rank 0). A rank whose heartbeat stops meanwhile is lost; a rank that
        posted ``abort`` ends the wait with its error."""
        ranks = list(watch) if watch is not None else [int(k.rsplit("/", 1)[1]) for k in keys]
        pending = dict(zip(ranks, keys, strict=True)) if watch is None else {}
        last = {r: -1 for r in ranks}
        moved = {r: time.monotonic() for r in ranks}
        while not self._store.check(keys):
            if abort and self._store.check(["abort"]):
                raise DistributedError(self._store.get("abort").decode())
            now = time.monotonic()
            for r in ranks:
                if r == self.world.rank or (r in pending and self._store.check([pending[r]])):
                    continue
                beat = self._store.add(f"beat/{r}", 0)
                if beat != last[r]:
                    last[r], moved[r] = beat, now
                elif now - moved[r] > LOST_AFTER_SECONDS:
                    raise DistributedError(
                        f"rank {r} stopped responding during {step} (killed, or its node was "
                        f"lost: no heartbeat for {LOST_AFTER_SECONDS:.0f} s); nothing was committed"
                    )
            time.sleep(0.05)


def _ranks(ranks: Sequence[int]) -> str:
    return listed(ranks, 8)


def _failure_line(rank: int, exc: BaseException) -> str:
    """The one line every rank ends with when ``rank`` fails with ``exc``."""
    if isinstance(exc, DistributedError):
        return str(exc)  # already names the rank at fault
    return f"rank {rank} failed: {_error_line(exc)}; nothing was committed"


def _error_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, DsckptError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


@contextmanager
def coordinator(world: World) -> Iterator[Coordinator]:
    """Join the run's store (the leader hosts it) for the duration of one conversion."""
    from torch.distributed import PrefixStore, TCPStore  # imported only when launched

    # Under torchrun the agent already serves a store at MASTER_ADDR:MASTER_PORT (and says so):
    # every rank joins it as a client. Otherwise rank 0 serves it.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        server = TCPStore(
            world.host,
            world.port,
            world.size,
            world.is_leader and not agent,
            timeout=_CONNECT_TIMEOUT,
            wait_for_workers=False,
        )
        store = PrefixStore(f"dsckpt/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/", server)
    except Exception as exc:
        raise DistributedError(
            f"rank {world.rank} cannot reach the leader at {world.host}:{world.port}: "
            f"{_error_line(exc)}; check MASTER_ADDR/MASTER_PORT and that rank 0 runs"
        ) from exc
    coord = Coordinator(world, store)
    try:
        yield coord
    except BaseException as exc:
        coord.leave(exc)
        raise
    coord.leave(None)
