"""Coverage-guided fuzzing of frame parsing (atheris; not collected by pytest).

Arbitrary bytes must either parse to the same records in the compiled kernel
and the pure twin, or make both raise FrameError with the same message; any
other exception, a crash or a mismatch is a bug. The pure twin is instrumented
for coverage feedback; the compiled kernel is exercised on the same inputs.

Run (about two minutes; CORPUS_DIR may hold a few valid frames as seeds)::

    PYTHONPATH=. python tests/native/fuzz_framing.py -max_total_time=120 CORPUS_DIR
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from pysrbup._native import framing_pure

from pysrbup._native import _framing
from pysrbup._native.framing_errors import FrameError


def _outcome(impl, data: bytes, **kwargs):
    try:
        return ("ok", [(bytes(i), f, bytes(p)) for i, f, p in impl.unpack_records(data, **kwargs)])
    except FrameError as exc:
        return ("error", str(exc))


def test_one_input(data: bytes) -> None:
    """Checks one input: both twins agree, with default and with tiny limits."""
    native, pure = _outcome(_framing, data), _outcome(framing_pure, data)
    if native != pure:
        raise AssertionError(f"twins disagree on {data!r}: {native} != {pure}")
    if native[0] == "ok":
        repacked = bytes(_framing.pack_records(native[1]))
        if repacked != data:
            raise AssertionError(f"re-pack differs for {data!r}")
    limits = {"max_payload": 16, "max_records": 2}
    if _outcome(_framing, data, **limits) != _outcome(framing_pure, data, **limits):
        raise AssertionError(f"twins disagree under limits on {data!r}")


def main() -> None:
    """Starts the fuzzer; libFuzzer options and corpus dirs come from argv."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
