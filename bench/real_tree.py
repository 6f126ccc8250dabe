"""A data set of real files nobody here wrote: copies of system directories.

``copy_real_tree(dest, min_files)`` copies, in this order and until at least
``min_files`` entries are there, ``/usr/share``, ``/usr/include``, this
Python's standard library and site-packages, and the other Python installs
under ``/usr/lib`` and ``/usr/local/lib`` (each one again under a new name
when the machine has too few, as duplicated installs are common on real
machines). Sockets, devices and FIFOs are skipped; unreadable files too.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig

MiB = 1024 * 1024
SOURCES = [
    "/usr/share",
    "/usr/include",
    sysconfig.get_paths()["stdlib"],
    sysconfig.get_paths()["purelib"],
    *sorted(
        os.path.join(base, name)
        for base in ("/usr/lib", "/usr/local/lib")
        if os.path.isdir(base)
        for name in os.listdir(base)
        if name.startswith("python3")
    ),
]


def _ignore(directory: str, names: list[str]) -> list[str]:
    skipped = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            skipped.append(name)
            continue
        regular = os.path.isfile(path) and not os.path.islink(path)
        kind_ok = os.path.isdir(path) or os.path.islink(path) or regular
        if not kind_ok or (regular and not os.access(path, os.R_OK)) or st.st_size > 256 * MiB:
            skipped.append(name)
    return skipped


def count_entries(root: str) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


def copy_real_tree(dest: str, min_files: int = 100_000) -> dict:
    """Copies real directories into ``dest`` until it holds ``min_files`` entries.

    Returns what was copied: the sources, entries and bytes.
    """
    os.makedirs(dest, exist_ok=True)
    copied: list[str] = []
    entries = 0
    round_number = 0
    while entries < min_files and round_number < 20:
        for source in dict.fromkeys(SOURCES):
            if entries >= min_files:
                break
            if not os.path.isdir(source):
                continue
            name = source.strip("/").replace("/", "_")
            name += f".{round_number}" if round_number else ""
            target = os.path.join(dest, name)
            shutil.copytree(source, target, symlinks=True, ignore=_ignore, dirs_exist_ok=True)
            copied.append(source)
            entries = count_entries(dest)
        round_number += 1
    total = 0
    for dirpath, _, files in os.walk(dest):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.lstat(path).st_size
    return {"sources": copied, "entries": entries, "bytes": total}


if __name__ == "__main__":
    print(copy_real_tree(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100_000))
