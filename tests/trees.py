"""Building real directory trees and comparing them byte for byte."""

from __future__ import annotations

import os
import stat

import numpy as np


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def make_full_tree(root: str, seed: int = 1) -> None:
    """A tree with every kind of entry pysrbup restores, a FIFO among them."""
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.makedirs(os.path.join(root, "empty_dir"))
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(random_bytes(9 * 1024 * 1024 + 123, seed))
    with open(os.path.join(root, "sub", "text.txt"), "w") as f:
        f.write("".join(f"line {i} of text\n" for i in range(50000)))
    with open(os.path.join(root, "empty.txt"), "wb"):
        pass
    with open(os.path.join(root, "sub", "deeper", "small.bin"), "wb") as f:
        f.write(random_bytes(1000, seed + 1))
    with open(os.fsencode(root) + b"/caf\xc3\xa9-\xff.txt", "wb") as f:
        f.write(b"non-utf8 name")
    os.symlink("sub/text.txt", os.path.join(root, "link"))
    os.symlink("does/not/exist", os.path.join(root, "dangling"))
    os.chmod(os.path.join(root, "sub", "text.txt"), 0o640)
    os.chmod(os.path.join(root, "sub", "deeper", "small.bin"), 0o755)
    os.chmod(os.path.join(root, "empty_dir"), 0o700)
    os.mkfifo(os.path.join(root, "fifo"))
    os.utime(
        os.path.join(root, "big.bin"), ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789)
    )
    os.utime(os.path.join(root, "sub"), ns=(1_500_000_000_987_654_321, 1_500_000_000_987_654_321))


def snapshot_tree(root: str, skip_special: bool = True) -> dict:
    """Everything restore must reproduce: kinds, bytes, modes, mtimes, link targets, owners."""
    result = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root_b)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entry = ("link", os.readlink(path), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                entry = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    data = handle.read()
                entry = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, data)
            elif skip_special:
                continue
            else:
                entry = ("special",)
            result[rel] = (*entry, st.st_uid, st.st_gid)
    return result


def dir_size(path: str) -> int:
    """Bytes of every file below ``path``."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(path)
        for name in files
    )
