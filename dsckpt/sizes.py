"""Byte counts for people: the one size format of every message, table and progress bar.

Decimal units, as Hugging Face users read them everywhere: the Hub's file sizes, ``hf``'s
progress bars, and ``max_shard_size="5GB"`` (5 * 10**9 bytes, which ``--max-shard-size`` parses
alike). A leaf module (no dsckpt imports) so every layer can use it.
"""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Bytes in decimal units, one decimal: ``999 B``, ``1.5 kB``, ``201.5 MB``, ``5.0 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if round(abs(n), 1) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def exact_bytes(n: int) -> str:
    """``28000000000`` -> ``"28000000000 bytes (28.0 GB)"``: exact, and readable at a glance
    (disk-space messages, where a user compares the figure with ``df``)."""
    return f"{n} bytes" if abs(n) < 1000 else f"{n} bytes ({human_bytes(n)})"
