"""`dsckpt reshape`: re-partition a checkpoint for other TP, PP and DP degrees."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsckpt.cli.console import console
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
    from dsckpt.reshaping import reshape as run

    with byte_progress(enabled=not quiet and not dry_run) as progress:
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
        console().print(plan_table(result))
    console().print(result.summary())


def plan_table(result: Any) -> Any:
    """The plan as Rich tables: for a pipeline the show-map tables of the target; for ZeRO, per
    group and target rank, where the partition comes from."""
    from rich.table import Table
    from rich.text import Text

    if not hasattr(result.plan, "rows"):
        from dsckpt.render import map_report

        return map_report(result.topology_map())
    plan = result.plan

    what = {"zero": f"ZeRO-{plan.stage}", "bf16_optimizer": "BF16_Optimizer", "zero3": "ZeRO-3"}[
        plan.kind
    ]
    table = Table(title=f"{what}: DP {plan.source_dp} -> {plan.dp}", title_justify="left")
    table.add_column("group")
    table.add_column("rank", justify="right")
    table.add_column("elements", justify="right")
    table.add_column("padding", justify="right")
    table.add_column(Text("from: source rank[elements]->offset"), overflow="fold")
    for group, rank, numel, padding, sources in plan.rows():
        table.add_row(group, str(rank), str(numel), str(padding), Text(sources))
    if plan.frozen:
        table.caption = (
            f"{len(plan.frozen)} frozen parameter(s) re-split the same way into "
            f"ceil(numel/{plan.dp}) fragments per rank"
        )
    return table
