"""`dsckpt reshape`: re-partition a ZeRO checkpoint for another data-parallel size."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dsckpt.cli.console import console
from dsckpt.cli.options import CheckpointArg, ForceOpt, QuietOpt, TagOpt
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
    dp: Annotated[
        int, typer.Option("--dp", help="Target data-parallel size (>= 1).", show_default=False)
    ],
    tag: TagOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show which source ranks and element ranges make each new partition; "
            "write nothing.",
        ),
    ] = False,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Reshape a ZeRO 1/2/3 checkpoint to another DP size: weights, optimizer state, counters."""
    from dsckpt.reshape import reshape as run

    with byte_progress(enabled=not quiet and not dry_run) as progress:
        result = run(ckpt, out, dp=dp, tag=tag, force=force, dry_run=dry_run, progress=progress)
    if dry_run:
        console().print(plan_table(result.plan))
    console().print(result.summary())


def plan_table(plan: Any) -> Any:
    """The plan as a Rich table: per group and target rank, where the partition comes from."""
    from rich.table import Table
    from rich.text import Text

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
