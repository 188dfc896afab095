"""The front door of ``reshape``: a checkpoint to new degrees, whatever its layout.

ZeRO checkpoints without model parallelism are planned by :mod:`dsckpt.plan.zero_reshape`
(``--dp``); pipeline / Megatron-DeepSpeed checkpoints by :mod:`dsckpt.plan.pipeline_reshape`
(``--tp``, ``--pp``, ``--dp`` together); universal checkpoints (``ds_to_universal``) by
:mod:`dsckpt.plan.universal_reshape` (``--dp``: native ZeRO files, the same writer). Either
way the rank files become a write plan (:mod:`dsckpt.execute.formats.deepspeed_files`,
:mod:`dsckpt.execute.formats.pipeline_files`) that the one executor writes
(:func:`dsckpt.execute.checkpoint_dir.write_tag_directory`).
"""

from __future__ import annotations

from pathlib import Path

from dsckpt.discover.files import scan
from dsckpt.discover.layout import Layout, open_checkpoint
from dsckpt.errors import UnsupportedLayout, UsageError
from dsckpt.execute.checkpoint_dir import check_reshape_output, write_tag_directory
from dsckpt.execute.formats.deepspeed_files import ZeroRankFiles
from dsckpt.execute.formats.pipeline_files import PipelineRankFiles
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.maps import check_degrees
from dsckpt.plan.pipeline_reshape import PipelineReshapeResult, plan_pipeline
from dsckpt.plan.universal_reshape import UniversalSource, open_universal, plan_universal
from dsckpt.plan.zero_reshape import ReshapeResult
from dsckpt.plan.zero_source import (
    Source,
    extra_entries,
    location_of,
    plan_reshape,
    refuse_stage0_ep_change,
)


def reshape(
    ckpt: Path | str,
    out: Path | str,
    *,
    dp: int | None = None,
    tp: int | None = None,
    pp: int | None = None,
    ep: int | None = None,
    partition_method: str = "parameters",
    layer_specs: str | None = None,
    rules_file: Path | None = None,
    tag: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressSink | None = None,
) -> ReshapeResult | PipelineReshapeResult:
    """Write ``ckpt`` re-partitioned for a new topology to ``out``; an omitted degree is kept.

    ``out`` becomes a save_dir DeepSpeed loads at the new size with
    ``engine.load_checkpoint(out)``: ``out/latest`` names the source tag, ``out/<tag>/`` holds
    the rank files. Nothing is written on a dry run or on any error; the input is never modified.
    Pipeline / Megatron checkpoints go to :func:`reshape_pipeline` (any of
    ``tp``, ``pp``, ``dp``); ZeRO checkpoints without model parallelism take ``dp`` only, and so
    do universal checkpoints (:func:`reshape_universal`), written as native ZeRO files.
    Mixture-of-experts ZeRO-1/2 checkpoints keep their expert-parallel sizes unless ``ep`` is
    given (native MoE whose layers share one EP size: every expert group goes to EP ``ep``,
    ``dp`` defaulting to the saved DP size); ``dp`` must be a multiple of the EP size, and the
    expert groups are re-split over ``dp / ep`` ranks.

    Raises:
        UsageError, InconsistentCheckpoint, UnsupportedLayout, OutputError: one line each.
    """
    check_degrees(dp=dp, tp=tp, pp=pp, ep=ep)
    layout = open_checkpoint(ckpt, tag)
    if ep is not None and layout.kind in ("universal", "pipeline"):
        raise UnsupportedLayout(
            f"--ep {ep}: {layout.dir} is a {layout.kind} checkpoint; --ep applies to native "
            "mixture-of-experts ZeRO-1/2 checkpoints"
        )
    if layout.kind == "universal":
        if (tp or 1) != 1 or (pp or 1) != 1 or rules_file is not None:
            raise UnsupportedLayout(
                f"{layout.dir} is a universal checkpoint: reshape writes it as a native ZeRO "
                "checkpoint at a new DP size (--dp only); TP/PP/rules do not apply"
            )
        if dp is None:
            raise UsageError("give a target degree: --dp N (the native checkpoint's DP size)")
        return reshape_universal(
            layout, out, dp=dp, force=force, dry_run=dry_run, progress=progress
        )
    if layout.kind == "pipeline":
        return reshape_pipeline(
            layout,
            out,
            tp=tp,
            pp=pp,
            dp=dp,
            partition_method=partition_method,
            layer_specs=layer_specs,
            rules_file=rules_file,
            force=force,
            dry_run=dry_run,
            progress=progress,
        )
    if (tp or 1) != 1 or (pp or 1) != 1 or rules_file is not None:
        raise UnsupportedLayout(
            f"{layout.dir} is not a pipeline / Megatron checkpoint (no layer files): only --dp "
            "(and --ep for native MoE) can change, and there are no TP rules to apply"
        )
    if dp is None and ep is not None:
        dp = layout.dp  # only the expert parallelism changes
    if dp is None:
        raise UsageError("give a target degree: --dp N (this checkpoint has no model parallelism)")
    return reshape_zero(layout, out, dp=dp, ep=ep, force=force, dry_run=dry_run, progress=progress)


def reshape_zero(
    layout: Layout,
    out: Path | str,
    *,
    dp: int,
    ep: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressSink | None = None,
) -> ReshapeResult:
    """Write the ZeRO checkpoint ``layout`` re-partitioned for ``dp`` ranks (MoE expert groups
    at EP ``ep``, None: kept) to ``out`` (see :func:`reshape`): plan, check the output, plan
    every rank file, then write them."""
    refuse_stage0_ep_change(layout, ep)
    source, plan = plan_reshape(layout, dp, ep=ep)
    result = ReshapeResult(
        plan=plan, source=layout.dir, out=Path(out), tag=source.tag, written=False
    )
    description = f"reshape to DP {plan.dp}"
    if plan.source_ep_sizes:
        description += f", EP {', '.join(map(str, plan.ep_sizes))}"
    return _write_zero(source, result, force, dry_run, progress, description)


def reshape_universal(
    layout: Layout,
    out: Path | str,
    *,
    dp: int,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressSink | None = None,
) -> ReshapeResult:
    """Write the universal checkpoint ``layout`` as a native ZeRO checkpoint for ``dp`` ranks
    (:mod:`dsckpt.plan.universal_reshape`): what DeepSpeed would have saved at that size, so a
    plain ``engine.load_checkpoint(out)`` resumes it without ``load_universal``."""
    source = open_universal(layout)
    plan = plan_universal(source, dp)
    result = ReshapeResult(
        plan=plan,
        source=layout.dir,
        out=Path(out),
        tag=source.tag,
        written=False,
        from_universal=True,
    )
    return _write_zero(source, result, force, dry_run, progress, f"universal to native DP {dp}")


def _write_zero(
    source: Source | UniversalSource,
    result: ReshapeResult,
    force: bool,
    dry_run: bool,
    progress: ProgressSink | None,
    description: str,
) -> ReshapeResult:
    """Check the output, plan every rank file of ``result.plan`` from ``source``, write them."""
    check_reshape_output(source.layout, result.out, force)
    plan = result.plan
    if dry_run:
        result.plan_files = lambda: ZeroRankFiles(source, plan).write_plan()
        return result
    # ZeRO-3's model-states files are planned as they are written (memory bounded by one).
    write_plan = ZeroRankFiles(source, plan).write_plan(defer=True)
    written = write_tag_directory(
        write_plan,
        result.out,
        source.tag,
        force=force,
        progress=progress,
        description=description,
        extras_from=source.layout.dir,
        extras=[p.name for p in source.extra_files],
    )
    result.files = [f.name.partition("/")[2] for f in write_plan.files if f.name != "latest"]
    result.files += written.copied
    result.skipped, result.nbytes = written.skipped, written.nbytes
    result.written = True
    return result


def reshape_pipeline(
    layout: Layout,
    out: Path | str,
    *,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    partition_method: str = "parameters",
    layer_specs: str | None = None,
    rules_file: Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressSink | None = None,
) -> PipelineReshapeResult:
    """Write the pipeline checkpoint ``layout`` re-split for (``pp``, ``tp``, ``dp``) to ``out``.

    Raises:
        UsageError, RuleError, InconsistentCheckpoint, UnsupportedLayout, OutputError.
    """
    plan = plan_pipeline(
        layout,
        tp=tp,
        pp=pp,
        dp=dp,
        partition_method=partition_method,
        layer_specs=layer_specs,
        rules_file=rules_file,
    )
    out = Path(out)
    check_reshape_output(layout, out, force)
    tag = layout.tag if layout.tag is not None else layout.dir.name
    result = PipelineReshapeResult(plan, layout.dir, out, tag, written=False)
    if dry_run:
        result.plan_files = lambda: PipelineRankFiles(plan).write_plan(tag)
        return result
    rank_files, _ = scan(location_of(layout))
    extras = extra_entries(layout.dir, rank_files)
    write_plan = PipelineRankFiles(plan).write_plan(tag)
    dst = plan.dst
    written = write_tag_directory(
        write_plan,
        out,
        tag,
        force=force,
        progress=progress,
        description=f"reshape to PP {dst.pp} x TP {dst.tp} x DP {dst.dp}",
        extras_from=layout.dir,
        extras=extras,
    )
    planned = [f.name.partition("/")[2] for f in write_plan.files if f.name != "latest"]
    result.files = sorted(planned + written.copied)
    result.skipped, result.nbytes = written.skipped, written.nbytes
    result.written = True
    return result
