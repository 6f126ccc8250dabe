"""One conformance suite for every blob store (as restic's backend/test, kopia's blobtesting).

Runs against the local directory store, the S3 store on a real SeaweedFS on
loopback, and the fault-injecting wrapper (which must behave like what it
wraps while it injects nothing).
"""

from __future__ import annotations

import os
import threading

import pytest
from faultstore import Crash, FaultyStore
from seaweed import ACCESS_KEY, s3_or_skip

from pysrbup.errors import RepositoryError, StorageFullError, UsageError
from pysrbup.server.blobstore import (
    BlobNotFoundError,
    BlobStore,
    LocalStore,
    S3Location,
    S3Store,
    open_store,
)


def _s3(bucket: str | None = None, prefix: str = "repo", **kwargs) -> S3Store:
    weed = s3_or_skip()
    where = S3Location(
        bucket or weed.new_bucket(),
        prefix,
        endpoint=weed.endpoint,
        access_key=ACCESS_KEY,
        secret_key=kwargs.pop("secret_key", weed.env()["AWS_SECRET_ACCESS_KEY"]),
    )
    return S3Store(where, **kwargs)


@pytest.fixture(params=["local", "s3", "faulty"])
def store(request, tmp_path) -> BlobStore:
    if request.param == "local":
        made = LocalStore(str(tmp_path / "store"))
    elif request.param == "s3":
        made = _s3()
    else:
        made = FaultyStore(LocalStore(str(tmp_path / "store")))
    yield made
    made.close()


def test_put_get_stat_delete(store):
    assert store.stat("config") is None
    with pytest.raises(BlobNotFoundError):
        store.get("config")
    store.put("config", b"hello world")
    assert store.get("config") == b"hello world"
    assert store.stat("config") == 11
    store.delete("config")
    store.delete("config")  # a missing object is not an error
    assert store.stat("config") is None


def test_empty_and_large_objects(store):
    store.put("keys/empty", b"")
    assert store.get("keys/empty") == b"" and store.stat("keys/empty") == 0
    big = os.urandom(33 * 1024 * 1024 + 5)
    store.put("packs/ab/big.pack", big)
    assert store.get("packs/ab/big.pack") == big


def test_ranged_get_is_like_pread(store):
    data = bytes(range(256)) * 40
    store.put("packs/00/p.pack", data)
    assert store.get("packs/00/p.pack", 100, 50) == data[100:150]
    assert store.get("packs/00/p.pack", len(data) - 10, 100) == data[-10:]  # short at the end
    assert store.get("packs/00/p.pack", len(data), 10) == b""
    assert store.get("packs/00/p.pack", len(data) + 5, 10) == b""
    assert store.get("packs/00/p.pack", 5000) == data[5000:]
    assert store.get("packs/00/p.pack", 7, 0) == b""


def test_put_replaces_whole(store):
    store.put("snapshots/0123456789abcdef", b"a" * 1000)
    assert store.get("snapshots/0123456789abcdef", 0, 10) == b"a" * 10  # a cached reader
    store.put("snapshots/0123456789abcdef", b"b" * 10)
    assert store.get("snapshots/0123456789abcdef") == b"b" * 10
    assert store.get("snapshots/0123456789abcdef", 0, 10) == b"b" * 10


def test_put_new_creates_only_once(store):
    assert store.put_new("lock", b"first")
    assert not store.put_new("lock", b"second")
    assert store.get("lock") == b"first"
    store.delete("lock")
    assert store.put_new("lock", b"third")


def test_put_file(store, tmp_path):
    path = tmp_path / "staged.pack"
    data = os.urandom(100_000)
    path.write_bytes(data)
    store.put_file("packs/cd/staged.pack", str(path))
    assert store.get("packs/cd/staged.pack") == data


def test_list_by_folder(store):
    names = {"packs/aa/1.pack": 3, "packs/aa/1.ecc": 4, "packs/bb/2.pack": 5, "keys/k1": 1}
    for name, size in names.items():
        store.put(name, b"x" * size)
    store.put("snapshots/0123456789abcdef", b"s")
    assert dict(store.list("packs")) == {k: v for k, v in names.items() if k.startswith("packs")}
    assert dict(store.list("keys")) == {"keys/k1": 1}
    assert list(store.list("deleted")) == []


def test_hostile_names_are_refused(store):
    for bad in ("../escape", "/abs", "a//b", "packs/../config", "", "a/./b", "sp ace"):
        with pytest.raises(UsageError):
            store.put(bad, b"x")


def test_concurrent_puts_and_gets(store):
    errors = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                name = f"keys/{i:02d}{j:02d}"
                data = os.urandom(1000 + i * j)
                store.put(name, data)
                assert store.get(name) == data
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(list(store.list("keys"))) == 60


# ---- implementation-specific -------------------------------------------------------


def test_local_store_is_todays_layout_and_leaves_no_temporaries(tmp_path):
    store = LocalStore(str(tmp_path))
    store.put("packs/ab/abcd.pack", b"pack")
    assert (tmp_path / "packs" / "ab" / "abcd.pack").read_bytes() == b"pack"
    assert sorted(os.listdir(tmp_path / "packs" / "ab")) == ["abcd.pack"]
    (tmp_path / "packs" / "ab" / "abcd.ecc.tmp").write_bytes(b"torn")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.tmp.1.2").write_bytes(b"torn")
    assert [n for n, _ in store.list("packs")] == ["packs/ab/abcd.pack"]
    assert store.remove_temporaries() == 2


def test_faulty_store_injects_full_disk_and_crashes(tmp_path):
    store = FaultyStore(LocalStore(str(tmp_path)), full=lambda name: name.startswith("packs/"))
    store.put("keys/a", b"fine")
    with pytest.raises(StorageFullError):
        store.put("packs/aa/x.pack", b"no room")
    assert store.stat("packs/aa/x.pack") is None
    store = FaultyStore(LocalStore(str(tmp_path)), crash_after=1)
    store.put("keys/b", b"one")
    with pytest.raises(Crash):
        store.put("keys/c", b"two")
    with pytest.raises(Crash):  # a dead process does nothing more
        store.get("keys/b")
    assert sorted(n for n, _ in LocalStore(str(tmp_path)).list("keys")) == ["keys/a", "keys/b"]


def test_s3_errors_are_one_clear_line(tmp_path):
    weed = s3_or_skip()
    bad = _s3(secret_key="wrong")
    with pytest.raises(RepositoryError, match="access denied") as denied:
        bad.check()
    assert "\n" not in str(denied.value)
    with pytest.raises(RepositoryError, match="does not exist"):
        _s3(bucket="no-such-bucket-here").check()
    unreachable = S3Store(
        S3Location("b", "p", endpoint="http://127.0.0.1:9", access_key="a", secret_key="b"),
        timeout=3,
        retries=0,
    )
    with pytest.raises(RepositoryError, match="cannot reach") as down:
        unreachable.check()
    assert "\n" not in str(down.value)
    assert weed.endpoint.startswith("http://127.0.0.1:")


def test_open_store_takes_a_directory_or_an_s3_url(tmp_path, monkeypatch):
    assert isinstance(open_store(str(tmp_path / "d")), LocalStore)
    with pytest.raises(UsageError):
        S3Location.parse("s3://")
    assert S3Location.parse("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    weed = s3_or_skip()
    bucket = weed.new_bucket()
    for name, value in weed.env().items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3://{bucket}/some/prefix")
    store.put("config", b"c")
    assert store.stat("config") == 1
    assert open_store(f"s3://{bucket}/some").stat("prefix/config") == 1
