"""Output files for a consolidation plan, every one written atomically.

Every format is a preallocated file whose byte layout is computed from the plan before any data
is copied, so the executor can fill tensors in any order straight from the source files:

- ``*.safetensors``: the header is computed up front; tied aliases get their own copy of the
  bytes (safetensors cannot alias) and are listed in the metadata.
- a directory: Hugging Face shards ``model-0000i-of-0000N.safetensors`` plus
  ``model.safetensors.index.json``.
- ``*.bin`` / ``*.pt``: the tensors are filled into a raw temporary file, then ``torch.save``
  writes views of its memory map, one storage record per tensor, aliases sharing a storage as in
  DeepSpeed's own state dict.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from dsckpt.execute import execute
from dsckpt.formats.atomic import atomic_output, reserve
from dsckpt.formats.safetensors import SafetensorsSink, ShardedSink, shard_tensors
from dsckpt.formats.sizes import parse_size
from dsckpt.plan import ConsolidationPlan, OutputTensor
from dsckpt.progress import ProgressSink

INDEX_NAME = "model.safetensors.index.json"


def write_output(
    fmt: str,
    out: Path,
    plan: ConsolidationPlan,
    *,
    metadata: dict[str, str],
    force: bool,
    max_shard_size: str | int,
    progress: ProgressSink,
) -> int:
    """Write ``plan`` to ``out`` in format ``fmt``, streaming from the source files.

    Returns:
        The number of files written.
    """
    from dsckpt.consolidate import SHARDED, TORCH

    cap = parse_size(max_shard_size) if fmt == SHARDED else 0
    if fmt == TORCH:
        with atomic_output(out, force=force, is_dir=False) as tmp:
            _write_torch(tmp, plan, progress)
        return 1
    # safetensors cannot alias: a tied name gets its own copy, read from the same sources.
    copies = _with_alias_copies(plan)
    progress.start("consolidating", copies.nbytes)
    if fmt == SHARDED:
        with atomic_output(out, force=force, is_dir=True) as tmp:
            tmp.mkdir()
            with ShardedSink(tmp, shard_tensors(list(copies), cap), metadata) as sink:
                execute(copies, sink, progress.advance)
            _write_index(tmp / INDEX_NAME, sink, metadata)
        return sink.files + 1
    with (
        atomic_output(out, force=force, is_dir=False) as tmp,
        SafetensorsSink(tmp, list(copies), metadata) as single,
    ):
        execute(copies, single, progress.advance)
    return 1


def _with_alias_copies(plan: ConsolidationPlan) -> ConsolidationPlan:
    by_name = {t.name: t for t in plan.tensors}
    aliases = [
        OutputTensor(alias, by_name[c].shape, by_name[c].dtype, by_name[c].reads)
        for alias, c in plan.aliases.items()
    ]
    return replace(plan, tensors=plan.tensors + tuple(aliases), aliases={})


def _write_index(path: Path, sink: ShardedSink, metadata: dict[str, str]) -> None:
    index = {
        "metadata": {"total_size": sink.total_size, **metadata},
        "weight_map": dict(sorted(sink.weight_map.items())),
    }
    path.write_text(json.dumps(index, indent=2) + "\n")


class _RawSink:
    """Tensors packed back to back (64-byte aligned) in a raw file, for the torch format."""

    ALIGN = 64

    def __init__(self, path: Path, tensors: list[OutputTensor]) -> None:
        self.path = path
        self.offsets: dict[str, int] = {}
        offset = 0
        for t in tensors:
            self.offsets[t.name] = offset
            offset += -(-t.nbytes // self.ALIGN) * self.ALIGN
        self.size = offset
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        reserve(self.fd, path, self.size)

    def locate(self, name: str) -> tuple[int, int]:
        return self.fd, self.offsets[name]

    def close(self) -> None:
        os.close(self.fd)


def _write_torch(tmp: Path, plan: ConsolidationPlan, progress: ProgressSink) -> None:
    raw_path = tmp.with_name(tmp.name + ".raw")
    raw = _RawSink(raw_path, list(plan.tensors))
    progress.start("consolidating", plan.nbytes)
    try:
        execute(plan, raw, progress.advance)
        raw.close()
        mapped = torch.UntypedStorage.from_file(str(raw_path), False, max(raw.size, 1))
        views = {}
        for t in plan.tensors:
            start = raw.offsets[t.name]
            storage = mapped[start : start + t.nbytes]
            views[t.name] = torch.empty(0, dtype=t.dtype).set_(storage, 0, t.shape)  # type: ignore[call-overload]
        for alias, canonical in plan.aliases.items():
            views[alias] = views[canonical]
        torch.save({name: views[name] for name in plan.names()}, tmp)
    finally:
        raw_path.unlink(missing_ok=True)
