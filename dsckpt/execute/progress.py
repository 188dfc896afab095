"""The progress interface the core reports to; the CLI supplies a Rich bar, the library none."""

from __future__ import annotations


class ProgressSink:
    """Receives the total bytes up front, then increments. The base class ignores both."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass
