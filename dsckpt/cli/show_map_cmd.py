"""`dsckpt show-map`: which file holds which layer slice for which rank, and old -> new maps."""

from __future__ import annotations

import json

import typer

from dsckpt.cli.console import console
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
    """Show the rank and layer maps; with target degrees, which sources feed each new rank."""
    from dsckpt.layout import open_checkpoint
    from dsckpt.render import map_json, map_report
    from dsckpt.topology_map import topology_map

    tmap = topology_map(
        open_checkpoint(ckpt, tag),
        tp=tp,
        pp=pp,
        dp=dp,
        method=partition_method,
        layer_specs=layer_specs,
    )
    if as_json:
        typer.echo(json.dumps(map_json(tmap), indent=2))
    else:
        console().print(map_report(tmap))
