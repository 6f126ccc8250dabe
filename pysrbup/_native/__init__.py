"""Native kernels (Cython) and their pure-Python twins.

Each kernel has a public facade module here (``chunker``, ``rs``,
``framing``, ``records``, ``fsops``) that re-exports either the compiled
extension (``_chunker``, ...) or the pure-Python twin (``chunker_pure``,
...). The compiled one is required unless the user sets
``PYSRBUP_PURE_PYTHON=1``: a missing or stale build fails loudly rather than
running silently slow or wrong.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

#: Bumped whenever a kernel's API or output changes; every compiled extension
#: exports the value it was built with as ``API_VERSION``.
API_VERSION = 2

_PURE_ENV = "PYSRBUP_PURE_PYTHON"
KERNELS = ("chunker", "rs", "framing", "records", "fsops")


class NativeBuildError(ImportError):
    """The compiled kernels are missing or stale; rebuild or ask for the pure twins."""


def pure_requested() -> bool:
    """True when the user asked for the pure-Python twins instead of compiled kernels."""
    return os.environ.get(_PURE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def load(name: str) -> ModuleType:
    """Returns the backend module for kernel ``name`` (e.g. ``"chunker"``)."""
    if pure_requested():
        return importlib.import_module(f"{__name__}.{name}_pure")
    try:
        module = importlib.import_module(f"{__name__}._{name}")
    except ImportError as exc:
        raise NativeBuildError(
            f"pysrbup: compiled kernel {name!r} is missing ({exc}); reinstall pysrbup "
            f"(a wheel, or ./build.sh in a checkout), or set {_PURE_ENV}=1 to use the "
            "slow pure-Python twins"
        ) from exc
    built = getattr(module, "API_VERSION", None)
    if built != API_VERSION:
        raise NativeBuildError(
            f"pysrbup: compiled kernel {name!r} is stale (API {built}, expected "
            f"{API_VERSION}); reinstall pysrbup (a wheel, or ./build.sh in a checkout)"
        )
    return module


def backend_names() -> dict[str, str]:
    """Which backend each kernel uses (``native``, ``pure``, ``missing``, ``stale``)."""
    if pure_requested():
        return {name: "pure" for name in KERNELS}
    names = {}
    for name in KERNELS:
        try:
            load(name)
            names[name] = "native"
        except NativeBuildError as exc:
            names[name] = "stale" if "stale" in str(exc) else "missing"
    return names
