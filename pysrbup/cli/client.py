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
import re
import sys

from pysrbup.cli.common import VersionAction, exit_quickly, report_error, stdout_closed
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


def _add_filters(p: argparse.ArgumentParser) -> None:
    """restic's snapshot filters (they need the key: hosts, paths and tags are encrypted)."""
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG[,TAG]",
        help="only backups with all these tags (repeat: any of the groups)",
    )
    p.add_argument("--host", action="append", default=[], help="only backups of this host")
    p.add_argument("--path", action="append", default=[], help="only backups of this path")


def parse_time(text: str) -> int:
    """``YYYY-MM-DD HH:MM:SS`` (or ``YYYY-MM-DD``) in local time, as ns since the epoch."""
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            stamp = datetime.datetime.strptime(text.strip(), form).astimezone()
        except ValueError:
            continue
        return int(stamp.timestamp()) * 1_000_000_000
    raise UsageError(f'bad --time {text!r}: use "YYYY-MM-DD HH:MM:SS"')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pysrbup-client",
        description="Encrypted, deduplicated backups to a pysrbup server.",
    )
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument(
        "--server-address",
        default=os.environ.get(ENV_SERVER, DEFAULT_SERVER),
        help=f"host:port of the server (env {ENV_SERVER}; default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=os.cpu_count() or 2,
        help="parallel workers (default: the number of cores): backup runs this many worker "
        "processes, each reading, chunking and sealing files (and 2 threads sealing a large "
        "file's chunks); restore writes with this many threads (and fetches with 2 streams)",
    )
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
    p = sub.add_parser("backup", help="back up a directory (or standard input: --stdin)")
    p.add_argument("backup_dir", nargs="?", help="the directory (not with --stdin)")
    p.add_argument("key_file", nargs="?", help=key_help)
    p.add_argument(
        "--stdin",
        action="store_true",
        help="back up standard input as one file (backup --stdin [KEY_FILE])",
    )
    p.add_argument("--stdin-filename", default="stdin", help="its name (default stdin)")
    p.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    p.add_argument("--host", help="record this host name instead of this machine's")
    p.add_argument("--time", help='record this time ("YYYY-MM-DD HH:MM:SS", local) instead of now')
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out paths matching PATTERN (restic's patterns: * ? [..] within a name, "
        "** across directories, a leading / anchors at the root; repeatable)",
    )
    p.add_argument(
        "--iexclude", action="append", default=[], metavar="PATTERN", help="--exclude, any case"
    )
    p.add_argument(
        "--exclude-file",
        action="append",
        default=[],
        metavar="FILE",
        help="patterns from FILE, one per line (# comments)",
    )
    p.add_argument(
        "--exclude-caches",
        action="store_true",
        help="leave out the contents of directories holding a valid CACHEDIR.TAG",
    )
    p.add_argument(
        "--exclude-if-present",
        action="append",
        default=[],
        metavar="NAME[:HEADER]",
        help="leave out the contents of directories holding NAME (starting with HEADER)",
    )
    p.add_argument(
        "--exclude-larger-than", metavar="SIZE", help="leave out files larger than SIZE (1G, 500M)"
    )
    p.add_argument(
        "--one-file-system",
        action="store_true",
        help="do not descend into other file systems (mount points are kept, empty)",
    )
    p.add_argument(
        "--no-xattrs", action="store_true", help="do not back up extended attributes and ACLs"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="read and deduplicate everything, say what would be stored, upload nothing",
    )

    p = sub.add_parser("restore", help="restore a backup into a directory")
    p.add_argument("backup_id")
    p.add_argument("restore_dir")
    p.add_argument("key_file", nargs="?", help=key_help)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="restore only paths matching PATTERN (matched against the path below restore_dir, "
        "e.g. src/sub/file; the --exclude pattern language of backup; repeatable). Anchor it "
        "(/src/sub/file) to read only the directories on its way: without the leading / it "
        "may match at any depth",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="do not restore paths matching PATTERN (and nothing below them)",
    )
    p.add_argument(
        "--numeric-owner",
        action="store_true",
        help="as root, restore owners by the recorded ids (default: by name where it exists)",
    )

    p = sub.add_parser(
        "delete",
        help="delete backups (delete ID... KEY_FILE), then collect garbage once",
    )
    p.add_argument("backup_ids", nargs="+", metavar="backup_id")

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

    p = sub.add_parser("tag", help="change a backup's tags (it gets a new id, as in restic)")
    p.add_argument("backup_id")
    p.add_argument("--key-file", help=key_help)
    p.add_argument("--add", action="append", default=[], metavar="TAG", help="add a tag")
    p.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove a tag")
    p.add_argument(
        "--set", action="append", default=None, metavar="TAG", help="replace all tags by these"
    )

    p = sub.add_parser(
        "forget",
        help="remove backups by a retention policy (restic's forget rules), then free space",
        description="Keeps what the --keep-* rules select, restic's semantics to the letter: "
        "backups newest first; each rule counts on its own (one backup may use up a daily and "
        "a weekly count); only the newest backup of an hour, day, ISO week, month or year "
        "counts; a rule with counts left at the end also keeps the oldest backup; "
        "--keep-within* count back from the newest backup, not from now. N may be -1 or "
        "'unlimited'. Durations look like 1y2m3d4h. The policy applies to each group "
        "(--group-by, default host,paths) separately. Everything else is removed, and "
        "garbage is collected once for all of them.",
    )
    p.add_argument("--key-file", help=key_help)
    for kind in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{kind}", default="0", metavar="N", help=f"keep {kind} backups")
    for kind in ("", "-hourly", "-daily", "-weekly", "-monthly", "-yearly"):
        p.add_argument(
            f"--keep-within{kind}",
            metavar="DURATION",
            help=f"keep{kind.replace('-', ' ') or ' all'} backups within DURATION of the newest",
        )
    p.add_argument(
        "--keep-tag",
        action="append",
        default=[],
        metavar="TAG[,TAG]",
        help="keep backups with all these tags (repeatable)",
    )
    p.add_argument("--group-by", default="host,paths", help="host,paths,tags or a subset")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    _add_filters(p)

    p = sub.add_parser("stats", help="sizes, deduplication, and what the server stores")
    p.add_argument("--key-file", help=key_help)
    p.add_argument("--backup", action="append", default=[], metavar="ID", help="only these backups")
    _add_filters(p)

    p = sub.add_parser("list", help="list backups")
    p.add_argument("--key-file", help="also decrypt host, path, tags, file count and size")
    _add_filters(p)

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

    p = sub.add_parser(
        "ls",
        help="list the entries of a directory of a backup (--json: one object per line)",
    )
    p.add_argument("backup_id")
    p.add_argument("path", nargs="?", default="", help="relative to the backed-up directory")
    p.add_argument("--key-file", help=key_help)
    p.add_argument("--recursive", "-r", action="store_true", help="also everything below")
    p.add_argument("--long", "-l", action="store_true", help="type, mode, owner, size, mtime")

    p = sub.add_parser(
        "find",
        help="which backups hold paths matching a pattern, newest first",
        description="A pattern without / is a glob (* ? [..]) on names at any depth; one with / "
        "on the whole path from the backed-up directory (* within one name, ** across "
        "directories), so only the directories it can match are read.",
    )
    p.add_argument("patterns", nargs="+", metavar="PATTERN")
    p.add_argument("--key-file", help=key_help)
    p.add_argument("--backup", action="append", default=[], metavar="ID", help="only these backups")
    _add_filters(p)

    p = sub.add_parser(
        "dump", help="write a file of a backup to stdout, or a directory as a tar (or zip) stream"
    )
    p.add_argument("backup_id")
    p.add_argument("path", help="relative to the backed-up directory ('' or / for all of it)")
    p.add_argument("--key-file", help=key_help)
    p.add_argument("--archive", choices=("tar", "zip"), default="tar", help="for directories")

    p = sub.add_parser(
        "diff",
        help="what changed between two backups: + added, - removed, M content, U metadata, T type",
    )
    p.add_argument("old_backup_id")
    p.add_argument("new_backup_id")
    p.add_argument("--key-file", help=key_help)

    p = sub.add_parser(
        "mount",
        help="serve the backups as a read-only file system (FUSE) until unmounted",
        description="ids/<id>/ holds each backup's files, snapshots/<time> links to it, "
        "snapshots/latest to the newest. Data is fetched as it is read. Ctrl-C or "
        "'fusermount -u MOUNTPOINT' unmounts.",
    )
    p.add_argument("mountpoint")
    p.add_argument("--key-file", help=key_help)
    p.add_argument(
        "--allow-other", action="store_true", help="let other users in too (FUSE allow_other)"
    )
    p.add_argument(
        "--no-default-permissions",
        action="store_true",
        help="do not check the backed-up owners and modes on access (with --allow-other: "
        "every user can read every file)",
    )

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
    from pysrbup.client.excludes import Excludes
    from pysrbup.client.progress import Progress

    if args.stdin:  # backup --stdin [KEY_FILE]: the one positional is the key file
        if args.backup_dir and args.key_file:
            raise UsageError("backup --stdin takes no directory")
        args.key_file, args.backup_dir = args.key_file or args.backup_dir, None
    elif not args.backup_dir:
        raise UsageError("backup needs a directory (or --stdin)")
    key = _key(args.key_file, reads=False)
    if not args.stdin and not os.path.isdir(args.backup_dir):
        raise UsageError(f"{args.backup_dir} is not a directory")
    repo = _open_repo(args, key)
    with repo.conn:
        excludes = Excludes.from_options(
            exclude=args.exclude,
            iexclude=args.iexclude,
            exclude_files=args.exclude_file,
            exclude_caches=args.exclude_caches,
            exclude_if_present=args.exclude_if_present,
            exclude_larger_than=args.exclude_larger_than,
            one_file_system=args.one_file_system,
        )
        job = Backup(
            repo,
            args.num_threads,
            Progress("backup"),
            excludes=excludes,
            xattrs=not args.no_xattrs,
            dry_run=args.dry_run,
        )
        when = parse_time(args.time) if args.time else None
        meta = {"tags": args.tag, "host": args.host, "time_ns": when}
        if args.stdin:
            result = job.run_stream(sys.stdin.buffer, args.stdin_filename, **meta)
        else:
            result = job.run(args.backup_dir, **meta)
    payload = result.as_dict()
    if args.dry_run:
        payload["dry_run"] = True
        last = (
            f"Dry run: would add {human_bytes(result.bytes_new)} in {result.chunks_new} new "
            "objects; nothing was uploaded"
        )
    else:
        last = f"Completed backup id: {result.backup_id}"
    _emit(
        args,
        payload,
        [
            f"Files: {result.files}, directories: {result.dirs}",
            f"Read {human_bytes(result.bytes_read)}, new {human_bytes(result.bytes_new)}, "
            f"sent {human_bytes(result.bytes_sent)} in {result.duration:.1f} s",
            last,
        ],
    )
    if result.errors:
        print(
            f"pysrbup-client: warning: {len(result.errors)} file(s) could not be read, or "
            "changed while read (named above); the backup holds what could be read",
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
        job = Restore(
            repo,
            args.num_threads,
            force=args.force,
            progress=Progress("restore"),
            numeric_owner=args.numeric_owner,
            includes=args.include,
            excludes=args.exclude,
        )
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


def _delete_records(repo, backup_ids: list[str]) -> list[str]:
    """Removes snapshot records (each opened with the key first); returns the full ids.

    An id whose record is already gone because an earlier delete was
    interrupted counts as deleted, so that a rerun finishes the job.
    """
    from pysrbup.errors import NotFoundError

    if repo.info.append_only:
        raise PermissionDeniedError("the server is append-only: deleting is refused")
    infos = {}
    listed = repo.snapshots()
    for backup_id in backup_ids:
        try:
            info = repo.find_snapshot(backup_id, listed)
        except NotFoundError as unknown:
            full = backup_id.strip().lower()
            try:
                already = repo.delete_snapshot(full)
            except NotFoundError:
                already = False
            if not already:
                raise unknown from None
            infos[full] = None
            continue
        repo.open_snapshot(info)  # the key must open it: never delete blindly
        infos[info.snapshot_id] = info
    for backup_id, info in infos.items():
        if info is not None:
            repo.delete_snapshot(backup_id)
    return list(infos)


def _gc_lines(result) -> list[str]:
    lines = [f"Freed {human_bytes(result.bytes_freed)} ({result.condemned} objects no backup uses)"]
    if result.bytes_pending:
        lines.append(
            f"{human_bytes(result.bytes_pending)} more will be freed when running backups finish"
        )
    return lines


def _gc_payload(result) -> dict:
    return {
        "objects_condemned": result.condemned,
        "bytes_freed": result.bytes_freed,
        "bytes_pending": result.bytes_pending,
    }


def _split_key_argument(values: list[str], key_file: str | None) -> tuple[list[str], str | None]:
    """``delete ID... [KEY_FILE]``: the last value is the key file unless it is a backup id.

    A backup id (or prefix) is 1 to 16 hex digits; anything else, or an existing
    file, is the key file, so a missing key file is reported as one.
    """
    last = values[-1]
    looks_like_id = re.fullmatch(r"[0-9a-fA-F]{1,16}", last.strip()) is not None
    if key_file is None and len(values) > 1 and (os.path.isfile(last) or not looks_like_id):
        return values[:-1], last
    return values, key_file


def cmd_delete(args) -> int:
    from pysrbup.client.gc import collect_garbage

    backup_ids, key_path = _split_key_argument(args.backup_ids, None)
    key = _key(key_path)
    repo = _open_repo(args, key)
    with repo.conn:
        deleted = _delete_records(repo, backup_ids)
        result = collect_garbage(repo)  # once, however many records went
    lines = [f"Deleted backup {backup_id}" for backup_id in deleted] + _gc_lines(result)
    _emit(args, {"deleted": deleted, **_gc_payload(result)}, lines)
    return EXIT_OK


def _listed_row(item) -> dict:
    return {
        "id": item.id,
        "time": iso_time(item.record.time_ns),
        "stored_bytes": item.info.stored_bytes,
        "host": item.host,
        "path": item.path,
        "tags": item.tags,
        "files": item.record.files,
        "logical_bytes": item.record.logical_bytes,
    }


def cmd_list(args) -> int:
    from pysrbup.client.selection import open_all, select

    filtered = args.tag or args.host or args.path
    if filtered and not (args.key_file or os.environ.get(ENV_KEY_FILE)):
        raise UsageError("--tag, --host and --path need --key-file (they are encrypted)")
    key = _key(args.key_file, needed=False) if (args.key_file or filtered) else None
    repo = _open_repo(args, key)
    with repo.conn:
        if key is None:
            rows = [
                {
                    "id": info.snapshot_id,
                    "time": iso_time(info.created_ns),  # the server's word: no key to check it
                    "stored_bytes": info.stored_bytes,
                }
                for info in repo.snapshots()
            ]
        else:
            picked = select(open_all(repo), args.tag, args.host, args.path)
            rows = [_listed_row(item) for item in picked]
    lines = []
    for row in rows:
        line = f"{row['id']}  {row['time']}  {human_bytes(row['stored_bytes']):>10}"
        if key is not None:
            line += (
                f"  {row['host']}  {row['path']}  {row['files']} files  "
                f"{human_bytes(row['logical_bytes'])}"
            )
            if row["tags"]:
                line += "  [" + ",".join(row["tags"]) + "]"
        lines.append(line)
    _emit(args, {"backups": rows}, lines)
    return EXIT_OK


def cmd_tag(args) -> int:
    from pysrbup.client.retag import new_tags, retag
    from pysrbup.client.selection import Listed

    if not (args.add or args.remove or args.set is not None):
        raise UsageError("nothing to do: give --add, --remove or --set")
    key = _key(args.key_file)
    repo = _open_repo(args, key)
    with repo.conn:
        info = repo.find_snapshot(args.backup_id)
        item = Listed(info, repo.open_snapshot(info))
        tags = new_tags(item.tags, args.add, args.remove, args.set)
        new_id = retag(repo, item, tags)
    shown = ",".join(tags) or "no tags"
    line = (
        f"Backup {item.id} is now {new_id} [{shown}]"
        if new_id != item.id
        else (f"Backup {item.id} already has [{shown}]")
    )
    _emit(args, {"old_id": item.id, "new_id": new_id, "tags": tags}, [line])
    return EXIT_OK


def _selected(repo, args):
    """The backups --tag/--host/--path and --backup select, from one listing."""
    from pysrbup.client.selection import open_all, select

    everything = open_all(repo)
    backups = select(everything, args.tag, args.host, args.path)
    if args.backup:
        infos = [item.info for item in everything]
        wanted = {repo.find_snapshot(b, infos).snapshot_id for b in args.backup}
        backups = [b for b in backups if b.id in wanted]
    return backups


def cmd_stats(args) -> int:
    from pysrbup.client.stats import tree_stats

    key = _key(args.key_file)
    repo = _open_repo(args, key)
    with repo.conn:
        backups = _selected(repo, args)
        trees = tree_stats(repo, backups)
        server = repo.conn.stats()
    payload = {
        "backups": trees.backups,
        "files": trees.files,
        "directories": trees.dirs,
        "logical_bytes": trees.logical_bytes,
        "unique_chunks": trees.chunks,
        "unique_bytes": trees.unique_bytes,
        "dedup_ratio": round(trees.dedup_ratio, 3),
        "trees": trees.trees,
        "repository": {
            "objects": server.objects,
            "stored_bytes": server.object_bytes,
            "packs": server.packs,
            "pack_bytes": server.pack_bytes,
            "parity_bytes": server.parity_bytes,
            "condemned_objects": server.condemned_objects,
            "condemned_bytes": server.condemned_bytes,
        },
    }
    lines = [
        f"Backups: {trees.backups}, files: {trees.files}, directories: {trees.dirs}",
        f"Logical size: {human_bytes(trees.logical_bytes)} in {trees.chunks} distinct chunks of "
        f"{human_bytes(trees.unique_bytes)} (deduplication {trees.dedup_ratio:.2f}x)",
        f"Repository: {server.objects} objects, {human_bytes(server.object_bytes)} stored in "
        f"{server.packs} packs ({human_bytes(server.pack_bytes)}), parity "
        f"{human_bytes(server.parity_bytes)}",
    ]
    if server.condemned_objects:
        lines.append(
            f"Waiting to be freed: {server.condemned_objects} objects, "
            f"{human_bytes(server.condemned_bytes)}"
        )
    _emit(args, payload, lines)
    return EXIT_OK


_WITHIN = (
    "within",
    "within_hourly",
    "within_daily",
    "within_weekly",
    "within_monthly",
    "within_yearly",
)


def _policy_from(args):
    """The retention policy and grouping the --keep-* and --group-by flags ask for."""
    from pysrbup.client import policy

    try:
        durations = {
            name: policy.parse_duration(getattr(args, f"keep_{name}"))
            for name in _WITHIN
            if getattr(args, f"keep_{name}")
        }
        counts = {
            kind: policy.parse_count(getattr(args, f"keep_{kind}"))
            for kind in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
        }
        rules = policy.Policy(
            **counts, **durations, tags=[policy.parse_tag_list(t) for t in args.keep_tag]
        )
        rules.validate()
        group_by = policy.parse_group_by(args.group_by)
    except ValueError as exc:
        raise UsageError(f"forget: {exc}") from None
    return rules, group_by


def cmd_forget(args) -> int:
    from pysrbup.client.forget import decide, forget
    from pysrbup.client.selection import open_all, select

    rules, group_by = _policy_from(args)
    if rules.empty():
        raise UsageError("no policy given (--keep-*): nothing would be kept, nothing is removed")
    key = _key(args.key_file)
    repo = _open_repo(args, key)
    with repo.conn:
        if repo.info.append_only and not args.dry_run:
            raise PermissionDeniedError("the server is append-only: deleting is refused")
        decisions = decide(select(open_all(repo), args.tag, args.host, args.path), rules, group_by)
        result = None if args.dry_run else forget(repo, decisions)
    lines: list[str] = []
    groups = []
    for d in decisions:
        shown = ", ".join(
            f"{k} [{', '.join(v)}]" if isinstance(v, tuple) else f"{k} {v}"
            for k, v in d.key.items()
        )
        lines.append(f"backups for {shown or 'all'}: keep {len(d.keep)}, remove {len(d.remove)}")
        lines += [
            f"  keep   {b.id}  {iso_time(b.record.time_ns)}  {', '.join(d.reasons[b.id])}"
            for b in d.keep
        ]
        lines += [f"  remove {b.id}  {iso_time(b.record.time_ns)}" for b in d.remove]
        groups.append(
            {
                "key": {k: list(v) if isinstance(v, tuple) else v for k, v in d.key.items()},
                "keep": [{"id": b.id, "reasons": d.reasons[b.id]} for b in d.keep],
                "remove": [b.id for b in d.remove],
            }
        )
    payload: dict = {"groups": groups, "dry_run": args.dry_run}
    if result is not None:
        lines += _gc_lines(result)
        payload.update(_gc_payload(result))
    elif args.dry_run:
        lines.append("dry run: nothing was removed")
    _emit(args, payload, lines)
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


def _print_lines(lines) -> int:
    """Prints each line as it comes (``ls``, ``find`` and ``diff`` stream their output)."""
    out = sys.stdout
    batch: list[str] = []
    try:
        for line in lines:
            batch.append(line)
            if len(batch) >= 256:  # one write per batch: print() per line costs 8 us
                batch.append("")
                out.write("\n".join(batch))
                batch.clear()
        if batch:
            batch.append("")
            out.write("\n".join(batch))
        out.flush()
    except BrokenPipeError:
        return stdout_closed()
    return EXIT_OK


def cmd_ls(args) -> int:
    from pysrbup.client import browse
    from pysrbup.textsafe import printable

    repo = _open_repo(args, _key(args.key_file))
    with repo.conn:
        backup_id, record = browse.open_backup(repo, args.backup_id)
        trees = browse.Trees(repo)
        entries = browse.list_entries(trees, record, backup_id, args.path, args.recursive)
        if args.json:
            return _print_lines(json.dumps(browse.entry_dict(p, n)) for p, n in entries)
        show = browse.long_line if args.long else lambda path, node: browse.shown(path)
        return _print_lines(printable(show(p, n)) for p, n in entries)


def cmd_find(args) -> int:
    from pysrbup.client import browse
    from pysrbup.textsafe import printable

    repo = _open_repo(args, _key(args.key_file))
    with repo.conn:
        backups = _selected(repo, args)
        backups.sort(key=lambda b: (b.record.time_ns, b.id), reverse=True)  # newest first
        found = browse.find(browse.Trees(repo), [(b.id, b.record) for b in backups], args.patterns)
        if args.json:
            return _print_lines(
                json.dumps(
                    {
                        "backup_id": f.backup_id,
                        "backup_time": iso_time(f.record.time_ns),
                        **browse.entry_dict(f.path, f.node),
                    }
                )
                for f in found
            )
        return _print_lines(
            printable(
                f"{f.backup_id}  {browse.type_name(f.node):<8} {f.node.size:>12}  "
                f"{iso_time(f.node.mtime_ns)}  {browse.shown(f.path)}"
            )
            for f in found
        )


def cmd_dump(args) -> int:
    from pysrbup.client import browse

    repo = _open_repo(args, _key(args.key_file))
    with repo.conn:
        backup_id, record = browse.open_backup(repo, args.backup_id)
        out = sys.stdout.buffer
        try:
            browse.dump(browse.Trees(repo), record, backup_id, args.path, out, args.archive, _warn)
            out.flush()
        except BrokenPipeError:
            return stdout_closed()
    return EXIT_OK


def cmd_diff(args) -> int:
    from pysrbup.client import browse
    from pysrbup.textsafe import printable

    repo = _open_repo(args, _key(args.key_file))
    with repo.conn:
        old_id, old = browse.open_backup(repo, args.old_backup_id)
        new_id, new = browse.open_backup(repo, args.new_backup_id)
        diff = browse.Diff(browse.Trees(repo), old, new)

        def lines():
            for change in diff.changes():
                if args.json:
                    yield json.dumps(
                        {
                            "message_type": "change",
                            "path": change.shown,
                            "modifier": change.modifier,
                            "type": browse.type_name(change.node),
                        }
                    )
                else:
                    yield printable(f"{change.modifier} {change.shown}")
            s = diff.stats
            if args.json:
                yield json.dumps(
                    {"message_type": "statistics", "old": old_id, "new": new_id, **s.as_dict()}
                )
            else:
                yield (
                    f"{s.added} added, {s.removed} removed, {s.changed} changed, "
                    f"{s.metadata} metadata only, {s.type_changed} type changed; data "
                    f"{human_bytes(s.bytes_added)} added, {human_bytes(s.bytes_removed)} removed"
                )

        return _print_lines(lines())


def cmd_mount(args) -> int:
    from pysrbup.client.mount import run_mount

    repo = _open_repo(args, _key(args.key_file))
    with repo.conn:
        run_mount(
            repo,
            args.mountpoint,
            _warn,
            allow_other=args.allow_other,
            default_permissions=not args.no_default_permissions,
            announce=lambda line: print(f"pysrbup-client: {line}", file=sys.stderr, flush=True),
        )
    print("pysrbup-client: unmounted", file=sys.stderr)
    return EXIT_OK


COMMANDS = {
    "backup": cmd_backup,
    "restore": cmd_restore,
    "delete": cmd_delete,
    "list": cmd_list,
    "check": cmd_check,
    "init": cmd_init,
    "key": cmd_key,
    "tag": cmd_tag,
    "stats": cmd_stats,
    "forget": cmd_forget,
    "ls": cmd_ls,
    "find": cmd_find,
    "dump": cmd_dump,
    "diff": cmd_diff,
    "mount": cmd_mount,
    "generate_key": cmd_generate_key,
}


#: Commands that receive file data in frames of a few MiB (see pysrbup/memtune.py).
_READERS = {"restore", "dump", "mount"}


def _tune_memory(command: str) -> None:
    """malloc tuning for the command, before any thread (gRPC's) allocates: only then
    does the arena limit hold."""
    from pysrbup import memtune

    if command in _READERS:
        memtune.tune_malloc(
            memtune.RESTORE_MMAP_THRESHOLD,
            memtune.RESTORE_TRIM_THRESHOLD,
            memtune.RESTORE_ARENA_MAX,
        )
    else:
        memtune.tune_malloc()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gRPC core logs every failed TLS handshake at INFO on stderr; errors are reported in one line.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if args.num_threads < 1:
        print("pysrbup-client: error: --num-threads must be at least 1", file=sys.stderr)
        return UsageError.exit_code
    _tune_memory(args.command)
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


def run() -> None:
    """The ``pysrbup-client`` program: ``main()`` with the quick exit (cli/common.py)."""
    exit_quickly(main)


if __name__ == "__main__":
    run()
