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
TPOpt = Annotated[
    int | None, typer.Option("--tp", help="Target tensor-parallel degree (default: keep).")
]
PPOpt = Annotated[
    int | None, typer.Option("--pp", help="Target pipeline-parallel degree (default: keep).")
]
DPOpt = Annotated[
    int | None, typer.Option("--dp", help="Target data-parallel degree (default: keep).")
]
PartitionMethodOpt = Annotated[
    str,
    typer.Option(
        "--partition-method",
        help="How the target assigns layers to stages, as "
        "PipelineModule(partition_method=...): parameters, uniform or type:REGEX "
        "(the checkpoint does not record it).",
    ),
]
LayerSpecsOpt = Annotated[
    str | None,
    typer.Option(
        "--layer-specs",
        help="The PipelineModule's layer list, one comma-separated entry per spec: TYPE, "
        "KEY@TYPE for a TiedLayerSpec, *N to repeat (e.g. "
        "'embed@EmbeddingPipe,TransformerLayerPipe*24,LayerNorm,embed@EmbeddingPipe'). "
        "Default: inferred from the files; uniform and type: need it.",
    ),
]
