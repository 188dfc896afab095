"""One place that decides how output looks: tables on a terminal, plain records in a pipe.

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
    return Console(stderr=stderr, width=_pinned_width(), highlight=False, soft_wrap=False)


def _pinned_width() -> int | None:
    value = os.environ.get("DSCKPT_WIDTH")
    return int(value) if value else None


def tables_wanted() -> bool:
    """Tables when stdout is a terminal, or when DSCKPT_WIDTH asks for one that wide (tests and
    the docs' golden blocks show what a terminal shows); plain records otherwise."""
    return _pinned_width() is not None or console().is_terminal


def show(*renderables: Any) -> None:
    """A report: Rich tables on a terminal; in a pipe, one record per line, never wrapped
    (:func:`dsckpt.render.plain_lines`), so `grep`, `cut` and `wc -l` count what they should."""
    from rich.console import Group

    if tables_wanted():
        out = console()
        for renderable in renderables:
            out.print(renderable)
        return
    from dsckpt.render import plain_lines

    for line in plain_lines(Group(*renderables)):
        typer.echo(line)


def print_line(line: str) -> None:
    """A result line (``wrote ...``, ``dry run: ...``): escaped, one line whatever the width
    (a terminal may show it over several rows; a pipe gets it whole)."""
    from dsckpt.printable import printable

    typer.echo(printable(line))


def warn(message: str) -> None:
    """A ``warning:`` line on stderr, escaped like every other line."""
    from dsckpt.printable import printable

    typer.echo(f"warning: {printable(message)}", err=True)


def echo_error(message: str) -> None:
    """The one ``error:`` line on stderr, whatever the message quotes from a file."""
    from dsckpt.printable import printable

    typer.echo(f"error: {printable(message)}", err=True)


def exit_on_errors(findings: Iterable[Any]) -> None:
    """Exit 1 with one line naming the first error finding, after the report was printed."""
    from dsckpt.discover.model import first_error

    error = first_error(findings, hint="")  # the report above lists them
    if error is not None:
        echo_error(str(error))
        raise typer.Exit(1)
