"""`dsckpt to-fp32`: one consolidated state dict, loadable without DeepSpeed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dsckpt.cli.console import print_line, warn
from dsckpt.cli.errors import reporting_interrupt
from dsckpt.cli.help import examples
from dsckpt.cli.launch import as_launched
from dsckpt.cli.options import (
    CheckpointArg,
    ForceOpt,
    QuietOpt,
    RulesOpt,
    TagOpt,
    WorkersOpt,
    dtype_option,
)
from dsckpt.cli.progress import byte_progress
from dsckpt.errors import UsageError


def to_fp32(
    ckpt: CheckpointArg,
    out: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Output: *.safetensors, *.bin / *.pt (torch.save), or a directory for "
            "Hugging Face shards + model.safetensors.index.json.",
            show_default=False,
        ),
    ],
    tag: TagOpt = None,
    step: Annotated[
        int | None,
        typer.Option(
            "--step",
            metavar="N",
            min=0,
            help="Trainer output_dir: read checkpoint-N/ (default: the newest).",
        ),
    ] = None,
    dtype: Annotated[
        str,
        dtype_option(
            "Output dtype of floating tensors: fp32, bf16 or fp16 (or float32, bfloat16, "
            "float16); auto: the one config.json names (Hugging Face folder output).",
            allow_auto=True,
        ),
    ] = "fp32",
    hf: Annotated[
        bool | None,
        typer.Option(
            "--hf/--no-hf",
            help="Write a from_pretrained folder: shards + index, config.json, tokenizer files "
            "copied, tied weights as save_pretrained writes them. Default: when OUT is a "
            "directory and the checkpoint folder holds config.json.",
            show_default=False,
        ),
    ] = None,
    adapter: Annotated[
        bool,
        typer.Option(
            "--adapter",
            help="PEFT LoRA runs: write an adapter folder PeftModel.from_pretrained loads "
            "(adapter_model.safetensors with PEFT's key names, adapter_config.json).",
        ),
    ] = False,
    merge_adapter: Annotated[
        Path | None,
        typer.Option(
            "--merge-adapter",
            metavar="BASE",
            help="PEFT LoRA runs: write BASE (the base model's folder) with the trained "
            "adapter merged in, as PEFT's merge_and_unload computes it, in fp32.",
            show_default=False,
        ),
    ] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE",
            help="Largest shard when OUT is a directory (e.g. 5GB, 500MB, 10GiB); default 5GB.",
            show_default=False,
        ),
    ] = None,
    exclude_frozen: Annotated[
        bool, typer.Option("--exclude-frozen", help="Leave out frozen parameters.")
    ] = False,
    rules: RulesOpt = None,
    from_layers: Annotated[
        bool,
        typer.Option(
            "--from-layers",
            help="Pipeline checkpoints: take weights from the layer files (model dtype, upcast) "
            "instead of the fp32 optimizer partitions. Without ZeRO, fp32 layer files are taken "
            "anyway: they are the weights.",
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
    hf_names: Annotated[
        bool,
        typer.Option(
            "--hf-names",
            help="DeepSpeed AutoEP (MoE) checkpoints: name the expert and router tensors as the "
            "Hugging Face model does (Mixtral: experts.gate_up_proj = cat(w1, w3), "
            "experts.down_proj, gate.weight), so the model class loads them strictly.",
        ),
    ] = False,
    optimizer: Annotated[
        bool,
        typer.Option(
            "--optimizer",
            help="Also write the optimizer state (exp_avg, exp_avg_sq, step, param groups): "
            "optimizer.safetensors inside a directory OUT, <stem>.optimizer.safetensors beside "
            "a file OUT; written together with the weights (both or neither).",
        ),
    ] = False,
    optimizer_format: Annotated[
        str,
        typer.Option(
            metavar="FORMAT",
            help="With --optimizer: safetensors (tensors by parameter name) or torch (a "
            "torch.optim.AdamW state_dict() saved as optimizer.pt / <stem>.optimizer.pt).",
        ),
    ] = "safetensors",
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    workers: WorkersOpt = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON (see docs/json.md).")
    ] = False,
) -> None:
    """Consolidate a ZeRO 1/2/3, plain or Megatron 3D checkpoint into one fp32 state dict."""
    invocation = dict(locals())  # the parameters, for --workers to run this again
    from dsckpt.api.consolidation import check_optimizer_options, consolidate, output_format
    from dsckpt.execute.formats import SHARDED
    from dsckpt.render import consolidate_json, consolidate_line, to_json

    if max_shard_size is not None and output_format(out) != SHARDED:
        raise UsageError(
            f"--max-shard-size {max_shard_size}: {out} is a single file; shards are written "
            "only when OUT is a directory (drop the option, or give a directory)"
        )
    if optimizer and (adapter or merge_adapter):
        raise UsageError(
            "--optimizer exports the optimizer state of a full consolidation: it "
            "takes no --adapter or --merge-adapter"
        )
    if optimizer:
        check_optimizer_options(optimizer_format, from_layers)
    elif optimizer_format != "safetensors":
        raise UsageError(f"--optimizer-format {optimizer_format} needs --optimizer")
    if from_layers:
        check_from_layers(ckpt, tag, "to-fp32", step)
    if hf_names and (adapter or merge_adapter):
        raise UsageError(
            "--hf-names names a full consolidation's MoE tensors: it takes no --adapter or "
            "--merge-adapter"
        )
    if adapter and (hf or max_shard_size or exclude_frozen or from_layers or merge_adapter):
        raise UsageError(
            "--adapter writes one adapter file of the LoRA matrices: it takes no "
            "--hf, --merge-adapter, --max-shard-size, --exclude-frozen or "
            "--from-layers"
        )
    if merge_adapter and (hf is not None or exclude_frozen or from_layers):
        raise UsageError(
            "--merge-adapter writes a Hugging Face folder of the merged model: it "
            "takes no --hf/--no-hf, --exclude-frozen or --from-layers"
        )
    with (
        as_launched(workers, to_fp32, invocation) as reports,
        reporting_interrupt(out),
        byte_progress(enabled=not quiet and reports) as progress,
    ):
        if adapter:
            from dsckpt.api.hf import export_adapter

            result = export_adapter(
                ckpt, out, step=step, tag=tag, dtype=dtype, force=force, progress=progress
            )
        elif merge_adapter is not None:
            from dsckpt.api.hf import export_merged

            result = export_merged(
                ckpt,
                out,
                merge_adapter,
                step=step,
                tag=tag,
                dtype=dtype,
                max_shard_size=max_shard_size or "5GB",
                force=force,
                progress=progress,
            )
        else:
            result = consolidate(
                ckpt,
                out,
                tag=tag,
                step=step,
                dtype=dtype,
                hf=hf,
                max_shard_size="5GB" if max_shard_size is None else max_shard_size,
                exclude_frozen=exclude_frozen,
                force=force,
                progress=progress,
                rules_file=rules,
                from_layers=from_layers,
                strip_vocab_padding=not keep_vocab_padding,
                optimizer=optimizer,
                optimizer_format=optimizer_format,
                hf_names=hf_names,
            )
    if not reports:
        return
    if as_json:
        typer.echo(to_json(consolidate_json(result, dtype)))
    else:
        print_line(consolidate_line(result))


def check_from_layers(ckpt: Path, tag: str | None, command: str, step: int | None = None) -> None:
    """--from-layers means something only for a pipeline checkpoint: refuse it elsewhere, and
    warn, before any work, when the layer files hold fewer bits than the fp32 master weights."""
    from dsckpt.discover.layout import open_checkpoint

    layout = open_checkpoint(ckpt, tag, step)
    if layout.kind != "pipeline":
        raise UsageError(
            f"--from-layers: {layout.dir} has no pipeline layer files (layer_*-model_states.pt); "
            f"{command} reads the fp32 master weights from its optimizer partitions: drop the "
            "option"
        )
    if layout.param_dtype not in (None, "float32"):
        warn(
            f"--from-layers reads the {layout.param_dtype} layer weights (upcast), not the fp32 "
            "master weights"
        )


EXAMPLES = examples(
    "dsckpt to-fp32 checkpoints/ model.safetensors",
    "dsckpt to-fp32 output_dir/ hf-model/ --step 500 --max-shard-size 2GB --dtype bfloat16",
    "dsckpt to-fp32 checkpoints/ pytorch_model.bin --tag global_step100 --exclude-frozen",
    "dsckpt to-fp32 checkpoints/ model.safetensors --optimizer --json -q",
)
