"""The files cache on real files: hits, misses, racy timestamps, torn logs, compaction."""

from __future__ import annotations

import os
import time

from pysrbup.client.filescache import FilesCache

IDS = os.urandom(64)
SIZES = (7).to_bytes(4, "little") * 2


def _old_file(path, data: bytes = b"content") -> os.stat_result:
    path.write_bytes(data)
    past = time.time_ns() - 10 * 10**9
    os.utime(path, ns=(past, past))
    return os.stat(path)


def _later() -> int:
    """When the walker looked: long enough after the last change (ctime) not to be racy."""
    return time.time_ns() + 5 * 10**9


def _cache(folder) -> FilesCache:
    return FilesCache(b"r" * 16, folder=str(folder)).open()


def test_entries_survive_reopening_and_misses_follow_the_stat(tmp_path):
    data = tmp_path / "a.txt"
    st = _old_file(data)
    cache = _cache(tmp_path)
    cache.add(os.fsencode(data), st, IDS, SIZES, _later())
    cache.close()
    again = _cache(tmp_path)
    entry = again.lookup(os.fsencode(data), os.stat(data))
    assert entry is not None and entry.chunk_ids == IDS and entry.chunk_sizes == SIZES
    data.write_bytes(b"changed")  # size, mtime and ctime move
    assert again.lookup(os.fsencode(data), os.stat(data)) is None
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert again.lookup(os.fsencode(data), os.stat(data)) is None  # ctime still differs
    again.close()


def test_a_file_changed_just_now_is_not_cached(tmp_path):
    data = tmp_path / "fresh.txt"
    data.write_bytes(b"just written")
    cache = _cache(tmp_path)
    cache.add(os.fsencode(data), os.stat(data), IDS, SIZES, time.time_ns())
    cache.close()
    again = _cache(tmp_path)
    assert again.lookup(os.fsencode(data), os.stat(data)) is None
    again.close()


def test_a_torn_tail_is_cut_and_the_rest_kept(tmp_path):
    files = [tmp_path / f"f{i}" for i in range(3)]
    cache = _cache(tmp_path)
    for path in files:
        cache.add(os.fsencode(path), _old_file(path), IDS, SIZES, _later())
    cache.close()
    log = tmp_path / "files"
    intact = log.stat().st_size
    with open(log, "ab") as handle:
        handle.write(b"\x40\x00\x00\x00half a record")
    again = _cache(tmp_path)
    assert all(again.lookup(os.fsencode(p), os.stat(p)) for p in files)
    again.close()
    assert log.stat().st_size == intact
    # A flipped byte inside the last record drops that record only.
    raw = bytearray(log.read_bytes())
    raw[-10] ^= 0xFF
    log.write_bytes(bytes(raw))
    third = _cache(tmp_path)
    found = [third.lookup(os.fsencode(p), os.stat(p)) is not None for p in files]
    assert found == [True, True, False]
    third.close()


def test_compaction_keeps_what_was_seen_and_other_roots(tmp_path):
    root = tmp_path / "root"
    other = tmp_path / "other"
    root.mkdir()
    other.mkdir()
    kept, dropped, elsewhere = root / "kept", root / "gone", other / "x"
    cache = _cache(tmp_path)
    for path in (kept, dropped, elsewhere):
        cache.add(os.fsencode(path), _old_file(path), IDS, SIZES, _later())
    cache.close()
    run = _cache(tmp_path)  # the next backup of root sees only "kept", and a new file
    assert run.lookup(os.fsencode(kept), os.stat(kept)) is not None
    run.keep(os.fsencode(kept))
    new = root / "new"
    run.add(os.fsencode(new), _old_file(new), IDS[:32], SIZES[:4], _later())
    run.compact(os.fsencode(root))
    run.close()
    after = _cache(tmp_path)
    assert len(after) == 3
    assert after.lookup(os.fsencode(kept), os.stat(kept)) is not None
    assert after.lookup(os.fsencode(new), os.stat(new)).chunk_ids == IDS[:32]
    assert after.lookup(os.fsencode(elsewhere), os.stat(elsewhere)) is not None
    assert after.lookup(os.fsencode(dropped), os.stat(dropped)) is None
    after.close()


def test_a_second_writer_gets_a_read_only_cache(tmp_path):
    path = tmp_path / "f"
    first = _cache(tmp_path)
    second = _cache(tmp_path)
    assert first.writable and not second.writable
    second.add(os.fsencode(path), _old_file(path), IDS, SIZES, _later())
    second.close()
    first.close()
    assert _cache(tmp_path).lookup(os.fsencode(path), os.stat(path)) is None  # never written
