"""Options shared by several commands, declared once, with the placeholders the docs use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsckpt.errors import UsageError

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="CKPT",
        help="Checkpoint directory: the root holding `latest`, or a tag directory.",
        show_default=False,
    ),
]
TagOpt = Annotated[
    str | None,
    typer.Option(
        "--tag",
        metavar="TAG",
        help="Tag to read (e.g. global_step100); default: the one `latest` names.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the facts as JSON instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar; only the result line.")
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers",
        metavar="N",
        help="Write with N processes on this machine, each a share of the output files or "
        "bytes (under torchrun or srun, the launched processes share the work instead; see "
        "docs/large-checkpoints.md).",
    ),
]
RulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        metavar="FILE",
        help="TOML or JSON file of tensor-parallel merge rules; overrides the "
        "checkpoint's own patterns and the Megatron defaults (see docs/megatron.md).",
    ),
]
TPOpt = Annotated[
    int | None,
    typer.Option("--tp", metavar="N", help="Target tensor-parallel degree (default: keep)."),
]
PPOpt = Annotated[
    int | None,
    typer.Option("--pp", metavar="N", help="Target pipeline-parallel degree (default: keep)."),
]
DPOpt = Annotated[
    int | None,
    typer.Option("--dp", metavar="N", help="Target data-parallel degree (default: keep)."),
]
PartitionMethodOpt = Annotated[
    str,
    typer.Option(
        "--partition-method",
        metavar="METHOD",
        help="How the target assigns layers to stages, as "
        "PipelineModule(partition_method=...): parameters, uniform or type:REGEX "
        "(the checkpoint does not record it).",
    ),
]
# The example has spaces after its commas (the parser strips them) so that help can wrap it
# between specs instead of in the middle of a type name.
LayerSpecsOpt = Annotated[
    str | None,
    typer.Option(
        "--layer-specs",
        metavar="SPECS",
        help="The PipelineModule's layer list, one entry per spec, separated by commas: TYPE, "
        "KEY@TYPE for a TiedLayerSpec, *N to repeat (e.g. 'embed@EmbeddingPipe, "
        "TransformerLayerPipe*24, LayerNorm, embed@EmbeddingPipe'). "
        "Default: inferred from the files; uniform and type: need it.",
    ),
]

# --dtype: dsckpt's short names, and PyTorch's (what `torch.bfloat16` prints, with or without
# the `torch.` prefix), so a value copied from a training config or a script works as it is.
DTYPE_NAMES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
}


def normalise_dtype(value: str | None) -> str | None:
    """``"torch.bfloat16"``, ``"bfloat16"`` or ``"bf16"`` -> ``"bf16"``; None stays None."""
    if value is None:
        return None
    key = value.strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise UsageError(
            f"--dtype {value}: choose fp32 (float32), bf16 (bfloat16) or fp16 (float16)"
        )
    return DTYPE_NAMES[key]


def _complete_dtype(incomplete: str) -> list[str]:
    return [name for name in DTYPE_NAMES if name.startswith(incomplete.lower())]


def _normalise_dtype_or_auto(value: str | None) -> str | None:
    if value is not None and value.strip().lower() == "auto":
        return "auto"
    return normalise_dtype(value)


def dtype_option(help: str, allow_auto: bool = False) -> typer.models.OptionInfo:
    """``--dtype DTYPE``: any name of :data:`DTYPE_NAMES`, normalised to fp32, bf16 or fp16
    (and ``auto``, kept as is, where ``allow_auto``)."""
    return typer.Option(
        "--dtype",
        metavar="DTYPE",
        help=help,
        callback=_normalise_dtype_or_auto if allow_auto else normalise_dtype,
        autocompletion=_complete_dtype,
    )
