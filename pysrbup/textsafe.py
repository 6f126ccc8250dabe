"""Text that is safe to print: names from a backup cannot drive the terminal.

File names come from whoever made the backup (or from a damaged tree), and a
name holding ``ESC [ 2 J`` or a carriage return would otherwise act on the
terminal that prints a warning about it. ``printable`` shows such characters
as visible escapes instead.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls; bidirectional overrides and isolates (they
# reorder what follows on the line); lone surrogates (undecodable bytes of a
# file name, from os.fsdecode), which most streams cannot even encode.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with control characters (C0, C1, DEL, bidi controls) as visible escapes.

    An ESC character shows as the four characters ``\\x1b``, U+202E as ``\\u202e``;
    undecodable bytes of a file name (surrogate escapes) show as ``\\xNN`` too.
    Everything else is unchanged.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)
