"""Output formats for a consolidation plan: each lays the plan out as a write plan.

Every format is a file whose byte layout is computed from the plan before any data is copied;
:func:`output_plan` turns a :class:`~dsckpt.plan.consolidation.ConsolidationPlan` into a
:class:`~dsckpt.plan.fileplan.WritePlan` (headers as literal bytes, tensors as copies and casts
from the source files), which the one executor (:func:`dsckpt.execute.executor.run`) writes
atomically:

- ``*.safetensors``: :func:`~dsckpt.execute.formats.safetensors_writer.safetensors_file`; a tied
  alias gets its own copy of its canonical tensor's bytes (safetensors cannot alias).
- a directory: Hugging Face shards plus ``model.safetensors.index.json`` (one shard is written as
  ``model.safetensors``, as transformers does). Other files in the directory (``config.json``,
  tokenizer files) are kept: only dsckpt's own names are written, and after the new index is in
  place, files of its naming that it no longer lists are removed, as ``save_pretrained`` does
  (see :func:`dsckpt.execute.atomic.atomic_entries` for the commit order and its guarantees).
- a Hugging Face folder: the same, plus files copied unchanged beside the weights
  (``config.json``, tokenizer files: :mod:`dsckpt.execute.formats.hf_folder`), staged and
  renamed with the shards, before the index.
- ``*.bin`` / ``*.pt``: :func:`~dsckpt.execute.formats.torch_writer.torch_file`, a ``torch.save``
  zip; aliases share their canonical tensor's storage.

A companion file (the optimizer state, ``--optimizer``) joins the plan as one more file,
renamed into place just before the weights' commit point, so both are new or neither is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from dsckpt.execute.formats.safetensors_writer import safetensors_file
from dsckpt.execute.formats.sharding import PlannedTensor, TensorSpec, parse_size, plan_shards
from dsckpt.plan.consolidation import ConsolidationPlan
from dsckpt.plan.fileplan import FilePlan, Literal, WritePlan

SAFETENSORS, TORCH, SHARDED = "safetensors", "torch", "sharded safetensors"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = r"model-\d{5}-of-\d{5}\.safetensors"
# Every name dsckpt writes in a directory output: the only files --force may replace or remove.
_OWN_NAMES = "|".join([re.escape(SINGLE_NAME), re.escape(INDEX_NAME), _SHARD_PATTERN])


def is_own_name(name: str) -> bool:
    """Whether ``name`` is one dsckpt writes in a directory output (a shard, the single file,
    the index): the only files ``--force`` may replace or remove there."""
    return re.fullmatch(_OWN_NAMES, name) is not None


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


def output_plan(
    fmt: str,
    out: Path,
    plan: ConsolidationPlan,
    *,
    metadata: dict[str, str],
    max_shard_size: str | int,
    companion: FilePlan | None = None,
    copies: Mapping[str, FilePlan] | None = None,
) -> WritePlan:
    """The write plan of ``plan`` in format ``fmt``: every file, its bytes and their sources.

    ``companion`` is written with the weights (inside a directory OUT, or beside a single
    file); ``copies`` (a directory OUT only) are files copied unchanged into it.
    Pure: nothing is read or written. ``max_shard_size`` is checked for every format.
    """
    cap = parse_size(max_shard_size, what="--max-shard-size")
    if copies and fmt != SHARDED:
        raise ValueError("copied files go only into a directory output")
    if fmt == SHARDED:
        shards = sharded_safetensors_plan(
            plan.tensors, cap, aliases=plan.aliases, metadata=metadata
        )
        # Copied files first and the companion just before the commit point (the index, or
        # the one file): the folder is complete when its entry point appears.
        files = [*(copies or {}).values(), *shards.files[:-1]]
        files += [companion] if companion is not None else []
        return replace(shards, files=(*files, shards.files[-1]))
    if fmt == TORCH:
        # torch output needs torch anyway (it pickles torch's storage classes and dtypes)
        from dsckpt.execute.formats.torch_writer import torch_file

        file = torch_file(out.name, plan.tensors, aliases=plan.aliases)
    else:
        file = safetensors_file(out.name, plan.tensors, metadata=metadata, aliases=plan.aliases)
    if companion is None:
        return WritePlan((file,))
    return WritePlan((companion, file), directory=True, beside=True)


def sharded_safetensors_plan(
    tensors: Sequence[PlannedTensor],
    cap: int | str,
    *,
    aliases: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> WritePlan:
    """Hugging Face shards + index for a directory that keeps every file not of dsckpt's naming
    (one shard is ``model.safetensors`` with no index). ``metadata`` goes to every shard's
    ``__metadata__`` and to the index's ``metadata``."""
    aliases = dict(aliases or {})
    specs = [TensorSpec(t.name, t.dtype, t.shape) for t in tensors]
    shards = plan_shards(specs, cap, aliases=aliases)
    by_name = {t.name: t for t in tensors}
    files: list[FilePlan] = [
        safetensors_file(
            shard.filename,
            [by_name[s.name] for s in shard.tensors],
            metadata=metadata,
            aliases=dict(shard.aliases),
        )
        for shard in shards.shards
    ]
    if shards.is_sharded:
        index = shards.index_json(metadata).encode("utf-8")
        files.append(FilePlan(shards.index_name, len(index), (Literal(0, index),)))
    # The old entry points go first: no index may name a mix of old and new shards, and a
    # stale single file must not shadow new shards (transformers loads model.safetensors first).
    withdraw = (INDEX_NAME, SINGLE_NAME) if shards.is_sharded else (INDEX_NAME,)
    return WritePlan(tuple(files), directory=True, withdraw=withdraw, stale=_OWN_NAMES)
