"""``pysrbup-server``: serve a repository directory over gRPC."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pysrbup.cli.common import report_error, version_text
from pysrbup.errors import EXIT_OK, PysrbupError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysrbup-server", description="Store encrypted pysrbup backups."
    )
    parser.add_argument("--version", action="version", version=version_text("pysrbup-server"))
    parser.add_argument("--bind-to", default="localhost:50000", help="address:port to listen on")
    parser.add_argument("--num-threads", type=int, default=2, help="worker threads")
    parser.add_argument(
        "--append-only", action="store_true", help="refuse every deletion, even from key holders"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests")
    parser.add_argument("backups_dir", help="repository directory (created if missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s pysrbup-server %(levelname)s %(message)s",
    )
    if args.num_threads < 1:
        print("pysrbup-server: error: --num-threads must be at least 1", file=sys.stderr)
        return 2
    try:
        from pysrbup.server.serve import serve
        from pysrbup.server.storage import Repository

        repo = Repository(args.backups_dir, append_only=args.append_only)
        try:
            server, port = serve(repo, args.bind_to, args.num_threads)
        except (OSError, RuntimeError) as exc:
            repo.close()
            raise PysrbupError(f"cannot listen on {args.bind_to}: {exc}") from None
    except (PysrbupError, ImportError) as exc:
        return report_error("pysrbup-server", exc)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"pysrbup-server: serving {repo.root} on port {port}", file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(grace=5).wait()
    repo.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
