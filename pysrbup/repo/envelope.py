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

A session key is stored on the server in one of two forms, told apart by
length (60 or 93 bytes):

- wrapped by a master-key holder, under the master key's wrap key:
  ``nonce (12) || AES-256-GCM(wrap_key, session_key, aad)``;
- sealed by a put-only client to the repository's X25519 public key, with a
  fresh ephemeral key pair that is forgotten at once, so the client cannot
  open it again: ``0x02 || ephemeral public (32) || nonce (12) ||
  AES-256-GCM(HKDF(X25519(ephemeral, seal public) || both publics), session_key, aad)``;

with ``aad = "pysrbup-session-key" || key_id`` in both.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Mapping

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pysrbup.crypto.keys import public_bytes
from pysrbup.errors import IntegrityError, WrongKeyError
from pysrbup.fileio import read_into
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


class _Nonces:
    """Random AES-GCM nonces, drawn from the kernel 4,096 at a time (one system call
    instead of one per object; per object it was 4% of a backup of tiny files).

    Each thread takes from a pool of its own. A forked child starts with
    none: an inherited pool would hand the parent's next nonces to both.
    """

    BATCH = 4096

    def __init__(self) -> None:
        self._local = threading.local()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._local = threading.local()

    def take(self) -> bytes:
        local = self._local
        at = getattr(local, "at", 0)
        pool = getattr(local, "pool", b"")
        if at >= len(pool):
            local.pool = pool = os.urandom(NONCE_SIZE * self.BATCH)
            at = 0
        local.at = at + NONCE_SIZE
        return pool[at : at + NONCE_SIZE]


_NONCES = _Nonces()
new_nonce = _NONCES.take


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
        payload, flags = self.pack(data, compress)
        out = bytearray(OVERHEAD + len(payload))
        self.seal_into(oid, payload, flags, memoryview(out))
        return out

    def pack(self, data, compress: bool = True) -> tuple[object, int]:
        """(payload, flags) of ``data``: zstd-compressed if asked and it shrinks, else as is.

        With ``seal_into``, the two steps of ``seal``: a caller compresses
        first, then encrypts straight into memory of exactly the envelope's
        size (``OVERHEAD + len(payload)``), with no envelope object between.
        """
        if compress and len(data) > 64:
            packed = self._compressor().compress(data)
            if len(packed) < len(data):
                return packed, FLAG_ZSTD
        return data, 0

    def seal_into(self, oid: bytes, payload, flags: int, out: memoryview) -> None:
        """Writes the envelope of a ``pack`` result into ``out`` (exactly its size)."""
        if len(out) != OVERHEAD + len(payload):
            raise ValueError("the envelope's memory must be OVERHEAD + len(payload) bytes")
        nonce = new_nonce()
        struct.pack_into("BB", out, 0, VERSION, flags)
        out[2 : 2 + KEY_ID_SIZE] = self.key_id
        out[2 + KEY_ID_SIZE : HEADER_SIZE] = nonce
        aad = bytes(oid) + bytes(out[:_AAD_LEN])
        self._aead.encrypt_into(nonce, payload, aad, out[HEADER_SIZE:])


#: ``Buffers`` grow in steps of this much, so sizes repeat and freed memory is reused.
BUFFER_STEP = 1024 * 1024


class Buffers:
    """Reusable memory for ``Opener.open_into``, one per thread.

    Restore opens every chunk into the same two buffers (the decrypted and the
    decompressed payload) instead of two fresh objects per chunk, so no fresh
    pages are mapped per object. A buffer too small is replaced, never resized,
    so a view still held elsewhere stays valid.
    """

    def __init__(self) -> None:
        self._sealed = bytearray()
        self._plain = bytearray()

    @staticmethod
    def _fit(buf: bytearray, size: int) -> bytearray:
        if len(buf) >= size:
            return buf
        return bytearray(-(-size // BUFFER_STEP) * BUFFER_STEP)

    def sealed(self, size: int) -> memoryview:
        """``size`` bytes for the decrypted (still compressed) payload."""
        self._sealed = self._fit(self._sealed, size)
        return memoryview(self._sealed)[:size]

    def plain(self, size: int) -> memoryview:
        """``size`` bytes for the decompressed payload."""
        self._plain = self._fit(self._plain, size)
        return memoryview(self._plain)[:size]


class Opener:
    """Decrypts and verifies envelopes; knows every session key of the repository.

    ``reload`` lists the repository's wrapped session keys again: it is asked
    (once per unknown key id) when an envelope names a key stored after the
    opener was made, by a backup that committed meanwhile.
    """

    def __init__(
        self,
        mac_key: bytes,
        wrap_key: bytes,
        wrapped_keys: Mapping[bytes, bytes],
        seal_private: X25519PrivateKey | None = None,
        reload: Callable[[], Mapping[bytes, bytes]] | None = None,
    ):
        self.mac_key = mac_key
        self._wrap_key = wrap_key
        self._seal_private = seal_private
        self._wrapped = dict(wrapped_keys)
        self._reload = reload
        self._reloaded_for: set[bytes] = set()
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
            unknown = aead is None and key_id not in self._wrapped
            if unknown and self._reload is not None and key_id not in self._reloaded_for:
                self._reloaded_for.add(key_id)
                for known, wrapped in self._reload().items():
                    self._wrapped.setdefault(known, wrapped)
            if aead is None and key_id in self._wrapped:
                try:
                    key = open_session_key(
                        self._wrap_key, self._seal_private, key_id, self._wrapped[key_id]
                    )
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

    def _header(self, oid: bytes, view: memoryview) -> tuple[AESGCM, bytes, bytes, int]:
        """(cipher, nonce, associated data, flags) of an envelope; IntegrityError if bad."""
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
        return aead, nonce, aad, flags

    def open_into(self, oid: bytes, envelope, buffers: Buffers) -> memoryview:
        """``open``, but the plaintext is a view into ``buffers`` (valid until their next use).

        Decrypts into ``buffers.sealed`` and decompresses into ``buffers.plain``,
        so opening many objects maps no fresh memory per object. Checks exactly
        what ``open`` checks, in the same order; a frame that does not declare
        its size (never written by pysrbup) is decompressed the plain way.
        """
        view = memoryview(envelope)
        aead, nonce, aad, flags = self._header(oid, view)
        sealed = buffers.sealed(len(view) - OVERHEAD)
        try:
            aead.decrypt_into(nonce, view[HEADER_SIZE:], aad, sealed)
        except InvalidTag:
            raise IntegrityError(f"object {oid.hex()[:16]} failed authentication") from None
        return self._verified(oid, sealed, flags, lambda data: self._decompress_into(data, buffers))

    def _verified(self, oid: bytes, payload, flags: int, decompress: Callable):
        """The plaintext of a decrypted ``payload``: decompressed if flagged, its id checked."""
        if flags & FLAG_ZSTD:
            try:
                payload = decompress(payload)
            except zstandard.ZstdError as exc:
                raise IntegrityError(
                    f"object {oid.hex()[:16]} does not decompress: {exc}"
                ) from None
        if object_id(self.mac_key, payload) != oid:
            raise IntegrityError(f"object {oid.hex()[:16]} does not match its id")
        return payload

    def _decompress(self, data) -> bytes:
        return self._decompressor().decompress(data, max_output_size=MAX_OBJECT_SIZE)

    def _decompress_into(self, data: memoryview, buffers: Buffers) -> memoryview:
        """Decompresses one zstd frame into ``buffers.plain``; ZstdError if it is not one."""
        size = zstandard.frame_content_size(data)
        if size < 0 or size > MAX_OBJECT_SIZE:  # unknown (or absurd): as ``open`` does
            return memoryview(self._decompress(data))
        out = buffers.plain(size)
        reader = self._decompressor().stream_reader(data, read_across_frames=False)
        got = read_into(reader.readinto, out[:size])
        if got != size:
            raise zstandard.ZstdError(f"frame declares {size} bytes but holds {got}")
        if reader.read(1):  # more after the frame (pysrbup writes one): as ``open`` does
            return memoryview(self._decompress(data))
        return out

    def open(self, oid: bytes, envelope) -> bytes:
        """The verified plaintext of ``envelope``; IntegrityError if anything is off."""
        view = memoryview(envelope)
        aead, nonce, aad, flags = self._header(oid, view)
        try:
            payload = aead.decrypt(nonce, view[HEADER_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError(f"object {oid.hex()[:16]} failed authentication") from None
        return self._verified(oid, payload, flags, self._decompress)


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


_SEALED = 0x02
SEALED_SIZE = 1 + 32 + NONCE_SIZE + 32 + TAG_SIZE
_SEAL_INFO = b"pysrbup sealed session key"


def _seal_key(shared: bytes, ephemeral_public: bytes, seal_public: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_SEAL_INFO).derive(
        shared + ephemeral_public + seal_public
    )


def seal_session_key(seal_public: bytes, key_id: bytes, session_key: bytes) -> bytes:
    """Seals a session key to the repository's X25519 public key (a put-only client).

    The ephemeral private key is dropped on return: not even the caller can
    open the result again.
    """
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = public_bytes(ephemeral)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(seal_public))
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(_seal_key(shared, ephemeral_public, seal_public)).encrypt(
        nonce, session_key, _WRAP_LABEL + key_id
    )
    return bytes([_SEALED]) + ephemeral_public + nonce + sealed


def open_session_key(
    wrap_key: bytes, seal_private: X25519PrivateKey | None, key_id: bytes, stored: bytes
) -> bytes:
    """Opens a stored session key of either form; WrongKeyError if the key does not fit."""
    if len(stored) != SEALED_SIZE or stored[0] != _SEALED:
        return unwrap_session_key(wrap_key, key_id, stored)
    if seal_private is None:
        raise WrongKeyError("a session key sealed by a put-only client needs the master key")
    ephemeral_public = stored[1:33]
    nonce = stored[33 : 33 + NONCE_SIZE]
    seal_public = public_bytes(seal_private)
    try:
        shared = seal_private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        key = AESGCM(_seal_key(shared, ephemeral_public, seal_public)).decrypt(
            nonce, stored[33 + NONCE_SIZE :], _WRAP_LABEL + key_id
        )
    except (InvalidTag, ValueError):
        raise WrongKeyError(
            "the key does not fit this repository (cannot open its session keys)"
        ) from None
    return key
