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

from dsckpt.execute.atomic import atomic_entries
from dsckpt.execute.executor import execute
from dsckpt.execute.formats.safetensors_writer import SafetensorsWriter
from dsckpt.execute.formats.sharding import TensorSpec
from dsckpt.execute.progress import ProgressSink
from dsckpt.io.regular import open_regular, os_error
from dsckpt.plan.consolidation import ConsolidationPlan

_CHUNK = 1 << 20


def copy_files(sources: Mapping[str, Path], staged: Mapping[str, Path]) -> int:
    """Copy each ``sources[name]`` to ``staged[name]`` unchanged; returns the bytes copied.

    Raises:
        UnreadableFile: a source is no longer a regular file or cannot be read.
    """
    total = 0
    for name, source in sources.items():
        fd = open_regular(source, follow_symlinks=False)
        try:
            with open(staged[name], "xb") as out:
                while True:
                    try:
                        chunk = os.read(fd, _CHUNK)
                    except OSError as exc:
                        raise os_error(source, exc) from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    total += len(chunk)
        finally:
            os.close(fd)
    return total


ADAPTER_NAME = "adapter_model.safetensors"


def write_adapter(out: Path, plan: ConsolidationPlan, *, copies: Mapping[str, Path],
                  metadata: dict[str, str], force: bool, progress: ProgressSink) -> int:
    """A PEFT adapter folder: ``adapter_model.safetensors`` (one file, as PEFT writes it) and
    ``copies``, through the atomic directory output (other files in ``out`` are kept).

    Returns:
        The number of files written.
    """

    tensors = [TensorSpec(t.name, t.dtype, t.shape) for t in plan.tensors]
    names = [*copies, ADAPTER_NAME]  # the weights last: a folder with them is complete
    progress.start("consolidating", plan.nbytes)
    with atomic_entries(out, names, force=force, nbytes=plan.nbytes, durable=False) as paths:
        copy_files(copies, paths)
        with SafetensorsWriter(paths[ADAPTER_NAME], tensors, metadata=metadata) as writer:
            execute(plan, writer, progress.advance)
    return len(names)
