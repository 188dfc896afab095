"""The front door of ``reshape``: a checkpoint to new degrees, whatever its layout.

ZeRO checkpoints without model parallelism go to :mod:`dsckpt.zero_reshape` (``--dp``);
pipeline / Megatron-DeepSpeed checkpoints to :mod:`dsckpt.pipeline_reshape` (``--tp``, ``--pp``,
``--dp`` together).
"""

from __future__ import annotations

from pathlib import Path

from dsckpt.discover.layout import open_checkpoint
from dsckpt.errors import UnsupportedLayout, UsageError
from dsckpt.execute.progress import ProgressSink
from dsckpt.plan.maps import check_degrees
from dsckpt.plan.pipeline_reshape import PipelineReshapeResult, reshape_pipeline
from dsckpt.plan.zero_reshape import ReshapeResult, reshape_zero


def reshape(ckpt: Path | str, out: Path | str, *, dp: int | None = None, tp: int | None = None,
            pp: int | None = None, partition_method: str = "parameters",
            layer_specs: str | None = None, rules_file: Path | None = None,
            tag: str | None = None, force: bool = False, dry_run: bool = False,
            progress: ProgressSink | None = None) -> ReshapeResult | PipelineReshapeResult:
    """Write ``ckpt`` re-partitioned for a new topology to ``out``; an omitted degree is kept.

    ``out`` becomes a save_dir DeepSpeed loads at the new size with
    ``engine.load_checkpoint(out)``: ``out/latest`` names the source tag, ``out/<tag>/`` holds
    the rank files. Nothing is written on a dry run or on any error; the input is never modified.
    Pipeline / Megatron checkpoints go to :func:`dsckpt.pipeline_reshape.reshape_pipeline` (any of
    ``tp``, ``pp``, ``dp``); ZeRO checkpoints without model parallelism take ``dp`` only.

    Raises:
        UsageError, InconsistentCheckpoint, UnsupportedLayout, OutputError: one line each.
    """
    check_degrees(dp=dp, tp=tp, pp=pp)
    layout = open_checkpoint(ckpt, tag)
    if layout.kind == "pipeline":
        return reshape_pipeline(layout, out, tp=tp, pp=pp, dp=dp,
                                partition_method=partition_method, layer_specs=layer_specs,
                                rules_file=rules_file, force=force, dry_run=dry_run,
                                progress=progress)
    if (tp or 1) != 1 or (pp or 1) != 1 or rules_file is not None:
        raise UnsupportedLayout(
            f"{layout.dir} is not a pipeline / Megatron checkpoint (no layer files): only --dp "
            "can change, and there are no TP rules to apply")
    if dp is None:
        raise UsageError("give a target degree: --dp N (this checkpoint has no model parallelism)")
    return reshape_zero(layout, out, dp=dp, force=force, dry_run=dry_run, progress=progress)
