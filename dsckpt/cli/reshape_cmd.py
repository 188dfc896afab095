"""`dsckpt reshape`: re-partition a checkpoint for other TP, PP and DP degrees."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from dsckpt.cli.console import print_line, show, warn
from dsckpt.cli.errors import reporting_interrupt
from dsckpt.cli.help import examples
from dsckpt.cli.launch import as_launched
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
    WorkersOpt,
)
from dsckpt.cli.progress import byte_progress


def reshape(
    ckpt: CheckpointArg,
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Output save_dir (created; must not exist unless --force): gets `latest` and the "
            "tag directory, ready for engine.load_checkpoint at the new size.",
            show_default=False,
        ),
    ],
    dp: DPOpt = None,
    tp: TPOpt = None,
    pp: PPOpt = None,
    ep: Annotated[
        int | None,
        typer.Option(
            "--ep",
            metavar="M",
            help="Target expert-parallel degree of a native mixture-of-experts ZeRO-1/2 "
            "checkpoint whose MoE layers share one EP size (default: keep; --dp defaults to the "
            "saved DP size and must be a multiple of M).",
        ),
    ] = None,
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
    workers: WorkersOpt = 1,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the result (or the --dry-run plan) as JSON."),
    ] = False,
) -> None:
    """Reshape a checkpoint to new degrees (ZeRO 1/2/3: --dp; mixture-of-experts ZeRO 1/2: --dp,
    and --ep to change the expert parallelism; Megatron pipelines: --tp, --pp, --dp together; a
    universal checkpoint: --dp, written as native ZeRO files): weights, optimizer state and
    counters, loadable by unmodified DeepSpeed."""
    invocation = dict(locals())  # the parameters, for --workers to run this again
    from dsckpt.api.reshaping import reshape as run
    from dsckpt.render import reshape_json, reshape_line, to_json

    options: dict[str, Any] = dict(
        dp=dp,
        tp=tp,
        pp=pp,
        ep=ep,
        partition_method=partition_method,
        layer_specs=layer_specs,
        rules_file=rules,
        tag=tag,
        force=force,
    )
    empty = 0
    started = time.perf_counter()
    if dry_run or dp is not None or ep is not None:
        # Plan first: the dry run's answer, or (when the DP size changes) a look at how many
        # target ranks would be empty, said before anything is written.
        preview = run(ckpt, out, dry_run=True, **options)
        empty = empty_ranks(preview)
        if empty and not dry_run:
            warn(empty_warning(preview, empty))
    write_plan = None
    if dry_run:
        result = preview
        if as_json and result.plan_files is not None:  # byte ranges: planned only if asked
            write_plan = result.plan_files()
    else:
        started = time.perf_counter()
        with (
            as_launched(workers, reshape, invocation) as reports,
            reporting_interrupt(out),
            byte_progress(enabled=not quiet and reports) as progress,
        ):
            result = run(ckpt, out, dry_run=False, progress=progress, **options)
        if not reports:
            return
    seconds = time.perf_counter() - started
    if as_json:
        typer.echo(to_json(reshape_json(result, seconds, empty, write_plan)))
        return
    if dry_run:
        show(plan_report(result))
    print_line(reshape_line(result, empty))


def plan_report(result: Any) -> Any:
    """What --dry-run shows: a pipeline's target maps (the show-map tables), or a ZeRO plan's
    partitions and where they come from."""
    from dsckpt.plan.pipeline_reshape import PipelineReshapeResult
    from dsckpt.plan.topology_map import reshape_map
    from dsckpt.render import map_report, zero_reshape_table

    if isinstance(result, PipelineReshapeResult):
        return map_report(reshape_map(result.plan))
    return zero_reshape_table(result)


def empty_ranks(result: Any) -> int:
    """Target ranks whose every flat partition is DeepSpeed's padding only (no parameter
    element): a DP size far beyond what the model's size can spread over.

    Read from the plan: a ZeRO plan lists each rank's partition (length and padding); a
    pipeline plan gives each target stage's parameters, partitioned as ZeRO-1 partitions them.
    """
    plan = result.plan
    if hasattr(plan, "stages"):
        return _pipeline_empty_ranks(plan)
    held: dict[int, int] = {}
    for group in plan.groups:
        for part in group.partitions:
            held[part.rank] = held.get(part.rank, 0) + part.numel - part.padding
    return sum(1 for n in held.values() if n <= 0)


def _pipeline_empty_ranks(plan: Any) -> int:
    from dsckpt.discover import zero

    dst = plan.dst
    empty = 0
    for stage in plan.stages:
        for tp_rank in range(dst.tp):
            totals = [
                sum(zero.numel(plan.local_shape(name, tp_rank)) for name in names)
                for names in stage.groups
            ]
            sizes = [zero.zero12_partition_size(total, dst.dp) for total in totals]
            empty += sum(
                1
                for d in range(dst.dp)
                if all(d * size >= total for size, total in zip(sizes, totals, strict=True))
            )
    return empty


def empty_warning(result: Any, empty: int) -> str:
    from dsckpt.render import reshape_topologies

    _, dst = reshape_topologies(result)
    world = dst["pp"] * dst["tp"] * dst["dp"]
    return (
        f"{empty} of {world} target ranks would hold no parameter elements, only padding: "
        f"the model is too small to spread over DP {dst['dp']} (a smaller --dp avoids it)"
    )


EXAMPLES = examples(
    "dsckpt reshape checkpoints/ resized/ --dp 8",
    "dsckpt reshape moe-checkpoints/ resized/ --dp 4 --ep 4 --dry-run",
    "dsckpt reshape megatron-ckpt/ resized/ --tp 1 --pp 2 --dp 4",
    "dsckpt reshape checkpoints/ resized/ --dp 8 --json -q",
)
