"""The exception shared by both framing backends.

It lives in its own module so the compiled ``_framing`` and the pure
``framing_pure`` raise the very same class: callers catch
``pysrbup._native.framing.FrameError`` whichever backend is loaded.
"""

from __future__ import annotations


class FrameError(ValueError):
    """A received frame is malformed (bad magic, truncated, oversized, trailing bytes)."""
