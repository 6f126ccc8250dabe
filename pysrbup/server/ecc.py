"""Reed-Solomon parity sidecars: the server repairs bit rot in its packs without a key.

A sealed pack of ``size`` bytes is viewed as K contiguous rows of
``row_len`` bytes (the last one zero-padded), ``row_len`` a multiple of the
block size B. Parity rows are systematic RS over GF(256) down each byte
column (``pysrbup._native.rs``), so a burst of damage, however long, hits
one row per column and is repairable as an erasure. Every B-byte block of
every data and parity row has an xxh3 checksum; a block whose checksum fails
is an erasure, and any column with at most M erased blocks is rebuilt::

                 column j (B bytes)
    row 0      | ... | blk | ... |   pack[0 : row_len]
    ...
    row K-1    | ... | blk | ... |   pack[(K-1) row_len : size] + zero padding
    parity 0   | ... | blk | ... |   in the sidecar
    parity M-1 | ... | blk | ... |

Sidecar ``<pack id>.ecc`` beside the pack (integers little-endian)::

    meta      b"PSRBECC1" | version u32 | K u16 | M u16 | B u32 |
              pack size u64 | row_len u64 | (K+M) x (row_len/B) xxh3 u64 |
              xxh3_64 of all the preceding meta bytes u64
    parity    M x row_len bytes
    meta      a second copy of meta (the first may rot too)
    length    u64: size of one meta copy

The level (K, M) is stored per pack, so a repository may hold packs of
several levels; ``--ecc=none`` writes no sidecar.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import xxhash

from pysrbup._native import rs
from pysrbup.errors import UsageError
from pysrbup.server.packs import fsync_dir

log = logging.getLogger("pysrbup.server")

MAGIC = b"PSRBECC1"
VERSION = 1
HEADER = struct.Struct("<8sIHHIQQ")
TAIL = struct.Struct("<Q")
BLOCK_SIZE = 4096


class SidecarError(Exception):
    """A sidecar is missing, unreadable or damaged in both meta copies."""


@dataclass(frozen=True)
class EccLevel:
    """K data rows protected by M parity rows."""

    k: int
    m: int

    @classmethod
    def parse(cls, text: str) -> EccLevel | None:
        """``"none"`` or ``"K+M"`` (e.g. ``"20+2"``); UsageError when malformed."""
        text = text.strip().lower()
        if text in ("none", "off", "0"):
            return None
        match = re.fullmatch(r"(\d+)\+(\d+)", text)
        if not match:
            raise UsageError(f"--ecc takes 'none' or K+M such as 20+2, not {text!r}")
        k, m = int(match.group(1)), int(match.group(2))
        if k < 1 or m < 1 or k + m > rs.MAX_SHARDS:
            raise UsageError(f"--ecc {text}: need K >= 1, M >= 1 and K + M <= {rs.MAX_SHARDS}")
        return cls(k, m)

    def __str__(self) -> str:
        return f"{self.k}+{self.m}"


#: About 10% overhead; any two damaged blocks per column, or bursts up to 2/20 of a pack.
DEFAULT_LEVEL = EccLevel(20, 2)


#: A pack's parity file is named like the pack with this suffix.
SIDECAR_SUFFIX = ".ecc"


def sidecar_path(pack_path: str) -> str:
    return os.path.splitext(pack_path)[0] + SIDECAR_SUFFIX


def _row_len(size: int, k: int, block: int) -> int:
    per_row = -(-max(size, 1) // k)
    return -(-per_row // block) * block


def _block_sums(rows: np.ndarray, block: int) -> np.ndarray:
    """xxh3 of every ``block``-byte block of every row: shape (rows, row_len / block)."""
    count, row_len = rows.shape
    sums = np.empty((count, row_len // block), dtype=np.uint64)
    digest = xxhash.xxh3_64_intdigest
    for r in range(count):
        view = memoryview(rows[r])
        sums[r] = [digest(view[j : j + block]) for j in range(0, row_len, block)]
    return sums


@dataclass
class Sidecar:
    """The parsed meta of one sidecar."""

    k: int
    m: int
    block: int
    pack_size: int
    row_len: int
    sums: np.ndarray  # (k + m, row_len / block) uint64
    meta_len: int
    first_copy_ok: bool = True

    @property
    def level(self) -> EccLevel:
        return EccLevel(self.k, self.m)

    @property
    def parity_offset(self) -> int:
        return self.meta_len


def _meta(level: EccLevel, block: int, size: int, row_len: int, sums: np.ndarray) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, level.k, level.m, block, size, row_len)
    body = head + sums.astype("<u8").tobytes()
    return body + TAIL.pack(xxhash.xxh3_64_intdigest(body))


def _parse_meta(raw: bytes) -> Sidecar | None:
    if len(raw) < HEADER.size + TAIL.size:
        return None
    magic, version, k, m, block, size, row_len = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or not block or row_len % block or k < 1 or m < 1:
        return None
    nblk = row_len // block
    meta_len = HEADER.size + 8 * (k + m) * nblk + TAIL.size
    if len(raw) < meta_len:
        return None
    body = raw[: meta_len - TAIL.size]
    if TAIL.unpack_from(raw, meta_len - TAIL.size)[0] != xxhash.xxh3_64_intdigest(body):
        return None
    sums = np.frombuffer(body, dtype="<u8", offset=HEADER.size).reshape(k + m, nblk)
    return Sidecar(k, m, block, size, row_len, sums.astype(np.uint64), meta_len)


class Workspace:
    """Buffers :func:`encode` reuses from one pack to the next (one user at a time).

    A pack is a little over 32 MiB, so its matrix would be a fresh mapping
    each time, faulted in page by page; reused, it costs a copy only.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, size: int) -> np.ndarray:
        """A uint8 array of ``size`` bytes (contents undefined), grown when too small."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < size:
            buf = self._buffers[name] = np.empty(size, dtype=np.uint8)
        return buf[:size]

    def clear(self) -> None:
        """Frees the buffers (they come back, at their first use, as fresh pages)."""
        self._buffers.clear()


def _matrix(
    data: bytes | memoryview, k: int, row_len: int, workspace: Workspace | None = None
) -> np.ndarray:
    """``data`` as a (k, row_len) zero-padded matrix."""
    if workspace is None:
        matrix = np.zeros(k * row_len, dtype=np.uint8)
    else:
        matrix = workspace.take("data", k * row_len)
    got = min(len(data), k * row_len)
    matrix[:got] = np.frombuffer(data, dtype=np.uint8, count=got)
    if workspace is not None:
        matrix[got:] = 0
    return matrix.reshape(k, row_len)


def read_pack_matrix(pack_path: str, k: int, row_len: int) -> tuple[np.ndarray, int]:
    """The pack as a (k, row_len) zero-padded matrix, and its actual size on disk."""
    data = np.zeros(k * row_len, dtype=np.uint8)
    with open(pack_path, "rb") as handle:
        got = handle.readinto(memoryview(data))
    return data.reshape(k, row_len), got


def encode(
    pack: bytes | memoryview,
    level: EccLevel,
    block: int = BLOCK_SIZE,
    verify: Callable[[memoryview], str] | None = None,
    workspace: Workspace | None = None,
) -> tuple[bytes, str]:
    """The sidecar of a sealed pack's bytes, or (b"", why not) when ``verify`` refuses them.

    A codec over bytes: where the pack and its sidecar are kept is the
    caller's business (pysrbup/server/parity.py keeps them in a blob store).
    With a ``workspace`` the stripe and parity live in its reused buffers.
    """
    if verify is not None:
        problem = verify(memoryview(pack))
        if problem:
            return b"", problem
    size = len(pack)
    row_len = _row_len(size, level.k, block)
    data = _matrix(pack, level.k, row_len, workspace)
    out = None
    if workspace is not None:
        out = workspace.take("parity", level.m * row_len).reshape(level.m, row_len)
    parity = rs.encode(data, level.m, out=out)
    sums = np.vstack([_block_sums(data, block), _block_sums(parity, block)])
    meta = _meta(level, block, size, row_len, sums)
    return b"".join([meta, memoryview(parity).cast("B"), meta, TAIL.pack(len(meta))]), ""


def write_sidecar(
    pack_path: str,
    level: EccLevel,
    block: int = BLOCK_SIZE,
    verify: Callable[[memoryview], str] | None = None,
) -> str:
    """Computes and durably writes the sidecar of a sealed pack file beside it.

    The pack is read once; ``verify`` (given the pack's bytes) may refuse it
    by returning why, and then no parity is written. Returns that reason, or
    "" once the sidecar is on disk.
    """
    with open(pack_path, "rb") as handle:
        pack = handle.read()
    sidecar, problem = encode(pack, level, block, verify)
    if problem:
        return problem
    _replace_file(sidecar_path(pack_path), sidecar)
    return ""


def _replace_file(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def parse_sidecar(raw: bytes, where: str = "sidecar") -> Sidecar:
    """Parses a whole sidecar, falling back to its second meta copy."""
    total = len(raw)
    parsed = None
    if total >= HEADER.size:
        _, _, k, m, block, _, row_len = HEADER.unpack_from(raw)
        if block and k and m and row_len % block == 0:
            meta_len = HEADER.size + 8 * (k + m) * (row_len // block) + TAIL.size
            if meta_len <= total:
                parsed = _parse_meta(raw[:meta_len])
    if parsed is None and total >= TAIL.size:
        (meta_len,) = TAIL.unpack_from(raw, total - TAIL.size)
        if 0 < meta_len <= total - TAIL.size:
            parsed = _parse_meta(raw[total - TAIL.size - meta_len : total - TAIL.size])
            if parsed is not None:
                parsed.first_copy_ok = False
    if parsed is None:
        raise SidecarError(f"{where} is damaged beyond use (both meta copies)")
    return parsed


def load_sidecar(path: str) -> Sidecar:
    """Parses a sidecar file, falling back to its second meta copy."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise SidecarError(f"{path} is missing") from None
    except OSError as exc:
        raise SidecarError(f"cannot read {path}: {exc.strerror}") from None
    return parse_sidecar(raw, path)


@dataclass
class PackCheck:
    """What verifying one pack found."""

    blocks_checked: int = 0
    blocks_repaired: int = 0
    blocks_unrepairable: int = 0
    #: Byte ranges of the pack that are damaged and could not be rebuilt.
    bad_ranges: list[tuple[int, int]] = field(default_factory=list)
    unprotected: bool = False


@dataclass
class Repaired:
    """A check's result, and the repaired bytes to store (None: that object needs nothing)."""

    check: PackCheck
    pack: bytes | None = None
    sidecar: bytes | None = None


def check(pack: bytes | memoryview, sidecar: bytes | None, where: str = "pack") -> Repaired:
    """Verifies every block of a pack's bytes against its sidecar; rebuilds what parity allows.

    Returns the whole repaired pack (its original sealed bytes, the recorded
    size) and sidecar when anything was rebuilt, for the caller to store
    whole: objects are replaced, never patched.
    """
    result = PackCheck()
    if sidecar is None:
        result.unprotected = True
        return Repaired(result)
    try:
        sc = parse_sidecar(sidecar, where + " sidecar")
    except SidecarError:
        result.unprotected = True
        return Repaired(result)
    k, m, block = sc.k, sc.m, sc.block
    actual_size = len(pack)
    data = _matrix(pack, k, sc.row_len)
    parity = np.zeros((m, sc.row_len), dtype=np.uint8)
    raw_parity = sidecar[sc.parity_offset : sc.parity_offset + m * sc.row_len]
    parity.reshape(-1)[: len(raw_parity)] = np.frombuffer(raw_parity, dtype=np.uint8)
    shards = np.vstack([data, parity])
    bad = _block_sums(shards, block) != sc.sums
    result.blocks_checked = bad.size
    new_sidecar = None
    if not sc.first_copy_ok:  # restore the damaged first meta copy
        meta = _meta(sc.level, block, sc.pack_size, sc.row_len, sc.sums)
        new_sidecar = bytearray(sidecar)
        new_sidecar[: len(meta)] = meta
        result.blocks_repaired += 1
    if actual_size != sc.pack_size:  # truncated (or grown): the missing tail is an erasure
        lost_from = min(actual_size, sc.pack_size) // block
        flat = np.zeros(k * (sc.row_len // block), dtype=bool)
        flat[lost_from : -(-sc.pack_size // block)] = True
        bad[:k] |= flat.reshape(k, -1)
    if not bad.any():
        if actual_size != sc.pack_size:
            return Repaired(result, bytes(pack[: sc.pack_size]), _maybe(new_sidecar))
        return Repaired(result, None, _maybe(new_sidecar))
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for j in np.nonzero(bad.any(axis=0))[0]:
        groups[tuple(np.nonzero(bad[:, j])[0].tolist())].append(int(j))
    fixed_data = fixed_parity = False
    for missing, columns in groups.items():
        if len(missing) > m:
            for r in missing:
                if r < k:
                    for j in columns:
                        start = r * sc.row_len + j * block
                        result.bad_ranges.append((start, min(start + block, sc.pack_size)))
            result.blocks_unrepairable += len(missing) * len(columns)
            continue
        cols = np.concatenate([np.arange(j * block, (j + 1) * block) for j in columns])
        stripe = np.ascontiguousarray(shards[:, cols])
        rebuilt = rs.reconstruct(stripe, list(missing), k)
        stripe[:k] = rebuilt
        stripe[k:] = rs.encode(np.ascontiguousarray(rebuilt), m)
        check_sums = _block_sums(
            stripe[list(missing)].reshape(len(missing) * len(columns), block), block
        )
        expected = np.array([[sc.sums[r, j]] for r in missing for j in columns], dtype=np.uint64)
        if not np.array_equal(check_sums, expected):
            result.blocks_unrepairable += len(missing) * len(columns)
            log.error("ecc: repair of %s did not verify; sidecar checksums may be damaged", where)
            continue
        shards[:, cols] = stripe
        fixed_data |= any(r < k for r in missing)
        fixed_parity |= any(r >= k for r in missing)
        result.blocks_repaired += len(missing) * len(columns)
    result.bad_ranges.sort()
    repaired = Repaired(result, None, _maybe(new_sidecar))
    if fixed_data or (result.blocks_repaired and actual_size != sc.pack_size):
        repaired.pack = shards[:k].reshape(-1)[: sc.pack_size].tobytes()
    if fixed_parity:
        side = bytearray(new_sidecar if new_sidecar is not None else sidecar)
        side[sc.parity_offset : sc.parity_offset + m * sc.row_len] = shards[k:].tobytes()
        repaired.sidecar = bytes(side)
    if result.blocks_repaired:
        log.warning("ecc: repaired %d block(s) of %s", result.blocks_repaired, where)
    return repaired


def _maybe(data: bytearray | None) -> bytes | None:
    return None if data is None else bytes(data)


def check_pack(pack_path: str, repair: bool = True) -> PackCheck:
    """Verifies a pack file against the sidecar beside it; rebuilds what parity allows.

    Repaired bytes replace the pack (its original sealed content, never a
    change) and the sidecar whole: temporary file, fsync, rename.
    """
    try:
        with open(sidecar_path(pack_path), "rb") as handle:
            sidecar = handle.read()
    except FileNotFoundError:
        sidecar = None
    with open(pack_path, "rb") as handle:
        pack = handle.read()
    repaired = check(pack, sidecar, pack_path)
    if repair:
        if repaired.pack is not None:
            _replace_file(pack_path, repaired.pack)
        if repaired.sidecar is not None:
            _replace_file(sidecar_path(pack_path), repaired.sidecar)
    return repaired.check
