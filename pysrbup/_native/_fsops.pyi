"""Type stub for the compiled file-creation kernel; see fsops_pure for documentation."""

from typing import Any

API_VERSION: int

def create_file(
    dir_fd: int,
    name: bytes,
    data: Any,
    size: int,
    open_mode: int,
    chmod_mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
) -> int: ...
def write_at(dir_fd: int, name: bytes, data: Any, offset: int) -> None: ...
