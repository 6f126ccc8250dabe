"""Settings read from environment variables, checked so a typo is a clear error.

A malformed value (``PYSRBUP_TIMEOUT=2m``) is a usage error naming the
variable, not a traceback from deep inside the command that first used it.
"""

from __future__ import annotations

import math
import os

from pysrbup.errors import UsageError
from pysrbup.textsafe import printable


def seconds(name: str, default: float, allow_zero: bool = False) -> float:
    """The number of seconds in environment variable ``name``; ``default`` if unset or empty.

    Raises UsageError unless the value is a finite number above zero (or zero,
    with ``allow_zero``).
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        least = "zero or more" if allow_zero else "more than zero"
        raise UsageError(f"{name} must be a number of seconds ({least}), not {printable(raw)!r}")
    return value
