"""Snapshot metadata, tags, several deletes with one garbage collection, forget and stats."""

from __future__ import annotations

import json
import os

from helpers import assert_no_traceback, backup_id_in
from trees import random_bytes, snapshot_tree


def _src(tmp_path, name: str, seed: int, size: int = 200_000):
    src = tmp_path / name
    src.mkdir()
    (src / "own.bin").write_bytes(random_bytes(size, seed))
    (src / "note.txt").write_text(f"{name}\n")
    return src


def _backup(client, src, key_file, *flags: str) -> str:
    return backup_id_in(client.run("backup", str(src), key_file, *flags, check=True).stdout)


def _listing(client, key_file, *flags: str) -> list[dict]:
    proc = client.run("--json", "list", "--key-file", key_file, *flags, check=True)
    return json.loads(proc.stdout)["backups"]


def test_metadata_lives_in_the_record_and_filters_select(tmp_path, client, key_file):
    a = _src(tmp_path, "a", 1)
    b = _src(tmp_path, "b", 2)
    first = _backup(
        client,
        a,
        key_file,
        "--tag",
        "daily",
        "--tag",
        "db",
        "--host",
        "alpha",
        "--time",
        "2021-03-04 05:06:07",
    )
    second = _backup(client, b, key_file, "--tag", "weekly", "--host", "beta")
    rows = {row["id"]: row for row in _listing(client, key_file)}
    assert rows[first]["tags"] == ["daily", "db"] and rows[first]["host"] == "alpha"
    assert rows[first]["time"].startswith("2021-03-0")  # local 05:06:07, shown in UTC
    assert rows[second]["tags"] == ["weekly"] and rows[second]["host"] == "beta"
    assert [r["id"] for r in _listing(client, key_file, "--tag", "daily,db")] == [first]
    assert [r["id"] for r in _listing(client, key_file, "--tag", "daily,weekly")] == []
    both = _listing(client, key_file, "--tag", "db", "--tag", "weekly")
    assert {r["id"] for r in both} == {first, second}
    assert [r["id"] for r in _listing(client, key_file, "--host", "beta")] == [second]
    assert [r["id"] for r in _listing(client, key_file, "--path", str(a))] == [first]
    text = client.run("list", "--key-file", key_file, check=True).stdout
    assert "[daily,db]" in text
    refused = client.run("list", "--tag", "daily")
    assert refused.returncode == 2 and "need --key-file" in refused.stderr
    bad = client.run("backup", str(a), key_file, "--time", "yesterday")
    assert bad.returncode == 2 and "bad --time" in bad.stderr
    assert_no_traceback(bad)


def test_tag_rewrites_the_record_under_a_new_id(tmp_path, client, key_file):
    src = _src(tmp_path, "src", 3)
    old = _backup(client, src, key_file, "--tag", "keep", "--tag", "old")
    proc = client.run(
        "--json", "tag", old, "--key-file", key_file, "--add", "new", "--remove", "old", check=True
    )
    report = json.loads(proc.stdout)
    assert report["old_id"] == old and report["tags"] == ["keep", "new"]
    new = report["new_id"]
    rows = _listing(client, key_file)
    assert [r["id"] for r in rows] == [new] and rows[0]["tags"] == ["keep", "new"]
    out = tmp_path / "out"
    client.run("restore", new, str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))
    replaced = client.run("--json", "tag", new, "--key-file", key_file, "--set", "only", check=True)
    assert json.loads(replaced.stdout)["tags"] == ["only"]
    assert "gone without a delete" not in client.run("list", check=True).stderr


def test_delete_several_collects_garbage_once(tmp_path, client, key_file, server):
    ids = [_backup(client, _src(tmp_path, f"s{i}", 10 + i, 1_000_000), key_file) for i in range(4)]
    proc = client.run("--json", "delete", ids[0], ids[1], ids[2][:8], key_file, check=True)
    report = json.loads(proc.stdout)
    assert report["deleted"] == ids[:3]
    assert report["bytes_freed"] > 3 * 1_000_000
    listed = [r["id"] for r in _listing(client, key_file)]
    assert listed == [ids[3]]
    missing = client.run("delete", ids[3], str(tmp_path / "no-such.key"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_stats_counts_logical_unique_and_stored(tmp_path, client, key_file):
    src = _src(tmp_path, "src", 20, 3_000_000)
    first = _backup(client, src, key_file)
    _backup(client, src, key_file)  # the same data again
    report = json.loads(client.run("--json", "stats", "--key-file", key_file, check=True).stdout)
    assert report["backups"] == 2
    assert report["logical_bytes"] == 2 * (3_000_000 + len("src\n"))
    assert report["unique_bytes"] == 3_000_000 + len("src\n")
    assert 1.99 < report["dedup_ratio"] < 2.01
    repo = report["repository"]
    assert repo["objects"] >= report["unique_chunks"] and repo["packs"] >= 1
    assert repo["pack_bytes"] >= repo["stored_bytes"] > 3_000_000 and repo["parity_bytes"] > 0
    one = json.loads(
        client.run("--json", "stats", "--key-file", key_file, "--backup", first, check=True).stdout
    )
    assert one["backups"] == 1 and 0.99 < one["dedup_ratio"] < 1.01
    assert os.path.exists(src)


def _make_daily_backups(tmp_path, server, client, key_file, monkeypatch, days: int):
    """``days`` backups one day apart (--time), each with a file of its own, made in-process."""
    import datetime

    from pysrbup.client.backup import Backup
    from pysrbup.client.connection import Connection
    from pysrbup.client.repository import RemoteRepository
    from pysrbup.crypto.keyfile import load_key_file

    for name in ("PYSRBUP_CACHE_DIR", "PYSRBUP_CONFIG_DIR", "PYSRBUP_INIT_TOKEN"):
        monkeypatch.setenv(name, client.env[name])
    src = tmp_path / "src"
    src.mkdir()
    (src / "shared.bin").write_bytes(random_bytes(300_000, 7))
    start = datetime.datetime(2024, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
    made = {}
    with Connection(server.address) as conn:
        repo = RemoteRepository(conn, load_key_file(key_file))
        for day in range(days):
            for old in src.glob("day-*"):
                old.unlink()
            (src / f"day-{day:03}.bin").write_bytes(random_bytes(100_000, 1000 + day))
            when = start + datetime.timedelta(days=day)
            result = Backup(repo, 2).run(str(src), time_ns=int(when.timestamp()) * 10**9)
            made[result.backup_id] = day
    return src, made


def test_forget_keeps_by_policy_frees_the_rest_once(
    tmp_path, client, key_file, server, monkeypatch
):
    from pysrbup.client import policy

    _src_dir, made = _make_daily_backups(tmp_path, server, client, key_file, monkeypatch, 30)
    dry = client.run(
        "--json",
        "forget",
        "--key-file",
        key_file,
        "--keep-daily",
        "5",
        "--keep-weekly",
        "2",
        "--dry-run",
        check=True,
    )
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and len(_listing(client, key_file)) == 30
    (group,) = plan["groups"]
    kept = {k["id"] for k in group["keep"]}
    # The same decision as the policy engine (restic's rules) on the same records.
    listed = _listing(client, key_file)
    import datetime

    metas = [
        policy.SnapshotMeta(
            id=r["id"],
            time=datetime.datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=datetime.timezone.utc
            ),
        )
        for r in listed
    ]
    want, _, _ = policy.apply(metas, policy.Policy(daily=5, weekly=2))
    assert kept == {m.id for m in want}
    newest_days = sorted(made.values())[-5:]
    assert {made[i] for i in kept} >= set(newest_days)
    assert len(kept) < 30
    stats_before = json.loads(
        client.run("--json", "stats", "--key-file", key_file, check=True).stdout
    )
    done = client.run(
        "--json",
        "forget",
        "--key-file",
        key_file,
        "--keep-daily",
        "5",
        "--keep-weekly",
        "2",
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["bytes_freed"] > (30 - len(kept)) * 90_000
    assert {r["id"] for r in _listing(client, key_file)} == kept
    stats_after = json.loads(
        client.run("--json", "stats", "--key-file", key_file, check=True).stdout
    )
    assert stats_after["unique_bytes"] == 300_000 + len(kept) * 100_000
    assert stats_after["repository"]["stored_bytes"] < stats_before["repository"]["stored_bytes"]
    for backup_id in kept:
        out = tmp_path / f"out-{backup_id}"
        client.run("restore", backup_id, str(out), key_file, check=True)
        names = sorted(p.name for p in (out / "src").iterdir())
        assert names == [f"day-{made[backup_id]:03}.bin", "shared.bin"]


def test_forget_racing_a_backup_keeps_the_backup(tmp_path, client, key_file, server, monkeypatch):
    src, _made = _make_daily_backups(tmp_path, server, client, key_file, monkeypatch, 6)
    (src / "big.bin").write_bytes(random_bytes(30 * 1024 * 1024, 99))
    running = client.spawn("backup", str(src), key_file)
    forgot = client.run("forget", "--key-file", key_file, "--keep-last", "1")
    out, err = running.communicate(timeout=300)
    assert running.returncode == 0, err
    assert forgot.returncode in (0, 1), forgot.stderr  # may give up if backups kept changing
    assert_no_traceback(forgot)
    backup_id = backup_id_in(out)
    restored = tmp_path / "restored"
    client.run("restore", backup_id, str(restored), key_file, check=True)
    assert snapshot_tree(str(restored / "src")) == snapshot_tree(str(src))


def test_forget_refuses_bad_policies(client, key_file):
    for flags in (
        ("--keep-within", "3w"),
        ("--keep-daily", "many"),
        ("--keep-daily", "-2"),
        ("--keep-last", "1", "--group-by", "hostname,colour"),
        (),
    ):
        proc = client.run("forget", "--key-file", key_file, *flags)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "error" in proc.stderr
        assert_no_traceback(proc)
