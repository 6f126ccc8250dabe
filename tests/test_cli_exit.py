"""The client's quick exit: output and exit code intact, threads still waited for.

``exit_quickly`` skips the interpreter's teardown after a command (tens of ms
with gRPC loaded); these run it in real subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

#: Buffered standard streams, as a terminal-less program has them by default.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _run(body: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """
            import atexit, sys, threading, time
            from pysrbup.cli.common import exit_quickly
            """
        )
        + textwrap.dedent(body)
    )
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, timeout=60, env=ENV
    )


def test_buffered_output_exit_code_and_atexit_handlers_survive(tmp_path):
    proc = _run(
        """
        def main():
            atexit.register(lambda: open(sys.argv[1] + "/atexit", "w").write("ran"))
            sys.stdout.write("x" * 1_000_000)  # still in the buffers when main returns
            sys.stderr.write("warning\\n")
            return 3

        exit_quickly(main)
        """,
        tmp_path,
    )
    assert proc.returncode == 3
    assert proc.stdout == b"x" * 1_000_000
    assert proc.stderr == b"warning\n"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_a_thread_still_running_is_waited_for(tmp_path):
    proc = _run(
        """
        def late():
            time.sleep(0.3)
            open(sys.argv[1] + "/late", "w").write("done")

        def main():
            threading.Thread(target=late).start()  # not a daemon
            print("main done")
            return 0

        exit_quickly(main)
        """,
        tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout == b"main done\n"
    assert (tmp_path / "late").read_text() == "done"


def test_a_reader_gone_before_the_last_flush_is_exit_141(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from pysrbup.cli.common import exit_quickly

            def main():
                sys.stdout.write("y" * 100)  # buffered: written at the flush
                time.sleep(0.5)  # meanwhile the reader goes away
                return 0

            exit_quickly(main)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"BrokenPipe" not in err
