"""In-memory tensors as planned tensors, so format tests write through the one executor."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from dsckpt.execute.executor import run
from dsckpt.plan.fileplan import FilePlan, Literal, WritePlan


def raw(t: torch.Tensor) -> bytes:
    """Exact bytes of a tensor (bit-for-bit comparison, NaN included)."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


@dataclass(frozen=True)
class InMemory:
    """A tensor whose bytes the plan holds as literals, cut into up to three pieces at random
    places and listed in shuffled order (the executor must not depend on the order)."""

    name: str
    tensor: torch.Tensor
    seed: int = 1

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def ops(self, at: int) -> list[Literal]:
        data = raw(self.tensor)
        rnd = random.Random(f"{self.seed}{self.name}")
        cuts = sorted({0, len(data), *(rnd.randrange(len(data) + 1) for _ in range(2))})
        pieces = [Literal(at + a, data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
        rnd.shuffle(pieces)
        return pieces


def in_memory(sd: dict[str, torch.Tensor], seed: int = 1) -> list[InMemory]:
    return [InMemory(k, v, seed) for k, v in sd.items()]


def write(file: FilePlan, out: Path) -> None:
    """Write one planned file to ``out`` through the executor."""
    run(WritePlan((file,)), out)
