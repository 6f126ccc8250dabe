"""Where the client keeps per-repository state on the local machine.

``$PYSRBUP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/pysrbup`` (default
``~/.cache/pysrbup``), with one folder per repository id. Everything here is
a cache: deleting it costs time on the next backup, never data.
"""

from __future__ import annotations

import os


def cache_root() -> str:
    """The top folder of pysrbup's local caches."""
    explicit = os.environ.get("PYSRBUP_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pysrbup")


def repo_cache_dir(repo_id: bytes) -> str:
    """The cache folder of one repository, created on demand."""
    path = os.path.join(cache_root(), repo_id.hex())
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path
