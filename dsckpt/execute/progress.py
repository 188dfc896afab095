"""The progress interface the core reports to; the CLI supplies a Rich bar, the library none."""

from __future__ import annotations


class ProgressSink:
    """Receives the total bytes up front, then increments (and, for files planned as they are
    written, additions to the total). The base class ignores them."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def grow(self, nbytes: int) -> None:
        """``nbytes`` more to do than the total said (a file planned only when written)."""
