"""Restore's pooled data path: ``Opener.open_into`` and the parallel, bounded fetch.

``open_into`` decrypts and decompresses into reused buffers; it must accept
exactly what ``open`` accepts and return the same bytes, and refuse every
damaged object ``open`` refuses. The restore built on it is held against the
source tree with tiny fetch batches and budgets, so that many frames, streams
and batches meet in one run.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
import zstandard
from inprocess import in_process_server
from trees import random_bytes, snapshot_tree

from pysrbup.client import restore as restore_mod
from pysrbup.errors import IntegrityError
from pysrbup.repo import envelope
from pysrbup.repo.wire import KEY_ID_SIZE


def _seal_raw(sealer: envelope.Sealer, oid: bytes, payload: bytes, flags: int) -> bytes:
    """An envelope of ``payload`` as is (no compression step): for hand-made payloads."""
    nonce = os.urandom(envelope.NONCE_SIZE)
    header = struct.pack("BB", envelope.VERSION, flags) + sealer.key_id + nonce
    aad = oid + header[: 2 + KEY_ID_SIZE]
    return header + sealer._aead.encrypt(nonce, payload, aad)


def _sample(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 64, 65, 4096, rng.randrange(1, 300_000), rng.randrange(1, 3 << 20)])
    if rng.random() < 0.5:
        return rng.randbytes(size)
    words = [rng.randbytes(rng.randrange(1, 9)) for _ in range(50)]
    return b" ".join(rng.choice(words) for _ in range(size // 4 + 1))[:size]


def test_open_into_returns_what_open_returns_on_random_inputs(parts):
    _, sealer, opener = parts
    rng = random.Random(7)
    buffers = envelope.Buffers()  # one for all: sizes grow and shrink
    for _ in range(60):
        data = _sample(rng)
        oid = sealer.object_id(data)
        sealed = sealer.seal(oid, data)
        view = opener.open_into(oid, memoryview(sealed), buffers)
        assert bytes(view) == opener.open(oid, sealed) == data


def test_a_view_survives_a_larger_object(parts):
    _, sealer, opener = parts
    buffers = envelope.Buffers()
    small, large = b"small " * 100, os.urandom(3 * envelope.BUFFER_STEP)
    first = opener.open_into(
        sealer.object_id(small), sealer.seal(sealer.object_id(small), small), buffers
    )
    opener.open_into(sealer.object_id(large), sealer.seal(sealer.object_id(large), large), buffers)
    assert bytes(first) == small  # the buffer was replaced, not resized under the view


@pytest.mark.parametrize("compressible", [True, False])
def test_open_into_detects_every_flipped_byte(parts, compressible):
    _, sealer, opener = parts
    data = b"some plaintext " * 20 if compressible else os.urandom(300)
    oid = sealer.object_id(data)
    sealed = sealer.seal(oid, data)
    assert (sealed[1] & envelope.FLAG_ZSTD) == compressible
    buffers = envelope.Buffers()
    for pos in range(len(sealed)):
        broken = bytearray(sealed)
        broken[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            opener.open_into(oid, broken, buffers)
    assert bytes(opener.open_into(oid, sealed, buffers)) == data  # still good afterwards


def test_open_into_refuses_truncated_swapped_and_foreign_objects(parts):
    _, sealer, opener = parts
    buffers = envelope.Buffers()
    a, b = b"A" * 500, b"B" * 500
    sealed_a = sealer.seal(sealer.object_id(a), a)
    for oid, blob, why in [
        (sealer.object_id(b), sealed_a, "failed authentication"),
        (sealer.object_id(a), sealed_a[:-1], "failed authentication"),
        (sealer.object_id(a), sealed_a[:10], "truncated"),
        (sealer.object_id(b), sealer.seal(sealer.object_id(b), a), "does not match its id"),
    ]:
        with pytest.raises(IntegrityError, match=why):
            opener.open_into(oid, blob, buffers)
        with pytest.raises(IntegrityError, match=why):
            opener.open(oid, blob)
    other = envelope.Sealer(sealer.mac_key, os.urandom(32), os.urandom(16))
    foreign = other.seal(other.object_id(a), a)
    with pytest.raises(IntegrityError, match="session key"):
        opener.open_into(other.object_id(a), foreign, buffers)


def test_hand_made_zstd_payloads_get_the_same_verdict(parts):
    """Frames without a declared size, with trailing frames, or not zstd at all."""
    _, sealer, opener = parts
    buffers = envelope.Buffers()
    data, more = b"first part " * 1000, b"second part " * 1000
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    two = zstandard.ZstdCompressor().compress(data) + zstandard.ZstdCompressor().compress(more)
    cases = [
        (sealer.object_id(data), no_size),
        (sealer.object_id(data), two),
        (sealer.object_id(data + more), two),
        (sealer.object_id(data), b"not a zstd frame at all"),
        (sealer.object_id(data), zstandard.ZstdCompressor().compress(data)[:-5]),
    ]
    for oid, payload in cases:
        sealed = _seal_raw(sealer, oid, payload, envelope.FLAG_ZSTD)
        try:
            expected = opener.open(oid, sealed)
        except IntegrityError:
            with pytest.raises(IntegrityError):
                opener.open_into(oid, sealed, buffers)
        else:
            assert bytes(opener.open_into(oid, sealed, buffers)) == expected


def _tree(root) -> None:
    rng = random.Random(3)
    for d in range(12):
        sub = root / f"d{d:02d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(25):
            (sub / f"f{f}.txt").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
    big = random_bytes(6 * 1024 * 1024, 11)
    (root / "big.bin").write_bytes(big)
    (root / "copy.bin").write_bytes(big)  # the same chunks in a second file
    with open(root / "sparse.img", "wb") as handle:  # zeros between data: holes
        handle.write(random_bytes(300_000, 12))
        handle.seek(16 * 1024 * 1024, os.SEEK_CUR)  # whole all-zero chunks inside
        handle.write(b"end")
    os.link(root / "d00" / "inner" / "f1.txt", root / "hardlink.txt")
    os.symlink("big.bin", root / "link")


def test_restore_with_many_small_batches_and_streams(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSRBUP_CACHE_DIR", str(tmp_path / "cache"))
    # Tiny requests and budget: hundreds of frames, every stream busy, frames waiting.
    monkeypatch.setattr(restore_mod, "FETCH_BYTES", 64 * 1024)
    monkeypatch.setattr(restore_mod, "INFLIGHT_BYTES", 96 * 1024)
    monkeypatch.setattr(restore_mod, "FETCH_STREAMS", 3)
    monkeypatch.setattr(restore_mod, "_PLAN_ROWS", 2)  # the plan's columns double many times
    from pysrbup.client.backup import Backup

    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    with in_process_server(str(tmp_path / "repo")) as served:
        backup_id = Backup(served.remote, 2).run(str(src)).backup_id
        job = restore_mod.Restore(served.remote, 3)
        result = job.run(backup_id, str(tmp_path / "out"))
    out = tmp_path / "out" / "src"
    assert snapshot_tree(str(out)) == snapshot_tree(str(src))
    assert os.stat(out / "hardlink.txt").st_ino == os.stat(out / "d00" / "inner" / "f1.txt").st_ino
    assert os.stat(out / "sparse.img").st_blocks * 512 < 8 * 1024 * 1024  # holes stay holes
    assert result.damaged == [] and result.bytes_written == sum(
        os.path.getsize(p) for p in out.rglob("*") if p.is_file() and not p.is_symlink()
    ) - os.path.getsize(out / "hardlink.txt")
    places = job.planned()
    assert sum(len(p) for p in places.values()) > len(places)  # copy.bin reuses big.bin's


class _Node:
    """What ``_Plan.add_file`` reads of a tree node."""

    def __init__(self, mode: int, mtime_ns: int):
        self.mode, self.mtime_ns, self.xattrs = mode, mtime_ns, []


def test_plan_keeps_every_file_and_place_as_its_columns_grow(monkeypatch):
    monkeypatch.setattr(restore_mod, "_PLAN_ROWS", 3)
    rng = random.Random(5)
    plan = restore_mod._Plan()
    files, places = [], {}
    oids = [rng.randbytes(32) for _ in range(700)]
    for number in range(2500):
        name = rng.randbytes(rng.randrange(1, 40))
        node = _Node(rng.randrange(1 << 16), rng.randrange(-(1 << 62), 1 << 62))
        owner = (rng.randrange(1 << 32), rng.randrange(1 << 32))
        assert plan.add_file(number % 17, name, node, owner) == number
        files.append((number % 17, name, (node.mode, node.mtime_ns, *owner)))
        for _ in range(rng.randrange(0, 4)):
            oid, offset, size = rng.choice(oids), rng.randrange(-1, 1 << 40), rng.randrange(1 << 22)
            plan.add_place(oid, number, offset, size)
            places.setdefault(oid, []).append((number, offset, size))
    assert plan.file_count == len(files)
    for number, (dir_index, name, meta) in enumerate(files):
        assert (plan.f_dir[number], plan.name(number), plan.meta(number)) == (dir_index, name, meta)
    assert plan.oids == list(places)  # numbered by first sight
    for chunk, oid in enumerate(plan.oids):
        assert plan.chunk_of[oid] == chunk
        assert list(plan.places(chunk)) == places[oid][::-1]  # newest first
    assert plan.place_count == sum(len(p) for p in places.values())
