"""The repository's keys: the master key, the sub-keys derived from it, and put-only keys.

A master key is one random 32-byte secret. Everything else is derived with
HKDF-SHA256 under a distinct label, so one secret serves every purpose
without one use weakening another:

    chunk-id MAC key   keyed BLAKE3 over plaintext chunks (dedup ids)
    gear seed          the chunker's gear table (boundaries do not fingerprint)
    wrap key           AES-256-GCM key that wraps per-session data keys
    seal key           X25519 key pair: put-only clients seal session keys to
                       its public half, only the master key opens them
    write key          Ed25519 seed of the write capability: begins backup sessions
    destroy key        Ed25519 seed of the destroy capability: deletes, condemns

The server holds the public halves of the two capability keys (fixed by
``pysrbup-client init``) and demands signatures over fresh challenges.

A put-only key (``PutKey``) holds the MAC key, the gear seed and the write
key (so it deduplicates and backs up exactly like the master key) plus the
public halves of the seal and destroy keys: it can neither decrypt anything
nor destroy. How keys are stored in files is keyfile.py's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pysrbup.errors import KeyFileError

KEY_SIZE = 32
#: A put key's material: MAC key, gear seed, write seed, seal public, destroy public.
PUT_KEY_SIZE = 5 * KEY_SIZE


def _derive(master: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"pysrbup " + label.encode()
    ).derive(master)


def public_bytes(private) -> bytes:
    """The raw 32-byte public half of an Ed25519 or X25519 key."""
    return private.public_key().public_bytes_raw()


@dataclass(frozen=True)
class MasterKey:
    """The repository's master key and its derived sub-keys."""

    secret: bytes
    can_read = True

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise KeyFileError(f"a master key is {KEY_SIZE} bytes, got {len(self.secret)}")

    @classmethod
    def generate(cls) -> MasterKey:
        """A fresh random master key."""
        return cls(os.urandom(KEY_SIZE))

    @cached_property
    def mac_key(self) -> bytes:
        """Key of the keyed BLAKE3 that names chunks."""
        return _derive(self.secret, "chunk-id mac")

    @cached_property
    def gear_seed(self) -> bytes:
        """Seed of the chunker's gear table."""
        return _derive(self.secret, "gear table")

    @cached_property
    def wrap_key(self) -> bytes:
        """AES-256-GCM key that wraps session keys."""
        return _derive(self.secret, "key wrap")

    @cached_property
    def seal_private(self) -> X25519PrivateKey:
        """The X25519 key that opens session keys sealed by put-only clients."""
        return X25519PrivateKey.from_private_bytes(_derive(self.secret, "seal x25519"))

    @cached_property
    def seal_public_key(self) -> bytes:
        return public_bytes(self.seal_private)

    @cached_property
    def write_key(self) -> Ed25519PrivateKey:
        """The write capability: signs the opening of backup sessions."""
        return Ed25519PrivateKey.from_private_bytes(self._write_seed)

    @cached_property
    def _write_seed(self) -> bytes:
        return _derive(self.secret, "write ed25519")

    @cached_property
    def write_public_key(self) -> bytes:
        """Raw 32-byte public half of ``write_key``."""
        return public_bytes(self.write_key)

    @cached_property
    def destroy_key(self) -> Ed25519PrivateKey:
        """The destroy capability: signs deletes and condemnations."""
        return Ed25519PrivateKey.from_private_bytes(_derive(self.secret, "auth ed25519"))

    @cached_property
    def destroy_public_key(self) -> bytes:
        """Raw 32-byte public half of ``destroy_key``."""
        return public_bytes(self.destroy_key)

    def put_only(self) -> PutKey:
        """The put-only key of this repository: backs up, cannot read or destroy."""
        return PutKey(
            self.mac_key,
            self.gear_seed,
            self._write_seed,
            self.seal_public_key,
            self.destroy_public_key,
        )

    def payload(self) -> bytes:
        """The bytes a key file stores."""
        return self.secret


@dataclass(frozen=True)
class PutKey:
    """A put-only key: deduplicates and backs up, but cannot decrypt or destroy."""

    mac_key: bytes
    gear_seed: bytes
    write_seed: bytes = field(repr=False)
    seal_public_key: bytes
    destroy_public_key: bytes
    can_read = False

    def __post_init__(self) -> None:
        parts = (self.mac_key, self.gear_seed, self.write_seed, self.seal_public_key)
        if any(len(p) != KEY_SIZE for p in (*parts, self.destroy_public_key)):
            raise KeyFileError("a put-only key is malformed")

    @classmethod
    def from_payload(cls, payload: bytes) -> PutKey:
        if len(payload) != PUT_KEY_SIZE:
            raise KeyFileError("a put-only key is malformed")
        return cls(*(payload[i : i + KEY_SIZE] for i in range(0, PUT_KEY_SIZE, KEY_SIZE)))

    def payload(self) -> bytes:
        """The bytes a key file stores."""
        return (
            self.mac_key
            + self.gear_seed
            + self.write_seed
            + self.seal_public_key
            + self.destroy_public_key
        )

    @cached_property
    def write_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.write_seed)

    @cached_property
    def write_public_key(self) -> bytes:
        return public_bytes(self.write_key)


Key = MasterKey | PutKey
