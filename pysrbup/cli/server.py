"""``pysrbup-server``: serve a repository directory over gRPC."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from pysrbup.cli.common import VersionAction, report_error
from pysrbup.errors import EXIT_OK, PysrbupError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysrbup-server", description="Store encrypted pysrbup backups."
    )
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--bind-to", default="localhost:50000", help="address:port to listen on")
    parser.add_argument("--num-threads", type=int, default=2, help="worker threads")
    parser.add_argument(
        "--append-only", action="store_true", help="refuse every deletion, even from key holders"
    )
    parser.add_argument(
        "--ecc",
        default="20+2",
        help="parity for new packs: K+M (K data, M parity blocks per column) or none "
        "(default 20+2, about 10%% overhead)",
    )
    parser.add_argument(
        "--scrub-interval",
        type=float,
        default=0,
        metavar="SECONDS",
        help="while serving, verify and repair every pack this often (0: never)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--scrub",
        action="store_true",
        help="verify and repair every pack, report, and exit (non-zero if anything is lost)",
    )
    mode.add_argument(
        "--init",
        action="store_true",
        help="create the repository if needed, print its one-time init token and exit "
        "(the owner passes it to pysrbup-client init)",
    )
    mode.add_argument(
        "--rebuild-index",
        action="store_true",
        help="rebuild the SQLite index from the packs' footers and exit",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM certificate (chain, leaf first) to serve TLS with; needs --tls-key "
        "(default: a self-signed one made on first start in <backups_dir>/tls/)",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="unencrypted PEM key of --tls-cert")
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="serve without TLS. Backups stay end-to-end encrypted, but anyone on the network "
        "path sees the traffic (object ids, sizes, session ids, timing, which backups exist) and "
        "can impersonate this server, tamper with its replies or drop requests (hiding or "
        "rolling back backups), or take a new repository's init token before its owner uses "
        "it. For loopback or an encrypted tunnel only; clients need --plaintext too",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="[HOST:]PORT",
        help="while serving, expose Prometheus metrics on http://HOST:PORT/metrics "
        "(default: off; a bare PORT listens on 127.0.0.1 only)",
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="keep the repository in an S3-compatible bucket, s3://BUCKET/PREFIX (default: in "
        "backups_dir). backups_dir then holds only this server's index cache, staging area, "
        "TLS files and init token; the endpoint and credentials come from --s3-endpoint and "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION",
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint, e.g. http://127.0.0.1:8333"
    )
    parser.add_argument("--s3-region", metavar="NAME", help="S3 region (default us-east-1)")
    parser.add_argument(
        "--break-lock",
        action="store_true",
        help="take over the bucket's lock object left by a server that is gone for good",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests")
    parser.add_argument(
        "backups_dir",
        help="repository directory (created if missing); with --storage, this server's "
        "local directory",
    )
    return parser


def print_scrub(report) -> int:
    """Prints a scrub report; the exit status is non-zero if anything is unrepairable."""
    print(
        f"scrub: {report.packs} packs, {report.blocks_checked} blocks checked, "
        f"{report.blocks_repaired} repaired, {report.blocks_unrepairable} unrepairable"
        + (f", {report.packs_unprotected} packs without parity" if report.packs_unprotected else "")
        + (f", {report.sidecars_written} parity files rewritten" if report.sidecars_written else "")
    )
    for name, ids in sorted(report.damaged.items()):
        print(f"damaged: {name}: {len(ids)} object(s) lost")
        for oid in ids:
            print(f"  lost object {oid.hex()}")
    return 1 if report.damaged else EXIT_OK


def print_init(repo) -> int:
    """Prints the init token of an uninitialised repository (``--init``)."""
    if repo.initialised:
        print(f"pysrbup-server: {repo.root} is already initialised", file=sys.stderr)
        return 1
    print(repo.init_token())
    return EXIT_OK


_SCRUBBING = threading.Lock()


def _background_scrub(repo) -> None:
    if not _SCRUBBING.acquire(blocking=False):
        return  # the previous scrub is still running
    try:
        report = repo.scrub()
    finally:
        _SCRUBBING.release()
    level = logging.ERROR if report.damaged else logging.INFO
    logging.getLogger("pysrbup.server").log(
        level,
        "scrub: %d blocks checked, %d repaired, %d unrepairable",
        report.blocks_checked,
        report.blocks_repaired,
        report.blocks_unrepairable,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s pysrbup-server %(levelname)s %(message)s",
    )
    if args.num_threads < 1:
        print("pysrbup-server: error: --num-threads must be at least 1", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key) or (args.plaintext and args.tls_cert):
        print(
            "pysrbup-server: error: give --tls-cert and --tls-key together, and not with "
            "--plaintext",
            file=sys.stderr,
        )
        return 2
    try:
        from pysrbup.server.ecc import EccLevel
        from pysrbup.server.serve import serve
        from pysrbup.server.storage import Repository, rebuild_index

        level = EccLevel.parse(args.ecc)
        if args.metrics_address:
            from pysrbup.server.metrics import ServerMetrics, parse_address

            metrics_host, metrics_port = parse_address(args.metrics_address)
        store = None
        if args.storage:
            from pysrbup.server.blobstore import open_store

            store = open_store(args.storage, endpoint=args.s3_endpoint, region=args.s3_region)
        if args.rebuild_index:
            count_packs, count_objects = rebuild_index(args.backups_dir, store)
            print(
                f"pysrbup-server: rebuilt the index: {count_packs} packs, {count_objects} objects"
            )
            return EXIT_OK
        repo = Repository.open(
            args.backups_dir,
            store=store,
            append_only=args.append_only,
            ecc_level=level,
            break_lock=args.break_lock,
        )
        if args.init:
            try:
                return print_init(repo)
            finally:
                repo.close()
        if args.scrub:
            try:
                repo.wait_for_parity()
                return print_scrub(repo.scrub())
            finally:
                repo.close()
        certificate = None
        if not args.plaintext:
            from pysrbup.server import tls

            try:
                if args.tls_cert:
                    certificate = tls.load(args.tls_cert, args.tls_key)
                else:
                    certificate = tls.load_or_create(repo.root)
            except PysrbupError:
                repo.close()
                raise
        metrics = metrics_url = None
        if args.metrics_address:
            metrics = ServerMetrics(repo)
            try:
                metrics_url = metrics.start_http(metrics_host, metrics_port)
            except OSError as exc:
                repo.close()
                raise PysrbupError(
                    f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror or exc}"
                ) from None
        try:
            server, port = serve(
                repo,
                args.bind_to,
                args.num_threads,
                certificate=certificate,
                plaintext=args.plaintext,
                interceptors=[metrics.interceptor] if metrics else [],
            )
        except (OSError, RuntimeError) as exc:
            if metrics:
                metrics.stop()
            repo.close()
            raise PysrbupError(f"cannot listen on {args.bind_to}: {exc}") from None
    except (PysrbupError, ImportError) as exc:
        return report_error("pysrbup-server", exc)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if certificate is None:
        print(
            "pysrbup-server: warning: serving without TLS (--plaintext): anyone on the "
            "network path can read and alter the traffic",
            file=sys.stderr,
        )
    else:
        print(
            f"pysrbup-server: TLS certificate fingerprint {certificate.fingerprint}",
            file=sys.stderr,
        )
    if not repo.initialised:
        print(
            f"pysrbup-server: the repository is new: initialise it with "
            f"pysrbup-client init --init-token $(cat {repo.init_token_path}) KEY_FILE",
            file=sys.stderr,
        )
    if metrics_url:
        print(f"pysrbup-server: metrics on {metrics_url}", file=sys.stderr)
    print(
        f"pysrbup-server: serving {repo.store.location} on port {port}", file=sys.stderr, flush=True
    )
    next_scrub = time.monotonic() + args.scrub_interval
    while not stop.wait(0.5):
        if args.scrub_interval > 0 and time.monotonic() >= next_scrub:
            threading.Thread(target=_background_scrub, args=(repo,), daemon=True).start()
            next_scrub = time.monotonic() + args.scrub_interval
    server.stop(grace=5).wait()
    if metrics:
        metrics.stop()
    repo.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
