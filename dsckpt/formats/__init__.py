"""Output files for a consolidation plan, every one written atomically.

Every format is a preallocated file whose byte layout is computed from the plan before any data
is copied, so the executor fills tensors in any order straight from the source files through the
writers' ``locate`` (the executor's sink protocol):

- ``*.safetensors``: :class:`~dsckpt.formats.safetensors_writer.SafetensorsWriter`; a tied alias
  gets its own copy of its canonical tensor's bytes (safetensors cannot alias).
- a directory: Hugging Face shards plus ``model.safetensors.index.json`` (one shard is written as
  ``model.safetensors``, as transformers does).
- ``*.bin`` / ``*.pt``: :class:`~dsckpt.formats.torch_writer.TorchWriter`, a ``torch.save`` zip
  written in one pass; aliases share their canonical tensor's storage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsckpt.atomic import atomic_output
from dsckpt.execute import execute
from dsckpt.formats.safetensors_writer import SafetensorsWriter, ShardedSafetensorsWriter
from dsckpt.formats.sharding import TensorSpec, parse_size, plan_shards
from dsckpt.plan import ConsolidationPlan
from dsckpt.progress import ProgressSink

SAFETENSORS, TORCH, SHARDED = "safetensors", "torch", "sharded safetensors"


def output_format(out: Path) -> str | None:
    """The format OUT asks for by its suffix (a directory for shards), or None if unknown."""
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        return SAFETENSORS
    if suffix in (".bin", ".pt", ".pth"):
        return TORCH
    if suffix == "" or out.is_dir():
        return SHARDED
    return None


def write_output(fmt: str, out: Path, plan: ConsolidationPlan, *, metadata: dict[str, str],
                 force: bool, max_shard_size: str | int, progress: ProgressSink) -> int:
    """Write ``plan`` to ``out`` in format ``fmt``, streaming from the source files.

    Returns:
        The number of files written.
    """
    tensors = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    cap = parse_size(max_shard_size, what="--max-shard-size")
    progress.start("consolidating", plan.nbytes)
    # No fsync: like torch.save and safetensors, durability against power loss is the
    # filesystem's; the rename still guarantees no half-written file carries OUT's name.
    with atomic_output(out, force=force, is_dir=fmt == SHARDED, nbytes=plan.nbytes,
                       durable=False) as tmp:
        if fmt == SHARDED:
            shards = plan_shards(tensors, cap, aliases=plan.aliases)
            writer: Any = ShardedSafetensorsWriter(tmp, shards, metadata=metadata,
                                                   index_metadata=metadata)
            files = len(shards.shards) + shards.is_sharded
        elif fmt == TORCH:
            # torch output needs torch anyway (it pickles torch's storage classes and dtypes)
            from dsckpt.formats.torch_writer import TorchWriter

            writer, files = TorchWriter(tmp, tensors, aliases=plan.aliases), 1
        else:
            writer = SafetensorsWriter(tmp, tensors, metadata=metadata, aliases=plan.aliases)
            files = 1
        with writer:
            execute(plan, writer, progress.advance)
    return files
