"""Commands as processes of a ``torchrun`` / ``srun`` launch (docs/distributed.md)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dsckpt.execute.distributed import launched, world_from_env


@contextmanager
def as_launched() -> Iterator[bool]:
    """Run the command as this process's share when a launcher started several (it set
    ``RANK``/``WORLD_SIZE``, or an srun step has several tasks); yields whether this process
    reports: rank 0 shows the progress bar and the result, the others stay quiet."""
    world = world_from_env()
    with launched(world):
        yield world is None or world.is_leader
