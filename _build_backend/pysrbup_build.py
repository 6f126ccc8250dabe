"""pysrbup's build backend: setuptools, plus the code generators only when they are needed.

Two sets of files are generated at build time and never committed (see setup.py):

- ``pysrbup/_native/_*.c`` from the ``.pyx`` kernels, by Cython;
- ``pysrbup/proto/*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py`` from ``protos/``, by grpcio-tools.

An sdist ships both sets, so a wheel built from it needs a C compiler and nothing else. This
backend is setuptools' own with one change: Cython and grpcio-tools are added to the build
requirements only when a generated file is missing or older than its source, which is always the
case in a fresh git checkout and never in an unpacked sdist. setup.py uses the same checks.

The hooks that are not redefined here are setuptools' (re-exported below).
"""

from __future__ import annotations

import glob
import os

from setuptools.build_meta import *  # noqa: F403 - every PEP 517 hook not redefined below

#: The generators. grpcio-tools is pinned: the stubs it writes refuse to import on a grpcio or
#: protobuf runtime older than the versions it was built with, and pyproject.toml's dependencies
#: name exactly those floors. Bump the three together (build.sh installs the same pins for the
#: developer set-up; tests/test_install.py checks that they all agree).
CYTHON_REQUIREMENT = "Cython>=3.0"
GRPC_TOOLS_REQUIREMENT = "grpcio-tools==1.85.1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _newer_or_same(target: str, source: str) -> bool:
    return os.path.exists(target) and os.path.getmtime(target) >= os.path.getmtime(source)


def pyx_sources(root: str = ROOT) -> list[str]:
    """The Cython kernels, as paths relative to ``root``."""
    pattern = os.path.join(root, "pysrbup", "_native", "_*.pyx")
    return sorted(os.path.relpath(path, root) for path in glob.glob(pattern))


def proto_sources(root: str = ROOT) -> list[str]:
    """The .proto files the gRPC stubs are generated from, as absolute paths."""
    return sorted(glob.glob(os.path.join(root, "protos", "pysrbup", "proto", "*.proto")))


def c_source(pyx: str) -> str:
    return os.path.splitext(pyx)[0] + ".c"


def stubs_of(proto: str, root: str = ROOT) -> list[str]:
    base = os.path.splitext(os.path.basename(proto))[0]
    return [os.path.join(root, "pysrbup", "proto", base + suffix) for suffix in STUB_SUFFIXES]


def stale_c_sources(root: str = ROOT) -> list[str]:
    """The .pyx files whose generated .c file is missing or older than they are."""
    return [
        pyx
        for pyx in pyx_sources(root)
        if not _newer_or_same(os.path.join(root, c_source(pyx)), os.path.join(root, pyx))
    ]


def stale_protos(root: str = ROOT) -> list[str]:
    """The .proto files with a generated stub that is missing or older than they are."""
    return [
        proto
        for proto in proto_sources(root)
        if not all(_newer_or_same(stub, proto) for stub in stubs_of(proto, root))
    ]


def in_sdist(root: str = ROOT) -> bool:
    """True in an unpacked sdist (it has PKG-INFO at its top; a git checkout has not)."""
    return os.path.exists(os.path.join(root, "PKG-INFO"))


def generator_requirements(root: str = ROOT) -> list[str]:
    """What the build must install beyond ``[build-system] requires``."""
    needed = []
    if stale_c_sources(root):
        needed.append(CYTHON_REQUIREMENT)
    if stale_protos(root):
        needed.append(GRPC_TOOLS_REQUIREMENT)
    return needed


# setuptools' own get_requires_* hooks run setup.py, which cannot run before the generators it
# needs are installed; the only thing they would add (``wheel``) is built into setuptools>=70.1.
def get_requires_for_build_wheel(config_settings=None):
    return generator_requirements()


def get_requires_for_build_sdist(config_settings=None):
    return generator_requirements()


def get_requires_for_build_editable(config_settings=None):
    return generator_requirements()
