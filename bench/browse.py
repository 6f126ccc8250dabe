#!/usr/bin/env python3
"""Getting one file back, measured against restic on the same data in one run.

Two data sets, each backed up by pysrbup (server on loopback) and restic
(local repository):

A. ``--files`` files (default 10,000) of random data, ``--size-mb`` in all
   (default 1024), among them one 1 MiB file. Figures: a full restore
   against restoring only that file (``restore --include``): wall time, and
   for pysrbup the bytes fetched (``restore --json``'s ``bytes_fetched``).

B. A real tree of at least ``--real-files`` entries (default 100,000;
   copies of ``/usr/share``, ``/usr/include`` and Python installs, see
   ``real_tree.py``) plus one 200 MiB random file. Figures: ``ls`` of the
   whole backup and ``find`` of a name pattern (wall time, client peak RSS);
   the mount (``pysrbup-client mount`` and ``restic mount``): time from start
   to the first byte of a deep file, sequential read of the 200 MiB file in
   MB/s against ``dump`` of it, and the mount process's peak RSS after
   ``ls -R`` of the whole backup.

Commands run from a small runner process (``compare.Runner``) so that peak
RSS is the command's own. restic is installed from apt when missing.

    .venv/bin/python bench/browse.py --work /tmp/browse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import compare
import numpy as np
from real_tree import copy_real_tree

MiB = 1024 * 1024


def generate_files(root: str, files: int, size_mb: int, seed: int = 3) -> str:
    """``files`` random files in 100 directories; returns the 1 MiB one's relative path."""
    rng = np.random.default_rng(seed)
    total = size_mb * MiB
    sizes = rng.integers(1, 2 * total // files, size=files - 1)
    sizes = (sizes * ((total - MiB) / sizes.sum())).astype(int) + 1
    for i, size in enumerate(sizes):
        path = os.path.join(root, f"d{i % 100:02d}", f"f{i:05d}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(rng.bytes(int(size)))
    target = os.path.join("d42", "one-mib.bin")
    with open(os.path.join(root, target), "wb") as handle:
        handle.write(rng.bytes(MiB))
    return target


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"mount exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.005)


def _unmount(path: str, proc: subprocess.Popen) -> None:
    subprocess.run(["fusermount3", "-u", path], capture_output=True)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _read_all(path: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(MiB):
            total += len(chunk)
    return time.perf_counter() - t0, total


def measure_mount(cmd, env, mountpoint, first_file, big_file, listed_dir) -> dict:
    """Start-to-first-byte, sequential MB/s, and peak RSS after ``ls -R`` of one mount."""
    os.makedirs(mountpoint, exist_ok=True)
    subprocess.run(["sync"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(first_file, proc)
        with open(first_file, "rb") as handle:
            handle.read(1)
        first_byte = time.perf_counter() - t0
        seconds, size = _read_all(big_file)
        t1 = time.perf_counter()
        subprocess.run(["ls", "-lR", listed_dir], stdout=subprocess.DEVNULL, check=True)
        ls_seconds = time.perf_counter() - t1
        return {
            "first_byte_s": first_byte,
            "read_mb_s": size / seconds / 1e6,
            "ls_lR_s": ls_seconds,
            "rss_after_ls": compare._proc_memory(proc.pid, "VmRSS"),
            "peak_rss": compare._proc_memory(proc.pid),
        }
    finally:
        _unmount(mountpoint, proc)


def _row(label: str, ours: float, theirs: float | None, unit: str, fmt: str = "{:.2f}") -> str:
    ratio = f"{ours / theirs:.2f}x" if theirs else "n/a"
    shown = fmt.format(theirs) if theirs is not None else "n/a"
    return f"| {label} | {fmt.format(ours)} {unit} | {shown} {unit} | {ratio} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/pysrbup-browse", help="scratch directory")
    parser.add_argument("--files", type=int, default=10_000, help="files of data set A")
    parser.add_argument("--size-mb", type=int, default=1024, help="MiB of data set A")
    parser.add_argument("--real-files", type=int, default=100_000, help="entries of data set B")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)

    compare.ensure_installed(["restic"])
    if os.path.exists(args.work):
        shutil.rmtree(args.work)
    os.makedirs(args.work)
    compare.RUN = compare.Runner(args.work)
    figures: dict = {}
    try:
        figures["A"] = data_set_a(args)
        figures["B"] = data_set_b(args)
    finally:
        compare.RUN.close()
    print(report(figures, args))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


def _tools(work: str):
    ours = compare.Pysrbup("pysrbup", compare.ROOT, work, 2, sys.executable)
    restic = compare.Restic(work)
    ours.setup()
    restic.setup()
    return ours, restic


def data_set_a(args) -> dict:
    work = os.path.join(args.work, "A")
    data = os.path.join(work, "data")
    os.makedirs(data)
    target = generate_files(data, args.files, args.size_mb)
    ours, restic = _tools(work)
    out: dict = {"files": args.files + 1, "bytes": compare.dir_size(data)}
    try:
        out["backup"] = {"pysrbup": ours.backup("initial", data).seconds}
        out["backup"]["restic"] = restic.backup("initial", data).seconds
        full, stdout, _ = ours._measure(
            ours._client("--json", "restore", ours.last_id, os.path.join(work, "r1"), ours.key)
        )
        full_fetched = json.loads(stdout)["bytes_fetched"]
        pattern = f"/data/{target}"  # anchored: only the trees on its way
        restore_one = ["--json", "restore", ours.last_id, os.path.join(work, "r2"), ours.key]
        one, stdout, _ = ours._measure(ours._client(*restore_one, "--include", pattern))
        one_fetched = json.loads(stdout)["bytes_fetched"]
        with (
            open(os.path.join(work, "r2", pattern.lstrip("/")), "rb") as a,
            open(os.path.join(data, target), "rb") as b,
        ):
            assert a.read() == b.read(), "the restored file differs"
        r_full, _ = restic.restore(os.path.join(work, "s1"))
        restic_one = ["restic", "restore", "latest", "--target", os.path.join(work, "s2")]
        r_one, _, _ = compare.wait4_run(
            [*restic_one, "--include", os.path.join(data, target)], env=restic.env
        )
        out["restore_full_s"] = {"pysrbup": full.seconds, "restic": r_full.seconds}
        out["restore_one_s"] = {"pysrbup": one.seconds, "restic": r_one.seconds}
        out["fetched"] = {"full": full_fetched, "one": one_fetched}
    finally:
        ours.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def data_set_b(args) -> dict:
    work = os.path.join(args.work, "B")
    data = os.path.join(work, "data")
    copied = copy_real_tree(os.path.join(data, "real"), args.real_files)
    big = os.path.join(data, "big.bin")
    with open(big, "wb") as handle:
        rng = np.random.default_rng(5)
        for _ in range(200):
            handle.write(rng.bytes(MiB))
    deep = max(
        (os.path.join(d, f) for d, _, files in os.walk(data) for f in files),
        key=lambda p: (p.count("/"), p),
    )
    ours, restic = _tools(work)
    out: dict = {"entries": copied["entries"] + 1, "bytes": copied["bytes"] + 200 * MiB}
    try:
        out["backup"] = {"pysrbup": ours.backup("initial", data).seconds}
        out["backup"]["restic"] = restic.backup("initial", data).seconds
        key = ["--key-file", ours.key]
        runs = {
            "ls": (
                ours._client("ls", ours.last_id, "--recursive", *key),
                ["restic", "ls", "latest"],
            ),
            "find": (
                ours._client("find", "*.h", *key),
                ["restic", "find", "*.h"],
            ),
            "dump": (
                ours._client("dump", ours.last_id, "big.bin", *key),
                ["restic", "dump", "latest", big],
            ),
        }
        for name, (mine, theirs) in runs.items():
            a, _, _ = ours._measure(mine)
            b, _, _ = compare.wait4_run(theirs, env=restic.env)
            out[name] = {
                "pysrbup": {"s": a.seconds, "rss": a.max_rss},
                "restic": {"s": b.seconds, "rss": b.max_rss},
            }
        rel_deep = os.path.relpath(deep, data)
        mnt = os.path.join(work, "mnt-pysrbup")
        ids = os.path.join(mnt, "ids", ours.last_id)
        out["mount"] = {
            "pysrbup": measure_mount(
                ours._client("mount", mnt, *key),
                ours.env,
                mnt,
                os.path.join(ids, rel_deep),
                os.path.join(ids, "big.bin"),
                ids,
            )
        }
        mnt = os.path.join(work, "mnt-restic")
        latest = os.path.join(mnt, "snapshots", "latest") + data
        try:
            out["mount"]["restic"] = measure_mount(
                ["restic", "mount", mnt],
                restic.env,
                mnt,
                latest + "/" + rel_deep,
                latest + "/big.bin",
                latest,
            )
        except (RuntimeError, OSError) as exc:
            out["mount"]["restic"] = {"error": str(exc)[:200]}
    finally:
        ours.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def report(f: dict, args) -> str:
    a, b = f["A"], f["B"]
    lines = [
        f"Data set A: {a['files']} random files, {a['bytes'] / MiB:.0f} MiB. "
        f"Data set B: {b['entries']} entries of real files plus a 200 MiB file, "
        f"{b['bytes'] / MiB:.0f} MiB. {os.cpu_count()} CPUs; restic: "
        + compare._version(["restic", "version"]),
        "",
        "| | pysrbup | restic | pysrbup / restic |",
        "|---|---|---|---|",
    ]
    lines.append(_row("A: initial backup", a["backup"]["pysrbup"], a["backup"]["restic"], "s"))
    lines.append(_row("A: full restore", *a["restore_full_s"].values(), "s"))
    lines.append(_row("A: restore one 1 MiB file", *a["restore_one_s"].values(), "s"))
    lines.append(_row("B: initial backup", b["backup"]["pysrbup"], b["backup"]["restic"], "s"))
    for name in ("ls", "find", "dump"):
        mine, theirs = b[name]["pysrbup"], b[name]["restic"]
        lines.append(_row(f"B: {name} wall", mine["s"], theirs["s"], "s"))
        rss = (mine["rss"] / MiB, theirs["rss"] / MiB)
        lines.append(_row(f"B: {name} client peak RSS", *rss, "MiB", "{:.0f}"))
    mine, theirs = b["mount"]["pysrbup"], b["mount"].get("restic", {})
    for key, label, unit, fmt in (
        ("first_byte_s", "B: mount, start to first byte", "s", "{:.2f}"),
        ("read_mb_s", "B: mount, sequential read of 200 MiB", "MB/s", "{:.0f}"),
        ("ls_lR_s", "B: mount, ls -lR of the backup", "s", "{:.1f}"),
    ):
        lines.append(_row(label, mine[key], theirs.get(key), unit, fmt))
    for key, label in (("rss_after_ls", "RSS after ls -lR"), ("peak_rss", "peak RSS, all steps")):
        theirs_mib = theirs[key] / MiB if key in theirs else None
        lines.append(_row(f"B: mount, {label}", mine[key] / MiB, theirs_mib, "MiB", "{:.0f}"))
    dump_mb_s = 200 * MiB / b["dump"]["pysrbup"]["s"] / 1e6
    one = a["restore_one_s"]["pysrbup"] / a["restore_full_s"]["pysrbup"]
    lines += [
        "",
        f"A, pysrbup: restoring one 1 MiB file fetched {a['fetched']['one']:,} bytes, "
        f"{100 * a['fetched']['one'] / a['fetched']['full']:.3f}% of a full restore's "
        f"{a['fetched']['full']:,}, in {100 * one:.1f}% of its time.",
        f"B, pysrbup: mount reads the 200 MiB file at {mine['read_mb_s'] / dump_mb_s:.2f}x the "
        f"speed of dump ({dump_mb_s:.0f} MB/s, process start included).",
    ]
    if "error" in theirs:
        lines.append(f"restic mount failed here: {theirs['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
