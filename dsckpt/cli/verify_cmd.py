"""`dsckpt verify`: an output, or a second checkpoint, holds exactly what a checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dsckpt.cli.help import examples
from dsckpt.cli.options import CheckpointArg, JsonOpt, QuietOpt, RulesOpt, TagOpt, dtype_option
from dsckpt.cli.progress import byte_progress


def verify(
    ckpt: CheckpointArg,
    other: Annotated[
        Path,
        typer.Argument(
            metavar="OUT_OR_CKPT",
            help="What to check against CKPT: an output (*.safetensors, *.bin / *.pt, or a "
            "directory of shards with its index, as to-fp32 or zero_to_fp32 writes it), or a "
            "second DeepSpeed checkpoint (e.g. a reshape of CKPT).",
            show_default=False,
        ),
    ],
    tag: TagOpt = None,
    dtype: Annotated[
        str | None,
        dtype_option(
            "OUT was written with to-fp32 --dtype fp32, bf16 or fp16 (or float32, bfloat16, "
            "float16): every floating tensor must be that cast. Default: read it from OUT."
        ),
    ] = None,
    exclude_frozen: Annotated[
        bool, typer.Option("--exclude-frozen", help="OUT leaves out frozen parameters.")
    ] = False,
    keep_vocab_padding: Annotated[
        bool,
        typer.Option("--keep-vocab-padding", help="OUT keeps Megatron's vocabulary padding rows."),
    ] = False,
    from_layers: Annotated[
        bool,
        typer.Option("--from-layers", help="OUT was written by to-fp32 --from-layers (pipelines)."),
    ] = False,
    rules: RulesOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check a conversion: every tensor equal, bit for bit; exits 1 on any difference.

    Against an output: names, dtypes, shapes and bytes of every tensor, tied aliases, missing
    and extra keys. Against a second checkpoint, whatever its ZeRO stage, DP, TP or PP: the fp32
    master weights, the optimizer state of every parameter, and the counters and
    hyper-parameters (listed with --json).
    """
    from dsckpt.api.verify import is_checkpoint, verify_checkpoints, verify_output
    from dsckpt.cli.to_fp32_cmd import check_from_layers
    from dsckpt.errors import UsageError

    with byte_progress(enabled=not quiet and not as_json) as progress:
        if is_checkpoint(other):
            if dtype or exclude_frozen or keep_vocab_padding or from_layers:
                raise UsageError(
                    f"{other} is a DeepSpeed checkpoint: --dtype, --exclude-frozen, "
                    "--keep-vocab-padding and --from-layers describe an output, not a second "
                    "checkpoint"
                )
            result = verify_checkpoints(ckpt, other, tag=tag, rules_file=rules, progress=progress)
        else:
            if from_layers:
                check_from_layers(ckpt, tag, "verify")
            result = verify_output(
                ckpt,
                other,
                tag=tag,
                dtype=dtype,
                exclude_frozen=exclude_frozen,
                rules_file=rules,
                strip_vocab_padding=not keep_vocab_padding,
                from_layers=from_layers,
                progress=progress,
            )
    typer.echo(json.dumps(result.to_json(), indent=2) if as_json else result.summary())
    if not result.equal:
        raise typer.Exit(1)


EXAMPLES = examples(
    "dsckpt verify checkpoints/ model.safetensors",
    "dsckpt verify checkpoints/ hf-model/ --dtype bfloat16",
    "dsckpt verify checkpoints/ resized/",
    "dsckpt verify checkpoints/ pytorch_model.bin --json",
)
