"""Browsing backups without restoring them: ``ls``, ``find``, ``dump`` and ``diff``.

Paths are relative to the backed-up directory (``sub/dir``; the root is the
empty path), held as raw bytes as the trees store names, and shown with
``os.fsdecode``. Only the trees a command needs are fetched:

- ``ls`` and ``dump`` fetch the trees on the way to the path, then (for
  ``--recursive`` and directories) the ones below it, depth first. Before a
  tree that is not at hand is read, up to ``PREFETCH_TREES`` trees the walk
  needs next (siblings of it and of its parents) come in one request, and
  parsed trees are kept within a byte budget (``Trees``), so memory is
  bounded by the budget and the depth, not by the size of the backup.
- ``find`` walks the trees of all the backups it searches level by level,
  each distinct tree once per run (trees shared between backups are fetched
  once), keeping of each only its subdirectories and its matches. A pattern
  is matched a path component at a time, so a directory is not descended
  into when no pattern can match below it (``sub/*.h`` reads ``sub`` only;
  a name pattern reads everything).
- ``diff`` walks two backups side by side and skips, without fetching, every
  subtree whose id is the same on both sides.
- ``dump`` fetches a file's chunks in batches of ``DUMP_BATCH_BYTES`` and
  writes them in order, each verified (AEAD tag and keyed MAC) by
  ``RemoteRepository.fetch_objects``; directories become a tar (or zip)
  stream written as it goes.
"""

from __future__ import annotations

import datetime
import fnmatch
import os
import re
import stat
import tarfile
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from pysrbup.client.repository import FETCH_IDS, RemoteRepository
from pysrbup.errors import IntegrityError, NotFoundError, PysrbupError, UsageError
from pysrbup.proto import repo_pb2
from pysrbup.repo import tree
from pysrbup.textsafe import printable

#: Plaintext bytes of parsed trees kept for reuse within one run.
TREE_CACHE_BYTES = 32 * 1024 * 1024
#: Trees fetched in one request when a depth-first walk needs one it does not have.
PREFETCH_TREES = 256
#: Trees fetched, a level of directories per request, when a walk that reads everything
#: below a directory needs one it does not have (see ``Trees.load``).
DESCEND_TREES = 2048
#: Entries looked at ahead of the walk to find those trees.
PREFETCH_SCAN = 16 * PREFETCH_TREES
#: Plaintext bytes of file data fetched per request by ``dump``.
DUMP_BATCH_BYTES = 32 * 1024 * 1024

NODE_FILE = repo_pb2.NODE_FILE
NODE_DIR = repo_pb2.NODE_DIR
NODE_SYMLINK = repo_pb2.NODE_SYMLINK

Entry = tuple[bytes, repo_pb2.Node]  # (path relative to the backup's root, node)


def shown(path: bytes) -> str:
    """A path as users see it (``.`` for the root), undecodable bytes as surrogates."""
    return os.fsdecode(path) if path else "."


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


# ---- trees ------------------------------------------------------------------


class Trees:
    """Fetches, verifies and parses tree objects; keeps recent ones within ``budget`` bytes.

    ``fetched`` counts the tree objects fetched from the server in this run.
    """

    def __init__(self, repo: RemoteRepository, budget: int = TREE_CACHE_BYTES):
        self.repo = repo
        self.budget = budget
        self.fetched = 0
        self._cache: OrderedDict[bytes, tuple[repo_pb2.Tree, int]] = OrderedDict()
        self._used = 0

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._cache

    def fetch(self, oids: Iterable[bytes]) -> Iterator[tuple[bytes, repo_pb2.Tree, int]]:
        """Yields (id, parsed tree, plaintext size) of each of ``oids`` once, not cached.

        IntegrityError if one is missing, damaged, not a tree, or not sent at all.
        """
        wanted = list(dict.fromkeys(oids))
        pending = set(wanted)
        for oid, plain, problem in self.repo.fetch_objects(wanted):
            if plain is None:
                raise IntegrityError(f"{problem}; run check to see which backups it damages")
            pending.discard(oid)
            self.fetched += 1
            yield oid, tree.parse(plain, f"tree {oid.hex()[:16]}"), len(plain)
        if pending:
            oid = next(iter(pending))
            raise IntegrityError(f"the server did not send tree {oid.hex()[:16]}")

    def load(self, oids: Iterable[bytes], descend: bool = False) -> None:
        """Fetches those of ``oids`` not at hand, in one request per ``FETCH_IDS``.

        ``descend``: then the directories below them too, a level per request,
        up to ``DESCEND_TREES`` trees in all (a depth-first walk would
        otherwise ask for each new level on its own).
        """
        wave = [o for o in dict.fromkeys(oids) if o not in self._cache]
        budget = DESCEND_TREES
        while wave:
            below: dict[bytes, None] = {}
            budget -= len(wave)
            for oid, parsed, size in self.fetch(wave):
                self._keep(oid, parsed, size)
                if descend and budget > len(below):
                    for node in parsed.nodes:
                        if node.type == NODE_DIR and node.subtree not in self._cache:
                            below[node.subtree] = None
            wave = list(below)[: max(budget, 0)] if descend else []

    def get(self, oid: bytes) -> repo_pb2.Tree:
        """The parsed tree ``oid``, fetched if it is not at hand."""
        hit = self._cache.get(oid)
        if hit is not None:
            self._cache.move_to_end(oid)
            return hit[0]
        for _, parsed, size in self.fetch([oid]):
            self._keep(oid, parsed, size)
            return parsed
        raise AssertionError("unreachable: fetch raises when the tree is not sent")

    def _keep(self, oid: bytes, parsed: repo_pb2.Tree, size: int) -> None:
        cost = size + 256
        if cost > self.budget or oid in self._cache:
            return
        self._cache[oid] = (parsed, cost)
        self._used += cost
        while self._used > self.budget:
            _, (_, old) = self._cache.popitem(last=False)
            self._used -= old

    def root(self, record: repo_pb2.Snapshot) -> repo_pb2.Node:
        """The node of the backed-up directory itself (the one entry of the root tree)."""
        nodes = self.get(record.root_tree).nodes
        if len(nodes) != 1 or nodes[0].type != NODE_DIR:
            raise IntegrityError("the backup's root tree does not hold exactly one directory")
        return nodes[0]

    def entries(self, path: bytes, node: repo_pb2.Node) -> list[Entry]:
        """The entries of directory ``node`` at ``path``, in name order."""
        return [(_join(path, child.name), child) for child in self.get(node.subtree).nodes]


def preorder(
    trees: Trees,
    items: Sequence,
    needs: Callable[[object], tuple[bytes, ...]],
    expand: Callable[[object], Sequence],
    descend: bool = False,
) -> Iterator:
    """Yields ``items``, each followed by what ``expand`` makes of it, depth first.

    ``needs(item)`` names the trees ``expand(item)`` reads (none: nothing
    below it). When one is not at hand, it and the trees the walk needs next
    (up to ``PREFETCH_TREES``, from the entries ahead on every level) are
    fetched in one request; ``descend`` (a walk that reads everything below)
    also fetches the directories below those, level by level (``Trees.load``).
    """
    stack: list[list] = [[items, 0]]
    while stack:
        frame = stack[-1]
        level, index = frame
        if index >= len(level):
            stack.pop()
            continue
        frame[1] = index + 1
        item = level[index]
        yield item
        ids = needs(item)
        if not ids:
            continue
        if any(oid not in trees for oid in ids):
            trees.load([*ids, *_upcoming(trees, stack, needs)], descend)
        children = expand(item)
        if children:
            stack.append([children, 0])


def _upcoming(trees: Trees, stack: list[list], needs) -> list[bytes]:
    """Trees not at hand that the entries ahead of a depth-first walk need, soonest first."""
    found: dict[bytes, None] = {}
    scanned = 0
    for level, index in reversed(stack):
        for item in level[index:]:
            scanned += 1
            for oid in needs(item):
                if oid not in trees:
                    found[oid] = None
            if len(found) >= PREFETCH_TREES or scanned >= PREFETCH_SCAN:
                return list(found)[:PREFETCH_TREES]
    return list(found)


def _dir_needs(entry: Entry) -> tuple[bytes, ...]:
    node = entry[1]
    return (node.subtree,) if node.type == NODE_DIR else ()


def _components(path: str) -> list[bytes]:
    """``sub/dir`` (or ``/sub/dir/``, ``./sub``) as raw name components."""
    parts = [p for p in os.fsencode(path).split(b"/") if p and p != b"."]
    if b".." in parts:
        raise NotFoundError(f"{path}: '..' cannot appear in a path inside a backup")
    return parts


def locate(trees: Trees, record: repo_pb2.Snapshot, path: str, backup_id: str) -> Entry:
    """(path, node) of ``path`` in the backup; NotFoundError if it has no such entry.

    Fetches only the trees on the way. The root is ``(b"", node of the backed-up directory)``.
    """
    node = trees.root(record)
    here = b""
    for part in _components(path):
        if node.type != NODE_DIR:
            raise NotFoundError(f"{path}: {shown(here)} is not a directory in backup {backup_id}")
        for child in trees.get(node.subtree).nodes:
            if child.name == part:
                node = child
                break
        else:
            raise NotFoundError(f"{path}: no such file or directory in backup {backup_id}")
        here = _join(here, part)
    return here, node


def open_backup(repo: RemoteRepository, backup_id: str) -> tuple[str, repo_pb2.Snapshot]:
    """(full id, opened record) of the backup ``backup_id`` names (a unique prefix will do)."""
    info = repo.find_snapshot(backup_id)
    return info.snapshot_id, repo.open_snapshot(info)


# ---- entries as data ------------------------------------------------------------


def type_name(node: repo_pb2.Node) -> str:
    """``file``, ``dir``, ``symlink``, ``fifo``, ``chardev``, ... (from the NodeType name)."""
    try:
        return repo_pb2.NodeType.Name(node.type).removeprefix("NODE_").lower()
    except ValueError:
        return f"type{node.type}"


_IFMT = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "socket": stat.S_IFSOCK,
}


def st_mode(node: repo_pb2.Node) -> int:
    """The node's ``st_mode``: file type bits (none for a type it does not know) and mode."""
    return _IFMT.get(type_name(node), 0) | node.mode


def permissions(node: repo_pb2.Node) -> str:
    """``drwxr-x---`` as ``ls -l`` shows it (``?`` for a type it does not know)."""
    return stat.filemode(st_mode(node))


def iso_ns(ns: int) -> str:
    """``2020-09-13T12:26:40.123456789Z`` (UTC; no fraction when it is zero)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    try:
        stamp = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        stamp += datetime.timedelta(seconds=seconds)
    except OverflowError:
        return str(ns)
    text = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{frac:09d}Z" if frac else f"{text}Z"


def entry_dict(path: bytes, node: repo_pb2.Node) -> dict:
    """One entry as ``ls --json`` prints it (restic's fields, names decoded with fsdecode)."""
    row = {
        "path": shown(path),
        "name": os.fsdecode(node.name),
        "type": type_name(node),
        "mode": node.mode,
        "permissions": permissions(node),
        "size": node.size,
        "mtime": iso_ns(node.mtime_ns),
        "mtime_ns": node.mtime_ns,
        "uid": node.uid,
        "gid": node.gid,
        "user": node.user,
        "group": node.group,
    }
    if node.type == NODE_SYMLINK:
        row["link_target"] = os.fsdecode(node.link_target)
    if getattr(node, "links", 0) > 1:
        row["links"] = node.links
    if getattr(node, "rdev", 0):
        row["rdev"] = node.rdev
    return row


def long_line(path: bytes, node: repo_pb2.Node) -> str:
    """``-rw-r----- links user group size mtime path[ -> target]``, as ``ls -l`` (unescaped).

    The link count is the file's hard links when it had several, else 1.
    """
    seconds = node.mtime_ns // 1_000_000_000
    line = (
        f"{permissions(node)} {max(node.links, 1):>3} "
        f"{node.user or node.uid!s:<8} {node.group or node.gid!s:<8} "
        f"{node.size:>12} {iso_ns(seconds * 1_000_000_000)} {shown(path)}"
    )
    if node.type == NODE_SYMLINK:
        line += f" -> {os.fsdecode(node.link_target)}"
    return line


# ---- ls ---------------------------------------------------------------------------


def list_entries(
    trees: Trees, record: repo_pb2.Snapshot, backup_id: str, path: str = "", recursive=False
) -> Iterator[Entry]:
    """The entries of directory ``path`` (all below it if ``recursive``), depth first.

    A path naming a file (or symlink, ...) yields that entry alone.
    """
    here, node = locate(trees, record, path, backup_id)
    if node.type != NODE_DIR:
        yield here, node
        return
    items = trees.entries(here, node)
    if not recursive:
        yield from items
        return
    yield from preorder(trees, items, _dir_needs, lambda entry: trees.entries(*entry), True)


# ---- find -------------------------------------------------------------------------

_ANY_DEPTH = object()  # the ``**`` component: any number of directories
_GLOB = re.compile(rb"[*?\[]")


def _compile_component(part: bytes):
    if part == b"**":
        return _ANY_DEPTH
    if not _GLOB.search(part):
        return part  # literal: compared as it is
    return re.compile(fnmatch.translate(part.decode("latin-1")).encode("latin-1"))


def parse_pattern(text: str) -> list[bytes]:
    """A ``find`` pattern as components: ``*.h`` -> ``**``, ``*.h``; ``sub/*.h`` -> sub, ``*.h``.

    A pattern without ``/`` is matched against names at any depth; one with
    ``/`` against the whole path from the root (a leading ``/`` changes
    nothing). ``*``, ``?`` and ``[...]`` match within one name (fnmatch), ``**``
    any number of directories.
    """
    raw = os.fsencode(text)
    if b"/" in raw:
        parts = [p for p in raw.split(b"/") if p and p != b"."]
    else:
        parts = [b"**", raw] if raw else []
    if not parts:
        raise UsageError(f"find: {text!r} is not a pattern")
    collapsed: list[bytes] = []
    for part in parts:
        if not (part == b"**" and collapsed and collapsed[-1] == b"**"):
            collapsed.append(part)
    return collapsed


class Matcher:
    """Patterns matched one path component at a time (a small NFA over components).

    A state set is a set of (pattern, position) pairs: how far each pattern
    got along the path so far. State sets are interned to small ints, so a
    directory's state is one int, shared by every path in the same state.
    """

    def __init__(self, patterns: list[list[bytes]]):
        self._parts = [[_compile_component(p) for p in parts] for parts in patterns]
        self._ids: dict[frozenset, int] = {}
        self._sets: list[frozenset] = []
        self.start = self._intern(self._closure({(i, 0) for i in range(len(patterns))}))

    def _closure(self, states: set[tuple[int, int]]) -> frozenset:
        todo = list(states)
        out = set(states)
        while todo:
            index, pos = todo.pop()
            parts = self._parts[index]
            if pos < len(parts) and parts[pos] is _ANY_DEPTH and (index, pos + 1) not in out:
                out.add((index, pos + 1))
                todo.append((index, pos + 1))
        return frozenset(out)

    def _intern(self, states: frozenset) -> int:
        sid = self._ids.get(states)
        if sid is None:
            sid = self._ids[states] = len(self._sets)
            self._sets.append(states)
        return sid

    def step(self, sid: int, name: bytes) -> tuple[bool, int]:
        """(whether the entry ``name`` matches, state below it or -1 if nothing can match)."""
        after = set()
        for index, pos in self._sets[sid]:
            parts = self._parts[index]
            if pos >= len(parts):
                continue
            part = parts[pos]
            if part is _ANY_DEPTH:
                after.add((index, pos))
            elif part == name if isinstance(part, bytes) else part.match(name) is not None:
                after.add((index, pos + 1))
        closed = self._closure(after)
        matched = any(pos == len(self._parts[index]) for index, pos in closed)
        alive = frozenset((i, p) for i, p in closed if p < len(self._parts[i]))
        return matched, self._intern(alive) if alive else -1


@dataclass
class Found:
    """One entry a ``find`` pattern matched."""

    backup_id: str
    record: repo_pb2.Snapshot
    path: bytes
    node: repo_pb2.Node  # without its chunk list


_Key = tuple[bytes, int]  # (tree id, matcher state)


def _lean(node: repo_pb2.Node) -> repo_pb2.Node:
    kept = repo_pb2.Node()
    kept.CopyFrom(node)
    kept.ClearField("chunk_ids")
    kept.ClearField("chunk_sizes")
    return kept


def find(
    trees: Trees,
    backups: list[tuple[str, repo_pb2.Snapshot]],
    patterns: list[str],
) -> Iterator[Found]:
    """The entries of ``backups`` matching any of ``patterns``, backup by backup, depth first.

    First every tree of every backup that might hold a match is fetched once
    (level by level, each distinct tree once) and reduced to its matches and
    subdirectories; then each backup's matches are listed from that.
    """
    matcher = Matcher([parse_pattern(p) for p in patterns])
    trees.load(record.root_tree for _, record in backups)
    roots: list[_Key] = [(trees.root(record).subtree, matcher.start) for _, record in backups]
    # (tree, state) -> entries in name order: (name, matching node or None, key below or None)
    summary: dict[_Key, list[tuple[bytes, repo_pb2.Node | None, _Key | None]]] = {}
    level: dict[_Key, None] = dict.fromkeys(roots)
    while level:
        states: dict[bytes, list[int]] = {}
        for oid, sid in level:
            states.setdefault(oid, []).append(sid)
        following: dict[_Key, None] = {}
        for oid, parsed, _ in trees.fetch(states):
            for sid in states[oid]:
                items = summary[(oid, sid)] = []
                for node in parsed.nodes:
                    matched, below = matcher.step(sid, node.name)
                    child = (node.subtree, below) if node.type == NODE_DIR and below >= 0 else None
                    if child is not None and child not in summary:
                        following[child] = None
                    if matched or child is not None:
                        items.append((node.name, _lean(node) if matched else None, child))
        level = {key: None for key in following if key not in summary}
    useful = _useful(summary, roots)
    for (backup_id, record), root in zip(backups, roots, strict=True):
        if not useful[root]:
            continue
        stack = [(b"", iter(summary[root]))]
        while stack:
            path, entries = stack[-1]
            item = next(entries, None)
            if item is None:
                stack.pop()
                continue
            name, hit, child = item
            here = _join(path, name)
            if hit is not None:
                yield Found(backup_id, record, here, hit)
            if child is not None and useful[child]:
                stack.append((here, iter(summary[child])))


def _useful(summary: dict, roots: list[_Key]) -> dict[_Key, bool]:
    """Whether any match lies in or below each summarised tree (post-order, no recursion)."""
    useful: dict[_Key, bool] = {}
    for root in roots:
        stack = [root]
        while stack:
            key = stack[-1]
            if key in useful:
                stack.pop()
                continue
            pending = [c for _, _, c in summary[key] if c is not None and c not in useful]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            useful[key] = any(
                hit is not None or (child is not None and useful[child])
                for _, hit, child in summary[key]
            )
    return useful


# ---- dump -------------------------------------------------------------------------


def _fetch_chunks(
    repo: RemoteRepository, oids: list[bytes]
) -> tuple[dict[bytes, bytes], dict[bytes, str]]:
    """(verified plaintext by id, why not by id) for ``oids``, each fetched once."""
    got: dict[bytes, bytes] = {}
    problems: dict[bytes, str] = {}
    for oid, plain, problem in repo.fetch_objects(list(dict.fromkeys(oids))):
        if plain is None:
            problems[oid] = problem
        else:
            got[oid] = plain
    return got, problems


def _pieces(where: str, chunks, got: dict[bytes, bytes], problems: dict[bytes, str]):
    """The plaintext of ``chunks`` in order; IntegrityError naming the file if one is bad."""
    out = []
    for oid, _, size in chunks:
        data = got.get(oid)
        if data is None or len(data) != size:
            why = problems.get(oid) or f"chunk {oid.hex()[:16]} is missing or damaged"
            raise IntegrityError(f"{where}: {why}")
        out.append(data)
    return out


def file_data(repo: RemoteRepository, path: bytes, node: repo_pb2.Node) -> Iterator[bytes]:
    """A file's bytes, chunk by chunk in order, fetched ``DUMP_BATCH_BYTES`` at a time.

    Every chunk is verified (AEAD tag, keyed MAC, size); IntegrityError naming
    the file if one is missing or damaged.
    """
    where = printable(shown(path))
    chunks = tree.file_chunks(node, where)
    start = 0
    while start < len(chunks):
        end, total = start, 0
        while end < len(chunks) and end - start < FETCH_IDS:
            if end > start and total + chunks[end][2] > DUMP_BATCH_BYTES:
                break
            total += chunks[end][2]
            end += 1
        batch = chunks[start:end]
        yield from _pieces(where, batch, *_fetch_chunks(repo, [oid for oid, _, _ in batch]))
        start = end


def _with_data(
    repo: RemoteRepository, entries: Iterable[Entry]
) -> Iterator[tuple[bytes, repo_pb2.Node, Iterator[bytes]]]:
    """Each entry with an iterator over its data (empty but for files), in order.

    Small files are fetched many at a time (up to ``DUMP_BATCH_BYTES`` or
    ``FETCH_IDS`` chunks per request); a large one streams by itself.
    """
    pending: list[tuple[bytes, repo_pb2.Node, list]] = []
    size = count = 0

    def flush():
        oids = [oid for _, _, chunks in pending for oid, _, _ in chunks]
        got, problems = _fetch_chunks(repo, oids) if oids else ({}, {})
        for path, node, chunks in pending:
            yield path, node, iter(_pieces(printable(shown(path)), chunks, got, problems))
        pending.clear()

    for path, node in entries:
        chunks = tree.file_chunks(node, printable(shown(path))) if node.type == NODE_FILE else []
        if node.size > DUMP_BATCH_BYTES // 4 or len(chunks) > FETCH_IDS // 4:
            yield from flush()
            size = count = 0
            yield path, node, file_data(repo, path, node)
            continue
        if size + node.size > DUMP_BATCH_BYTES or count + len(chunks) > FETCH_IDS:
            yield from flush()
            size = count = 0
        pending.append((path, node, chunks))
        size += node.size if chunks else 0
        count += len(chunks)
        if len(pending) >= FETCH_IDS:
            yield from flush()
            size = count = 0
    yield from flush()


class _Reader:
    """A file object over an iterator of byte strings (what tarfile copies from)."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces = pieces
        self._head = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while size < 0 or len(out) < size:
            if not self._head:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._head = memoryview(piece)
            take = len(self._head) if size < 0 else min(size - len(out), len(self._head))
            out += self._head[:take]
            self._head = self._head[take:]
        return bytes(out)


def _walk_below(trees: Trees, top: Entry) -> Iterator[Entry]:
    """``top`` and, if it is a directory, everything below it, depth first."""
    return preorder(trees, [top], _dir_needs, lambda entry: trees.entries(*entry), True)


def _archive_names(top: Entry) -> Callable[[bytes], bytes]:
    """Member names: relative to the dumped entry's parent (``sub/...`` for ``sub``)."""
    path, node = top
    base = path.rsplit(b"/", 1)[-1] if path else node.name
    cut = len(path) + 1 if path else 0
    return lambda member: base + b"/" + member[cut:] if member != path else base


def write_tar(
    trees: Trees, top: Entry, out: BinaryIO, warn: Callable[[str], None] = lambda m: None
) -> int:
    """Streams ``top`` and everything below it to ``out`` as a tar (PAX); returns the entries.

    Names are raw bytes (PAX ``hdrcharset=BINARY`` where they are not UTF-8),
    with modes, owners, mtimes (ns), symlinks, FIFOs and devices; files of one
    backup that were hard links of each other become tar hard links.
    """
    name_of = _archive_names(top)
    first_link: dict[tuple[int, int], str] = {}
    count = 0
    with tarfile.open(
        fileobj=out,
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        copybufsize=1 << 20,
    ) as tar:
        for path, node, content in _with_data(trees.repo, _walk_below(trees, top)):
            info = tarfile.TarInfo(os.fsdecode(name_of(path)))
            info.mode = node.mode
            seconds, frac = divmod(node.mtime_ns, 1_000_000_000)
            info.mtime = seconds
            if frac:
                info.pax_headers = {"mtime": f"{seconds}.{frac:09d}"}
            info.uid, info.gid = node.uid, node.gid
            info.uname, info.gname = node.user, node.group
            kind = type_name(node)
            data = None
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = os.fsdecode(node.link_target)
            elif kind == "file":
                identity = (getattr(node, "device", 0), getattr(node, "inode", 0))
                if getattr(node, "links", 0) > 1 and identity in first_link:
                    info.type = tarfile.LNKTYPE
                    info.linkname = first_link[identity]
                else:
                    if getattr(node, "links", 0) > 1:
                        first_link[identity] = info.name
                    info.size = node.size
                    data = _Reader(content)
            elif kind in ("fifo", "chardev", "blockdev"):
                info.type = {
                    "fifo": tarfile.FIFOTYPE,
                    "chardev": tarfile.CHRTYPE,
                    "blockdev": tarfile.BLKTYPE,
                }[kind]
                rdev = getattr(node, "rdev", 0)
                info.devmajor, info.devminor = os.major(rdev), os.minor(rdev)
            else:
                warn(f"skipping {printable(shown(path))}: cannot put a {kind} in a tar")
                continue
            tar.addfile(info, data)
            count += 1
    return count


def _zip_time(ns: int) -> tuple[int, int, int, int, int, int]:
    """Local time as zip stores it, within the years zip can hold (1980 to 2107)."""
    try:
        stamp = tuple(time.localtime(ns // 1_000_000_000)[:6])
    except (OverflowError, OSError, ValueError):
        stamp = (1980, 1, 1, 0, 0, 0)
    return min(max(stamp, (1980, 1, 1, 0, 0, 0)), (2107, 12, 31, 23, 59, 58))


def write_zip(
    trees: Trees, top: Entry, out: BinaryIO, warn: Callable[[str], None] = lambda m: None
) -> int:
    """Streams ``top`` and everything below it to ``out`` as a zip (deflate); returns entries.

    Zip stores names as UTF-8: bytes that are not are written as ``\\xNN``
    (with a warning). Symlinks are stored as Unix symlinks; other special
    files are skipped with a warning.
    """
    name_of = _archive_names(top)
    count = 0
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for path, node, content in _with_data(trees.repo, _walk_below(trees, top)):
            raw = name_of(path)
            name = raw.decode("utf-8", "backslashreplace")
            if name.encode("utf-8", "backslashreplace") != raw:
                warn(f"{printable(shown(path))}: the name is not UTF-8; stored as {name}")
            kind = type_name(node)
            if kind not in ("dir", "file", "symlink"):
                warn(f"skipping {printable(shown(path))}: cannot put a {kind} in a zip")
                continue
            when = _zip_time(node.mtime_ns)
            info = zipfile.ZipInfo(name + "/" if kind == "dir" else name, date_time=when)
            info.create_system = 3  # Unix: external_attr holds st_mode
            info.external_attr = (_IFMT[kind] | node.mode) << 16
            if kind == "dir":
                info.external_attr |= 0x10  # MS-DOS directory bit
                info.compress_type = zipfile.ZIP_STORED
                archive.writestr(info, b"")
            elif kind == "symlink":
                archive.writestr(info, node.link_target)
            else:
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w", force_zip64=node.size >= 1 << 31) as dest:
                    for data in content:
                        dest.write(data)
            count += 1
    return count


def dump(
    trees: Trees,
    record: repo_pb2.Snapshot,
    backup_id: str,
    path: str,
    out: BinaryIO,
    archive: str = "tar",
    warn: Callable[[str], None] = lambda m: None,
) -> Entry:
    """Writes the file ``path`` of the backup to ``out``, or the directory as an archive.

    Returns the entry dumped; PysrbupError for a symlink or special file.
    """
    top = locate(trees, record, path, backup_id)
    node = top[1]
    if node.type == NODE_FILE:
        for data in file_data(trees.repo, top[0], node):
            out.write(data)
    elif node.type == NODE_DIR:
        (write_zip if archive == "zip" else write_tar)(trees, top, out, warn)
    else:
        what = type_name(node)
        if node.type == NODE_SYMLINK:
            what += f" to {os.fsdecode(node.link_target)}"
        raise PysrbupError(
            f"{path} is a {what} in backup {backup_id}; dump takes a file or a directory"
        )
    return top


# ---- diff -------------------------------------------------------------------------

#: Node fields that are not metadata a diff reports: content, and hard-link bookkeeping.
_CONTENT = ("name", "size", "chunk_ids", "chunk_sizes", "subtree", "link_target")
_NOT_METADATA = [
    name
    for name in (*_CONTENT, "device", "inode", "links")
    if name in repo_pb2.Node.DESCRIPTOR.fields_by_name
]


def _metadata(node: repo_pb2.Node, with_mtime: bool) -> bytes:
    kept = repo_pb2.Node()
    kept.CopyFrom(node)
    for name in _NOT_METADATA:
        kept.ClearField(name)
    if not with_mtime:
        kept.ClearField("mtime_ns")
    return kept.SerializeToString(deterministic=True)


@dataclass
class Change:
    """A ``diff`` line: ``+`` added, ``-`` removed, ``M`` content, ``U`` metadata, ``T`` type."""

    modifier: str
    path: bytes
    node: repo_pb2.Node  # the newer side's, or the removed one

    @property
    def shown(self) -> str:
        return shown(self.path) + ("/" if self.node.type == NODE_DIR and self.path else "")


@dataclass
class DiffStats:
    added: int = 0
    removed: int = 0
    changed: int = 0
    metadata: int = 0
    type_changed: int = 0
    bytes_added: int = 0  # plaintext bytes of chunks only the newer side's changed parts hold
    bytes_removed: int = 0  # ... only the older side's
    trees_fetched: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_COUNTERS = {"+": "added", "-": "removed", "M": "changed", "U": "metadata", "T": "type_changed"}

_Pair = tuple[bytes, "repo_pb2.Node | None", "repo_pb2.Node | None"]


class Diff:
    """What changed from backup ``old`` to backup ``new`` (``restic diff``, with metadata).

    Subtrees with the same id on both sides are skipped unfetched. A
    directory's own mtime is compared only when its contents are the same
    (otherwise it follows from the changes listed inside). Bytes added and
    removed count the distinct chunks that the differing parts of one side
    hold and those of the other do not; chunks of skipped (identical)
    subtrees are not looked at.
    """

    def __init__(self, trees: Trees, old: repo_pb2.Snapshot, new: repo_pb2.Snapshot):
        self.trees = trees
        self.old, self.new = old, new
        self.stats = DiffStats()
        self._old_chunks: dict[bytes, int] = {}
        self._new_chunks: dict[bytes, int] = {}

    def changes(self) -> Iterator[Change]:
        """The changes, depth first in name order; ``stats`` is complete once exhausted."""
        start = self.trees.fetched
        if self.old.root_tree != self.new.root_tree:
            self.trees.load([self.old.root_tree, self.new.root_tree])
            roots = [(b"", self.trees.root(self.old), self.trees.root(self.new))]
            for pair in preorder(self.trees, roots, self._needs, self._expand):
                change = self._classify(*pair)
                if change is not None:
                    counter = _COUNTERS[change.modifier]
                    setattr(self.stats, counter, getattr(self.stats, counter) + 1)
                    yield change
        old, new = self._old_chunks, self._new_chunks
        self.stats.bytes_added = sum(size for oid, size in new.items() if oid not in old)
        self.stats.bytes_removed = sum(size for oid, size in old.items() if oid not in new)
        self.stats.trees_fetched = self.trees.fetched - start

    @staticmethod
    def _needs(pair: _Pair) -> tuple[bytes, ...]:
        _, old, new = pair
        old_dir = old is not None and old.type == NODE_DIR
        new_dir = new is not None and new.type == NODE_DIR
        if old_dir and new_dir:
            return () if old.subtree == new.subtree else (old.subtree, new.subtree)
        if old_dir:
            return (old.subtree,)
        if new_dir:
            return (new.subtree,)
        return ()

    def _expand(self, pair: _Pair) -> list[_Pair]:
        path, old, new = pair
        before = {}
        after = {}
        if old is not None and old.type == NODE_DIR:
            before = {node.name: node for node in self.trees.get(old.subtree).nodes}
        if new is not None and new.type == NODE_DIR:
            after = {node.name: node for node in self.trees.get(new.subtree).nodes}
        return [
            (_join(path, name), before.get(name), after.get(name))
            for name in sorted(before.keys() | after.keys())
        ]

    def _collect(self, path: bytes, node: repo_pb2.Node, into: dict[bytes, int]) -> None:
        if node.type == NODE_FILE:
            for oid, _, size in tree.file_chunks(node, printable(shown(path))):
                into[oid] = size

    def _classify(self, path: bytes, old, new) -> Change | None:
        if old is None:
            self._collect(path, new, self._new_chunks)
            return Change("+", path, new)
        if new is None:
            self._collect(path, old, self._old_chunks)
            return Change("-", path, old)
        if old.type != new.type:
            self._collect(path, old, self._old_chunks)
            self._collect(path, new, self._new_chunks)
            return Change("T", path, new)
        if old.type == NODE_FILE and (old.chunk_ids != new.chunk_ids or old.size != new.size):
            self._collect(path, old, self._old_chunks)
            self._collect(path, new, self._new_chunks)
            return Change("M", path, new)
        if old.type == NODE_SYMLINK and old.link_target != new.link_target:
            return Change("M", path, new)
        with_mtime = old.type != NODE_DIR or old.subtree == new.subtree
        if _metadata(old, with_mtime) != _metadata(new, with_mtime):
            return Change("U", path, new)
        return None
