"""Restore's file creation facade: the compiled kernel or its pure-Python twin.

Import from here. :mod:`pysrbup._native.fsops_pure` documents the contract.
"""

from __future__ import annotations

from pysrbup._native import load
from pysrbup._native.fsops_pure import CREATE_FLAGS  # what both backends open new files with

_impl = load("fsops")

create_files = _impl.create_files
write_at = _impl.write_at

__all__ = ["CREATE_FLAGS", "create_files", "write_at"]
