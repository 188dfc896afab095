"""`dsckpt show-map`: which file holds which layer slice for which rank, and old -> new maps."""

from __future__ import annotations

import typer

from dsckpt.cli.console import exit_on_errors, show
from dsckpt.cli.help import examples
from dsckpt.cli.options import (
    CheckpointArg,
    DPOpt,
    JsonOpt,
    LayerSpecsOpt,
    PartitionMethodOpt,
    PPOpt,
    TagOpt,
    TPOpt,
)


def show_map(
    ckpt: CheckpointArg,
    tag: TagOpt = None,
    tp: TPOpt = None,
    pp: PPOpt = None,
    dp: DPOpt = None,
    partition_method: PartitionMethodOpt = "parameters",
    layer_specs: LayerSpecsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the rank and layer maps; with target degrees, which sources feed each new rank.

    Exits 1 when the checkpoint has errors (the findings `inspect` reports): what can be mapped
    is shown, then the findings.
    """
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.errors import DsckptError
    from dsckpt.plan.topology_map import topology_map
    from dsckpt.render import findings_table, map_json, map_report, to_json

    layout = open_checkpoint(ckpt, tag)
    try:
        tmap = topology_map(
            layout, tp=tp, pp=pp, dp=dp, method=partition_method, layer_specs=layer_specs
        )
    except DsckptError:
        if not layout.errors:
            raise
        # A broken checkpoint may not support a target map; its findings say why, so show what
        # can be mapped and them rather than only the symptom.
        tmap = topology_map(layout)
    if as_json:
        typer.echo(to_json(map_json(tmap, findings=layout.findings)))
    else:
        show(map_report(tmap), *([findings_table(layout)] if layout.findings else []))
    exit_on_errors(layout.findings)


EXAMPLES = examples(
    "dsckpt show-map checkpoints/",
    "dsckpt show-map checkpoints/ --tp 1 --pp 4",
    "dsckpt show-map checkpoints/ --tp 2 --pp 2 --dp 8 --json",
)
