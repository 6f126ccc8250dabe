"""Type stub for the compiled framing kernel; see framing_pure for documentation."""

from collections.abc import Sequence
from typing import Any

from pysrbup._native.framing_errors import FrameError as FrameError

API_VERSION: int
MAGIC: bytes
HEADER_SIZE: int
RECORD_OVERHEAD: int
ID_SIZE: int
MAX_PAYLOAD: int
MAX_COUNT: int

def pack_records(records: Sequence[tuple[Any, int, Any]]) -> bytes: ...
def unpack_records(
    buf: Any, max_payload: int = ..., max_records: int = ...
) -> list[tuple[memoryview, int, memoryview]]: ...
