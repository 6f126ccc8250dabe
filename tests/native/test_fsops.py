"""The file-creation kernel against its pure twin, on real files in temporary directories."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest

from pysrbup._native import _fsops, fsops, fsops_pure

IMPLS = [pytest.param(_fsops, id="native"), pytest.param(fsops_pure, id="pure")]


def _dir_fd(path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def _outcome(impl, where, name, data, size, open_mode, chmod_mode, mtime_ns):
    """What ``create_files`` did with one file: (result, content, mode, mtime, atime)."""
    os.makedirs(where, exist_ok=True)
    fd = _dir_fd(where)
    try:
        (result,) = impl.create_files(
            [(fd, name, data, size, open_mode, chmod_mode, -1, -1, mtime_ns)]
        )
    finally:
        os.close(fd)
    path = os.path.join(where, os.fsdecode(name))
    st = os.lstat(path)
    os.chmod(path, 0o600)  # readable here even without root
    with open(path, "rb") as handle:
        content = handle.read()
    return result, content, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_atime_ns


def test_facade_picks_the_compiled_kernel():
    assert fsops.create_files is _fsops.create_files
    assert _fsops.API_VERSION == 2


@pytest.mark.parametrize("seed", range(25))
def test_native_matches_pure_on_random_files(tmp_path, seed):
    rng = random.Random(seed)
    name = bytes(rng.choice(b"abcxyz\xc3\xa9\xff-_.") for _ in range(rng.randint(1, 40)))
    if name in (b".", b".."):
        name = b"f" + name
    size = rng.choice([0, 1, 100, 4096, 70_000, 1 << 20])
    with_data = rng.random() < 0.8
    data = rng.randbytes(size) if with_data else None
    if data is not None and rng.random() < 0.5:  # a view into a bigger buffer, as restore has
        big = bytearray(rng.randbytes(7)) + bytearray(data) + bytearray(5)
        data = memoryview(big)[7 : 7 + size]
    open_mode = rng.choice([0o600, 0o644, 0o755, 0o400, 0o000])
    chmod_mode = rng.choice([-1, 0o644, 0o4755, 0o1777, 0o000])
    mtime_ns = rng.choice([0, 1, -1_500_000_001, rng.randrange(1 << 62)])
    mtime_ns -= mtime_ns % 1000 if rng.random() < 0.5 else 0
    native = _outcome(_fsops, tmp_path / "n", name, data, size, open_mode, chmod_mode, mtime_ns)
    pure = _outcome(fsops_pure, tmp_path / "p", name, data, size, open_mode, chmod_mode, mtime_ns)
    assert native == pure
    assert native[0] == 0
    assert native[1] == (bytes(data) if data is not None else bytes(size))
    assert native[3] == mtime_ns and native[4] == mtime_ns


@pytest.mark.parametrize("impl", IMPLS)
def test_a_batch_reports_each_failure_and_makes_the_rest(tmp_path, impl):
    (tmp_path / "taken").write_bytes(b"old")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    fd = _dir_fd(tmp_path)
    try:
        results = impl.create_files(
            [
                (fd, b"taken", b"new", 3, 0o644, -1, -1, -1, 0),
                (fd, b"one", b"1", 1, 0o644, -1, -1, -1, 10**9),
                (fd, b"link", b"new", 3, 0o644, -1, -1, -1, 0),
                (fd, b"missing/dir", b"x", 1, 0o644, -1, -1, -1, 0),
                (fd, b"two", None, 5, 0o600, 0o640, -1, -1, 2 * 10**9),
            ]
        )
        assert results == [-errno.EEXIST, 0, -errno.EEXIST, -errno.ENOENT, 0]
        with pytest.raises(OSError) as caught:
            impl.write_at(fd, b"link", b"new", 0)
        assert caught.value.errno == errno.ELOOP
        assert caught.value.strerror == os.strerror(errno.ELOOP)
        with pytest.raises(ValueError):
            impl.create_files(
                [
                    (fd, b"three", b"x", 1, 0o644, -1, -1, -1, 0),
                    (fd, b"nul\0name", b"x", 1, 0o644, -1, -1, -1, 0),
                ]
            )
    finally:
        os.close(fd)
    assert (tmp_path / "taken").read_bytes() == b"old"
    assert not (tmp_path / "elsewhere").exists()
    assert not (tmp_path / "three").exists()  # refused before anything was made
    assert (tmp_path / "one").read_bytes() == b"1"
    assert os.lstat(tmp_path / "one").st_mtime_ns == 10**9
    assert (tmp_path / "two").read_bytes() == bytes(5)
    assert stat.S_IMODE(os.lstat(tmp_path / "two").st_mode) == 0o640


@pytest.mark.parametrize("seed", range(5))
def test_native_matches_pure_on_random_batches(tmp_path, seed):
    rng = random.Random(100 + seed)
    specs = []
    for n in range(rng.randint(0, 60)):
        data = rng.randbytes(rng.choice([0, 10, 5000])) if rng.random() < 0.9 else None
        name = f"f{n}".encode() if rng.random() < 0.9 else f"f{rng.randrange(n + 1)}".encode()
        specs.append((name, data, rng.randrange(3000), rng.choice([0o644, 0o600]), 7 * n))
    outcomes = []
    for impl, where in ((_fsops, tmp_path / "n"), (fsops_pure, tmp_path / "p")):
        where.mkdir()
        fd = _dir_fd(where)
        try:
            results = impl.create_files(
                [(fd, n, d, s, m, -1, -1, -1, t) for n, d, s, m, t in specs]
            )
        finally:
            os.close(fd)
        files = {
            p.name: (p.read_bytes(), stat.S_IMODE(p.lstat().st_mode), p.lstat().st_mtime_ns)
            for p in where.iterdir()
        }
        outcomes.append((results, files))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][1]) == outcomes[0][0].count(0)  # duplicates refused with EEXIST


@pytest.mark.parametrize("impl", IMPLS)
def test_write_at_fills_places_of_an_existing_file(tmp_path, impl):
    rng = random.Random(7)
    parts = [rng.randbytes(rng.randint(1, 50_000)) for _ in range(6)]
    fd = _dir_fd(tmp_path)
    try:
        assert impl.create_files(
            [(fd, b"f", None, sum(map(len, parts)), 0o600, -1, -1, -1, 5)]
        ) == [0]
        offsets = [sum(map(len, parts[:i])) for i in range(len(parts))]
        for i in rng.sample(range(len(parts)), len(parts)):
            impl.write_at(fd, b"f", memoryview(parts[i]), offsets[i])
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_failed_metadata_call_returns_its_errno_and_keeps_the_data(tmp_path, impl):
    fd = _dir_fd(tmp_path)
    try:
        # Giving a file to another owner: EPERM unless root, which may (then 0).
        (result,) = impl.create_files([(fd, b"f", b"data", 4, 0o600, 0o640, 12345, 12345, 10**18)])
    finally:
        os.close(fd)
    st = os.lstat(tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"data"
    if os.geteuid() == 0:
        assert result == 0
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (12345, 12345, 0o640)
        assert st.st_mtime_ns == 10**18
    else:
        assert result == errno.EPERM
        assert stat.S_IMODE(st.st_mode) == 0o600  # the rest was left alone
