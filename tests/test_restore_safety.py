"""Restore never leaves its target: symlinks in it are not followed, hostile trees are refused."""

from __future__ import annotations

import os
import stat

import pytest
from helpers import assert_no_traceback
from trees import random_bytes, snapshot_tree

from pysrbup.client.safefs import DirTable
from pysrbup.errors import IntegrityError
from pysrbup.proto import repo_pb2
from pysrbup.repo.tree import parse as parse_tree
from pysrbup.server import packs
from pysrbup.textsafe import printable


def _make_source(tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "dir").mkdir(parents=True)
    (src / "sub" / "dir" / "file.txt").write_bytes(random_bytes(5000, 7))
    (src / "sub" / "top.txt").write_text("top\n")
    (src / "sub" / "big.bin").write_bytes(random_bytes(3 * 1024 * 1024, 8))  # several chunks
    (src / "sub" / "empty.txt").write_bytes(b"")
    os.symlink("dir/file.txt", src / "sub" / "link")
    os.chmod(src / "sub" / "dir" / "file.txt", 0o640)
    os.chmod(src / "sub" / "dir", 0o750)
    os.chmod(src / "sub", 0o755)
    return src


def _outside_dir(tmp_path):
    """A directory beside the restore target, with a file, a mode and an owner to watch."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine\n")
    os.chmod(outside / "precious.txt", 0o604)
    os.chmod(outside, 0o711)
    if os.geteuid() == 0:  # a restore as root would chown what it wrongly reaches
        os.chown(outside, 12345, 12345)
        os.chown(outside / "precious.txt", 12345, 12345)
    os.utime(outside, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return outside


def _state(path) -> tuple:
    """Everything a stray write, chmod, chown or utime would change below and at ``path``."""
    st = os.lstat(path)
    below = snapshot_tree(str(path)) if stat.S_ISDIR(st.st_mode) else None
    data = None if below is not None else open(path, "rb").read()  # noqa: SIM115
    return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, below, data)


@pytest.mark.parametrize("replaced", ["sub", os.path.join("sub", "dir")])
def test_force_never_follows_a_symlinked_directory(tmp_path, client, key_file, replaced):
    src = _make_source(tmp_path)
    backup_id = client.backup(str(src), key_file)
    out = tmp_path / "out"
    client.run("restore", backup_id, str(out), key_file, check=True)
    outside = _outside_dir(tmp_path)
    victim = out / "src" / replaced
    for root, dirs, files in os.walk(victim, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            path = os.path.join(root, name)
            (os.unlink if os.path.islink(path) else os.rmdir)(path)
    os.rmdir(victim)
    os.symlink(outside, victim)
    before = _state(outside)

    proc = client.run("restore", "--force", backup_id, str(out), key_file)

    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    assert _state(outside) == before
    assert not os.path.islink(victim)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))


@pytest.mark.parametrize("kind", ["link-to-file", "link-to-dir", "hardlink"])
@pytest.mark.parametrize("name", ["top.txt", "big.bin", "empty.txt"])
def test_force_replaces_a_file_and_leaves_what_it_pointed_to(
    tmp_path, client, key_file, kind, name
):
    src = _make_source(tmp_path)
    backup_id = client.backup(str(src), key_file)
    out = tmp_path / "out"
    client.run("restore", backup_id, str(out), key_file, check=True)
    outside = _outside_dir(tmp_path)
    pointed = outside if kind == "link-to-dir" else outside / "precious.txt"
    victim = out / "src" / "sub" / name
    victim.unlink()
    if kind == "hardlink":
        os.link(pointed, victim)
    else:
        os.symlink(pointed, victim)
    before = _state(outside), _state(pointed)

    proc = client.run("restore", backup_id, str(out), key_file)  # no --force: refused
    assert proc.returncode == 1
    assert_no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists; restore elsewhere or use --force" in lines[0]
    assert (_state(outside), _state(pointed)) == before
    assert os.path.islink(victim) == (kind != "hardlink")

    proc = client.run("restore", "--force", backup_id, str(out), key_file)
    assert proc.returncode == 0, proc.stderr
    assert (_state(outside), _state(pointed)) == before
    assert stat.S_ISREG(os.lstat(victim).st_mode) and os.lstat(victim).st_nlink == 1
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))


def test_force_replaces_an_empty_directory_but_not_a_full_one(tmp_path, client, key_file):
    src = _make_source(tmp_path)
    backup_id = client.backup(str(src), key_file)
    out = tmp_path / "out"
    client.run("restore", backup_id, str(out), key_file, check=True)
    (out / "src" / "sub" / "top.txt").unlink()
    (out / "src" / "sub" / "top.txt").mkdir()
    client.run("restore", "--force", backup_id, str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))

    (out / "src" / "sub" / "top.txt").unlink()
    (out / "src" / "sub" / "top.txt").mkdir()
    (out / "src" / "sub" / "top.txt" / "keep.txt").write_text("local work\n")
    proc = client.run("restore", "--force", backup_id, str(out), key_file)
    assert proc.returncode == 1
    assert_no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "top.txt is a directory that is not empty" in lines[0]
    assert (out / "src" / "sub" / "top.txt" / "keep.txt").read_text() == "local work\n"


def test_target_may_be_a_symlink(tmp_path, client, key_file):
    src = _make_source(tmp_path)
    backup_id = client.backup(str(src), key_file)
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "out")
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(real / "src")) == snapshot_tree(str(src))


# ---- trees with invalid or duplicate names ----------------------------------


def _tree_bytes(*names: bytes) -> bytes:
    nodes = [repo_pb2.Node(name=name, type=repo_pb2.NODE_FILE) for name in names]
    return repo_pb2.Tree(nodes=nodes).SerializeToString()


@pytest.mark.parametrize(
    "names",
    [
        (b"a", b"a"),
        (b"a", b"b", b"a"),  # not adjacent: a tree need not be sorted
        (b"",),
        (b".",),
        (b"..",),
        (b"x/y",),
        (b"../escape",),
        (b"nul\0byte",),
    ],
    ids=["duplicate", "duplicate-unsorted", "empty", "dot", "dotdot", "slash", "up", "nul"],
)
def test_trees_with_bad_names_are_refused(names):
    where = "/restore/out/src/evil\x1b[2Jdir"
    with pytest.raises(IntegrityError) as info:
        parse_tree(_tree_bytes(*names), where)
    message = str(info.value)
    assert message.startswith("/restore/out/src/evil\\x1b[2Jdir: ")
    assert "\x1b" not in message
    assert ("twice" in message) == (names[0] == b"a")


def test_good_tree_and_wide_deep_restore(tmp_path, client, key_file):
    """Names that are only almost bad pass; more directories than fds are cached."""
    parsed = parse_tree(_tree_bytes(b"...", b".a", b"a..", b"\xff\x1b"), "d")
    assert [n.name for n in parsed.nodes] == [b"...", b".a", b"a..", b"\xff\x1b"]
    src = tmp_path / "src"
    deep = src
    for level in range(40):
        deep = deep / f"d{level}"
        deep.mkdir(parents=True)
        (deep / "f").write_bytes(random_bytes(100 + level, level))
    for i in range(300):
        wide = src / "wide" / f"w{i:03}"
        wide.mkdir(parents=True)
        (wide / "a.txt").write_text(f"{i}\n")
        (wide / "b.txt").write_text(f"{i} b\n")
        os.chmod(wide, 0o555)
    (src / "...").write_text("dots\n")
    backup_id = client.backup(str(src), key_file)
    out = tmp_path / "out"
    client.run("restore", backup_id, str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))


def test_dir_table_opens_without_following_and_stays_bounded(tmp_path):
    chain = tmp_path / "a" / "b" / "c"
    chain.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "a" / "b" / "link")
    table = DirTable(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), limit=1)
    try:
        a = table.add(0, b"a")
        b = table.add(a, b"b")
        c = table.add(b, b"c")
        link = table.add(b, b"link")
        fd = table.acquire(c)
        assert os.path.samestat(os.fstat(fd), os.stat(chain))
        table.release(c)
        assert table.open_count() <= 2  # the root and one idle directory
        with pytest.raises(OSError):  # ELOOP/ENOTDIR: the symlink is not followed
            table.acquire(link)
        assert table.open_count() <= 2
    finally:
        table.close()


# ---- control characters in what is printed ----------------------------------


def test_printable_escapes_controls():
    assert printable("plain/é/名") == "plain/é/名"
    assert printable("a\x1b[31mb\r\n\x00\x7f\x9b") == "a\\x1b[31mb\\x0d\\x0a\\x00\\x7f\\x9b"
    assert printable("evil\u202etxt") == "evil\\u202etxt"
    assert printable(os.fsdecode(b"caf\xff")) == "caf\\xff"


@pytest.mark.server_args("--ecc=none")  # no parity: the damage reaches the client
def test_damaged_file_with_escape_in_its_name_is_reported_escaped(
    tmp_path, client, key_file, server
):
    src = tmp_path / "src"
    src.mkdir()
    hostile = "\x1b[31mred\x07.bin"
    (src / hostile).write_bytes(random_bytes(2 * 1024 * 1024, 31))
    (src / "bystander.txt").write_text("unharmed\n")
    backup_id = client.backup(str(src), key_file)
    server.settled()
    pack_files = sorted(
        os.path.join(root, name)
        for root, _, files in os.walk(os.path.join(server.repo, "packs"))
        for name in files
        if name.endswith(".pack")
    )
    entries = packs.read_footer(pack_files[0])
    assert entries
    entry = max(entries, key=lambda e: e.length)  # a chunk of the hostile file
    with open(pack_files[0], "r+b") as handle:
        handle.seek(entry.offset + entry.length // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))
    out = tmp_path / "out"
    proc = client.run("restore", backup_id, str(out), key_file)
    assert proc.returncode == 3, proc.stderr
    assert_no_traceback(proc)
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "\\x1b[31mred\\x07.bin" in proc.stderr and "damaged" in proc.stderr
    assert (out / "src" / "bystander.txt").read_text() == "unharmed\n"
    assert os.path.getsize(out / "src" / hostile) == 2 * 1024 * 1024
