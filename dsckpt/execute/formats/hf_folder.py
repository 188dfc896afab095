"""The files of a Hugging Face model folder besides the weights (``config.json``, tokenizer,
chat template), copied byte for byte into the staged entries of a directory output; and a PEFT
adapter folder (``adapter_model.safetensors`` plus such copies).

Copies go through :func:`dsckpt.discover.files.open_regular` without following links, so a
file swapped for a link or a FIFO between discovery and the copy is refused, not followed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dsckpt.execute.formats.safetensors_writer import safetensors_file
from dsckpt.io.regular import open_regular
from dsckpt.plan.consolidation import ConsolidationPlan
from dsckpt.plan.fileplan import ByteRange, Copy, FilePlan, WritePlan


def copied_files(sources: Mapping[str, Path]) -> dict[str, FilePlan]:
    """Each ``sources[name]`` copied unchanged as entry ``name``: one whole-file copy, sized now.

    Raises:
        UnreadableFile: a source is not a regular file (a link is not followed) or cannot be
            read.
    """
    files = {}
    for name, source in sources.items():
        fd = open_regular(source, follow_symlinks=False)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        copy = (Copy(0, ByteRange(source, 0, size, follow_links=False)),) if size else ()
        files[name] = FilePlan(name, size, copy)
    return files


ADAPTER_NAME = "adapter_model.safetensors"


def adapter_plan(
    plan: ConsolidationPlan, *, copies: Mapping[str, Path], metadata: dict[str, str]
) -> WritePlan:
    """A PEFT adapter folder: ``adapter_model.safetensors`` (one file, as PEFT writes it) after
    ``copies``: the weights last, so a folder holding them is complete. Other files in the
    folder are kept."""
    adapter = safetensors_file(ADAPTER_NAME, plan.tensors, metadata=metadata)
    return WritePlan((*copied_files(copies).values(), adapter), directory=True)
