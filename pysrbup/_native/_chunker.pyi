"""Type stub for the compiled chunker; see chunker_pure for documentation."""

from typing import Any

API_VERSION: int
DEFAULT_MIN: int
DEFAULT_AVG: int
DEFAULT_MAX: int
MAX_CHUNK_LIMIT: int

def cut_points(
    gear: Any, buf: Any, min_size: int, avg_size: int, max_size: int, eof: bool
) -> list[int]: ...
