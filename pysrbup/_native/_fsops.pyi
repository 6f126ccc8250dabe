"""Type stub for the compiled file-creation kernel; see fsops_pure for documentation."""

from typing import Any

API_VERSION: int

def create_files(files: list[tuple[Any, ...]]) -> list[int]: ...
def write_at(dir_fd: int, name: bytes, data: Any, offset: int) -> None: ...
