"""The master key file and the sub-keys derived from it.

A key file holds one random 32-byte master key. Everything else is derived
with HKDF-SHA256 under a distinct label, so one secret serves every purpose
without one use weakening another:

    chunk-id MAC key   keyed BLAKE3 over plaintext chunks (dedup ids)
    gear seed          the chunker's gear table (boundaries do not fingerprint)
    wrap key           AES-256-GCM key that wraps per-session data keys
    write key          Ed25519 seed of the write capability: begins backup sessions
    destroy key        Ed25519 seed of the destroy capability: deletes, condemns

The server holds the public halves of the two capability keys (fixed by
``pysrbup-client init``) and demands signatures over fresh challenges.

Key file format (text, mode 0600):

    {"format": "pysrbup-key", "version": 1, "key": "<base64 of 32 bytes>"}
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from functools import cached_property

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pysrbup.errors import KeyFileError

KEY_SIZE = 32
_FORMAT = "pysrbup-key"
_VERSION = 1


def _derive(master: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"pysrbup " + label.encode()
    ).derive(master)


def public_bytes(private: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public half of an Ed25519 key."""
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


@dataclass(frozen=True)
class MasterKey:
    """The repository's master key and its derived sub-keys."""

    secret: bytes

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
    def write_key(self) -> Ed25519PrivateKey:
        """The write capability: signs the opening of backup sessions."""
        return Ed25519PrivateKey.from_private_bytes(_derive(self.secret, "write ed25519"))

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

    def dumps(self) -> str:
        """The key file's text."""
        body = {"format": _FORMAT, "version": _VERSION, "key": base64.b64encode(self.secret)}
        body["key"] = body["key"].decode()
        return json.dumps(body) + "\n"

    @classmethod
    def loads(cls, text: str, source: str = "key") -> MasterKey:
        """Parses a key file's text; ``source`` names it in error messages."""
        try:
            body = json.loads(text)
            if body.get("format") != _FORMAT:
                raise ValueError("not a pysrbup key")
            if body.get("version") != _VERSION:
                raise ValueError(f"unsupported key version {body.get('version')!r}")
            secret = base64.b64decode(body["key"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise KeyFileError(f"{source} is not a valid pysrbup key file ({exc})") from None
        if len(secret) != KEY_SIZE:
            raise KeyFileError(f"{source} is not a valid pysrbup key file (wrong key length)")
        return cls(secret)


def load_key_file(path: str) -> MasterKey:
    """Reads the key file at ``path`` with a clear error when it is missing or bad."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(64 * 1024)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    return MasterKey.loads(text, source=f"key file {path}")


def write_key_file(path: str, key: MasterKey) -> None:
    """Writes ``key`` to a new file with mode 0600; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(key.dumps())
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None
