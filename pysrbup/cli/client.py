"""``pysrbup-client``: back up, restore, list and delete; generate keys.

The six seed command lines are the contract (see DESIGN.md §1); everything
else (``--json``, ``--force``, ``--key-file``, environment variables) is
added around them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from pysrbup.cli.common import report_error, version_text
from pysrbup.errors import (
    EXIT_OK,
    IncompleteError,
    PermissionDeniedError,
    PysrbupError,
    UsageError,
)

ENV_SERVER = "PYSRBUP_SERVER"
ENV_KEY_FILE = "PYSRBUP_KEY_FILE"
ENV_TLS_CA = "PYSRBUP_TLS_CA"
ENV_TLS_FINGERPRINT = "PYSRBUP_TLS_FINGERPRINT"
ENV_PLAINTEXT = "PYSRBUP_PLAINTEXT"
DEFAULT_SERVER = "localhost:50000"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysrbup-client",
        description="Encrypted, deduplicated backups to a pysrbup server.",
    )
    parser.add_argument("--version", action="version", version=version_text("pysrbup-client"))
    parser.add_argument(
        "--server-address",
        default=os.environ.get(ENV_SERVER, DEFAULT_SERVER),
        help=f"host:port of the server (env {ENV_SERVER}; default {DEFAULT_SERVER})",
    )
    parser.add_argument("--num-threads", type=int, default=2, help="worker threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get(ENV_TLS_CA) or None,
        help="verify the server's certificate (and host name) against this PEM CA bundle "
        f"(env {ENV_TLS_CA}; default: pin the certificate the server shows on first contact, "
        "in known_servers in $PYSRBUP_CONFIG_DIR or ~/.config/pysrbup)",
    )
    parser.add_argument(
        "--tls-fingerprint",
        metavar="SHA256:HEX",
        default=os.environ.get(ENV_TLS_FINGERPRINT) or None,
        help="accept only the server certificate with this fingerprint, as pysrbup-server "
        f"prints it at start (env {ENV_TLS_FINGERPRINT})",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        default=os.environ.get(ENV_PLAINTEXT, "").lower() in ("1", "true", "yes", "on"),
        help=f"no TLS, for a server run with --plaintext (env {ENV_PLAINTEXT}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    key_help = f"key file (env {ENV_KEY_FILE})"
    p = sub.add_parser("backup", help="back up a directory")
    p.add_argument("backup_dir")
    p.add_argument("key_file", nargs="?", help=key_help)

    p = sub.add_parser("restore", help="restore a backup into a directory")
    p.add_argument("backup_id")
    p.add_argument("restore_dir")
    p.add_argument("key_file", nargs="?", help=key_help)
    p.add_argument("--force", action="store_true", help="overwrite existing files")

    p = sub.add_parser("delete", help="delete a backup")
    p.add_argument("backup_id")
    p.add_argument("key_file", nargs="?", help=key_help)

    p = sub.add_parser(
        "init",
        help="fix a new repository's keys to this key file (once, with the server's init token)",
    )
    p.add_argument("key_file", nargs="?", help=key_help)
    p.add_argument(
        "--init-token",
        default=os.environ.get("PYSRBUP_INIT_TOKEN"),
        help="the token the server wrote to <backups_dir>/init-token (env PYSRBUP_INIT_TOKEN)",
    )

    p = sub.add_parser("list", help="list backups")
    p.add_argument("--key-file", help="also decrypt host, path, file count and size")

    p = sub.add_parser(
        "check",
        help="verify every backup without restoring: records, trees, and that every chunk exists",
    )
    p.add_argument("--key-file", help=key_help)
    read = p.add_mutually_exclusive_group()
    read.add_argument(
        "--read-data", action="store_true", help="also fetch and verify every data chunk"
    )
    read.add_argument(
        "--read-data-subset",
        metavar="N%|n/t",
        help="fetch and verify a random N%% of the chunks, or the n-th of t fixed groups",
    )

    p = sub.add_parser("key", help="key commands: show-public, put-only, passwd")
    keys = p.add_subparsers(dest="key_command", metavar="KEY_COMMAND")
    keys.required = True
    k = keys.add_parser("show-public", help="the public keys a server operator may see")
    k.add_argument("key_file", nargs="?", help=key_help)
    k = keys.add_parser(
        "put-only", help="derive a key that can back up but not read, restore or delete"
    )
    k.add_argument("key_file", help="the master key")
    k.add_argument("put_key_file", help="where to write the put-only key")
    k = keys.add_parser(
        "passwd",
        help="change the key file's passphrase (the new one from PYSRBUP_NEW_PASSWORD_FILE, "
        "or the terminal)",
    )
    k.add_argument("key_file", nargs="?", help=key_help)

    p = sub.add_parser("generate_key", help="create a new key")
    p.add_argument("key_file", nargs="?", help="where to write it (default: print it)")
    return parser


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def iso_time(ns: int) -> str:
    stamp = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(path: str | None, needed: bool = True, reads: bool = True):
    """The key from ``path`` or PYSRBUP_KEY_FILE; a put-only key only if not ``reads``."""
    from pysrbup.crypto.keyfile import load_key_file
    from pysrbup.errors import PutOnlyKeyError

    path = path or os.environ.get(ENV_KEY_FILE)
    if not path:
        if needed:
            raise UsageError(f"no key file given (pass it or set {ENV_KEY_FILE})")
        return None
    key = load_key_file(path)
    if reads and not key.can_read:
        raise PutOnlyKeyError(
            f"{path} is a put-only key: it can back up, but not read, restore or delete backups"
        )
    return key


def _open_repo(args, key):
    from pysrbup.client.connection import Connection
    from pysrbup.client.repository import RemoteRepository

    conn = Connection(
        args.server_address,
        plaintext=args.plaintext,
        tls_ca=args.tls_ca,
        tls_fingerprint=args.tls_fingerprint,
    )
    try:
        return RemoteRepository(conn, key, warn=_warn)
    except BaseException:
        conn.close()
        raise


def _warn(message: str) -> None:
    from pysrbup.textsafe import printable

    print(f"pysrbup-client: warning: {printable(message)}", file=sys.stderr)


def _emit(args, payload: dict, lines: list[str]) -> None:
    """Prints ``payload`` as JSON, or ``lines`` with control characters escaped."""
    from pysrbup.textsafe import printable

    if args.json:
        print(json.dumps(payload))
    else:
        for line in lines:
            print(printable(line))


def _new_passphrase(what: str) -> str | None:
    """A passphrase for a new key file, or None (then the file is unprotected, with a warning)."""
    from pysrbup.crypto.keyfile import ask_passphrase

    passphrase = ask_passphrase(f"passphrase for {what} (empty: none): ", confirm=True)
    if not passphrase:
        _warn(
            f"{what} is not protected by a passphrase: anyone who can read the file has the key "
            "(set PYSRBUP_PASSWORD_FILE or PYSRBUP_PASSWORD_COMMAND, or run it on a terminal)"
        )
    return passphrase or None


def cmd_generate_key(args) -> int:
    from pysrbup.crypto import keyfile
    from pysrbup.crypto.keys import MasterKey

    key = MasterKey.generate()
    if args.key_file:
        keyfile.write_key_file(args.key_file, key, _new_passphrase(args.key_file))
        _emit(args, {"key_file": args.key_file}, [f"Wrote a new key to {args.key_file}"])
    elif args.json:
        print(json.dumps({"key": json.loads(keyfile.dumps(key))}))
    else:
        sys.stdout.write(keyfile.dumps(key))
    return EXIT_OK


def cmd_key(args) -> int:
    """``key show-public | put-only | passwd``."""
    from pysrbup.crypto import keyfile

    key = _key(args.key_file, reads=args.key_command == "put-only")
    if args.key_command == "show-public":
        rows = {
            "kind": "master" if key.can_read else "put-only",
            "write_public_key": key.write_public_key.hex(),
            "destroy_public_key": key.destroy_public_key.hex(),
            "seal_public_key": key.seal_public_key.hex(),
        }
        _emit(args, rows, [f"{name}: {value}" for name, value in rows.items()])
    elif args.key_command == "put-only":
        put = key.put_only()
        keyfile.write_key_file(args.put_key_file, put, _new_passphrase(args.put_key_file))
        _emit(
            args,
            {"put_key_file": args.put_key_file},
            [
                f"Wrote a put-only key to {args.put_key_file}: it can back up to this "
                "repository, but not read, restore or delete backups"
            ],
        )
    else:  # passwd
        path = args.key_file or os.environ.get(ENV_KEY_FILE)
        new = keyfile.new_passphrase_for_change(path)
        if not new:
            _warn(f"{path} is no longer protected by a passphrase")
        keyfile.replace_key_file(path, key, new or None)
        _emit(args, {"key_file": path}, [f"Changed the passphrase of {path}"])
    return EXIT_OK


def cmd_init(args) -> int:
    key = _key(args.key_file)
    if not args.init_token:
        raise UsageError(
            "no init token given (--init-token or PYSRBUP_INIT_TOKEN; the server wrote it to "
            "<backups_dir>/init-token)"
        )
    repo = _open_repo(args, key)
    with repo.conn:
        repo.initialise(args.init_token)
    repo_id = repo.repo_id.hex()
    _emit(
        args,
        {"repo_id": repo_id, "initialised": True},
        [f"Initialised repository {repo_id}: only this key can now write to it or delete"],
    )
    return EXIT_OK


def cmd_backup(args) -> int:
    from pysrbup.client.backup import Backup
    from pysrbup.client.progress import Progress

    key = _key(args.key_file, reads=False)
    if not os.path.isdir(args.backup_dir):
        raise UsageError(f"{args.backup_dir} is not a directory")
    repo = _open_repo(args, key)
    with repo.conn:
        result = Backup(repo, args.num_threads, Progress("backup")).run(args.backup_dir)
    payload = result.as_dict()
    _emit(
        args,
        payload,
        [
            f"Files: {result.files}, directories: {result.dirs}",
            f"Read {human_bytes(result.bytes_read)}, new {human_bytes(result.bytes_new)}, "
            f"sent {human_bytes(result.bytes_sent)} in {result.duration:.1f} s",
            f"Completed backup id: {result.backup_id}",
        ],
    )
    if result.errors:
        print(
            f"pysrbup-client: warning: {len(result.errors)} file(s) could not be read "
            "and are not in the backup",
            file=sys.stderr,
        )
        return IncompleteError.exit_code
    return EXIT_OK


def cmd_restore(args) -> int:
    from pysrbup.client.progress import Progress
    from pysrbup.client.restore import Restore

    key = _key(args.key_file)
    repo = _open_repo(args, key)
    with repo.conn:
        job = Restore(repo, args.num_threads, force=args.force, progress=Progress("restore"))
        try:
            result = job.run(args.backup_id, args.restore_dir)
        except IncompleteError:
            if args.json:
                print(json.dumps(job.result.as_dict()))
            raise
    _emit(
        args,
        result.as_dict(),
        [
            f"Restored backup {result.backup_id} into {result.target}: {result.files} files, "
            f"{result.dirs} directories, {result.symlinks} symlinks, "
            f"{human_bytes(result.bytes_written)}"
        ],
    )
    return EXIT_OK


def cmd_delete(args) -> int:
    from pysrbup.client.gc import collect_garbage
    from pysrbup.errors import NotFoundError

    key = _key(args.key_file)
    repo = _open_repo(args, key)
    with repo.conn:
        if repo.info.append_only:
            raise PermissionDeniedError("the server is append-only: deleting is refused")
        try:
            info = repo.find_snapshot(args.backup_id)
        except NotFoundError as unknown:
            # A rerun after an interrupted delete: the record is gone, finish the job.
            backup_id = args.backup_id.strip().lower()
            try:
                already = repo.delete_snapshot(backup_id)
            except NotFoundError:
                already = False
            if not already:
                raise unknown from None
        else:
            backup_id = info.snapshot_id
            repo.open_snapshot(info)  # the key must open it: never delete blindly
            repo.delete_snapshot(backup_id)
        result = collect_garbage(repo)
    lines = [
        f"Deleted backup {backup_id}",
        f"Freed {human_bytes(result.bytes_freed)} ({result.condemned} objects no backup uses)",
    ]
    if result.bytes_pending:
        lines.append(
            f"{human_bytes(result.bytes_pending)} more will be freed when running backups finish"
        )
    _emit(
        args,
        {
            "deleted": backup_id,
            "objects_condemned": result.condemned,
            "bytes_freed": result.bytes_freed,
            "bytes_pending": result.bytes_pending,
        },
        lines,
    )
    return EXIT_OK


def cmd_list(args) -> int:
    key = _key(args.key_file, needed=False) if args.key_file else None
    repo = _open_repo(args, key)
    rows = []
    with repo.conn:
        for info in repo.snapshots():
            row = {
                "id": info.snapshot_id,
                "time": iso_time(info.created_ns),  # the server's word, until the key opens it
                "stored_bytes": info.stored_bytes,
            }
            if key is not None:
                snap = repo.open_snapshot(info)
                row.update(
                    time=iso_time(snap.time_ns),
                    host=snap.hostname,
                    path=os.fsdecode(snap.source_path),
                    files=snap.files,
                    logical_bytes=snap.logical_bytes,
                )
            rows.append(row)
    lines = []
    for row in rows:
        line = f"{row['id']}  {row['time']}  {human_bytes(row['stored_bytes']):>10}"
        if key is not None:
            line += (
                f"  {row['host']}  {row['path']}  {row['files']} files  "
                f"{human_bytes(row['logical_bytes'])}"
            )
        lines.append(line)
    _emit(args, {"backups": rows}, lines)
    return EXIT_OK


def cmd_check(args) -> int:
    from pysrbup.client.check import Check, parse_subset
    from pysrbup.client.progress import Progress
    from pysrbup.errors import IntegrityError

    select = None
    if args.read_data_subset is not None:
        select = parse_subset(args.read_data_subset)
    elif args.read_data:
        select = parse_subset("100%")
    key = _key(args.key_file)
    repo = _open_repo(args, key)
    with repo.conn:
        result = Check(repo, select, Progress("check")).run()
    lines = [
        f"Checked {result.backups} backups: {result.trees} trees, "
        f"{result.data_objects} data objects referenced",
        f"Fetched and verified the trees and {result.data_read} data objects: "
        f"{human_bytes(result.bytes_read)} in {result.duration:.1f} s",
        *result.problem_lines(),
        "No errors were found" if result.healthy else result.summary(),
    ]
    _emit(args, result.as_dict(), lines)
    if not result.healthy:
        raise IntegrityError(result.summary())
    return EXIT_OK


COMMANDS = {
    "backup": cmd_backup,
    "restore": cmd_restore,
    "delete": cmd_delete,
    "list": cmd_list,
    "check": cmd_check,
    "init": cmd_init,
    "key": cmd_key,
    "generate_key": cmd_generate_key,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gRPC core logs every failed TLS handshake at INFO on stderr; errors are reported in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.num_threads < 1:
        print("pysrbup-client: error: --num-threads must be at least 1", file=sys.stderr)
        return UsageError.exit_code
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("pysrbup-client: interrupted", file=sys.stderr)
        return 130
    except PysrbupError as exc:
        return report_error("pysrbup-client", exc)
    except Exception as exc:
        if os.environ.get("PYSRBUP_DEBUG"):
            raise
        return report_error("pysrbup-client", exc)


if __name__ == "__main__":
    sys.exit(main())
