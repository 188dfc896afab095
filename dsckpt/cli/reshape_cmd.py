"""`dsckpt reshape`: re-partition a checkpoint for other TP, PP and DP degrees."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsckpt.cli.console import console, print_line
from dsckpt.cli.errors import reporting_interrupt
from dsckpt.cli.options import (
    CheckpointArg,
    DPOpt,
    ForceOpt,
    LayerSpecsOpt,
    PartitionMethodOpt,
    PPOpt,
    QuietOpt,
    RulesOpt,
    TagOpt,
    TPOpt,
)
from dsckpt.cli.progress import byte_progress


def reshape(
    ckpt: CheckpointArg,
    out: Annotated[
        Path,
        typer.Argument(
            help="Output save_dir (created; must not exist unless --force): gets `latest` and the "
            "tag directory, ready for engine.load_checkpoint at the new size.",
            show_default=False,
        ),
    ],
    dp: DPOpt = None,
    tp: TPOpt = None,
    pp: PPOpt = None,
    partition_method: PartitionMethodOpt = "parameters",
    layer_specs: LayerSpecsOpt = None,
    rules: RulesOpt = None,
    tag: TagOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show the plan (which source ranks, slices and element ranges make each new "
            "rank); write nothing.",
        ),
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Reshape a checkpoint to new degrees (ZeRO 1/2/3: --dp; Megatron pipelines: --tp, --pp,
    --dp together): weights, optimizer state and counters, loadable by unmodified DeepSpeed."""
    from dsckpt.api.reshaping import reshape as run

    with (
        reporting_interrupt(None if dry_run else out),
        byte_progress(enabled=not quiet and not dry_run) as progress,
    ):
        result = run(
            ckpt,
            out,
            dp=dp,
            tp=tp,
            pp=pp,
            partition_method=partition_method,
            layer_specs=layer_specs,
            rules_file=rules,
            tag=tag,
            force=force,
            dry_run=dry_run,
            progress=progress,
        )
    if dry_run:
        console().print(plan_report(result))
    print_line(result.summary())


def plan_report(result: Any) -> Any:
    """What --dry-run shows: a pipeline's target maps (the show-map tables), or a ZeRO plan's
    partitions and where they come from."""
    from dsckpt.plan.pipeline_reshape import PipelineReshapeResult
    from dsckpt.render import map_report, zero_reshape_table

    if isinstance(result, PipelineReshapeResult):
        return map_report(result.topology_map())
    return zero_reshape_table(result.plan)
