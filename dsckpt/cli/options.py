"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint directory: the root holding `latest`, or a tag directory.",
        show_default=False,
    ),
]
TagOpt = Annotated[
    str | None,
    typer.Option(
        "--tag", help="Tag to read (e.g. global_step100); default: the one `latest` names."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the facts as JSON instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar; only the result line.")
]
RulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        help="TOML or JSON file of tensor-parallel merge rules; overrides the "
        "checkpoint's own patterns and the Megatron defaults (see docs/megatron.md).",
    ),
]
