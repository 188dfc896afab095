"""`dsckpt to-fp32`: one consolidated state dict, loadable without DeepSpeed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsckpt.cli.console import print_line
from dsckpt.cli.errors import reporting_interrupt
from dsckpt.cli.options import CheckpointArg, ForceOpt, QuietOpt, RulesOpt, TagOpt
from dsckpt.cli.progress import byte_progress


def to_fp32(
    ckpt: CheckpointArg,
    out: Annotated[
        Path,
        typer.Argument(
            help="Output: *.safetensors, *.bin / *.pt (torch.save), or a directory for "
            "Hugging Face shards + model.safetensors.index.json.",
            show_default=False,
        ),
    ],
    tag: TagOpt = None,
    dtype: Annotated[
        str, typer.Option(help="Output dtype of floating tensors: fp32, bf16 or fp16.")
    ] = "fp32",
    max_shard_size: Annotated[
        str, typer.Option(help="Largest shard when OUT is a directory (e.g. 5GB, 500MB, 10GiB).")
    ] = "5GB",
    exclude_frozen: Annotated[
        bool, typer.Option("--exclude-frozen", help="Leave out frozen parameters.")
    ] = False,
    rules: RulesOpt = None,
    from_layers: Annotated[
        bool,
        typer.Option(
            "--from-layers",
            help="Pipeline checkpoints: take weights from the layer files (model dtype, upcast) "
            "instead of the fp32 optimizer partitions.",
        ),
    ] = False,
    keep_vocab_padding: Annotated[
        bool,
        typer.Option(
            "--keep-vocab-padding",
            help="Keep Megatron's vocabulary padding rows even where the original size "
            "is recorded.",
        ),
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Consolidate a ZeRO 1/2/3, plain or Megatron 3D checkpoint into one fp32 state dict."""
    from dsckpt.api.consolidation import consolidate

    if from_layers:
        typer.echo(
            "warning: --from-layers reads the model-dtype layer weights, not the fp32 "
            "master weights",
            err=True,
        )
    with reporting_interrupt(out), byte_progress(enabled=not quiet) as progress:
        result = consolidate(
            ckpt,
            out,
            tag=tag,
            dtype=dtype,
            max_shard_size=max_shard_size,
            exclude_frozen=exclude_frozen,
            force=force,
            progress=progress,
            rules_file=rules,
            from_layers=from_layers,
            strip_vocab_padding=not keep_vocab_padding,
        )
    print_line(result.summary())
