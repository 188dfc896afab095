"""The records of a consolidation plan: which element runs of which saved tensors make each output.

Plain frozen data, built by :mod:`dsckpt.plan.consolidation` (ZeRO and plain checkpoints) and
:mod:`dsckpt.plan.pipeline_consolidation` (pipelines), run by :mod:`dsckpt.execute.executor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsckpt.discover import zero
from dsckpt.errors import UsageError
from dsckpt.io import dtypes
from dsckpt.io.dtypes import DType
from dsckpt.io.load import TensorRef
from dsckpt.plan.fileplan import ByteRange, CastCopy, Computed, Copy

OutputDType = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, DType] = {"fp32": dtypes.FLOAT32, "bf16": dtypes.BFLOAT16, "fp16": dtypes.FLOAT16}


@dataclass(frozen=True)
class ConsolidationOptions:
    """What a consolidation plan is asked for beyond the layout: one record, built once by the
    front door (:func:`dsckpt.api.consolidation.plan_for`, ``consolidate``, ``verify``) and
    passed down, instead of the same keywords threaded through every signature.

    Attributes:
        dtype: floating tensors are written in this dtype (``--dtype``).
        exclude_frozen: leave frozen parameters out (``--exclude-frozen``).
        rules_file: a user TOML/JSON of TP merge rules overriding the built-in ones (``--rules``).
        from_layers: pipelines: take values from the layer files, not the fp32 partitions.
        strip_vocab_padding: drop the vocabulary rows Megatron padded for TP.
        hf_names: AutoEP checkpoints: name the MoE tensors as the Hugging Face model does
            (``--hf-names``, see :mod:`dsckpt.plan.moe_hf`).

    Raises:
        UsageError: an unknown ``dtype``.
    """

    dtype: OutputDType = "fp32"
    exclude_frozen: bool = False
    rules_file: Path | None = None
    from_layers: bool = False
    strip_vocab_padding: bool = True
    hf_names: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")


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
    # Values no source holds byte for byte (a merged LoRA weight): made in memory when written,
    # one tensor at a time, as a contiguous CPU tensor of ``dtype`` and ``shape``.
    compute: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return zero.numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def ops(self, at: int) -> list[Copy | CastCopy | Computed]:
        """The write-plan operations filling this tensor's bytes at file offset ``at``: a byte
        copy where the saved dtype is the output's and the source contiguous, else a cast."""
        if self.compute is not None:
            return [Computed(at, self.nbytes, self.compute, self.name)]
        item = self.dtype.itemsize
        ops: list[Copy | CastCopy | Computed] = []
        for read in self.reads:
            src, dst = read.source, at + read.dst_start * item
            if src.dtype == self.dtype and src.is_contiguous:
                start = src.offset + read.src_start * src.itemsize
                ops.append(Copy(dst, ByteRange(src.path, start, read.length * src.itemsize)))
            else:
                ops.append(CastCopy(dst, src, read.src_start, read.length, self.dtype))
        return ops


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
