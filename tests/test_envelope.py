"""Sealing and opening objects: every kind of tampering is caught."""

from __future__ import annotations

import os

import pytest

from pysrbup.crypto import keyfile
from pysrbup.crypto.keys import MasterKey
from pysrbup.errors import IntegrityError, KeyFileError, WrongKeyError
from pysrbup.repo import envelope


@pytest.mark.parametrize("data", [b"", b"x", b"abc" * 100_000, os.urandom(70_000)])
def test_roundtrip(parts, data):
    _, sealer, opener = parts
    oid = sealer.object_id(data)
    sealed = sealer.seal(oid, data)
    assert opener.open(oid, sealed) == data
    if len(data) > 1000:
        compressible = data[:3] == b"abc"
        assert (len(sealed) < len(data)) == compressible


def test_every_flipped_byte_is_detected(parts):
    _, sealer, opener = parts
    data = b"some plaintext " * 20
    oid = sealer.object_id(data)
    sealed = sealer.seal(oid, data)
    for pos in range(len(sealed)):
        broken = bytearray(sealed)
        broken[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            opener.open(oid, broken)


def test_swapped_truncated_and_foreign_objects(parts):
    _key, sealer, opener = parts
    a, b = b"A" * 500, b"B" * 500
    sealed_a = sealer.seal(sealer.object_id(a), a)
    with pytest.raises(IntegrityError):
        opener.open(sealer.object_id(b), sealed_a)
    with pytest.raises(IntegrityError):
        opener.open(sealer.object_id(a), sealed_a[:-1])
    # Sealed by a key holder under an id that is not the MAC of its content.
    wrong = sealer.seal(sealer.object_id(b), a)
    with pytest.raises(IntegrityError, match="does not match its id"):
        opener.open(sealer.object_id(b), wrong)


def test_wrong_master_key_cannot_unwrap(parts):
    key, _sealer, _ = parts
    wrapped = envelope.wrap_session_key(key.wrap_key, b"k" * 16, b"s" * 32)
    with pytest.raises(WrongKeyError):
        envelope.unwrap_session_key(MasterKey.generate().wrap_key, b"k" * 16, wrapped)
    assert envelope.unwrap_session_key(key.wrap_key, b"k" * 16, wrapped) == b"s" * 32


def test_subkeys_are_distinct_and_stable():
    key = MasterKey(bytes(range(32)))
    subkeys = [
        key.mac_key,
        key.gear_seed,
        key.wrap_key,
        key.write_public_key,
        key.destroy_public_key,
    ]
    assert len(set(subkeys)) == 5
    assert keyfile.loads(keyfile.dumps(key)) == key
    # Golden value: changing the derivation breaks every existing repository.
    assert key.mac_key.hex()[:32] == "c768f9353a665f7baa7239f236bcbb7d"
    assert key.destroy_public_key.hex()[:32] == "1ce1d07b83a4edb3a130cde38f6ac15e"
    assert key.write_public_key.hex()[:32] == "bb588cd9e224404bf0e828b737d74f36"


@pytest.mark.parametrize(
    "text", ["", "{}", '{"format": "pysrbup-key", "version": 1, "key": "AAAA"}', "garbage"]
)
def test_malformed_key_text(text):
    with pytest.raises(KeyFileError):
        keyfile.loads(text)


def test_nonces_never_repeat_across_threads_and_forks():
    """Pooled nonces: a forked child must not take the parent's next ones."""
    import threading

    from pysrbup.repo.envelope import new_nonce

    taken = [new_nonce() for _ in range(5000)]  # crosses a pool refill
    per_thread: list[list[bytes]] = [[] for _ in range(3)]
    threads = [
        threading.Thread(target=lambda out=out: out.extend(new_nonce() for _ in range(3000)))
        for out in per_thread
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its nonces go back through the pipe
        os.close(read_end)
        os.write(write_end, b"".join(new_nonce() for _ in range(100)))
        os._exit(0)
    os.close(write_end)
    child = b""
    while chunk := os.read(read_end, 65536):
        child += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    after_fork = [new_nonce() for _ in range(100)]
    everything = taken + [n for out in per_thread for n in out] + after_fork
    everything += [child[i : i + 12] for i in range(0, len(child), 12)]
    assert len(child) == 1200 and all(len(n) == 12 for n in everything)
    assert len(set(everything)) == len(everything) == 5000 + 9000 + 200
