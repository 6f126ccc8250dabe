"""Directory trees: serialising, naming and reading ``Tree`` objects.

A directory is stored as one encrypted object holding a ``Tree`` protobuf
(entries sorted by raw name bytes, serialised deterministically), so an
unchanged directory produces the same bytes, the same id and costs nothing
in the next backup. File nodes carry their chunk ids and the plaintext size
of each chunk, so a restore knows every chunk's offset before fetching it.
"""

from __future__ import annotations

import struct

from pysrbup.errors import IntegrityError
from pysrbup.proto import repo_pb2
from pysrbup.repo.wire import ID_SIZE
from pysrbup.textsafe import printable


def serialize(nodes: list[repo_pb2.Node]) -> bytes:
    """Deterministic bytes of the tree holding ``nodes`` (sorted by name)."""
    tree = repo_pb2.Tree(nodes=sorted(nodes, key=lambda n: n.name))
    return tree.SerializeToString(deterministic=True)


def encode(encoded_nodes: list[bytes]) -> bytes:
    """The same bytes as ``serialize``, from nodes already serialised deterministically.

    ``encoded_nodes`` must be in name order. A ``Tree`` is its ``nodes``
    field repeated: tag 0x0a, the length as a varint, the node's bytes.
    """
    out = bytearray()
    for node in encoded_nodes:
        size = len(node)
        out.append(0x0A)
        while size >= 0x80:
            out.append((size & 0x7F) | 0x80)
            size >>= 7
        out.append(size)
        out += node
    return bytes(out)


def parse(data: bytes, where: str) -> repo_pb2.Tree:
    """Parses the verified tree object of directory ``where`` and checks its names.

    IntegrityError naming the directory if it is not a tree, or if a name is
    empty, ``.``, ``..``, holds ``/`` or NUL, or appears twice: no reader
    (restore, check, garbage collection) ever acts on such a tree.
    """
    shown = printable(where)
    tree = repo_pb2.Tree()
    try:
        tree.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise IntegrityError(f"{shown}: not a directory tree ({exc})") from None
    seen: set[bytes] = set()
    for node in tree.nodes:
        name = node.name
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise IntegrityError(f"{shown}: invalid file name {name!r} in backup")
        if name in seen:
            raise IntegrityError(f"{shown}: file name {name!r} appears twice in backup")
        seen.add(name)
    return tree


def pack_sizes(sizes: list[int]) -> bytes:
    return struct.pack(f"<{len(sizes)}I", *sizes)


def file_chunks(node: repo_pb2.Node, where: str) -> list[tuple[bytes, int, int]]:
    """(chunk id, offset, size) of each chunk of a file node, checked for consistency."""
    ids, sizes = node.chunk_ids, node.chunk_sizes
    count = len(ids) // ID_SIZE
    if len(ids) % ID_SIZE or len(sizes) != 4 * count:
        raise IntegrityError(f"{where}: malformed chunk list")
    offset = 0
    chunks = []
    for i, size in enumerate(struct.unpack(f"<{count}I", sizes)):
        chunks.append((ids[i * ID_SIZE : (i + 1) * ID_SIZE], offset, size))
        offset += size
    if offset != node.size:
        raise IntegrityError(f"{where}: chunk sizes do not add up to the file size")
    return chunks
