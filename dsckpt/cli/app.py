"""The Typer app. Commands live one per module; errors are mapped to one line here."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dsckpt._version import __version__
from dsckpt.errors import DsckptError


class _Group(TyperGroup):
    """Turns dsckpt's typed errors into one line on stderr and exit code 1.

    Unknown exceptions keep their traceback: they are bugs. ``DSCKPT_DEBUG=1`` shows the
    traceback of known ones too.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except DsckptError as exc:
            if os.environ.get("DSCKPT_DEBUG"):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was written", err=True)
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    name="dsckpt",
    help="Inspect, consolidate and reshape DeepSpeed checkpoints, without DeepSpeed.",
    epilog="Errors print one line; set DSCKPT_DEBUG=1 to see the traceback.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Inspect, consolidate and reshape DeepSpeed checkpoints, without DeepSpeed."""


def _register() -> None:
    from dsckpt.cli import inspect_cmd, reshape_cmd, show_map_cmd, to_fp32_cmd

    app.command("inspect")(inspect_cmd.inspect)
    app.command("to-fp32")(to_fp32_cmd.to_fp32)
    app.command("show-map")(show_map_cmd.show_map)
    app.command("reshape")(reshape_cmd.reshape)
    from dsckpt.cli.verify_cmd import verify

    app.command("verify")(verify)


_register()


def main() -> None:
    app(prog_name="dsckpt")


if __name__ == "__main__":
    main()
