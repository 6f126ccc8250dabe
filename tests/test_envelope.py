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
