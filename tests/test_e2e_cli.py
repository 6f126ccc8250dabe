"""End to end: the seed's command lines against a real server on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from helpers import assert_no_traceback, backup_id_in
from trees import dir_size, make_full_tree, random_bytes, snapshot_tree


def test_roundtrip_every_file_kind(tmp_path, client, key_file):
    src = str(tmp_path / "src")
    make_full_tree(src)
    proc = client.run("backup", src, key_file, check=True)
    assert "skipping" not in proc.stderr
    backup_id = backup_id_in(proc.stdout)
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    restored = str(tmp_path / "out" / "src")
    assert snapshot_tree(restored, skip_special=False) == snapshot_tree(src, skip_special=False)
    assert stat.S_ISFIFO(os.lstat(os.path.join(restored, "fifo")).st_mode)
    src_st, out_st = os.stat(src), os.stat(restored)
    assert stat.S_IMODE(src_st.st_mode) == stat.S_IMODE(out_st.st_mode)
    assert src_st.st_mtime_ns == out_st.st_mtime_ns


def test_json_output_and_list(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n" * 1000)
    proc = client.run("--json", "backup", str(src), key_file, check=True)
    report = json.loads(proc.stdout)
    assert report["files"] == 1
    assert report["bytes_read"] == 6000
    assert report["bytes_new"] >= 6000
    assert 0 < report["bytes_sent"] < 6000  # compressed
    assert set(report) >= {
        "backup_id",
        "files",
        "bytes_read",
        "bytes_new",
        "bytes_sent",
        "duration",
    }
    listing = json.loads(client.run("--json", "list", check=True).stdout)
    assert [b["id"] for b in listing["backups"]] == [report["backup_id"]]
    assert listing["backups"][0]["time"].endswith("Z")
    detailed = client.run("list", "--key-file", key_file, check=True).stdout
    assert report["backup_id"] in detailed and str(src) in detailed and "1 files" in detailed


def test_dedup_across_backups_stores_once(tmp_path, client, key_file, server):
    src = tmp_path / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(random_bytes(6 * 1024 * 1024, 5))
    first = json.loads(client.run("--json", "backup", str(src), key_file, check=True).stdout)
    server.settled()
    size_after_first = dir_size(server.repo)
    (src / "copy.bin").write_bytes((src / "data.bin").read_bytes())
    second = json.loads(client.run("--json", "backup", str(src), key_file, check=True).stdout)
    assert first["bytes_new"] >= 6 * 1024 * 1024
    assert second["bytes_read"] == 12 * 1024 * 1024
    assert second["bytes_new"] < 64 * 1024  # only the changed directory tree
    server.settled()
    assert dir_size(server.repo) - size_after_first < 256 * 1024
    for backup_id in (first["backup_id"], second["backup_id"]):
        out = tmp_path / f"out-{backup_id}"
        client.run("restore", backup_id, str(out), key_file, check=True)
        assert (out / "src" / "data.bin").read_bytes() == (src / "data.bin").read_bytes()


def test_two_clients_at_once(tmp_path, client, key_file):
    shared = random_bytes(3 * 1024 * 1024, 9)
    sources = []
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / "shared.bin").write_bytes(shared)
        (src / "own.bin").write_bytes(random_bytes(4 * 1024 * 1024, 100 + i))
        sources.append(src)
    procs = [client.spawn("backup", str(src), key_file) for src in sources]
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        ids.append(backup_id_in(out))
    for src, backup_id in zip(sources, ids, strict=False):
        out = tmp_path / f"restore-{backup_id}"
        client.run("restore", backup_id, str(out), key_file, check=True)
        assert snapshot_tree(str(out / src.name)) == snapshot_tree(str(src))


def test_server_never_sees_plaintext(tmp_path, client, key_file, server):
    src = tmp_path / "secret_folder_name"
    src.mkdir()
    marker = "TOP-SECRET-CONTENT-MARKER"
    (src / "very_private_file_name.txt").write_text((marker + "\n") * 5000)
    client.backup(str(src), key_file)
    needles = [marker.encode(), b"very_private_file_name", b"secret_folder_name"]
    for root, _, files in os.walk(server.repo):
        for name in files:
            assert not any(n.decode() in name for n in needles)
            with open(os.path.join(root, name), "rb") as handle:
                blob = handle.read()
            for needle in needles:
                assert needle not in blob, f"{needle!r} found in {name}"


def test_wrong_key_is_refused(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    backup_id = client.backup(str(src), key_file)
    other = str(tmp_path / "other.key")
    client.run("generate_key", other, check=True)
    for args in (
        ("restore", backup_id, str(tmp_path / "out"), other),
        ("backup", str(src), other),
        ("delete", backup_id, other),
    ):
        proc = client.run(*args)
        assert proc.returncode == 1, proc.stderr
        assert "key does not belong to this repository" in proc.stderr
        assert_no_traceback(proc)
    assert backup_id in client.run("list", check=True).stdout


def test_unknown_backup_id(tmp_path, client, key_file):
    proc = client.run("restore", "0123456789abcdef", str(tmp_path / "out"), key_file)
    assert proc.returncode == 1
    assert "no backup with id 0123456789abcdef" in proc.stderr
    assert_no_traceback(proc)
    proc = client.run("delete", "feedface", key_file)
    assert proc.returncode == 1 and "no backup with id feedface" in proc.stderr


def test_key_file_errors(tmp_path, client):
    src = tmp_path / "src"
    src.mkdir()
    missing = client.run("backup", str(src), str(tmp_path / "nope.key"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    malformed = client.run("backup", str(src), str(bad))
    assert malformed.returncode == 1 and "not a valid pysrbup key file" in malformed.stderr
    nokey = client.run("backup", str(src))
    assert nokey.returncode == 2 and "no key file given" in nokey.stderr
    for proc in (missing, malformed, nokey):
        assert_no_traceback(proc)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PYSRBUP_TIMEOUT", "2m"),
        ("PYSRBUP_CONNECT_TIMEOUT", "-1"),
        ("PYSRBUP_RETRY_SECONDS", "nan"),
    ],
)
def test_malformed_numeric_settings_are_usage_errors(client, name, value):
    proc = client.run("list", env={**client.env, name: value})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name} must be a number of seconds" in lines[0], proc.stderr
    assert repr(value) in lines[0]
    assert_no_traceback(proc)


def test_zero_retry_seconds_is_accepted(client):
    proc = client.run("list", env={**client.env, "PYSRBUP_RETRY_SECONDS": "0"})
    assert proc.returncode == 0, proc.stderr


def test_generate_key(tmp_path, client):
    path = str(tmp_path / "k")
    client.run("generate_key", path, check=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as handle:
        before = handle.read()
    again = client.run("generate_key", path)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    with open(path) as handle:
        assert handle.read() == before
    printed = client.run("generate_key", check=True).stdout
    assert json.loads(printed)["format"] == "pysrbup-key"


def test_unreachable_server(tmp_path, key_file, cache_dir):
    from helpers import Client, base_env, free_port

    # Three seconds of trying instead of ten: the variable is honoured, and the test is short.
    dead = Client(
        f"127.0.0.1:{free_port()}", {**base_env(cache_dir), "PYSRBUP_CONNECT_TIMEOUT": "3"}
    )
    src = tmp_path / "src"
    src.mkdir()
    for args in (("list",), ("backup", str(src), key_file)):
        started = time.monotonic()
        proc = dead.run(*args, timeout=60)
        assert time.monotonic() - started < 9  # gave up after 3 s, not the default 10
        assert proc.returncode == 1
        assert "cannot reach the server" in proc.stderr
        assert_no_traceback(proc)


def test_pinned_server_gone_is_one_line(tmp_path, server, cache_dir, key_file):
    """The server whose certificate is kept in known_servers is down: the channel is tried
    straight away (no handshake of the client's own first), and gives up in one line."""
    client = server.client(cache_dir)
    src = tmp_path / "src"
    src.mkdir()
    client.backup(str(src), key_file)  # pins the certificate
    server.stop()
    client.env = {**client.env, "PYSRBUP_CONNECT_TIMEOUT": "3"}
    for args in (("list",), ("backup", str(src), key_file)):
        proc = client.run(*args, timeout=60)
        assert proc.returncode == 1
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines == [
            f"pysrbup-client: error: cannot reach the server at {server.address} "
            "(is pysrbup-server running?)"
        ], proc.stderr


def test_restore_refuses_existing_target_unless_forced(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("original")
    backup_id = client.backup(str(src), key_file)
    out = tmp_path / "out"
    (out / "src").mkdir(parents=True)
    (out / "src" / "f.txt").write_text("precious local edit")
    proc = client.run("restore", backup_id, str(out), key_file)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert (out / "src" / "f.txt").read_text() == "precious local edit"
    client.run("restore", "--force", backup_id, str(out), key_file, check=True)
    assert (out / "src" / "f.txt").read_text() == "original"


def test_delete_removes_from_list(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    first = client.backup(str(src), key_file)
    second = client.backup(str(src), key_file)
    proc = client.run("delete", first, key_file, check=True)
    assert f"Deleted backup {first}" in proc.stdout
    listing = client.run("list", check=True).stdout
    assert first not in listing and second in listing
    proc = client.run("restore", second, str(tmp_path / "out"), key_file, check=True)


def test_environment_variables(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("env")
    env = dict(client.env, PYSRBUP_SERVER=client.address, PYSRBUP_KEY_FILE=key_file)
    proc = subprocess.run(
        [sys.executable, "-m", "pysrbup.cli.client", "backup", str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("Completed backup id: ")


def test_version_names_kernels(client):
    proc = client.run("--version", check=True)
    assert "pysrbup-client 0.1.0" in proc.stdout and "chunker=" in proc.stdout
