"""The files of a Hugging Face model folder besides the weights (``config.json``, tokenizer,
chat template), copied byte for byte into the staged entries of a directory output.

Copies go through :func:`dsckpt.discover.files.open_regular` without following links, so a
file swapped for a link or a FIFO between discovery and the copy is refused, not followed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dsckpt.discover.files import open_regular, os_error

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
