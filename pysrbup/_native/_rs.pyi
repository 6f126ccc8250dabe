"""Type stub for the compiled Reed-Solomon kernel; see rs_pure for documentation."""

from collections.abc import Iterable

import numpy as np

API_VERSION: int
MAX_SHARDS: int

def encode(data: np.ndarray, m: int, out: np.ndarray | None = None) -> np.ndarray: ...
def reconstruct(
    shards: np.ndarray, missing: Iterable[int], k: int, out: np.ndarray | None = None
) -> np.ndarray: ...
def _get_isa() -> str: ...
def _set_isa(name: str | None) -> None: ...
