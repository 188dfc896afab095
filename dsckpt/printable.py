"""Text from a checkpoint made safe to show on a terminal, and lists cut short for a message.

Tags, key names, file names and the values quoted in messages come from files that anyone may
have written. A control character in them (ESC starting a CSI or OSC sequence, the 8-bit CSI
``\\x9b``, BEL, CR, a newline inside a name) would reach the terminal and act there: retitle the
window, clear the screen, hide a line, forge a second line of output. Every string printed as text
passes through :func:`printable` once, at the output boundary (``dsckpt.render`` and the CLI's
error printer); JSON needs nothing more, as ``json.dumps`` escapes these characters itself.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from typing import TypeVar

# Control (Cc: C0, DEL, C1 with the 8-bit CSI), format (Cf: bidi overrides that reorder what is
# shown, zero-width characters), lone surrogates (Cs: undecodable bytes of a file name, which
# would also make printing raise), and the Unicode line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class _Table(dict[int, "str | int"]):
    """A ``str.translate`` table filled on first sight of each character."""

    def __missing__(self, code: int) -> str | int:
        char = chr(code)
        value: str | int = (
            _escape(char) if unicodedata.category(char) in _ESCAPED_CATEGORIES else code
        )
        self[code] = value
        return value


_TABLE = _Table()
_T = TypeVar("_T")


def printable(text: object) -> str:
    """``str(text)`` with every control, format and separator character written as an escape.

    ``"a\\x1b[2Jb"`` becomes ``"a\\\\x1b[2Jb"`` (a backslash, then ``x1b``); ordinary letters of
    any script, spaces and punctuation are kept as they are.
    """
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():  # the common case, decided in C
        return s
    return s.translate(_TABLE)


def listed(
    items: Iterable[_T],
    shown: int = 3,
    sep: str = ", ",
    more: str = " and {} more",
    each: Callable[[_T], object] = str,
) -> str:
    """The first ``shown`` of ``items`` joined by ``sep``, then how many were left out.

    ``listed("abcde")`` is ``"a, b, c and 2 more"``; with ``shown`` or fewer items, just the
    items. ``more`` words the remainder, ``{}`` standing for its count (``" (and {} more)"``
    where the items are sentences of their own). ``each`` makes an item text (a rank number
    into its file name), called on the shown items only. A message names a few of many files or keys
    this way, so it stays one line and still says how many there are.
    """
    every = list(items)  # only the shown ones are made text: a list may hold a million ranks
    left = len(every) - shown
    text = sep.join(str(each(i)) for i in every[:shown])
    return text + (more.replace("{}", str(left)) if left > 0 else "")
