"""Output files for a consolidation plan, every one written atomically.

Every format is a preallocated file whose byte layout is computed from the plan before any data
is copied, so the executor fills tensors in any order straight from the source files through the
writers' ``locate`` (the executor's sink protocol):

- ``*.safetensors``: :class:`~dsckpt.formats.safetensors_writer.SafetensorsWriter`; a tied alias
  gets its own copy of its canonical tensor's bytes (safetensors cannot alias).
- a directory: Hugging Face shards plus ``model.safetensors.index.json`` (one shard is written as
  ``model.safetensors``, as transformers does). Other files in the directory (``config.json``,
  tokenizer files) are kept: only dsckpt's own names are written, and after the new index is in
  place, files of its naming that it no longer lists are removed, as ``save_pretrained`` does
  (see :func:`dsckpt.atomic.atomic_entries` for the commit order and its guarantees).
- a Hugging Face folder: the same, plus files copied unchanged beside the weights
  (``config.json``, tokenizer files: :mod:`dsckpt.execute.formats.hf_folder`), staged and
  renamed with the shards, before the index.
- ``*.bin`` / ``*.pt``: :class:`~dsckpt.formats.torch_writer.TorchWriter`, a ``torch.save`` zip
  written in one pass; aliases share their canonical tensor's storage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsckpt.execute.atomic import atomic_entries, atomic_output
from dsckpt.execute.executor import execute
from dsckpt.execute.formats.safetensors_writer import SafetensorsWriter, ShardedSafetensorsWriter
from dsckpt.execute.formats.sharding import TensorSpec, parse_size, plan_shards
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.consolidation import ConsolidationPlan

SAFETENSORS, TORCH, SHARDED = "safetensors", "torch", "sharded safetensors"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_own_name(name: str) -> bool:
    """Whether ``name`` is one dsckpt writes in a directory output (a shard, the single file,
    the index): the only files ``--force`` may replace or remove there."""
    return name in (SINGLE_NAME, INDEX_NAME) or _SHARD_NAME.fullmatch(name) is not None


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


@dataclass(frozen=True)
class Companion:
    """A second file written together with the weights (both or neither): the optimizer state.

    ``name`` is a file name beside a single-file OUT, or inside a directory OUT; ``write``
    fills the temporary path it is given, reporting bytes to the progress callback.
    """

    name: str
    nbytes: int
    write: Callable[[Path, Callable[[int], None]], None]


def write_output(fmt: str, out: Path, plan: ConsolidationPlan, *, metadata: dict[str, str],
                 force: bool, max_shard_size: str | int, progress: ProgressSink,
                 companion: Companion | None = None,
                 copies: Mapping[str, Path] | None = None,
                 computed: Mapping[str, Callable[[], Any]] | None = None) -> int:
    """Write ``plan`` to ``out`` in format ``fmt``, streaming from the source files.

    With a ``companion``, its file is staged too and renamed into place just before the
    weights' commit point (the single file, or the index), so either both are new or, when
    the write fails, neither is.
    ``copies`` (directory output only): ``{name in out: source file}`` copied unchanged.
    ``computed`` (directory output only): output tensors of ``plan`` (with no reads) whose
    values are not byte ranges of a source, each made in memory by its function, one at a time
    (a merged LoRA weight), as a contiguous CPU tensor of the planned dtype and shape.

    Returns:
        The number of files written.
    """
    tensors = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    cap = parse_size(max_shard_size, what="--max-shard-size")
    if (copies or computed) and fmt != SHARDED:
        raise ValueError("copied files and computed tensors go only into a directory output")
    progress.start("consolidating", plan.nbytes + (companion.nbytes if companion else 0))
    if fmt == SHARDED:
        return _write_shards(out, plan, tensors, cap, metadata, force, progress, companion,
                             copies or {}, computed or {})
    if companion is None:
        # No fsync: like torch.save and safetensors, durability against power loss is the
        # filesystem's; the rename still guarantees no half-written file carries OUT's name.
        with atomic_output(out, force=force, nbytes=plan.nbytes, durable=False) as tmp:
            _write_single(fmt, tmp, plan, tensors, metadata, progress)
        return 1
    names = [companion.name, out.name]  # the weights last: they are the commit point
    with atomic_entries(out.parent, names, force=force, per_entry=True,
                        nbytes=plan.nbytes + companion.nbytes, durable=False) as paths:
        _write_single(fmt, paths[out.name], plan, tensors, metadata, progress)
        companion.write(paths[companion.name], progress.advance)
    return 2


def _write_single(fmt: str, tmp: Path, plan: ConsolidationPlan, tensors: list[TensorSpec],
                  metadata: dict[str, str], progress: ProgressSink) -> None:
    writer: Any
    if fmt == TORCH:
        # torch output needs torch anyway (it pickles torch's storage classes and dtypes)
        from dsckpt.execute.formats.torch_writer import TorchWriter

        writer = TorchWriter(tmp, tensors, aliases=plan.aliases)
    else:
        writer = SafetensorsWriter(tmp, tensors, metadata=metadata, aliases=plan.aliases)
    with writer:
        execute(plan, writer, progress.advance)


def _write_shards(out: Path, plan: ConsolidationPlan, tensors: list[TensorSpec], cap: int,
                  metadata: dict[str, str], force: bool, progress: ProgressSink,
                  companion: Companion | None, copies: Mapping[str, Path],
                  computed: Mapping[str, Callable[[], Any]]) -> int:
    """Shards + index into ``out``, keeping every file that is not of dsckpt's naming."""
    shards = plan_shards(tensors, cap, aliases=plan.aliases)
    # Copied files go in first: the index (or the one file), renamed last, is the commit point
    # of the folder; the companion goes in just before it.
    names = [*copies] + [s.filename for s in shards.shards]
    names += [shards.index_name] if shards.is_sharded else []
    extra = companion.nbytes if companion else 0
    if companion is not None:
        names.insert(len(names) - 1, companion.name)
    # The old entry points go first: no index may name a mix of old and new shards, and a
    # stale single file must not shadow new shards (transformers loads model.safetensors first).
    withdraw = [INDEX_NAME, SINGLE_NAME] if shards.is_sharded else [INDEX_NAME]
    with atomic_entries(out, names, force=force, withdraw=withdraw, stale=is_own_name,
                        nbytes=plan.nbytes + extra, durable=False) as paths:
        if copies:
            from dsckpt.execute.formats.hf_folder import copy_files

            copy_files(copies, paths)
        writer = ShardedSafetensorsWriter(out, shards, metadata=metadata, index_metadata=metadata,
                                          paths=paths)
        with writer:
            execute(plan, writer, progress.advance)
            sizes = {t.name: t.nbytes for t in plan.tensors}
            for name, make in computed.items():
                value = make()
                writer.write(name, 0, value)
                progress.advance(sizes[name])
                del value  # one computed tensor in memory at a time
        if companion is not None:
            companion.write(paths[companion.name], progress.advance)
    return len(names)
