#!/usr/bin/env python3
"""End-to-end comparison of pysrbup with restic and BorgBackup on this machine.

Generates a deterministic mixed data set (one third compressible text, one
third random data, one third a disk-image-like file, plus small files: 10,000
at the default 976 MB, proportionally fewer for a smaller ``--size``), then
measures, interleaved in one run so that every tool sees the same machine
load (with ``--rounds``, each round another tool goes first), for each tool:

1. initial backup,
2. unchanged re-backup,
3. backup after a mutation (appends to 1% of files, 100 bytes inserted at the
   start of the three largest files, deletions, new files worth 20 MB scaled
   by ``--size``),
4. full restore of the mutated backup (verified identical to the source),

plus repository size, client CPU, peak RSS and minor page faults (``wait4``
rusage, per phase) and server CPU, peak RSS and minor page faults (``/proc``,
pysrbup only: restic and borg write a local repository in-process). The
result is a markdown table with ratios against restic.

``--data real`` replaces the generated set with copies of system directories
(``bench/real_tree.py``: ``/usr/share``, ``/usr/include``, Python installs;
``--files`` entries, default 100,000): many small real files, shared
libraries, duplicated installs. The same mutation is applied, scaled by the
tree's size.

Backups read data the generator just wrote, so it is in the page cache;
``--cold`` drops the cache before every backup as well (as the files of a
real backup usually are: on disk, not read lately). Every restore starts with
the cache dropped and, run as root, goes to a new ext4 file system on a loop
device (``--restore-fs``), so no tool pays for what was deleted before it.

pysrbup runs with a server on loopback. ``--pysrbup NAME=PATH`` (repeatable)
adds a pysrbup checkout to compare, e.g. a ``git worktree`` of an older
commit with its native kernels built, so that a change is measured against
its baseline in the same run. restic and borg are installed from apt when
missing (``apt-get update`` once, then ``apt-get install -y restic borgbackup``).

    .venv/bin/python bench/compare.py --size 300 --work /tmp/cmp
    .venv/bin/python bench/compare.py --tools pysrbup,restic --data real
    .venv/bin/python bench/compare.py --tools pysrbup,restic --data real --cold
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1000 * 1000
MiB = 1024 * 1024
PASSWORD = "compare-benchmark-password"
PHASES = ("initial", "unchanged", "mutated", "restore")


# ---- data set -----------------------------------------------------------------


def _vocabulary(rng: np.random.Generator) -> list[bytes]:
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    weights = np.linspace(2.0, 0.2, len(letters))
    weights /= weights.sum()
    words = []
    for _ in range(6000):
        n = int(rng.integers(2, 11))
        words.append(bytes(rng.choice(letters, n, p=weights)))
    return words


class TextSource:
    """Deterministic, compressible, never-repeating text (lines of random words)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        words = _vocabulary(rng)
        self.lines = []
        for i in range(50000):
            n = int(rng.integers(4, 16))
            picks = rng.integers(0, len(words), n)
            line = b" ".join(words[j] for j in picks)
            self.lines.append(b"%d: " % i + line.capitalize() + b".\n")
        self.rng = rng

    def make(self, size: int) -> bytes:
        idx = self.rng.integers(0, len(self.lines), size // 40 + 64)
        out = b"".join(self.lines[i] for i in idx)
        while len(out) < size:
            out += self.make(size - len(out))
        return out[:size]


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _disk_image(rng: np.random.Generator, text: TextSource, size: int) -> bytes:
    """Extents of zeros, repeated blocks, random data and text, like a VM image."""
    parts: list[bytes] = []
    total = 0
    seen: list[bytes] = []
    while total < size:
        kind = rng.choice(4, p=[0.25, 0.15, 0.35, 0.25])
        n = int(rng.integers(64 * 1024, 2 * MiB))
        if kind == 0:
            block = bytes(n)
        elif kind == 1 and seen:
            block = seen[int(rng.integers(0, len(seen)))]
        elif kind == 2 or kind == 1:
            block = rng.bytes(n)
            if len(seen) < 32:
                seen.append(block)
        else:
            block = text.make(n)
        parts.append(block)
        total += len(block)
    return b"".join(parts)[:size]


def generate(root: str, size_mb: int, seed: int = 1) -> dict:
    """Writes the data set under ``root``; returns a short description."""
    rng = np.random.default_rng(seed)
    text = TextSource(seed + 1)
    total = size_mb * MB
    third = total // 3
    n_small = max(300, round(10000 * size_mb / 976))
    made = 0
    # text: files of 1-24 MB
    i = 0
    while made < third:
        n = min(int(rng.integers(1 * MB, 24 * MB)), third - made)
        _write(os.path.join(root, "text", f"doc{i:03d}.txt"), text.make(n))
        made += n
        i += 1
    # random: files of 2-64 MB
    j = 0
    while made < 2 * third:
        n = min(int(rng.integers(2 * MB, 64 * MB)), 2 * third - made)
        _write(os.path.join(root, "random", f"blob{j:03d}.bin"), rng.bytes(n))
        made += n
        j += 1
    # disk image: one file, minus what the small files take
    small_sizes = rng.integers(50, 8192, n_small)
    image = max(MB, total - made - int(small_sizes.sum()))
    _write(os.path.join(root, "vm", "disk.img"), _disk_image(rng, text, image))
    made += image
    for k, n in enumerate(small_sizes):
        n = int(n)
        data = text.make(n) if k % 3 else rng.bytes(n)
        _write(os.path.join(root, "small", f"d{k % 100:02d}", f"f{k:05d}.dat"), data)
        made += n
    return {"bytes": made, "small_files": n_small, "text_files": i, "random_files": j}


def _all_files(root: str) -> list[str]:
    """Every regular file below ``root`` (not symlinks), in a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return found


def mutate(root: str, size_mb: int, seed: int = 2) -> dict:
    """Appends, inserts at the start, deletes and adds files (deterministic)."""
    rng = np.random.default_rng(seed)
    text = TextSource(seed + 1)
    files = _all_files(root)
    appended = rng.choice(len(files), max(1, len(files) // 100), replace=False)
    for k in appended:
        with open(files[k], "ab") as handle:
            handle.write(text.make(int(rng.integers(100, 4096))))
    largest = sorted(files, key=os.path.getsize)[-3:]
    for path in largest:
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(rng.bytes(100) + data)
    doomed = [f for f in files if f not in largest]
    doomed = [doomed[k] for k in rng.choice(len(doomed), max(1, len(files) // 200), replace=False)]
    for path in doomed:
        os.unlink(path)
    new_total = max(2 * MB, 20 * MB * size_mb // 976)
    made = 0
    k = 0
    while made < new_total:
        n = min(int(rng.integers(100_000, 4 * MB)), new_total - made)
        data = rng.bytes(n) if k % 2 else text.make(n)
        _write(os.path.join(root, "new", f"n{k:03d}.dat"), data)
        made += n
        k += 1
    return {"appended": len(appended), "inserted": 3, "deleted": len(doomed), "new_bytes": made}


def tree_digest(root: str) -> dict[str, tuple]:
    """Relative path -> (kind, size, mode, sha256 or link target) of every entry."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(path, root)] = ("link", os.readlink(path))
                continue
            if stat.S_ISDIR(st.st_mode):
                out[os.path.relpath(path, root)] = ("dir",)
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(4 * MiB):
                    digest.update(block)
            out[os.path.relpath(path, root)] = (
                "file",
                st.st_size,
                stat.S_IMODE(st.st_mode),
                digest.hexdigest(),
            )
    return out


# ---- running and measuring ----------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu: float
    max_rss: int  # bytes
    server_cpu: float = 0.0
    minflt: int = 0  # minor page faults of the command (and its children)
    server_minflt: int = 0
    server_rss: int = 0  # server peak RSS during the command (bytes; pysrbup only)


#: A tiny process started before the data set is generated runs every measured
#: command: a child inherits its parent's peak RSS through fork and exec, so
#: forking the tools from this (large) process would inflate their ru_maxrss.
RUNNER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(job["cmd"], env=job["env"], cwd=job["cwd"], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    print(json.dumps([seconds, os.waitstatus_to_exitcode(status),
                      usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024,
                      usage.ru_minflt]), flush=True)
"""


class Runner:
    """Runs commands from a small helper process and reports wall, CPU and peak RSS."""

    def __init__(self, scratch: str):
        self.scratch = scratch
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, cmd: list[str], env: dict | None = None, cwd: str | None = None):
        """Runs ``cmd``; returns (Run, stdout, stderr). Raises on a non-zero exit."""
        subprocess.run(["sync"], check=False)
        out = os.path.join(self.scratch, "cmd.out")
        err = os.path.join(self.scratch, "cmd.err")
        job = {"cmd": cmd, "env": env or dict(os.environ), "cwd": cwd, "out": out, "err": err}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        seconds, code, cpu, rss, minflt = json.loads(self.proc.stdout.readline())
        with open(out, errors="replace") as handle:
            stdout = handle.read()
        with open(err, errors="replace") as handle:
            stderr = handle.read()
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{stdout}\n{stderr}")
        return Run(seconds, cpu, rss, minflt=minflt), stdout, stderr

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


RUN: Runner | None = None


def wait4_run(cmd: list[str], env: dict | None = None, cwd: str | None = None):
    assert RUN is not None
    return RUN.run(cmd, env, cwd)


def dir_size(path: str, skip_suffix: str | None = None) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            if skip_suffix and name.endswith(skip_suffix):
                continue
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def _proc_cpu(pid: int) -> float:
    fields = _proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_minflt(pid: int) -> int:
    return int(_proc_stat(pid)[7])


def _proc_memory(pid: int, field: str = "VmHWM") -> int:
    """Bytes of a memory figure of ``/proc/PID/status`` (VmHWM: peak RSS, VmRSS: now)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _proc_hwm(pid: int) -> int:
    return _proc_memory(pid)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Tool:
    name: str
    results: dict[str, Run] = field(default_factory=dict)
    repo_size: int = 0
    repo_total: int = 0  # with ECC parity (pysrbup), else the same as repo_size
    server_hwm: int = 0

    def setup(self) -> None: ...
    def backup(self, phase: str, data: str) -> Run: ...
    def restore(self, target: str) -> tuple[Run, str]: ...
    def close(self) -> None: ...


class Pysrbup(Tool):
    def __init__(self, name: str, checkout: str, work: str, threads: int, python: str):
        super().__init__(name)
        self.checkout = checkout
        self.work = os.path.join(work, name)
        self.threads = threads
        self.python = python
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = checkout
        # As installed (pip compiles bytecode on install): where the calling shell says
        # not to write bytecode, every run compiled its modules afresh, ~0.1 s per command.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYSRBUP_CACHE_DIR"] = os.path.join(self.work, "cache")
        # The client pins each fresh server's certificate here, not in ~/.config/pysrbup.
        self.env["PYSRBUP_CONFIG_DIR"] = os.path.join(self.work, "config")
        self.port = _free_port()
        self.server: subprocess.Popen | None = None
        self.last_id = ""

    @property
    def repo(self) -> str:
        return os.path.join(self.work, "repo")

    def _client(self, *args: str) -> list[str]:
        return [
            self.python,
            "-m",
            "pysrbup.cli.client",
            f"--server-address=127.0.0.1:{self.port}",
            f"--num-threads={self.threads}",
            *args,
        ]

    def setup(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        self.key = os.path.join(self.work, "key")
        subprocess.run(
            [self.python, "-m", "pysrbup.cli.client", "generate_key", self.key],
            env=self.env,
            cwd=self.checkout,
            check=True,
            capture_output=True,
        )
        log = open(os.path.join(self.work, "server.log"), "ab")  # noqa: SIM115
        self.server = subprocess.Popen(
            [
                self.python,
                "-m",
                "pysrbup.cli.server",
                f"--bind-to=127.0.0.1:{self.port}",
                f"--num-threads={self.threads}",
                self.repo,
            ],
            env=self.env,
            cwd=self.checkout,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: server did not start")

    def _measure(self, cmd: list[str]):
        pid = self.server.pid
        with open(f"/proc/{pid}/clear_refs", "w") as handle:  # reset VmHWM
            handle.write("5")
        before, faults = _proc_cpu(pid), _proc_minflt(pid)
        run, out, err = wait4_run(cmd, env=self.env, cwd=self.checkout)
        run.server_cpu = _proc_cpu(pid) - before
        run.server_minflt = _proc_minflt(pid) - faults
        run.server_rss = _proc_hwm(pid)
        self.server_hwm = max(self.server_hwm, run.server_rss)
        return run, out, err

    def backup(self, phase: str, data: str) -> Run:
        token = os.path.join(self.repo, "init-token")  # the first backup initialises
        if os.path.exists(token):
            with open(token) as handle:
                self.env["PYSRBUP_INIT_TOKEN"] = handle.read().strip()
        run, out, _ = self._measure(self._client("backup", data, self.key))
        self.last_id = out.strip().splitlines()[-1].split(": ", 1)[1]
        self.repo_size = dir_size(self.repo, skip_suffix=".ecc")  # data, without parity
        self.repo_total = dir_size(self.repo)
        return run

    def restore(self, target: str) -> tuple[Run, str]:
        run, _, _ = self._measure(self._client("restore", self.last_id, target, self.key))
        return run, target

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()


class Restic(Tool):
    def __init__(self, work: str):
        super().__init__("restic")
        self.work = os.path.join(work, "restic")
        self.env = dict(os.environ, RESTIC_PASSWORD=PASSWORD)
        self.env["RESTIC_REPOSITORY"] = os.path.join(self.work, "repo")
        self.env["RESTIC_CACHE_DIR"] = os.path.join(self.work, "cache")

    def setup(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        subprocess.run(["restic", "init"], env=self.env, check=True, capture_output=True)

    def backup(self, phase: str, data: str) -> Run:
        run, _, _ = wait4_run(["restic", "backup", "--quiet", data], env=self.env)
        self.repo_size = dir_size(self.env["RESTIC_REPOSITORY"])
        return run

    def restore(self, target: str) -> tuple[Run, str]:
        run, _, _ = wait4_run(["restic", "restore", "latest", "--target", target], env=self.env)
        return run, target


class Borg(Tool):
    def __init__(self, work: str):
        super().__init__("borg")
        self.work = os.path.join(work, "borg")
        self.repo = os.path.join(self.work, "repo")
        self.env = dict(os.environ, BORG_PASSPHRASE=PASSWORD)
        self.env["BORG_BASE_DIR"] = os.path.join(self.work, "base")
        self.env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
        self.count = 0

    def setup(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        subprocess.run(
            ["borg", "init", "--encryption=repokey-blake2", self.repo],
            env=self.env,
            check=True,
            capture_output=True,
        )

    def backup(self, phase: str, data: str) -> Run:
        self.count += 1
        self.archive = f"a{self.count}"
        run, _, _ = wait4_run(
            ["borg", "create", "--compression", "zstd,3", f"{self.repo}::{self.archive}", data],
            env=self.env,
        )
        self.repo_size = dir_size(self.repo)
        return run

    def restore(self, target: str) -> tuple[Run, str]:
        os.makedirs(target, exist_ok=True)
        run, _, _ = wait4_run(
            ["borg", "extract", f"{self.repo}::{self.archive}"], env=self.env, cwd=target
        )
        return run, target


def ensure_installed(tools: list[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    packages = {"restic": "restic", "borg": "borgbackup"}
    print(f"installing {', '.join(missing)} from apt", file=sys.stderr)
    subprocess.run(["apt-get", "update"], check=True, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", *(packages[t] for t in missing)],
        check=True,
        capture_output=True,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


# ---- the report ---------------------------------------------------------------


def _fmt_ratio(value: float, base: float | None) -> str:
    if not base:
        return ""
    return f" ({value / base:.2f}x)"


def table(tools: list[Tool], data_bytes: int) -> str:
    ref = next((t for t in tools if t.name == "restic"), None)
    header = "| metric | " + " | ".join(t.name for t in tools) + " |"
    lines = [header, "|" + "---|" * (len(tools) + 1)]

    def row(label: str, get, fmt) -> None:
        cells = []
        base = get(ref) if ref is not None else None
        for tool in tools:
            value = get(tool)
            cells.append(fmt(value) + (_fmt_ratio(value, base) if tool is not ref else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for phase in PHASES:
        row(f"{phase} (s)", lambda t, p=phase: t.results[p].seconds, lambda v: f"{v:.2f}")
    for phase in ("initial", "restore"):
        row(
            f"{phase} MB/s",
            lambda t, p=phase: data_bytes / t.results[p].seconds / MB,
            lambda v: f"{v:.0f}",
        )
    row("repository data (MB)", lambda t: t.repo_size / MB, lambda v: f"{v:.1f}")
    row(
        "repository with ECC parity (MB)",
        lambda t: (t.repo_total or t.repo_size) / MB,
        lambda v: f"{v:.1f}",
    )
    for phase in PHASES:
        row(
            f"{phase} client CPU (s)",
            lambda t, p=phase: t.results[p].cpu,
            lambda v: f"{v:.1f}",
        )
    row(
        "initial server CPU (s)",
        lambda t: t.results["initial"].server_cpu,
        lambda v: f"{v:.1f}" if v else "-",
    )
    row(
        "restore server CPU (s)",
        lambda t: t.results["restore"].server_cpu,
        lambda v: f"{v:.1f}" if v else "-",
    )
    row(
        "client peak RSS (MiB)",
        lambda t: max(r.max_rss for r in t.results.values()) / MiB,
        lambda v: f"{v:.0f}",
    )
    for phase in PHASES:
        row(
            f"{phase} client peak RSS (MiB)",
            lambda t, p=phase: t.results[p].max_rss / MiB,
            lambda v: f"{v:.0f}",
        )
    for phase in ("initial", "restore"):
        row(
            f"{phase} client minor faults (k)",
            lambda t, p=phase: t.results[p].minflt / 1000,
            lambda v: f"{v:.0f}",
        )
    row(
        "restore server minor faults (k)",
        lambda t: t.results["restore"].server_minflt / 1000,
        lambda v: f"{v:.0f}" if v else "-",
    )
    row(
        "restore server peak RSS (MiB)",
        lambda t: t.results["restore"].server_rss / MiB,
        lambda v: f"{v:.0f}" if v else "-",
    )
    lines.append(
        "| server peak RSS (MiB) | "
        + " | ".join(f"{t.server_hwm / MiB:.0f}" if t.server_hwm else "-" for t in tools)
        + " |"
    )
    return "\n".join(lines)


def make_tools(args, wanted: list[str], work: str, python: str) -> list[Tool]:
    tools: list[Tool] = []
    for item in args.pysrbup:
        name, _, path = item.partition("=")
        tools.append(Pysrbup(name, os.path.abspath(path), work, args.threads, python))
    if "pysrbup" in wanted:
        tools.append(Pysrbup("pysrbup", ROOT, work, args.threads, python))
    if "restic" in wanted:
        tools.append(Restic(work))
    if "borg" in wanted:
        tools.append(Borg(work))
    return tools


def _log(phase: str, tool: Tool) -> None:
    print(f"{phase:10} {tool.name:14} {tool.results[phase].seconds:7.2f} s", file=sys.stderr)


def make_data(data: str, kind: str, size_mb: int, files: int) -> dict:
    """Writes the data set: ``synthetic`` (``generate``) or ``real`` (system directories)."""
    if kind == "real":
        from real_tree import copy_real_tree  # beside this file

        copied = copy_real_tree(data, files)
        return {
            "bytes": copied["bytes"],
            "small_files": copied["entries"],
            "sources": copied["sources"],
        }
    return generate(data, size_mb)


def _flush() -> None:
    """Writes dirty pages back before a backup (the data stays cached).

    Without this, the first tool's initial backup ran while the kernel was
    still writing the freshly generated data set to disk, and paid for it
    (seen here: 18.8 s for a backup that took 14-15 s after a sync).
    """
    subprocess.run(["sync"], check=False)


def _settle() -> None:
    """Flushes and drops the page cache (as root) before a restore.

    Restores run one after another on one disk: without this, each was
    slowed by what the one before wrote and read back (seen here: the third
    restore of a real tree at 3x the CPU of the first, whichever tool it was).
    """
    _flush()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")
    time.sleep(1)


def fresh_fs_available() -> bool:
    """Whether restores can go to a new ext4 on a loop device (root, losetup, mkfs.ext4)."""
    return (
        os.geteuid() == 0
        and shutil.which("losetup") is not None
        and shutil.which("mkfs.ext4") is not None
        and os.path.exists("/dev/loop-control")
    )


@contextlib.contextmanager
def fresh_fs(target: str, size_bytes: int):
    """Mounts a new ext4 at ``target`` for one restore, and removes it after.

    Restores into the scratch directory's file system were slowed by what
    was deleted there before: ext4's inode allocator checks every candidate
    inode for a recent deletion, and after ``rm -rf`` of a 127k-file tree
    that doubled a restore's system time, growing run after run (perf:
    ``find_inode_bit`` -> ``recently_deleted``), so whichever tool restored
    second paid for the first. A new file system per restore gives every
    tool the same empty disk. The image is sparse, on the scratch disk, and
    attached with direct I/O so its pages are not cached twice.
    """
    image = target + ".img"
    os.makedirs(target, exist_ok=True)
    with contextlib.ExitStack() as undo:  # unwinds whatever step was reached, last first
        with open(image, "wb") as handle:
            handle.truncate(size_bytes)
        undo.callback(os.unlink, image)
        lazy = "lazy_itable_init=0,lazy_journal_init=0"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", lazy, image], check=True, capture_output=True
        )
        attach = ["losetup", "--find", "--show", "--direct-io=on", image]
        device = subprocess.run(attach, check=True, capture_output=True, text=True).stdout.strip()
        undo.callback(subprocess.run, ["losetup", "-d", device], capture_output=True)
        subprocess.run(["mount", device, target], check=True, capture_output=True)
        undo.callback(subprocess.run, ["umount", target], capture_output=True)
        yield target


def _restore_fs_size(digest: dict[str, tuple]) -> int:
    """Room for one restored copy of a tree (its ``tree_digest``): its bytes twice,
    plus inodes and journal."""
    used = sum(entry[1] for entry in digest.values() if entry[0] == "file")
    return 2 * used + 4096 * 4 * len(digest) + 512 * MiB


def one_round(
    tools: list[Tool],
    work: str,
    size_mb: int,
    kind: str = "synthetic",
    files: int = 100_000,
    cold: bool = False,
    restore_fs: str = "dir",
) -> tuple[dict, dict]:
    """Fresh data and repositories; every phase for every tool, interleaved.

    ``cold``: the page cache is dropped before every backup too (as a backup of
    files nobody read lately finds it), not only before restores.
    ``restore_fs``: "ext4" restores each tool into a new file system of its
    own (``fresh_fs``); "dir" into a directory of the scratch file system.
    """
    before_backup = _settle if cold else _flush
    data = os.path.join(work, "data")
    t0 = time.perf_counter()
    described = make_data(data, kind, size_mb, files)
    print(f"generated {described} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if kind == "real":  # the mutation scales with the size of the tree
        size_mb = max(1, described["bytes"] // MB)
    try:
        for tool in tools:
            tool.setup()
        for phase in ("initial", "unchanged"):
            for tool in tools:
                before_backup()
                tool.results[phase] = tool.backup(phase, data)
                _log(phase, tool)
        mutated = mutate(data, size_mb)
        print(f"mutated: {mutated}", file=sys.stderr)
        for tool in tools:
            before_backup()
            tool.results["mutated"] = tool.backup("mutated", data)
            _log("mutated", tool)
        expected = tree_digest(data)
        fs_size = _restore_fs_size(expected) if restore_fs == "ext4" else 0
        for tool in tools:
            target = os.path.join(work, "restore-" + tool.name)
            with fresh_fs(target, fs_size) if fs_size else contextlib.nullcontext():
                _settle()
                run, where = tool.restore(target)
                tool.results["restore"] = run
                _log("restore", tool)
                restored = os.path.join(where, os.path.relpath(data, "/"))
                if isinstance(tool, Pysrbup):
                    restored = os.path.join(where, "data")
                if tree_digest(restored) != expected:
                    raise RuntimeError(f"{tool.name}: the restored tree differs from the source")
            shutil.rmtree(target)
    finally:
        for tool in tools:
            tool.close()
    return described, mutated


def combine(rounds: list[list[Tool]]) -> list[Tool]:
    """Per tool and metric, the median over rounds."""
    if len(rounds) == 1:
        return rounds[0]
    combined = []
    for column in zip(*rounds, strict=True):
        tool = Tool(column[0].name)
        for phase in PHASES:
            runs = [t.results[phase] for t in column]
            tool.results[phase] = Run(
                statistics.median(r.seconds for r in runs),
                statistics.median(r.cpu for r in runs),
                max(r.max_rss for r in runs),
                statistics.median(r.server_cpu for r in runs),
                int(statistics.median(r.minflt for r in runs)),
                int(statistics.median(r.server_minflt for r in runs)),
                max(r.server_rss for r in runs),
            )
        tool.repo_size = int(statistics.median(t.repo_size for t in column))
        tool.repo_total = int(statistics.median(t.repo_total for t in column))
        tool.server_hwm = max(t.server_hwm for t in column)
        combined.append(tool)
    return combined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=976, help="data set size in MB (default 976)")
    parser.add_argument(
        "--data",
        choices=("synthetic", "real"),
        default="synthetic",
        help="synthetic: the generated mixed set (--size); real: copies of system "
        "directories (bench/real_tree.py, --files entries)",
    )
    parser.add_argument(
        "--files",
        type=int,
        default=100_000,
        help="entries in the real-tree data set (default 100,000)",
    )
    parser.add_argument("--work", default="/tmp/pysrbup-compare", help="scratch directory")
    parser.add_argument("--threads", type=int, default=2, help="pysrbup --num-threads")
    parser.add_argument(
        "--tools", default="pysrbup,restic,borg", help="comma-separated: pysrbup, restic, borg"
    )
    parser.add_argument(
        "--pysrbup",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an extra pysrbup checkout to compare (e.g. a baseline worktree)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat everything; report medians (default 1)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before every backup too (the data is read from disk)",
    )
    parser.add_argument(
        "--restore-fs",
        choices=("auto", "ext4", "dir"),
        default="auto",
        help="ext4: every restore goes to a new ext4 on a loop device (needs root); "
        "dir: to a directory of the scratch disk; auto (default): ext4 where possible",
    )
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    if args.restore_fs == "auto":
        args.restore_fs = "ext4" if fresh_fs_available() else "dir"
    elif args.restore_fs == "ext4" and not fresh_fs_available():
        parser.error("--restore-fs ext4 needs root, losetup, mkfs.ext4 and /dev/loop-control")

    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    ensure_installed([t for t in wanted if t in ("restic", "borg")])
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    global RUN
    RUN = Runner(args.work)
    python = sys.executable

    rounds: list[list[Tool]] = []
    try:
        for number in range(args.rounds):
            work = os.path.join(args.work, f"round{number}")
            tools = make_tools(args, wanted, work, python)
            # Each round another tool goes first in every phase: whatever the first
            # run after a new data set pays (seen here: pysrbup's first-round initial
            # backup 15.1 s against 8.3-9.9 s later, restic's 12.5-14.2 s) is not
            # always charged to the same tool.
            shift = number % len(tools)
            described, mutated = one_round(
                tools[shift:] + tools[:shift],
                work,
                args.size,
                args.data,
                args.files,
                cold=args.cold,
                restore_fs=args.restore_fs,
            )
            data_bytes = sum(os.path.getsize(f) for f in _all_files(os.path.join(work, "data")))
            rounds.append(tools)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        RUN.close()
    tools = combine(rounds)
    versions = {
        "restic": _version(["restic", "version"]),
        "borg": _version(["borg", "--version"]),
    }
    print()
    print(
        f"Data set ({args.data}): {data_bytes / MB:.0f} MB "
        + (
            f"({described['small_files']} entries: {', '.join(described['sources'])}), "
            if args.data == "real"
            else f"({described['small_files']} small files), "
        )
        + f"mutation: {mutated}; {os.cpu_count()} CPUs; --num-threads={args.threads}; "
        + ("page cache dropped before every backup; " if args.cold else "")
        + (
            "each restore into a new ext4 on a loop device; "
            if args.restore_fs == "ext4"
            else "restores into the scratch file system; "
        )
        + ", ".join(f"{k}: {v}" for k, v in versions.items() if k in wanted)
    )
    print(
        "All restores verified identical to the source. Ratios are against restic"
        + (f"; medians of {args.rounds} rounds." if args.rounds > 1 else ".")
        + "\n"
    )
    print(table(tools, data_bytes))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "size_mb": args.size,
                    "data_bytes": data_bytes,
                    "tools": {
                        t.name: {
                            "repo_size": t.repo_size,
                            "repo_total": t.repo_total,
                            "server_hwm": t.server_hwm,
                            **{p: vars(r) for p, r in t.results.items()},
                        }
                        for t in tools
                    },
                },
                handle,
                indent=2,
            )
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
