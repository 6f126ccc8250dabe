"""What both command-line programs share: version text and error reporting."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Callable

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


def stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, as ls and cat do."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing at exit does not fail again
        os.close(devnull)
    return 141  # 128 + SIGPIPE: what a shell reports for a process SIGPIPE ended


def exit_quickly(main: Callable[[], int]) -> None:
    """Runs ``main()`` and ends the process with its code, skipping the interpreter's teardown.

    Freeing every module, gRPC's core and the heap took 60-150 ms after a
    command here (a quarter of a small backup; a resumed one pays it too) and
    does nothing a finished command needs: its files are closed, and stdout,
    stderr and the atexit handlers are still flushed and run here. Should a
    thread that is not a daemon still run, the exit waits for it as usual.
    """
    code = main() or 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away at the last write
        closed = stdout_closed()
        code = code or closed
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    main_thread = threading.main_thread()
    if any(not t.daemon for t in threading.enumerate() if t is not main_thread):
        sys.exit(code)
    atexit._run_exitfuncs()
    os._exit(code)
