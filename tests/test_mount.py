"""mount: a real read-only FUSE mount of real backups, read back and compared byte for byte.

The mount runs as ``pysrbup-client mount`` against a real server on
loopback. Where the machine has no ``/dev/fuse`` or no libfuse3 the FUSE
tests skip and say which; ``./build.sh`` installs libfuse3 where it can.
The laziness tests drive the same file system class in-process (without
the kernel) to count what each operation fetches.
"""

from __future__ import annotations

import ctypes.util
import errno
import os
import shutil
import signal
import stat
import subprocess
import threading
import time

import pytest
from helpers import assert_no_traceback
from inprocess import in_process_server
from trees import make_full_tree, random_bytes, snapshot_tree

from pysrbup.client.backup import Backup
from pysrbup.client.mount import BackupFS


def _fuse_missing() -> str:
    if not os.path.exists("/dev/fuse"):
        return "this machine has no /dev/fuse"
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        return "libfuse3 is not installed (./build.sh installs it with apt-get where it can)"
    return ""


needs_fuse = pytest.mark.skipif(bool(_fuse_missing()), reason=_fuse_missing() or "FUSE present")


def _unmount(mountpoint: str) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    subprocess.run(cmd, capture_output=True, timeout=30)


class Mounted:
    """A ``pysrbup-client mount`` process and its mount point."""

    def __init__(self, client, key_file: str, mountpoint: str, *flags: str):
        self.path = mountpoint
        os.makedirs(mountpoint, exist_ok=True)
        self.proc = client.spawn("mount", mountpoint, "--key-file", key_file, *flags)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"mount did not come up: {out}\n{err}")
            time.sleep(0.05)

    def backup_dir(self, backup_id: str) -> str:
        return os.path.join(self.path, "ids", backup_id)

    def stop(self) -> tuple[int, str]:
        """Unmounts with fusermount -u; (exit status, stderr) of the mount process."""
        if os.path.ismount(self.path):
            _unmount(self.path)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def mount(tmp_path, client, key_file):
    started = []

    def start(*flags: str) -> Mounted:
        mounted = Mounted(client, key_file, str(tmp_path / f"mnt{len(started)}"), *flags)
        started.append(mounted)
        return mounted

    yield start
    for mounted in started:
        mounted.stop()


@needs_fuse
def test_mount_shows_every_backup_byte_for_byte(tmp_path, client, key_file, mount):
    src = str(tmp_path / "src")
    make_full_tree(src)
    first = client.backup(src, key_file)
    with open(os.path.join(src, "sub", "text.txt"), "a") as handle:
        handle.write("changed\n")
    second = client.backup(src, key_file)

    mounted = mount()
    assert sorted(os.listdir(mounted.path)) == ["ids", "snapshots"]
    assert sorted(os.listdir(os.path.join(mounted.path, "ids"))) == sorted([first, second])
    root = mounted.backup_dir(second)
    assert snapshot_tree(root) == snapshot_tree(src)  # kinds, bytes, modes, mtimes, owners, links
    assert os.fsencode("caf\u00e9-") + b"\xff.txt" in os.listdir(os.fsencode(root))
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo")).st_mode)
    assert os.readlink(os.path.join(root, "dangling")) == "does/not/exist"
    assert os.listdir(os.path.join(root, "empty_dir")) == []
    with open(os.path.join(mounted.backup_dir(first), "sub", "text.txt"), "rb") as handle:
        assert not handle.read().endswith(b"changed\n")

    snapshots = os.path.join(mounted.path, "snapshots")
    names = sorted(os.listdir(snapshots))
    assert "latest" in names and len(names) == 3
    assert os.readlink(os.path.join(snapshots, "latest")) == f"../ids/{second}"
    targets = {os.readlink(os.path.join(snapshots, n)) for n in names if n != "latest"}
    assert targets == {f"../ids/{first}", f"../ids/{second}"}
    big = os.path.join(snapshots, "latest", "big.bin")
    with open(big, "rb") as handle, open(os.path.join(src, "big.bin"), "rb") as original:
        assert handle.read() == original.read()

    status, err = mounted.stop()
    assert status == 0, err
    assert_no_traceback(subprocess.CompletedProcess([], status, "", err))
    assert "unmounted" in err
    assert err.count("\n") == 2, err  # "serving ..." and "unmounted": no noise from libfuse
    assert not os.path.ismount(mounted.path)


@needs_fuse
def test_concurrent_and_random_reads_are_exact(tmp_path, client, key_file, mount):
    src = tmp_path / "src"
    src.mkdir()
    blobs = {f"f{i}.bin": random_bytes(6 * 1024 * 1024 + i * 777, 40 + i) for i in range(4)}
    for name, data in blobs.items():
        (src / name).write_bytes(data)
    backup_id = client.backup(str(src), key_file)
    root = mount().backup_dir(backup_id)
    failures: list[str] = []

    def read_whole(name: str) -> None:
        with open(os.path.join(root, name), "rb") as handle:
            if handle.read() != blobs[name]:
                failures.append(f"whole {name}")

    def read_pieces(name: str, seed: int) -> None:
        data = blobs[name]
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
        try:
            for k in range(40):
                offset = (seed * 7919 + k * 1_048_573) % len(data)
                if os.pread(fd, 70_000, offset) != data[offset : offset + 70_000]:
                    failures.append(f"{name} at {offset}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=read_whole, args=(n,)) for n in blobs]
    threads += [threading.Thread(target=read_pieces, args=(n, i)) for i, n in enumerate(blobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    with open(os.path.join(root, "f0.bin"), "rb") as handle:
        handle.seek(len(blobs["f0.bin"]) - 10)
        assert handle.read(100) == blobs["f0.bin"][-10:]  # a read past the end is short


@needs_fuse
def test_mount_is_read_only_and_unknown_paths_fail_cleanly(tmp_path, client, key_file, mount):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n")
    backup_id = client.backup(str(src), key_file)
    mounted = mount()
    root = mounted.backup_dir(backup_id)
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(root, "nope"))
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mounted.path, "ids", "0123456789abcdef"))
    with pytest.raises(NotADirectoryError):
        os.listdir(os.path.join(root, "a.txt"))
    for attempt in (
        lambda: os.open(os.path.join(root, "a.txt"), os.O_WRONLY | os.O_APPEND),
        lambda: os.open(os.path.join(root, "new.txt"), os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.mkdir(os.path.join(root, "d")),
        lambda: os.unlink(os.path.join(root, "a.txt")),
    ):
        with pytest.raises(OSError) as caught:
            attempt()
        assert caught.value.errno == errno.EROFS
    with open(os.path.join(root, "a.txt")) as handle:
        assert handle.read() == "alpha\n"


@needs_fuse
def test_ctrl_c_unmounts(tmp_path, client, key_file, mount):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n")
    client.backup(str(src), key_file)
    mounted = mount()
    mounted.proc.send_signal(signal.SIGINT)
    _, err = mounted.proc.communicate(timeout=30)
    assert mounted.proc.returncode == 0, err
    assert "unmounted" in err and "Traceback" not in err
    assert not os.path.ismount(mounted.path)


def test_mount_errors_are_one_line(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha\n")
    client.backup(str(src), key_file)
    missing = client.run("mount", str(tmp_path / "nowhere"), "--key-file", key_file)
    assert missing.returncode != 0 and "not a directory" in missing.stderr
    assert missing.stderr.count("\n") == 1, missing.stderr
    (tmp_path / "mnt").mkdir()
    env = {**client.env, "FUSE_LIBRARY_PATH": str(tmp_path / "no-libfuse.so")}
    nolib = client.run("mount", str(tmp_path / "mnt"), "--key-file", key_file, env=env)
    assert nolib.returncode != 0 and "FUSE library" in nolib.stderr, nolib.stderr
    assert nolib.stderr.count("\n") == 1, nolib.stderr
    assert_no_traceback(nolib)
    nokey = client.run("mount", str(tmp_path / "mnt"))
    assert nokey.returncode != 0 and "no key file" in nokey.stderr


# ---- what each operation fetches (the same class, without the kernel) --------------


@pytest.fixture
def served(tmp_path):
    with in_process_server(str(tmp_path / "repo")) as served:
        yield served


def test_listing_fetches_no_file_data_and_reads_fetch_only_their_chunks(tmp_path, served):
    src = tmp_path / "src"
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (src / f"d{d}" / f"f{f}.bin").write_bytes(random_bytes(20_000, d * 100 + f))
    (src / "large.bin").write_bytes(random_bytes(40 * 1024 * 1024, 7))
    Backup(served.remote, 2).run(str(src))
    fs = BackupFS(served.remote, warn=lambda message: None)
    (backup_id,) = fs.readdir("/ids", 0)[2:]

    names = fs.readdir(f"/ids/{backup_id}", 0)
    assert sorted(names[2:]) == sorted(["large.bin", *(f"d{d}" for d in range(5))])
    for d in range(5):
        assert len(fs.readdir(f"/ids/{backup_id}/d{d}", 0)) == 22
        for f in range(20):
            assert fs.getattr(f"/ids/{backup_id}/d{d}/f{f}.bin")["st_size"] == 20_000
    assert fs.chunks.fetched == 0  # listing and stat read trees only
    assert fs.trees.fetched <= 7  # the root tree, the backup's directory, its five subdirectories

    path = f"/ids/{backup_id}/large.bin"
    fh = fs.open(path, os.O_RDONLY)
    original = (src / "large.bin").read_bytes()
    middle = 20 * 1024 * 1024
    assert fs.read(path, 4096, middle, fh) == original[middle : middle + 4096]
    assert fs.chunks.fetched <= 2  # a random read: the chunk (or two) under it, no read-ahead
    fs.release(path, fh)
    fs.destroy("/")
