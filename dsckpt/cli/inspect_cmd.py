"""`dsckpt inspect`: what a checkpoint holds, by rank, and what is wrong with it."""

from __future__ import annotations

import typer

from dsckpt.cli.console import exit_on_errors, show
from dsckpt.cli.help import examples
from dsckpt.cli.options import CheckpointArg, JsonOpt, TagOpt


def inspect(
    ckpt: CheckpointArg,
    tag: TagOpt = None,
    params: bool = typer.Option(
        False, "--params", help="One row per parameter: shape, dtype, placement."
    ),
    as_json: JsonOpt = False,
) -> None:
    """Summarise a checkpoint: layout, topology, dtypes, counts, files by rank, findings.

    Exits 1 when any finding is an error (missing, stale or inconsistent files).
    """
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.render import layout_json, layout_report, to_json

    layout = open_checkpoint(ckpt, tag, partial=True)  # a damaged file: show what was read
    if as_json:
        typer.echo(to_json(layout_json(layout, params=params)))
    else:
        show(layout_report(layout, params=params))
    exit_on_errors(layout.findings)


EXAMPLES = examples(
    "dsckpt inspect checkpoints/",
    "dsckpt inspect checkpoints/global_step100 --params",
    "dsckpt inspect checkpoints/ | grep -c optim_states",
    "dsckpt inspect checkpoints/ --tag global_step100 --json",
)
