"""A byte progress bar (size known up front from the plan) that stays silent off a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dsckpt.execute.progress import ProgressSink


@contextmanager
def byte_progress(enabled: bool = True) -> Iterator[ProgressSink]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from dsckpt.cli.console import console

    out = console(stderr=True)
    if not enabled or not out.is_terminal:
        yield ProgressSink()
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    ) as bar:
        yield _RichSink(bar)


class _RichSink(ProgressSink):
    def __init__(self, bar) -> None:  # type: ignore[no-untyped-def]
        self.bar = bar
        self.task = None

    def start(self, description: str, total: int) -> None:
        from rich.markup import escape

        from dsckpt.printable import printable

        # The description is set into a markup template: escape it so it stays text.
        self.task = self.bar.add_task(escape(printable(description)), total=total)

    def advance(self, nbytes: int) -> None:
        self.bar.advance(self.task, nbytes)
