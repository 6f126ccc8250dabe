"""Reed-Solomon facade: the compiled kernel or its numpy twin.

Import from here. ``encode(data, m)`` returns the parity of a ``(k, n)``
stripe whose byte columns are ``reedsolo.RSCodec(m)`` codewords;
``reconstruct(shards, missing, k)`` rebuilds the data from any ``k`` of the
``k + m`` shards. See :mod:`pysrbup._native.rs_pure` and
:mod:`pysrbup._native.gf256`.
"""

from __future__ import annotations

from pysrbup._native import load

_impl = load("rs")

MAX_SHARDS: int = _impl.MAX_SHARDS
encode = _impl.encode
reconstruct = _impl.reconstruct

__all__ = ["MAX_SHARDS", "encode", "reconstruct"]
