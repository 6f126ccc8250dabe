"""Prometheus metrics (``--metrics-address``): real servers, real backups, real scrapes."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request

import pytest
from helpers import ServerProcess, base_env, free_port, server_cli
from prometheus_client.parser import text_string_to_metric_families
from trees import random_bytes, snapshot_tree

from pysrbup.repo import wire
from pysrbup.server import ecc, packs

LATENCY = "pysrbup_rpc_duration_seconds_count"


@pytest.fixture
def metered(tmp_path, cache_dir):
    """A server whose metrics listen on a bare port (so on 127.0.0.1); yields it and the port."""
    port = free_port()
    srv = ServerProcess(
        repo=str(tmp_path / "repo"),
        port=free_port(),
        env=base_env(cache_dir),
        log_path=str(tmp_path / "server.log"),
        extra=(f"--metrics-address={port}",),
    )
    srv.start()
    yield srv, port
    srv.stop()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics``, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(port: int, condition, timeout: float = 30) -> dict:
    """Scrapes until ``condition(samples)`` holds (stats are cached, parity comes later)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never got there: {samples}")
        time.sleep(0.2)


def calls(samples: dict, method: str, code: str = "OK") -> float:
    return value(samples, LATENCY, method=method, code=code)


def _write_files(folder, count: int, size: int, seed: int) -> None:
    folder.mkdir(exist_ok=True)
    for i in range(count):
        (folder / f"f{seed}-{i}.bin").write_bytes(random_bytes(size, seed + i))


def _repository_stats(client, key_file) -> dict:
    proc = client.run("--json", "stats", "--key-file", key_file, check=True)
    return json.loads(proc.stdout)["repository"]


def test_figures_follow_backups_and_restores(tmp_path, metered, cache_dir, key_file):
    server, port = metered
    assert f"metrics on http://127.0.0.1:{port}/metrics" in server.log()
    client = server.client(cache_dir)
    start = scrape(port)
    assert value(start, "pysrbup_objects") == 0 and value(start, "pysrbup_snapshots") == 0
    assert value(start, "process_cpu_seconds_total") > 0  # the server's own CPU time

    src = tmp_path / "src"
    _write_files(src, 2, 1_500_000, 10)
    client.backup(str(src), key_file)
    repo = _repository_stats(client, key_file)
    first = wait_for(port, lambda m: value(m, "pysrbup_objects") == repo["objects"] > 0)
    assert value(first, "pysrbup_object_bytes") == repo["stored_bytes"] > 3_000_000
    assert value(first, "pysrbup_packs") == repo["packs"] >= 1
    assert value(first, "pysrbup_pack_bytes") == repo["pack_bytes"]
    assert value(first, "pysrbup_objects_added_total") == repo["objects"]
    assert value(first, "pysrbup_object_bytes_added_total") == repo["stored_bytes"]
    # Frames carry every envelope plus record headers.
    assert value(first, "pysrbup_upload_received_bytes_total") >= repo["stored_bytes"]
    assert value(first, "pysrbup_snapshots") == 1
    assert value(first, "pysrbup_sessions_open") == 0  # the backup's session ended
    assert value(first, "pysrbup_sessions_started_total") >= 1
    for method in ("BeginSession", "CommitSnapshot", "GetStats"):
        assert calls(first, f"/pysrbup.proto.Backup/{method}") >= 1, method
    assert calls(first, wire.UPLOAD_RAW) >= 1
    assert value(
        first, "pysrbup_rpc_duration_seconds_bucket", method=wire.UPLOAD_RAW, code="OK", le="+Inf"
    ) == calls(first, wire.UPLOAD_RAW)

    _write_files(src, 1, 1_000_000, 20)  # new data
    second_id = client.backup(str(src), key_file)
    second = wait_for(port, lambda m: value(m, "pysrbup_snapshots") == 2)
    assert value(second, "pysrbup_objects") > value(first, "pysrbup_objects")
    assert value(second, "pysrbup_pack_bytes") > value(first, "pysrbup_pack_bytes")
    for name in ("pysrbup_objects_added_total", "pysrbup_upload_received_bytes_total"):
        assert value(second, name) > value(first, name), name
    assert calls(second, wire.UPLOAD_RAW) > calls(first, wire.UPLOAD_RAW)
    assert value(second, "pysrbup_sessions_open") == 0

    sent = value(second, "pysrbup_fetch_sent_bytes_total")
    client.run("restore", second_id, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    restored = scrape(port)
    assert value(restored, "pysrbup_fetch_sent_bytes_total") > sent + 4_000_000
    assert calls(restored, wire.FETCH_RAW) > calls(second, wire.FETCH_RAW)
    assert value(restored, "pysrbup_read_repairs_total") == 0


def _packs(repo: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        found += [os.path.join(root, f) for f in files if f.endswith(".pack")]
    return sorted(found)


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0xA5]))


def test_parity_repairs_and_scrubs_are_counted(tmp_path, metered, cache_dir, key_file):
    server, port = metered
    client = server.client(cache_dir)
    src = tmp_path / "src"
    _write_files(src, 2, 1_500_000, 30)
    backup_id = client.backup(str(src), key_file)
    wait_for(port, lambda m: value(m, "pysrbup_parity_bytes") > 0 and len(_packs(server.repo)))
    pack = max(_packs(server.repo), key=os.path.getsize)
    assert os.path.exists(ecc.sidecar_path(pack))
    victim = max(packs.read_footer(pack), key=lambda e: e.length)

    _flip(pack, victim.offset + 10)  # a restore reads it, fails, and repairs it from parity
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    healed = scrape(port)
    assert value(healed, "pysrbup_read_repairs_total") >= 1
    assert value(healed, "pysrbup_read_repaired_blocks_total") >= 1
    assert value(healed, "pysrbup_read_repaired_objects_total") >= 1
    assert value(healed, "pysrbup_read_damaged_objects_total") == 0
    assert value(healed, "pysrbup_scrub_runs_total") == 0

    server.stop()  # damage parity can repair, then let the server's own scrubs find it
    with open(pack, "r+b") as handle:
        handle.seek(1_000_000)
        handle.write(b"\0" * 50_000)
    server.extra = (*server.extra, "--scrub-interval=1")
    server.start()
    scrubbed = wait_for(port, lambda m: value(m, "pysrbup_scrub_runs_total") >= 1)
    assert value(scrubbed, "pysrbup_scrub_repaired_blocks_total") > 0
    assert value(scrubbed, "pysrbup_scrub_checked_blocks_total") > 0
    assert value(scrubbed, "pysrbup_scrub_unrepairable_blocks_total") == 0
    assert value(scrubbed, "pysrbup_scrub_last_damaged_objects") == 0
    assert 0 < value(scrubbed, "pysrbup_scrub_last_end_timestamp_seconds") <= time.time()

    server.stop()  # the victim hit in three rows of one column: beyond M = 2
    sc = ecc.load_sidecar(ecc.sidecar_path(pack))
    first_row, column = divmod(victim.offset + 10, sc.row_len)
    for i in range(3):
        _flip(pack, (first_row + i) % sc.k * sc.row_len + column)
    server.start()
    lost = wait_for(port, lambda m: value(m, "pysrbup_scrub_runs_total") >= 1)
    assert value(lost, "pysrbup_scrub_unrepairable_blocks_total") >= 3
    assert value(lost, "pysrbup_scrub_last_unrepairable_blocks") >= 3
    assert value(lost, "pysrbup_scrub_last_damaged_objects") >= 1
    assert value(lost, "pysrbup_scrub_damaged_objects_total") >= 1


def test_a_busy_metrics_port_is_one_line_and_a_failure(tmp_path, cache_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = server_cli(
            f"--bind-to=127.0.0.1:{free_port()}",
            f"--metrics-address=127.0.0.1:{taken}",
            str(tmp_path / "repo"),
            env=base_env(cache_dir),
        )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"pysrbup-server: error: cannot serve metrics on 127.0.0.1:{taken}: Address already in use"
    ]


@pytest.mark.parametrize("address", ["notaport", "localhost:", ":9100", "127.0.0.1:70000"])
def test_a_malformed_metrics_address_is_a_usage_error(tmp_path, cache_dir, address):
    proc = server_cli(
        f"--metrics-address={address}", str(tmp_path / "repo"), env=base_env(cache_dir)
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"pysrbup-server: error: --metrics-address takes [HOST:]PORT, not {address!r}"
    ]
