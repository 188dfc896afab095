"""One place that decides how output looks: plain when not a terminal, fixed width on request.

Everything the CLI prints as text goes through here or through :mod:`dsckpt.render`, where names
from a checkpoint have their control characters escaped (:func:`dsckpt.printable.printable`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import typer
from rich.console import Console


def console(stderr: bool = False) -> Console:
    # DSCKPT_WIDTH pins the width (tests, golden files); otherwise Rich asks the terminal.
    width = int(os.environ["DSCKPT_WIDTH"]) if os.environ.get("DSCKPT_WIDTH") else None
    return Console(stderr=stderr, width=width, highlight=False, soft_wrap=False)


def print_line(line: str) -> None:
    """A result line (``wrote ...``, ``dry run: ...``): escaped, never read as Rich markup."""
    from dsckpt.render import text

    console().print(text(line))


def echo_error(message: str) -> None:
    """The one ``error:`` line on stderr, whatever the message quotes from a file."""
    from dsckpt.printable import printable

    typer.echo(f"error: {printable(message)}", err=True)


def exit_on_errors(findings: Iterable[Any]) -> None:
    """Exit 1 with one line naming the first error finding, after the report was printed."""
    errors = [f for f in findings if f.level == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        echo_error(f"{errors[0].message}{more}")
        raise typer.Exit(1)
