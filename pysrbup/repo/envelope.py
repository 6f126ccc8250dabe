"""Encrypted objects: how one chunk, tree or snapshot record is sealed.

Every object the server stores is an envelope sealed with AES-256-GCM under
the session key of the backup that first wrote it::

    offset  size  field
    0       1     version (1)
    1       1     flags   (bit 0: payload is zstd-compressed)
    2       16    key id  (names the wrapped session key that opens it)
    18      12    nonce   (random)
    30      n+16  ciphertext of the (compressed) payload, then the GCM tag

Associated data = object id (32 bytes) || bytes 0..17 of the header, so the
server can neither swap objects between ids nor flip the flags or key id.
The object id is a keyed BLAKE3 MAC of the plaintext; ``Opener.open``
recomputes it after decrypting, so a replayed or forged object is detected
even if it was sealed by a key holder for another id.

A session key is wrapped the same way under the master key's wrap key:
``nonce (12) || AES-256-GCM(wrap_key, session_key, aad="pysrbup-session-key" || key_id)``.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Mapping

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pysrbup.errors import IntegrityError, WrongKeyError
from pysrbup.repo.wire import KEY_ID_SIZE

VERSION = 1
FLAG_ZSTD = 0x01
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 2 + KEY_ID_SIZE + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
#: Largest plaintext object accepted when opening (chunks are <= 4 MiB; trees may be larger).
MAX_OBJECT_SIZE = 48 * 1024 * 1024
ZSTD_LEVEL = 3

_AAD_LEN = 2 + KEY_ID_SIZE
_WRAP_LABEL = b"pysrbup-session-key"


def object_id(mac_key: bytes, data) -> bytes:
    """The 32-byte keyed BLAKE3 id of ``data``."""
    return blake3.blake3(data, key=mac_key).digest()


class Sealer:
    """Compresses and encrypts objects under one session key; safe across threads."""

    def __init__(self, mac_key: bytes, session_key: bytes, key_id: bytes, level: int = ZSTD_LEVEL):
        if len(key_id) != KEY_ID_SIZE:
            raise ValueError("key id must be 16 bytes")
        self.mac_key = mac_key
        self.key_id = key_id
        self._aead = AESGCM(session_key)
        self._level = level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        comp = getattr(self._local, "comp", None)
        if comp is None:
            comp = zstandard.ZstdCompressor(level=self._level)
            self._local.comp = comp
        return comp

    def object_id(self, data) -> bytes:
        """The id ``data`` is stored under."""
        return object_id(self.mac_key, data)

    def seal(self, oid: bytes, data, compress: bool = True) -> bytearray:
        """The envelope of ``data`` under ``oid``; compression is skipped if it does not shrink."""
        flags = 0
        payload = data
        if compress and len(data) > 64:
            packed = self._compressor().compress(data)
            if len(packed) < len(data):
                payload, flags = packed, FLAG_ZSTD
        out = bytearray(OVERHEAD + len(payload))
        nonce = os.urandom(NONCE_SIZE)
        struct.pack_into("BB", out, 0, VERSION, flags)
        out[2 : 2 + KEY_ID_SIZE] = self.key_id
        out[2 + KEY_ID_SIZE : HEADER_SIZE] = nonce
        aad = bytes(oid) + bytes(out[:_AAD_LEN])
        self._aead.encrypt_into(nonce, payload, aad, memoryview(out)[HEADER_SIZE:])
        return out


class Opener:
    """Decrypts and verifies envelopes; knows every session key of the repository."""

    def __init__(self, mac_key: bytes, wrap_key: bytes, wrapped_keys: Mapping[bytes, bytes]):
        self.mac_key = mac_key
        self._wrap_key = wrap_key
        self._wrapped = dict(wrapped_keys)
        self._aeads: dict[bytes, AESGCM] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def add_session_key(self, key_id: bytes, session_key: bytes) -> None:
        """Makes an already unwrapped session key known (the writer's own)."""
        with self._lock:
            self._aeads[key_id] = AESGCM(session_key)

    def _aead(self, key_id: bytes) -> AESGCM | None:
        with self._lock:
            aead = self._aeads.get(key_id)
            if aead is None and key_id in self._wrapped:
                try:
                    key = unwrap_session_key(self._wrap_key, key_id, self._wrapped[key_id])
                except (WrongKeyError, IntegrityError):
                    return None
                aead = self._aeads[key_id] = AESGCM(key)
            return aead

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dec = getattr(self._local, "dec", None)
        if dec is None:
            dec = zstandard.ZstdDecompressor()
            self._local.dec = dec
        return dec

    def open(self, oid: bytes, envelope) -> bytes:
        """The verified plaintext of ``envelope``; IntegrityError if anything is off."""
        view = memoryview(envelope)
        if len(view) < OVERHEAD:
            raise IntegrityError(f"object {oid.hex()[:16]} is truncated")
        version, flags = view[0], view[1]
        if version != VERSION or flags & ~FLAG_ZSTD:
            raise IntegrityError(f"object {oid.hex()[:16]} has an unknown format")
        key_id = bytes(view[2 : 2 + KEY_ID_SIZE])
        aead = self._aead(key_id)
        if aead is None:
            raise IntegrityError(
                f"object {oid.hex()[:16]} names a session key that is missing or damaged"
            )
        nonce = bytes(view[2 + KEY_ID_SIZE : HEADER_SIZE])
        aad = bytes(oid) + bytes(view[:_AAD_LEN])
        try:
            payload = aead.decrypt(nonce, view[HEADER_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError(f"object {oid.hex()[:16]} failed authentication") from None
        if flags & FLAG_ZSTD:
            try:
                payload = self._decompressor().decompress(payload, max_output_size=MAX_OBJECT_SIZE)
            except zstandard.ZstdError as exc:
                raise IntegrityError(
                    f"object {oid.hex()[:16]} does not decompress: {exc}"
                ) from None
        if object_id(self.mac_key, payload) != oid:
            raise IntegrityError(f"object {oid.hex()[:16]} does not match its id")
        return payload


def wrap_session_key(wrap_key: bytes, key_id: bytes, session_key: bytes) -> bytes:
    """Seals a session key under the master key's wrap key."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(wrap_key).encrypt(nonce, session_key, _WRAP_LABEL + key_id)


def unwrap_session_key(wrap_key: bytes, key_id: bytes, wrapped: bytes) -> bytes:
    """Opens a wrapped session key; WrongKeyError when the master key does not fit."""
    try:
        key = AESGCM(wrap_key).decrypt(
            wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _WRAP_LABEL + key_id
        )
    except (InvalidTag, ValueError):
        raise WrongKeyError(
            "the key does not fit this repository (cannot open its session keys)"
        ) from None
    if len(key) != 32:
        raise IntegrityError("a stored session key has the wrong length")
    return key
