"""Size strings as Hugging Face uses them for ``max_shard_size``."""

from __future__ import annotations

import re

from dsckpt.errors import UsageError

# Decimal units are powers of ten and binary ones powers of two, as transformers reads them;
# a lower-case trailing "b" (e.g. "5Gb") means bits.
_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?(B|b)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: an int, or a string like ``5GB``, ``500MB``, ``10GiB``, ``1000``."""
    if isinstance(value, int):
        size = value
    else:
        found = _SIZE.match(value)
        if not found:
            raise UsageError(f"--max-shard-size {value!r}: write a size like 5GB, 500MB or 10GiB")
        number, unit, byte = found.groups()
        size = int(float(number) * _UNITS[(unit or "").upper()])
        if byte == "b" and unit:
            size //= 8
    if size < 1:
        raise UsageError(f"--max-shard-size {value!r}: must be at least one byte")
    return size
