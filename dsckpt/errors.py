"""Typed, user-facing errors.

The core raises these; the CLI turns each into one line (what is wrong, which file or rank, what
to do) and exit code 1. Anything else is a bug and keeps its traceback. Every exception class
dsckpt defines is a :class:`DsckptError`, so ``except DsckptError`` catches all of them.
"""

from __future__ import annotations

from pathlib import Path


class DsckptError(Exception):
    """A user-facing error: one line that says what is wrong and what to do."""


class CheckpointNotFound(DsckptError):
    """The path given is not a checkpoint (missing, a file, empty, unrelated files)."""


class UnsafeCheckpoint(DsckptError):
    """A pickle asks for a global outside the allow-list; nothing from it was run."""


class CorruptFile(DsckptError):
    """A checkpoint file cannot be read as a torch zip pickle (truncated, not a zip, bad record)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path}: {reason}; the file is damaged or incomplete: "
            "copy it again from where the run saved it"
        )
        self.path = path


class UnreadableFile(CorruptFile):
    """A path dsckpt must read cannot be read as a file: not a regular file (a FIFO, a device, a
    directory), a dangling link or a link loop, or the system refuses it (permission, I/O error).

    A :class:`CorruptFile`, so code that tolerates a damaged rank file tolerates these the same
    way; the message says what the path is instead of calling it damaged.
    """

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        DsckptError.__init__(self, f"{path}: {reason}: {fix}")
        self.path = path


class InconsistentCheckpoint(DsckptError):
    """The rank files disagree with each other or with their own metadata."""


class UnsupportedLayout(DsckptError):
    """A layout dsckpt recognises but this command does not handle."""


class OutputError(DsckptError):
    """The destination cannot be written (exists, inside the input, no space, bad suffix)."""


class UsageError(DsckptError):
    """A flag value that cannot work (a degree below 1, an unknown dtype)."""


class MapError(DsckptError, ValueError):
    """A topology, partition or split that cannot be realised, with the reason in the message.

    Raised by the pure arithmetic of :mod:`dsckpt.plan.maps`, whose callers add which flag or
    parameter it concerns. Also a ValueError: a bad degree is a bad value.
    """


class IncompleteOutputError(OutputError, RuntimeError):
    """A write plan that would leave bytes unwritten, write some twice or outside a file, or a
    computed value of the wrong size: a bug in the plan or the executor. Nothing is written
    (or the output is discarded, never renamed into place); also a RuntimeError, as the bug it
    is."""
