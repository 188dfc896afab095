"""`dsckpt show-map`: which file holds which layer slice for which rank, and old -> new maps."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dsckpt.cli.console import console
from dsckpt.cli.options import CheckpointArg, JsonOpt, TagOpt


def show_map(
    ckpt: CheckpointArg,
    tag: TagOpt = None,
    tp: Annotated[int | None, typer.Option("--tp", help="Target tensor-parallel degree.")] = None,
    pp: Annotated[int | None, typer.Option("--pp", help="Target pipeline-parallel degree.")] = None,
    dp: Annotated[int | None, typer.Option("--dp", help="Target data-parallel degree.")] = None,
    partition_method: Annotated[
        str,
        typer.Option(
            help="How the target assigns layers to stages, as "
            "PipelineModule(partition_method=...): "
            "parameters, uniform or type:REGEX."
        ),
    ] = "parameters",
    as_json: JsonOpt = False,
) -> None:
    """Show the rank and layer maps; with target degrees, which sources feed each new rank."""
    from dsckpt.layout import open_checkpoint
    from dsckpt.render import map_json, map_report
    from dsckpt.topology_map import topology_map

    tmap = topology_map(open_checkpoint(ckpt, tag), tp=tp, pp=pp, dp=dp, method=partition_method)
    if as_json:
        typer.echo(json.dumps(map_json(tmap), indent=2))
    else:
        console().print(map_report(tmap))
