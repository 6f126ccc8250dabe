"""What both command-line programs share: version text and error reporting."""

from __future__ import annotations

import argparse
import sys

from pysrbup import __version__
from pysrbup._native import backend_names
from pysrbup.errors import EXIT_ERROR, PysrbupError
from pysrbup.textsafe import printable


def version_text(program: str) -> str:
    """``program VERSION (kernels: chunker=native, ...)``."""
    kernels = ", ".join(f"{k}={v}" for k, v in backend_names().items())
    return f"{program} {__version__} (kernels: {kernels})"


class VersionAction(argparse.Action):
    """``--version``: loads the kernels to name them only when asked (not on every start)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw):
        kw.setdefault("help", "show the version and the kernels in use, and exit")
        super().__init__(option_strings, dest=dest, default=default, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text(parser.prog))
        parser.exit()


def report_error(program: str, exc: BaseException) -> int:
    """Prints one line for ``exc`` on stderr and returns the exit code."""
    if isinstance(exc, PysrbupError):
        print(f"{program}: error: {printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    print(f"{program}: error: {type(exc).__name__}: {printable(str(exc))}", file=sys.stderr)
    return EXIT_ERROR
