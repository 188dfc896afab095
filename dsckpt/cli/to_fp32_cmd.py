"""`dsckpt to-fp32`: one consolidated state dict, loadable without DeepSpeed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsckpt.cli.console import console
from dsckpt.cli.options import CheckpointArg, ForceOpt, QuietOpt, TagOpt
from dsckpt.cli.progress import byte_progress


def to_fp32(
    ckpt: CheckpointArg,
    out: Annotated[Path, typer.Argument(
        help="Output: *.safetensors, *.bin / *.pt (torch.save), or a directory for "
             "Hugging Face shards + model.safetensors.index.json.", show_default=False)],
    tag: TagOpt = None,
    dtype: Annotated[str, typer.Option(help="Output dtype of floating tensors: fp32, bf16 or fp16."
                                       )] = "fp32",
    max_shard_size: Annotated[str, typer.Option(
        help="Largest shard when OUT is a directory (e.g. 5GB, 500MB, 10GiB).")] = "5GB",
    exclude_frozen: Annotated[bool, typer.Option(help="Leave out frozen parameters.")] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Consolidate a ZeRO 1/2/3 (or plain) checkpoint into one fp32 state dict."""
    from dsckpt.consolidate import consolidate

    with byte_progress(enabled=not quiet) as progress:
        result = consolidate(ckpt, out, tag=tag, dtype=dtype, max_shard_size=max_shard_size,
                             exclude_frozen=exclude_frozen, force=force, progress=progress)
    console().print(result.summary())
