"""Error correction and self-healing: real corruption in real packs and sidecars."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
from helpers import assert_no_traceback, backup_id_in, server_cli
from trees import random_bytes, snapshot_tree

from pysrbup.server import ecc, packs


def _packs(repo: str) -> list[str]:
    found = []
    for root, _, files in os.walk(os.path.join(repo, "packs")):
        found += [os.path.join(root, f) for f in files if f.endswith(".pack")]
    return sorted(found)


def _wait_for_parity(repo: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _packs(repo)
        if found and all(os.path.exists(ecc.sidecar_path(p)) for p in found):
            return found
        time.sleep(0.05)
    raise AssertionError("parity was not written")


def _flip(path: str, offset: int, count: int = 1) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(count))
        for i in range(len(data)):
            data[i] ^= 0xA5
        handle.seek(offset)
        handle.write(data)


# ---- the sidecar format on its own -------------------------------------------------


@pytest.fixture
def sealed_pack(tmp_path):
    path = str(tmp_path / "p.pack")
    data = random_bytes(2_000_000 + 777, 3)
    with open(path, "wb") as handle:
        handle.write(data)
    ecc.write_sidecar(path, ecc.EccLevel(10, 2))
    return path, data


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize(
    "damage",
    ["flipped-bytes", "zeroed-range", "truncated", "sidecar-meta", "sidecar-parity"],
)
def test_repairs_each_kind_of_damage(sealed_pack, damage):
    path, data = sealed_pack
    side = ecc.sidecar_path(path)
    if damage == "flipped-bytes":
        for offset in (0, 12345, 999_999, len(data) - 1):
            _flip(path, offset)
    elif damage == "zeroed-range":
        with open(path, "r+b") as handle:
            handle.seek(300_000)
            handle.write(b"\0" * 150_000)  # a burst within one row
    elif damage == "truncated":
        os.truncate(path, len(data) - 100_000)
    elif damage == "sidecar-meta":
        _flip(side, 20, 64)  # the first meta copy; the second one takes over
        _flip(path, 5000)
    else:
        sc = ecc.load_sidecar(side)
        _flip(side, sc.parity_offset + 100, 50)
    result = ecc.check_pack(path)
    assert result.blocks_repaired > 0 and result.blocks_unrepairable == 0
    assert _read(path) == data
    again = ecc.check_pack(path)
    assert (again.blocks_repaired, again.blocks_unrepairable) == (0, 0)


def test_damage_beyond_parity_is_reported_not_hidden(sealed_pack):
    path, _data = sealed_pack
    sc = ecc.load_sidecar(ecc.sidecar_path(path))
    for row in range(3):  # three rows hit in one column: more than M = 2 erasures
        _flip(path, row * sc.row_len + 100)
    result = ecc.check_pack(path)
    assert result.blocks_unrepairable == 3
    assert [start for start, _ in result.bad_ranges] == [0, sc.row_len, 2 * sc.row_len]


def test_parity_columns_are_reedsolo_codewords(sealed_pack):
    """The sidecar's parity is the same code reedsolo produces (golden compatibility)."""
    import reedsolo

    path, _data = sealed_pack
    sc = ecc.load_sidecar(ecc.sidecar_path(path))
    matrix, _ = ecc.read_pack_matrix(path, sc.k, sc.row_len)
    with open(ecc.sidecar_path(path), "rb") as handle:
        handle.seek(sc.parity_offset)
        parity = np.frombuffer(handle.read(sc.m * sc.row_len), dtype=np.uint8)
    parity = parity.reshape(sc.m, sc.row_len)
    codec = reedsolo.RSCodec(sc.m)
    for column in random.Random(1).sample(range(sc.row_len), 20):
        word = codec.encode(bytes(matrix[:, column]))
        assert word[-sc.m :] == parity[:, column].tobytes()


def test_level_parsing():
    assert ecc.EccLevel.parse("none") is None
    assert ecc.EccLevel.parse("20+2") == ecc.EccLevel(20, 2)
    for bad in ("20", "0+2", "250+10", "x+y"):
        with pytest.raises(Exception, match="--ecc"):
            ecc.EccLevel.parse(bad)


# ---- end to end ---------------------------------------------------------------------


def _backup(tmp_path, client, key_file):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(random_bytes(3 * 1024 * 1024, 50 + i))
    (src / "notes.txt").write_text("notes\n" * 1000)
    return src, client.backup(str(src), key_file)


def test_restore_heals_bit_rot_on_the_fly(tmp_path, client, key_file, server):
    src, backup_id = _backup(tmp_path, client, key_file)
    pack = _wait_for_parity(server.repo)[0]
    size = os.path.getsize(pack)
    rng = random.Random(5)
    for offset in rng.sample(range(size), 8):
        _flip(pack, offset)
    proc = client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert_no_traceback(proc)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    assert "repaired" in server.log()
    server.stop()
    scrub = server_cli("--scrub", server.repo, env=server.env)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
    assert " 0 repaired, 0 unrepairable" in scrub.stdout  # the read already wrote the repair back


def test_scrub_repairs_and_reports(tmp_path, client, key_file, server):
    src, backup_id = _backup(tmp_path, client, key_file)
    pack = _wait_for_parity(server.repo)[0]
    server.stop()
    with open(pack, "r+b") as handle:  # a zeroed range and a deleted sidecar elsewhere
        handle.seek(1_000_000)
        handle.write(b"\0" * 100_000)
    scrub = server_cli("--scrub", server.repo, env=server.env)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
    assert "0 unrepairable" in scrub.stdout and " 0 repaired" not in scrub.stdout
    os.unlink(ecc.sidecar_path(pack))
    scrub = server_cli("--scrub", server.repo, env=server.env)
    assert scrub.returncode == 0 and "0 unrepairable" in scrub.stdout
    assert os.path.exists(ecc.sidecar_path(pack))  # verified, then protected again
    server.start()
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))


def test_damage_beyond_parity_names_files_and_restores_the_rest(tmp_path, client, key_file, server):
    _src, backup_id = _backup(tmp_path, client, key_file)
    pack = _wait_for_parity(server.repo)[0]
    server.stop()
    entries = packs.read_footer(pack)
    victim = max(entries, key=lambda e: e.length)
    sc = ecc.load_sidecar(ecc.sidecar_path(pack))
    # Damage the victim record in 3 rows of the same column: beyond M = 2.
    first_row, column = divmod(victim.offset + 10, sc.row_len)
    for i in range(3):
        _flip(pack, (first_row + i) % sc.k * sc.row_len + column)
    scrub = server_cli("--scrub", server.repo, env=server.env)
    assert scrub.returncode == 1
    assert "lost object" in scrub.stdout and victim.oid.hex() in scrub.stdout
    server.start()
    proc = client.run("restore", backup_id, str(tmp_path / "out"), key_file)
    assert proc.returncode == 3, proc.stderr
    assert "damaged" in proc.stderr
    assert (tmp_path / "out" / "src" / "notes.txt").read_text() == "notes\n" * 1000
    assert_no_traceback(proc)


def test_a_pack_deleted_behind_the_servers_back_is_reported(tmp_path, client, key_file, server):
    _src, backup_id = _backup(tmp_path, client, key_file)
    pack = _wait_for_parity(server.repo)[0]
    lost = {e.oid.hex() for e in packs.read_footer(pack)}
    server.stop()
    os.unlink(pack)
    scrub = server_cli("--scrub", server.repo, env=server.env)
    assert scrub.returncode == 1, scrub.stdout + scrub.stderr
    assert f"{len(lost)} object(s) lost" in scrub.stdout
    assert lost <= set(scrub.stdout.split())
    server.start()
    proc = client.run("restore", backup_id, str(tmp_path / "out"), key_file)
    assert proc.returncode in (1, 3), proc.stderr  # everything it can is named, never a trace
    assert_no_traceback(proc)


def test_ecc_level_is_per_pack(tmp_path, client, key_file, server):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(random_bytes(500_000, 1))
    client.backup(str(tmp_path / "a"), key_file)
    first = _wait_for_parity(server.repo)
    server.stop()
    server.extra = ("--ecc=4+2",)
    server.start()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.bin").write_bytes(random_bytes(500_000, 2))
    b_id = client.backup(str(tmp_path / "b"), key_file)
    levels = {p: ecc.load_sidecar(ecc.sidecar_path(p)).level for p in _wait_for_parity(server.repo)}
    assert {str(levels[p]) for p in first} == {"20+2"}
    assert "4+2" in {str(v) for p, v in levels.items() if p not in first}
    server.stop()
    server.extra = ("--ecc=none",)
    server.start()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "z.bin").write_bytes(random_bytes(500_000, 3))
    client.backup(str(tmp_path / "c"), key_file)
    server.settled()
    assert any(not os.path.exists(ecc.sidecar_path(p)) for p in _packs(server.repo))
    client.run("restore", b_id, str(tmp_path / "out"), key_file, check=True)


def test_lost_index_is_refused_then_rebuilt(tmp_path, client, key_file, server):
    src, backup_id = _backup(tmp_path, client, key_file)
    server.stop()
    os.unlink(os.path.join(server.repo, "index.sqlite"))
    for extra in ("-wal", "-shm"):
        path = os.path.join(server.repo, "index.sqlite" + extra)
        if os.path.exists(path):
            os.unlink(path)
    refused = server_cli(f"--bind-to={server.address}", server.repo, env=server.env)
    assert refused.returncode != 0 and "--rebuild-index" in refused.stderr
    assert_no_traceback(refused)
    rebuilt = server_cli("--rebuild-index", server.repo, env=server.env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt the index" in rebuilt.stdout
    server.start()
    client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    # The id log restarted (new epoch): the next backup resyncs and still deduplicates.
    client.backup(str(src), key_file)


@pytest.mark.slow
def test_kill_9_during_uploads_repeatedly(tmp_path, client, key_file, server):
    client.env = dict(client.env, PYSRBUP_RETRY_SECONDS="3")
    completed: dict[str, str] = {}
    rng = random.Random(11)
    for attempt in range(4):
        src = tmp_path / f"set{attempt}"
        src.mkdir()
        for i in range(4):
            (src / f"part{i}.bin").write_bytes(random_bytes(6 * 1024 * 1024, 100 * attempt + i))
        proc = client.spawn("backup", str(src), key_file)  # gives up 3 s after the kill
        time.sleep(rng.uniform(0.4, 1.6))
        server.kill()
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            completed[backup_id_in(out)] = str(src)
        else:
            assert "Traceback" not in err
        server.start()
        for backup_id, path in completed.items():
            out_dir = tmp_path / f"check{attempt}-{backup_id}"
            client.run("restore", backup_id, str(out_dir), key_file, check=True)
            assert snapshot_tree(str(out_dir / os.path.basename(path))) == snapshot_tree(path)
        rerun = client.backup(str(src), key_file)  # the interrupted backup completes
        completed[rerun] = str(src)
    server.stop()
    scrub = server_cli("--scrub", server.repo, env=server.env)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
