"""A byte progress bar (size known up front from the plan) that stays silent off a terminal.

It is drawn on stderr, so stdout (a result line, or --json) stays clean even on a terminal.
Sizes and speeds use :func:`dsckpt.sizes.human_bytes`, as every other line does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dsckpt.execute.progress import ProgressSink


@contextmanager
def byte_progress(enabled: bool = True) -> Iterator[ProgressSink]:
    from rich.progress import BarColumn, Progress, TimeRemainingColumn

    from dsckpt.cli.console import console

    out = console(stderr=True)
    if not enabled or not out.is_terminal:
        yield ProgressSink()
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        *_byte_columns(),
        TimeRemainingColumn(),
        console=out,
        transient=True,
    ) as bar:
        yield _RichSink(bar)


def _byte_columns() -> tuple[Any, Any]:
    """``201.5 MB / 4.9 GB`` and ``310.2 MB/s``, in the units of every other line."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    from dsckpt.sizes import human_bytes

    class Done(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{human_bytes(task.completed)} / {human_bytes(task.total or 0)}")

    class Speed(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{human_bytes(speed)}/s" if speed else "")

    return Done(), Speed()


class _RichSink(ProgressSink):
    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.task = None
        self.total = 0

    def start(self, description: str, total: int) -> None:
        from rich.markup import escape

        from dsckpt.printable import printable

        # The description is set into a markup template: escape it so it stays text.
        self.total = total
        self.task = self.bar.add_task(escape(printable(description)), total=total)

    def advance(self, nbytes: int) -> None:
        self.bar.advance(self.task, nbytes)

    def grow(self, nbytes: int) -> None:
        self.total += nbytes
        self.bar.update(self.task, total=self.total)
