"""ls, find, dump and diff: browsing backups without restoring them.

Most tests drive the real client against a real server on loopback; the
ones that count which trees are fetched run the server in-process and wrap
``RemoteRepository.fetch_objects``.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
import zipfile

import pytest
from helpers import assert_no_traceback
from inprocess import in_process_server
from trees import make_full_tree, random_bytes, snapshot_tree

from pysrbup.client import browse
from pysrbup.client.backup import Backup
from pysrbup.textsafe import printable

ODD = b"caf\xc3\xa9-\xff.txt"  # the non-UTF-8 name make_full_tree creates
ODD_SHOWN = "caf\u00e9-\\xff.txt"  # how it is printed


def _walk(root: bytes, rel: bytes = b"") -> list[bytes]:
    """Every path below ``root``, depth first in byte order (the order ls -r prints)."""
    out = []
    for name in sorted(os.listdir(os.path.join(root, rel) if rel else root)):
        path = rel + b"/" + name if rel else name
        out.append(path)
        full = os.path.join(root, path)
        if os.path.isdir(full) and not os.path.islink(full):
            out += _walk(root, path)
    return out


def _lines(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    return proc.stdout.splitlines()


def _fails_in_one_line(proc, text: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert_no_traceback(proc)
    assert proc.stderr.count("\n") == 1 and text in proc.stderr, proc.stderr


@pytest.fixture
def backed_up(tmp_path, client, key_file):
    src = str(tmp_path / "src")
    make_full_tree(src)
    return src, client.backup(src, key_file)


# ---- ls ---------------------------------------------------------------------------


def test_ls_plain_recursive_and_long(backed_up, client, key_file):
    src, bid = backed_up
    src_b = os.fsencode(src)
    top = _lines(client.run("ls", bid, "--key-file", key_file))
    assert top == [printable(os.fsdecode(n)) for n in sorted(os.listdir(src_b))]
    assert ODD_SHOWN in top

    every = _lines(client.run("ls", bid, "--recursive", "--key-file", key_file))
    assert every == [printable(os.fsdecode(p)) for p in _walk(src_b)]

    below = _lines(client.run("ls", bid, "/sub/", "-r", "--key-file", key_file))
    assert below == ["sub/deeper", "sub/deeper/small.bin", "sub/text.txt"]
    assert _lines(client.run("ls", bid, "sub/text.txt", "--key-file", key_file)) == ["sub/text.txt"]

    long = _lines(client.run("ls", bid, "-l", "-r", "--key-file", key_file))
    by_path = {line.split()[-1] if " -> " not in line else line.split()[-3]: line for line in long}
    assert by_path["sub/text.txt"].startswith("-rw-r----- ")
    assert by_path["sub/text.txt"].split()[1] == "1"  # link count
    assert by_path["sub/text.txt"].split()[4] == str(os.path.getsize(f"{src}/sub/text.txt"))
    assert by_path["sub/deeper/small.bin"].startswith("-rwxr-xr-x ")
    assert by_path["empty_dir"].startswith("drwx------ ")
    assert by_path["link"].startswith("lrwxrwxrwx ") and by_path["link"].endswith(
        "link -> sub/text.txt"
    )
    assert by_path["big.bin"].split()[5] == "2020-09-13T12:26:40Z"


def test_ls_json_one_object_per_entry(backed_up, client, key_file):
    src, bid = backed_up
    proc = client.run("--json", "ls", bid, "-r", "--key-file", key_file)
    rows = [json.loads(line) for line in _lines(proc)]
    assert [row["path"] for row in rows] == [os.fsdecode(p) for p in _walk(os.fsencode(src))]
    by_path = {row["path"]: row for row in rows}
    for path, row in by_path.items():
        st = os.lstat(os.path.join(src, path))
        assert row["name"] == os.path.basename(path)
        assert row["mode"] == stat.S_IMODE(st.st_mode)
        assert row["mtime_ns"] == st.st_mtime_ns
        assert (row["uid"], row["gid"]) == (st.st_uid, st.st_gid)
        assert row["permissions"] == stat.filemode(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            assert (row["type"], row["size"]) == ("file", st.st_size)
        elif stat.S_ISDIR(st.st_mode):
            assert row["type"] == "dir"
        elif stat.S_ISLNK(st.st_mode):
            assert row["type"] == "symlink"
            assert row["link_target"] == os.readlink(os.path.join(src, path))
        elif stat.S_ISFIFO(st.st_mode):
            assert row["type"] == "fifo"
    assert by_path["big.bin"]["mtime"] == "2020-09-13T12:26:40.123456789Z"
    assert by_path["sub"]["mtime"] == "2017-07-14T02:40:00.987654321Z"
    assert by_path[os.fsdecode(ODD)]["size"] == len(b"non-utf8 name")


def test_ls_unknown_paths_and_backups_are_one_line(backed_up, client, key_file):
    _, bid = backed_up
    proc = client.run("ls", bid, "sub/nothing", "--key-file", key_file)
    _fails_in_one_line(proc, "sub/nothing: no such file or directory in backup " + bid)
    proc = client.run("ls", bid, "big.bin/x", "--key-file", key_file)
    _fails_in_one_line(proc, "big.bin is not a directory")
    _fails_in_one_line(client.run("ls", "0123abcd", "--key-file", key_file), "no backup with id")
    _fails_in_one_line(
        client.run("dump", bid, "no/such", "--key-file", key_file), "no such file or directory"
    )
    _fails_in_one_line(client.run("diff", bid, "0123abcd", "--key-file", key_file), "no backup")
    _fails_in_one_line(client.run("dump", bid, "link", "--key-file", key_file), "is a symlink")


# ---- find -------------------------------------------------------------------------


def test_find_by_name_and_by_path_newest_first(tmp_path, client, key_file):
    src = str(tmp_path / "src")
    make_full_tree(src)
    old = client.backup(src, key_file)
    os.unlink(f"{src}/big.bin")
    with open(f"{src}/sub/new.bin", "wb") as f:
        f.write(b"new")
    new = client.backup(src, key_file)

    def found(*args):
        proc = client.run("--json", "find", *args, "--key-file", key_file)
        return [(row["backup_id"], row["path"]) for row in map(json.loads, _lines(proc))]

    assert found("*.bin") == [
        (new, "sub/deeper/small.bin"),
        (new, "sub/new.bin"),
        (old, "big.bin"),
        (old, "sub/deeper/small.bin"),
    ]
    assert found("sub/*.bin") == [(new, "sub/new.bin")]
    assert found("/sub/**/*.bin") == [
        (new, "sub/deeper/small.bin"),
        (new, "sub/new.bin"),
        (old, "sub/deeper/small.bin"),
    ]
    assert found("*/deeper") == [(new, "sub/deeper"), (old, "sub/deeper")]
    assert found("big.*", "new.*") == [(new, "sub/new.bin"), (old, "big.bin")]
    assert found("*.bin", "--backup", old[:6]) == [(old, "big.bin"), (old, "sub/deeper/small.bin")]
    assert found("*.nothing") == []

    lines = _lines(client.run("find", "caf*", "--key-file", key_file))
    assert [line.split()[0] for line in lines] == [new, old]
    assert all(line.endswith(f"  {ODD_SHOWN}") for line in lines)
    fields = lines[0].split()
    assert fields[1:3] == ["file", str(len(b"non-utf8 name"))]
    _fails_in_one_line(client.run("find", "x", "--backup", "ffff", "--key-file", key_file), "ffff")


# ---- in-process: which trees are fetched ------------------------------------------------


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSRBUP_CACHE_DIR", str(tmp_path / "cache"))
    with in_process_server(str(tmp_path / "repo")) as served:
        yield served


@pytest.fixture
def fetched(served, monkeypatch):
    """Every id passed to ``fetch_objects``, in order."""
    seen: list[bytes] = []
    real = served.remote.fetch_objects

    def counting(oids):
        seen.extend(oids)
        return real(oids)

    monkeypatch.setattr(served.remote, "fetch_objects", counting)
    return seen


def _record(served, backup_id: str):
    return browse.open_backup(served.remote, backup_id)[1]


def _tree_id(served, record, path: str) -> bytes:
    """The id of the tree of directory ``path`` (looked up with an uncounted reader)."""
    return browse.locate(browse.Trees(served.remote), record, path, "?")[1].subtree


def test_ls_fetches_only_the_trees_on_the_way(served, fetched, tmp_path):
    src = str(tmp_path / "src")
    make_full_tree(src)
    backup_id = Backup(served.remote, 2).run(src).backup_id
    record = _record(served, backup_id)
    root, sub = _tree_id(served, record, ""), _tree_id(served, record, "sub")
    deeper, empty = _tree_id(served, record, "sub/deeper"), _tree_id(served, record, "empty_dir")
    fetched.clear()
    trees = browse.Trees(served.remote)
    listed = [p for p, _ in browse.list_entries(trees, record, backup_id, "sub")]
    assert listed == [b"sub/deeper", b"sub/text.txt"]
    assert fetched == [record.root_tree, root, sub]
    assert trees.fetched == 3

    fetched.clear()
    trees = browse.Trees(served.remote)
    listed = [p for p, _ in browse.list_entries(trees, record, backup_id, "sub", True)]
    assert listed == [b"sub/deeper", b"sub/deeper/small.bin", b"sub/text.txt"]
    assert fetched == [record.root_tree, root, sub, deeper]
    assert empty not in fetched


def test_find_fetches_each_distinct_tree_once(served, fetched, tmp_path):
    src = str(tmp_path / "src")
    make_full_tree(src)
    first = Backup(served.remote, 2).run(src).backup_id
    with open(f"{src}/sub/deeper/more.bin", "wb") as f:
        f.write(b"more")
    second = Backup(served.remote, 2).run(src).backup_id
    backups = [(second, _record(served, second)), (first, _record(served, first))]
    empty = _tree_id(served, backups[0][1], "empty_dir")
    assert empty == _tree_id(served, backups[1][1], "empty_dir")  # shared by both backups

    fetched.clear()
    found = [(b, p) for b, _, p, _ in _found(served, backups, ["*.bin"])]
    assert found == [
        (second, b"big.bin"),
        (second, b"sub/deeper/more.bin"),
        (second, b"sub/deeper/small.bin"),
        (first, b"big.bin"),
        (first, b"sub/deeper/small.bin"),
    ]
    assert len(fetched) == len(set(fetched))  # shared trees (empty_dir) once
    assert empty in fetched
    # Two root records, two root trees, two of sub, two of deeper, one empty_dir.
    assert len(fetched) == 9

    fetched.clear()  # anchored: only the way down to sub/deeper
    found = [(b, p) for b, _, p, _ in _found(served, backups, ["sub/deeper/small*"])]
    assert found == [(second, b"sub/deeper/small.bin"), (first, b"sub/deeper/small.bin")]
    assert empty not in fetched and len(fetched) == 8


def _found(served, backups, patterns):
    for item in browse.find(browse.Trees(served.remote), backups, patterns):
        yield item.backup_id, item.record, item.path, item.node


def test_dump_keeps_chunk_order_across_batches(served, tmp_path, monkeypatch):
    src = str(tmp_path / "src")
    make_full_tree(src)
    backup_id = Backup(served.remote, 2).run(src).backup_id
    record = _record(served, backup_id)
    monkeypatch.setattr(browse, "DUMP_BATCH_BYTES", 1)  # one chunk per request
    out = io.BytesIO()
    trees = browse.Trees(served.remote)
    node = browse.dump(trees, record, backup_id, "big.bin", out)[1]
    assert len(node.chunk_ids) // 32 > 3
    with open(f"{src}/big.bin", "rb") as f:
        assert out.getvalue() == f.read()


# ---- dump -------------------------------------------------------------------------


def _dump(client, key_file, *args) -> bytes:
    proc = subprocess.run(
        client.command("dump", *args, "--key-file", key_file),
        env=client.env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    return proc.stdout


def test_dump_files_byte_identical(backed_up, client, key_file):
    src, bid = backed_up
    with open(f"{src}/big.bin", "rb") as f:
        assert _dump(client, key_file, bid, "big.bin") == f.read()
    assert _dump(client, key_file, bid, os.fsdecode(ODD)) == b"non-utf8 name"
    assert _dump(client, key_file, bid, "empty.txt") == b""


def _split_mtimes(tree: dict) -> tuple[dict, dict]:
    """snapshot_tree's entries without mtimes, and the mtimes of all but symlinks.

    tar carries mtimes as decimal seconds that tarfile reads back as a float
    (about 0.1 µs off), and tarfile does not set the mtimes of symlinks.
    """
    rest, mtimes = {}, {}
    for path, entry in tree.items():
        if entry[0] in ("dir", "file", "link"):
            rest[path] = (*entry[:2], *entry[3:])
            if entry[0] != "link":
                mtimes[path] = entry[2]
        else:
            rest[path] = entry
    return rest, mtimes


def test_dump_directory_as_tar(backed_up, client, key_file, tmp_path):
    src, bid = backed_up
    data = _dump(client, key_file, bid, "/")
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["src"].isdir()
        assert members["src/link"].issym() and members["src/link"].linkname == "sub/text.txt"
        assert members["src/sub/text.txt"].mode == 0o640
        assert members["src/empty_dir"].mode == 0o700
        assert members["src/" + os.fsdecode(ODD)].size == len(b"non-utf8 name")
        assert "src/fifo" not in members or members["src/fifo"].isfifo()
        out = tmp_path / "out"
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(out, **trusted)
    restored, restored_mtimes = _split_mtimes(snapshot_tree(str(out / "src"), skip_special=False))
    wanted, wanted_mtimes = _split_mtimes(snapshot_tree(src, skip_special=False))
    if "src/fifo" not in members:  # a backup without special files
        wanted.pop(b"fifo")
    assert restored == wanted
    assert restored_mtimes.keys() == wanted_mtimes.keys()
    for path, mtime_ns in wanted_mtimes.items():
        assert abs(restored_mtimes[path] - mtime_ns) < 1000, path

    part = _dump(client, key_file, bid, "sub/deeper")
    with tarfile.open(fileobj=io.BytesIO(part), mode="r:") as tar:
        assert tar.getnames() == ["deeper", "deeper/small.bin"]
        assert tar.getmember("deeper/small.bin").mode == 0o755
        with open(f"{src}/sub/deeper/small.bin", "rb") as f:
            assert tar.extractfile("deeper/small.bin").read() == f.read()


def test_dump_directory_as_zip(backed_up, client, key_file):
    src, bid = backed_up
    data = _dump(client, key_file, bid, "sub", "--archive", "zip")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == [
            "sub/",
            "sub/deeper/",
            "sub/deeper/small.bin",
            "sub/text.txt",
        ]
        with open(f"{src}/sub/text.txt", "rb") as f:
            assert archive.read("sub/text.txt") == f.read()
        info = archive.getinfo("sub/deeper/small.bin")
        assert stat.S_IMODE(info.external_attr >> 16) == 0o755


# ---- diff -------------------------------------------------------------------------


def test_diff_lists_exactly_the_changes(tmp_path, client, key_file):
    src = str(tmp_path / "src")
    make_full_tree(src)
    old = client.backup(src, key_file)
    with open(f"{src}/new.txt", "wb") as f:  # added
        f.write(b"brand new\n")
    os.unlink(f"{src}/empty.txt")  # removed
    with open(f"{src}/sub/deeper/small.bin", "r+b") as f:  # content changed, same size
        f.write(random_bytes(1000, 99))
    os.chmod(f"{src}/sub/text.txt", 0o600)  # metadata only
    odd = os.path.join(os.fsencode(src), ODD)
    os.unlink(odd)  # a file replaced by a directory
    os.mkdir(odd)
    with open(os.path.join(odd, b"inner"), "wb") as f:
        f.write(b"inside\n")
    new = client.backup(src, key_file)

    lines = _lines(client.run("diff", old, new, "--key-file", key_file))
    assert lines == [
        f"T {ODD_SHOWN}/",
        f"+ {ODD_SHOWN}/inner",
        "- empty.txt",
        "+ new.txt",
        "M sub/deeper/small.bin",
        "U sub/text.txt",
        "2 added, 1 removed, 1 changed, 1 metadata only, 1 type changed; "
        "data 1017 B added, 1013 B removed",
    ]
    proc = client.run("--json", "diff", old, new, "--key-file", key_file)
    rows = [json.loads(line) for line in _lines(proc)]
    changes, stats = rows[:-1], rows[-1]
    assert [(c["modifier"], c["path"], c["type"]) for c in changes][:2] == [
        ("T", os.fsdecode(ODD) + "/", "dir"),
        ("+", os.fsdecode(ODD) + "/inner", "file"),
    ]
    assert stats["message_type"] == "statistics"
    assert (stats["bytes_added"], stats["bytes_removed"]) == (10 + 7 + 1000, 13 + 1000)
    # Root records, root trees, sub and sub/deeper on both sides, the new directory; not
    # empty_dir (the same subtree id on both sides).
    assert stats["trees_fetched"] == 9

    proc = client.run("--json", "diff", new, old, "--key-file", key_file)
    back = [json.loads(line) for line in _lines(proc)]
    assert [(c["modifier"], c["path"]) for c in back[:3]] == [
        ("T", os.fsdecode(ODD)),
        ("-", os.fsdecode(ODD) + "/inner"),
        ("+", "empty.txt"),
    ]
    assert (back[-1]["bytes_added"], back[-1]["bytes_removed"]) == (1013, 1017)


def test_diff_of_the_same_tree_is_a_zero_summary(backed_up, client, key_file):
    src, first = backed_up
    second = client.backup(src, key_file)
    assert second != first  # a new record, the same trees
    assert _lines(client.run("diff", first, second, "--key-file", key_file)) == [
        "0 added, 0 removed, 0 changed, 0 metadata only, 0 type changed; "
        "data 0 B added, 0 B removed"
    ]
    proc = client.run("--json", "diff", first, second, "--key-file", key_file)
    (stats,) = [json.loads(line) for line in _lines(proc)]
    assert stats["trees_fetched"] == 0
