"""What both command-line programs share: version text and error reporting."""

from __future__ import annotations

import sys

from pysrbup import __version__
from pysrbup._native import backend_names
from pysrbup.errors import EXIT_ERROR, PysrbupError
from pysrbup.textsafe import printable


def version_text(program: str) -> str:
    """``program VERSION (kernels: chunker=native, ...)``."""
    kernels = ", ".join(f"{k}={v}" for k, v in backend_names().items())
    return f"{program} {__version__} (kernels: {kernels})"


def report_error(program: str, exc: BaseException) -> int:
    """Prints one line for ``exc`` on stderr and returns the exit code."""
    if isinstance(exc, PysrbupError):
        print(f"{program}: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    print(f"{program}: error: {type(exc).__name__}: {printable(str(exc))}", file=sys.stderr)
    return EXIT_ERROR
