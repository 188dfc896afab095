"""One place that decides how output looks: plain when not a terminal, fixed width on request."""

from __future__ import annotations

import os

from rich.console import Console


def console(stderr: bool = False) -> Console:
    # DSCKPT_WIDTH pins the width (tests, golden files); otherwise Rich asks the terminal.
    width = int(os.environ["DSCKPT_WIDTH"]) if os.environ.get("DSCKPT_WIDTH") else None
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)
