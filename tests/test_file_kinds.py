"""What is really there comes back: hard links, xattrs and ACLs, FIFOs and devices,
files that change while read, and choosing what to back up (restic's exclude rules)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time

import pytest
from helpers import assert_no_traceback, backup_id_in
from trees import random_bytes, snapshot_tree

from pysrbup.client.excludes import CACHEDIR_SIGNATURE, Excludes, Pattern


def _restore(client, backup_id: str, out, key_file) -> None:
    client.run("restore", backup_id, str(out), key_file, check=True)


def _names(root) -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def _inode_groups(root) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(path, root))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def test_hard_links_come_back_as_links(tmp_path, client, key_file):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "b" / "deep").mkdir(parents=True)
    (src / "a" / "big.bin").write_bytes(random_bytes(6 * 1024 * 1024, 1))
    os.link(src / "a" / "big.bin", src / "b" / "deep" / "big-link.bin")
    (src / "a" / "small.txt").write_text("small\n")
    os.link(src / "a" / "small.txt", src / "a" / "small-2.txt")
    os.link(src / "a" / "small.txt", src / "b" / "small-3.txt")
    (src / "empty").write_bytes(b"")
    os.link(src / "empty", src / "b" / "empty-link")
    (src / "single.txt").write_text("alone\n")
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))
    assert _inode_groups(out / "src") == _inode_groups(src) != set()
    listing = client.run("ls", backup_id, "-l", "-r", "--key-file", key_file, check=True).stdout
    counts = {line.split()[-1]: line.split()[1] for line in listing.splitlines()}
    assert counts["a/small.txt"] == counts["b/small-3.txt"] == "3"
    assert counts["single.txt"] == "1"


def test_xattrs_are_backed_up_and_restored(tmp_path, client, key_file):
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "f.txt").write_text("with attributes\n")
    (src / "one.bin").write_bytes(random_bytes(10_000, 2))
    (src / "many.bin").write_bytes(random_bytes(6 * 1024 * 1024, 3))
    try:
        for path in (src / "dir", src / "dir" / "f.txt", src / "one.bin", src / "many.bin"):
            os.setxattr(path, "user.pysrbup.test", b"value \x00\xff " + path.name.encode())
        os.setxattr(src / "one.bin", "user.second", b"")
    except OSError as exc:
        pytest.skip(f"this file system keeps no user xattrs: {exc}")
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)
    for rel in ("dir", "dir/f.txt", "one.bin", "many.bin"):
        want = {n: os.getxattr(src / rel, n) for n in os.listxattr(src / rel)}
        got = {n: os.getxattr(out / "src" / rel, n) for n in os.listxattr(out / "src" / rel)}
        assert got == want and want
    plain = backup_id_in(client.run("backup", str(src), key_file, "--no-xattrs", check=True).stdout)
    bare = tmp_path / "bare"
    _restore(client, plain, bare, key_file)
    assert os.listxattr(bare / "src" / "one.bin") == []


@pytest.fixture
def setfacl():
    """setfacl/getfacl, installed from Debian's packages when missing (needs root)."""
    if not shutil.which("setfacl"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("setfacl is not installed and cannot be installed here")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "acl"]
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            if subprocess.run(install, capture_output=True, env=env).returncode != 0:
                pytest.skip("the acl package could not be installed")
    return shutil.which("setfacl")


def test_posix_acls_come_back(tmp_path, client, key_file, setfacl):
    src = tmp_path / "src"
    src.mkdir()
    (src / "shared.txt").write_text("for the group\n")
    subprocess.run(
        [setfacl, "-m", "u:nobody:r--,g:daemon:rw-", str(src / "shared.txt")], check=True
    )
    subprocess.run([setfacl, "-d", "-m", "u:nobody:rwx", str(src)], check=True)
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)

    def acl(path) -> str:
        return subprocess.run(
            ["getfacl", "--omit-header", "--absolute-names", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert acl(out / "src" / "shared.txt") == acl(src / "shared.txt")
    assert "user:nobody:r--" in acl(out / "src" / "shared.txt")
    assert acl(out / "src") == acl(src) and "default:user:nobody:rwx" in acl(src)


def test_fifos_and_devices(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe", 0o640)
    rooted = os.geteuid() == 0
    if rooted:
        os.mknod(src / "null-copy", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)
    st = os.lstat(out / "src" / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    if rooted:
        dev = os.lstat(out / "src" / "null-copy")
        assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)


def test_a_file_that_changes_while_read_is_reported(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    growing = src / "growing.log"
    growing.write_bytes(random_bytes(32 * 1024 * 1024, 4))
    (src / "steady.txt").write_text("steady\n")
    stop = threading.Event()

    def append():
        with open(growing, "ab") as handle:
            while not stop.is_set():
                handle.write(b"x" * 65536)
                handle.flush()
                time.sleep(0.002)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        proc = client.run("backup", str(src), key_file)
    finally:
        stop.set()
        writer.join()
    assert proc.returncode == 3, proc.stderr
    assert "growing.log changed while it was read" in proc.stderr
    assert_no_traceback(proc)
    backup_id = backup_id_in(proc.stdout)
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)
    assert (out / "src" / "steady.txt").read_text() == "steady\n"
    assert os.path.getsize(out / "src" / "growing.log") >= 32 * 1024 * 1024


def test_exclude_patterns_follow_restics_rules():
    def hit(pattern: str, path: str, ignore_case: bool = False) -> bool:
        return Pattern(pattern, ignore_case).matches([c for c in path.split("/") if c])

    assert hit("*.tmp", "/home/u/a.tmp") and not hit("*.tmp", "/home/u/a.tmpx")
    assert hit("cache", "/home/u/cache/x/y")  # a parent matches: everything below goes
    assert hit("cache/*.bin", "/srv/cache/a.bin") and not hit("cache/*.bin", "/srv/cache/d/a.bin")
    assert hit("/srv/data", "/srv/data/x") and not hit("/srv/data", "/other/srv/data")
    assert hit("/srv/**/*.o", "/srv/a/b/c.o") and hit("/srv/**/*.o", "/srv/c.o")
    assert hit("foo/**/bar", "/x/foo/bar") and hit("foo/**/bar", "/x/foo/a/b/bar/z")
    assert hit("d?t[0-9]", "/a/dat5") and not hit("d?t[0-9]", "/a/dat55")
    assert not hit("*.TMP", "/a/b.tmp") and hit("*.TMP", "/a/b.tmp", ignore_case=True)


def test_every_exclude_flag(tmp_path, client, key_file):
    src = tmp_path / "src"
    for folder in ("keep", "build/obj", "cache1/sub", "cache2", "fake_cache", "marked", "media"):
        (src / folder).mkdir(parents=True)
    files = {
        "keep/a.txt": b"a",
        "keep/b.TMP": b"b",
        "keep/c.tmp": b"c",
        "build/obj/x.o": b"x",
        "build/readme": b"r",
        "cache1/sub/blob": b"1",
        "cache2/blob": b"2",
        "fake_cache/blob": b"3",
        "marked/blob": b"4",
        "media/huge.iso": random_bytes(2 * 1024 * 1024, 5),
        "media/small.jpg": random_bytes(1000, 6),
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    (src / "cache1" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE + b"\n# a cache\n")
    (src / "cache1" / "sub" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE)  # nested
    (src / "cache2" / "CACHEDIR.TAG").write_bytes(CACHEDIR_SIGNATURE)
    (src / "fake_cache" / "CACHEDIR.TAG").write_bytes(b"Signature: not the real one")
    (src / "marked" / ".nobackup").write_bytes(b"")
    exclude_file = tmp_path / "excludes.txt"
    exclude_file.write_text("# build products\n\n  build/**/*.o  \n$PYSRBUP_TEST_DIR/readme\n")
    env = dict(client.env, PYSRBUP_TEST_DIR=str(src / "build"))
    proc = client.run(
        "backup",
        str(src),
        key_file,
        "--exclude",
        "*.tmp",
        "--iexclude",
        "*.tmp",
        "--exclude-file",
        str(exclude_file),
        "--exclude-caches",
        "--exclude-if-present",
        ".nobackup",
        "--exclude-larger-than",
        "1M",
        check=True,
        env=env,
    )
    out = tmp_path / "out"
    _restore(client, backup_id_in(proc.stdout), out, key_file)
    got = _names(out / "src")
    assert got == {
        "keep",
        "keep/a.txt",
        "build",
        "build/obj",
        "cache1",
        "cache2",
        "fake_cache",
        "fake_cache/blob",
        "fake_cache/CACHEDIR.TAG",
        "marked",
        "media",
        "media/small.jpg",
    }, got
    for rel in ("keep/b.TMP", "keep/c.tmp", "build/obj/x.o", "build/readme", "media/huge.iso"):
        assert rel not in got
    bad = client.run("backup", str(src), key_file, "--exclude-larger-than", "lots")
    assert bad.returncode == 2 and "bad size" in bad.stderr
    assert_no_traceback(bad)
    missing = client.run("backup", str(src), key_file, "--exclude-file", str(tmp_path / "none"))
    assert missing.returncode == 2 and "cannot read exclude file" in missing.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
def test_one_file_system_keeps_the_mount_point_empty(tmp_path, client, key_file):
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "local.txt").write_text("local\n")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(src / "mnt")]
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (src / "mnt" / "other-fs.txt").write_text("elsewhere\n")
        everything = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
        one = backup_id_in(
            client.run("backup", str(src), key_file, "--one-file-system", check=True).stdout
        )
    finally:
        subprocess.run(["umount", "-l", str(src / "mnt")])
    for backup_id, want in ((everything, True), (one, False)):
        out = tmp_path / f"out-{backup_id}"
        _restore(client, backup_id, out, key_file)
        assert (out / "src" / "local.txt").exists() and (out / "src" / "mnt").is_dir()
        assert (out / "src" / "mnt" / "other-fs.txt").exists() is want


def test_excludes_unit_rules(tmp_path):
    rules = Excludes.from_options(exclude=["/a/b"], exclude_larger_than="2k")
    assert rules.excluded("/a/b/c") and not rules.excluded("/x/a/b")
    assert rules.too_large(2049) and not rules.too_large(2048)
    with pytest.raises(Exception, match="empty exclude pattern"):
        Excludes.from_options(exclude=[""])


def test_sparse_files_come_back_sparse(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "disk.img"
    with open(sparse, "wb") as handle:
        handle.truncate(256 * 1024 * 1024)
        for at in (0, 100 * 1024 * 1024, 255 * 1024 * 1024):
            handle.seek(at)
            handle.write(random_bytes(1024 * 1024, at))
    if os.stat(sparse).st_blocks * 512 > 16 * 1024 * 1024:
        pytest.skip("this file system does not keep holes")
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    server.settled()
    packs = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(os.path.join(server.repo, "packs"))
        for name in names
        if name.endswith(".pack")
    )
    # 3 MiB of data; the zeros are stored once. Chunks that straddle data and zeros
    # (their cut points depend on the key) may be stored uncompressed, hence the margin.
    assert packs < 24 * 1024 * 1024, packs
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)
    restored = out / "src" / "disk.img"
    with open(sparse, "rb") as a, open(restored, "rb") as b:
        while True:
            x, y = a.read(1 << 22), b.read(1 << 22)
            assert x == y
            if not x:
                break
    allocated = os.stat(restored).st_blocks * 512  # straddling chunks are written whole
    assert allocated < 48 * 1024 * 1024, allocated


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files and add a user")
def test_owners_by_name_where_it_exists_else_by_id(tmp_path, client, key_file):
    if not (shutil.which("useradd") and shutil.which("usermod") and shutil.which("userdel")):
        pytest.skip("useradd/usermod/userdel are missing")
    user = f"psb{os.getpid() % 100000}"
    if subprocess.run(["useradd", "-M", "-u", "54321", user], capture_output=True).returncode:
        pytest.skip("cannot add a user here")
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "named.txt").write_text("owned by a named user\n")
        (src / "unnamed.txt").write_text("owned by an id without a name\n")
        os.chown(src / "named.txt", 54321, 54321)
        os.chown(src / "unnamed.txt", 45678, 45678)
        backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
        # The same name has another id on the machine restored to.
        subprocess.run(["usermod", "-u", "54322", user], check=True, capture_output=True)
        by_name = tmp_path / "by-name"
        _restore(client, backup_id, by_name, key_file)
        assert os.stat(by_name / "src" / "named.txt").st_uid == 54322
        assert os.stat(by_name / "src" / "unnamed.txt").st_uid == 45678
        numeric = tmp_path / "numeric"
        client.run("restore", backup_id, str(numeric), key_file, "--numeric-owner", check=True)
        assert os.stat(numeric / "src" / "named.txt").st_uid == 54321
    finally:
        subprocess.run(["userdel", user], capture_output=True)


def test_backup_from_standard_input(tmp_path, client, key_file):
    data = random_bytes(9 * 1024 * 1024, 11) + b"-- end of dump --\n"
    proc = subprocess.run(
        client.command("backup", "--stdin", "--stdin-filename", "db.sql", key_file),
        input=data,
        capture_output=True,
        env=client.env,
        check=True,
    )
    backup_id = backup_id_in(proc.stdout.decode())
    out = tmp_path / "out"
    _restore(client, backup_id, out, key_file)
    assert (out / "db.sql").read_bytes() == data
    again = subprocess.run(
        client.command("--json", "backup", "--stdin", "--stdin-filename", "db.sql", key_file),
        input=data,
        capture_output=True,
        env=client.env,
        check=True,
    )
    import json

    assert json.loads(again.stdout)["bytes_new"] < 1000  # only a new root tree: data deduplicated
    bad = client.run("backup", "--stdin", "--stdin-filename", "a/b", key_file, input="x")
    assert bad.returncode == 2 and "invalid --stdin-filename" in bad.stderr


def test_dry_run_says_what_is_new_and_stores_nothing(tmp_path, client, key_file, server):
    import json

    src = tmp_path / "src"
    src.mkdir()
    (src / "old.bin").write_bytes(random_bytes(2 * 1024 * 1024, 21))
    client.backup(str(src), key_file)
    (src / "new.bin").write_bytes(random_bytes(3 * 1024 * 1024, 22))
    listed = client.run("list", check=True).stdout
    server.settled()

    def stored():
        return sorted(
            (name, os.path.getsize(os.path.join(folder, name)))
            for folder, _, names in os.walk(os.path.join(server.repo, "packs"))
            for name in names
        )

    packs = stored()
    proc = client.run("--json", "backup", "--dry-run", str(src), key_file, check=True)
    report = json.loads(proc.stdout)
    assert report["dry_run"] and report["backup_id"] == ""
    assert 3 * 1024 * 1024 <= report["bytes_new"] < 3 * 1024 * 1024 + 10_000  # + new trees
    assert report["bytes_sent"] == 0
    assert client.run("list", check=True).stdout == listed
    assert stored() == packs
    text = client.run("backup", "--dry-run", str(src), key_file, check=True).stdout
    assert "nothing was uploaded" in text.splitlines()[-1]


def test_holes_are_zero_filled_without_reading_and_give_the_same_bytes(tmp_path):
    from pysrbup.client.file_saver import _SparseReader

    path = tmp_path / "holes.img"
    with open(path, "wb") as handle:
        handle.truncate(40 * 1024 * 1024 + 123)
        for at in (0, 5 * 1024 * 1024 + 7, 39 * 1024 * 1024):
            handle.seek(at)
            handle.write(random_bytes(300_000, at))
    want = path.read_bytes()
    for size in (4096, 1 << 20, 3 * 1024 * 1024 + 1):
        got = bytearray()
        buf = memoryview(bytearray(size))
        with open(path, "rb", buffering=0) as handle:
            reader = _SparseReader(handle)
            while n := reader.readinto(buf):
                got += buf[:n]
        assert bytes(got) == want


def test_small_files_keep_modes_owners_and_times_in_a_set_group_id_target(
    tmp_path, client, key_file
):
    """Restore makes small files in batches, with their final mode at creation where
    the umask allows, and skips chown where the new file is already its owner's; a
    set-group-ID target (files would take its group) must not fool either."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    modes = [0o644, 0o600, 0o755, 0o444, 0o664, 0o666, 0o700, 0o4755, 0o2755, 0o1644, 0o000]
    for n in range(120):
        path = src / ("sub" if n % 2 else ".") / f"f{n}"
        path.write_bytes(random_bytes(1 + n * 97, n))
        os.chmod(path, modes[n % len(modes)])
        os.utime(path, ns=(n * 10**9 + 7, n * 10**9 + 7))
        if os.geteuid() == 0 and n % 3 == 0:
            os.chown(path, 1000 + n, 2000 + n)
    expected = snapshot_tree(str(src))
    backup_id = backup_id_in(client.run("backup", str(src), key_file, check=True).stdout)
    plain = tmp_path / "plain"
    _restore(client, backup_id, plain, key_file)
    assert snapshot_tree(str(plain / "src")) == expected
    if os.geteuid() != 0:
        return
    target = tmp_path / "setgid"
    target.mkdir()
    os.chown(target, 0, 4321)
    os.chmod(target, 0o2775)
    _restore(client, backup_id, target, key_file)
    assert snapshot_tree(str(target / "src")) == expected
