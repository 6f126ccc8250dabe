"""Build of pysrbup: Cython kernels in pysrbup/_native and gRPC stubs from protos/.

The stubs are generated into the source tree (pysrbup/proto/*_pb2*.py, not
committed) before any build step runs, so editable installs, wheels and
`build_ext --inplace` all see them.
"""

import glob
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_stubs() -> None:
    """Runs grpc_tools.protoc over protos/ when a stub is missing or stale."""
    from grpc_tools import protoc

    protos = sorted(glob.glob(os.path.join(HERE, "protos", "pysrbup", "proto", "*.proto")))
    for proto in protos:
        base = os.path.splitext(os.path.basename(proto))[0]
        out = os.path.join(HERE, "pysrbup", "proto", base + "_pb2.py")
        if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(proto):
            continue
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        args = [
            "grpc_tools.protoc",
            f"-I{os.path.join(HERE, 'protos')}",
            f"-I{include}",
            f"--python_out={HERE}",
            f"--pyi_out={HERE}",
            f"--grpc_python_out={HERE}",
            proto,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPy(build_py):
    def run(self):
        generate_stubs()
        super().run()


class BuildExt(build_ext):
    def run(self):
        generate_stubs()
        super().run()


def extensions() -> list:
    """One extension per pysrbup/_native/_*.pyx file."""
    exts = []
    for pyx in sorted(glob.glob(os.path.join("pysrbup", "_native", "_*.pyx"))):
        name = "pysrbup._native." + os.path.splitext(os.path.basename(pyx))[0]
        exts.append(
            Extension(
                name,
                [pyx],
                include_dirs=[numpy.get_include()],
                extra_compile_args=["-O3"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(exts, language_level=3, compiler_directives={"embedsignature": True})


generate_stubs()
setup(ext_modules=extensions(), cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
