"""The Typer app. Commands live one per module; errors are mapped to one line here."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dsckpt._version import __version__
from dsckpt.cli.errors import Interrupted
from dsckpt.errors import DsckptError


class _Group(TyperGroup):
    """Turns what escapes a command into one line on stderr and exit code 1.

    dsckpt's typed errors carry their own message; operating-system errors, memory and recursion
    exhaustion (hostile files) get one from :mod:`dsckpt.cli.errors`. Any other exception keeps
    its traceback: it is a bug. ``DSCKPT_DEBUG=1`` shows the traceback of all of them.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader went away (`dsckpt inspect ... | head`): nothing left to say to it.
            _silence_stdout()
            raise typer.Exit(1) from None
        except (DsckptError, OSError, MemoryError, RecursionError) as exc:
            if os.environ.get("DSCKPT_DEBUG"):
                raise
            from dsckpt.cli.console import echo_error

            echo_error(_one_line(exc))
            raise typer.Exit(1) from None
        except Interrupted as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            # Commands that write wrap their work in reporting_interrupt; here nothing was.
            typer.echo("interrupted: nothing was written", err=True)
            raise typer.Exit(130) from None

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        from dsckpt.cli.help import write_epilog

        write_epilog(self.epilog, formatter)


def _one_line(exc: BaseException) -> str:
    from dsckpt.cli import errors

    if isinstance(exc, DsckptError):
        return str(exc)
    if isinstance(exc, OSError):
        return errors.os_error_line(exc)
    if isinstance(exc, MemoryError):
        return errors.memory_error_line()
    return errors.recursion_error_line()


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would report the broken pipe again, with a traceback.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


ROOT_EPILOG = """Examples:

    dsckpt inspect checkpoints/
    dsckpt to-fp32 checkpoints/ model.safetensors
    dsckpt verify checkpoints/ model.safetensors
    dsckpt reshape checkpoints/ resharded/ --dp 4
    dsckpt COMMAND -h

Errors print one line; set DSCKPT_DEBUG=1 to see the traceback."""

app = typer.Typer(
    cls=_Group,
    name="dsckpt",
    help="Inspect, consolidate and reshape DeepSpeed checkpoints, without DeepSpeed.",
    epilog=ROOT_EPILOG,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # `--install-completion` / `--show-completion`, as Typer apps have; the completion script
    # calls dsckpt back, so it must start fast (nothing heavy at import: see tests).
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    # torch warns on import when numpy is absent; dsckpt does not need it for what it then does.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)


def _register() -> None:
    from dsckpt.cli import inspect_cmd, reshape_cmd, show_map_cmd, to_fp32_cmd, verify_cmd
    from dsckpt.cli.help import Command

    for name, module, function in (
        ("inspect", inspect_cmd, inspect_cmd.inspect),
        ("to-fp32", to_fp32_cmd, to_fp32_cmd.to_fp32),
        ("show-map", show_map_cmd, show_map_cmd.show_map),
        ("reshape", reshape_cmd, reshape_cmd.reshape),
        ("verify", verify_cmd, verify_cmd.verify),
    ):
        app.command(name, cls=Command, epilog=module.EXAMPLES)(function)


_register()


def main() -> None:
    app(prog_name="dsckpt")


if __name__ == "__main__":
    main()
