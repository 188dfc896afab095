"""The records of a consolidation plan: which element runs of which saved tensors make each output.

Plain frozen data, built by :mod:`dsckpt.plan.consolidation` (ZeRO and plain checkpoints) and
:mod:`dsckpt.plan.pipeline_consolidation` (pipelines), run by :mod:`dsckpt.execute.executor`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from dsckpt.discover import zero
from dsckpt.io import dtypes
from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef

DTYPES = {"fp32": dtypes.FLOAT32, "bf16": dtypes.BFLOAT16, "fp16": dtypes.FLOAT16}


@dataclass(frozen=True)
class Read:
    """``length`` elements at ``src_start`` of a saved tensor go to ``dst_start`` of an output."""

    source: TensorRef
    src_start: int
    length: int
    dst_start: int


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: DType
    reads: tuple[Read, ...]

    @property
    def numel(self) -> int:
        return zero.numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ConsolidationPlan:
    """Output tensors in state-dict order, plus tied aliases that name one of them."""

    tensors: tuple[OutputTensor, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> canonical output name
    source: str = ""  # where the values come from, for the result line and metadata

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def names(self) -> list[str]:
        """Every key of the state dict, aliases included, in DeepSpeed's order."""
        return [t.name for t in self.tensors] + list(self.aliases)

    def __iter__(self) -> Iterator[OutputTensor]:
        return iter(self.tensors)
