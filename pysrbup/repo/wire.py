"""Facts of the wire protocol that both sides must agree on, written once.

The protobuf messages live in ``protos/pysrbup/proto/service.proto``; what
the generated stubs cannot carry (sizes, names of the raw-bytes methods,
metadata keys, status bytes, the upload acknowledgement) is here.
"""

from __future__ import annotations

import struct

#: The repository format and protocol this version speaks (the server's config file and
#: its GetInfo reply both carry it; either side refuses any other).
FORMAT_VERSION = 1
#: Object ids (keyed BLAKE3 MACs) are 32 bytes everywhere: packs, frames, trees, caches.
ID_SIZE = 32
#: Session key ids (envelope header, wrapped key names) are 16 bytes.
KEY_ID_SIZE = 16
#: Upload sessions and snapshot ids as the server names them.
SESSION_ID_HEX = 32
SNAPSHOT_ID_HEX = 16

#: Largest gRPC message either side sends or accepts (frames and big trees).
MAX_MESSAGE_BYTES = 80 * 1024 * 1024
#: Ids in one HasObjects, fetch, revive or condemn request.
MAX_IDS_PER_REQUEST = 65536
#: Largest encrypted snapshot record and wrapped session key the server stores.
MAX_SNAPSHOT_RECORD = 1024 * 1024
MAX_WRAPPED_KEY = 256
#: Highest value of a u64 field the server accepts (SQLite integers are signed 64-bit).
MAX_U63 = (1 << 63) - 1

#: Generic methods that carry bulk data as raw bytes (no protobuf around frames).
RAW_SERVICE = "pysrbup.proto.BackupRaw"
UPLOAD_METHOD = "Upload"
FETCH_METHOD = "Fetch"
UPLOAD_RAW = f"/{RAW_SERVICE}/{UPLOAD_METHOD}"
FETCH_RAW = f"/{RAW_SERVICE}/{FETCH_METHOD}"

#: Metadata of an upload stream: the session, the proof's sequence number and signature.
SESSION_KEY = "pysrbup-session"
SESSION_SEQ_KEY = "pysrbup-seq"
SESSION_PROOF_KEY = "pysrbup-proof-bin"

#: Id-log operations (``IdBatch.ops``): one byte per id.
OP_ADD = 0
OP_CONDEMN = 1

#: Per-record status in a fetch reply frame (the record's flags byte).
FETCH_FOUND = 0
FETCH_MISSING = 1
FETCH_DAMAGED = 2

#: Upload reply: frames of the call now durable, objects stored, dropped, bytes stored.
UPLOAD_ACK = struct.Struct("<QQQQ")
#: What a client leaves unacknowledged at most (bytes of frames, objects in them); the
#: server syncs at half of either, so a client sending at full speed never waits.
UPLOAD_WINDOW_BYTES = 16 * 1024 * 1024
UPLOAD_WINDOW_OBJECTS = 32768


def split_ids(blob: bytes) -> list[bytes]:
    """Splits concatenated ids; ValueError if the length is not a multiple of ``ID_SIZE``."""
    if len(blob) % ID_SIZE:
        raise ValueError(f"id list length is not a multiple of {ID_SIZE}")
    return [bytes(blob[i : i + ID_SIZE]) for i in range(0, len(blob), ID_SIZE)]
