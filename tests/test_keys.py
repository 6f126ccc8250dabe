"""Keys end to end: put-only keys back up but cannot read or destroy; passphrase-protected files."""

from __future__ import annotations

import base64
import json
import os
import signal
import time

import grpc
import pytest
from helpers import assert_no_traceback, backup_id_in
from peer import Peer
from trees import dir_size, random_bytes, snapshot_tree

from pysrbup.crypto import keyfile
from pysrbup.proto import service_pb2
from pysrbup.repo import auth


def _tree(root, files: int = 60, seed: int = 1) -> None:
    root.mkdir()
    for i in range(files):
        sub = root / f"d{i % 6}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(random_bytes(20_000 + i * 997, seed * 1000 + i))
    (root / "big.bin").write_bytes(random_bytes(6 * 1024 * 1024, seed))


def _read(path, mode: str = "r"):
    with open(path, mode) as handle:
        return handle.read()


def _one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout  # nothing printed before the refusal
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pysrbup-client: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert_no_traceback(proc)


@pytest.fixture
def put_key(tmp_path, client, key_file):
    """A put-only key of an initialised repository (the master key's first backup made it)."""
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "x").write_text("initialises the repository\n")
    client.backup(str(seed), key_file)
    path = str(tmp_path / "put.key")
    proc = client.run("key", "put-only", key_file, path, check=True)
    assert "put-only key" in proc.stdout
    return path


def test_put_key_backs_up_and_deduplicates_and_master_restores(
    tmp_path, client, key_file, put_key, server
):
    src = tmp_path / "src"
    _tree(src)
    time.sleep(1.2)  # files changed within a second are never cached (racy timestamps)
    original = snapshot_tree(str(src))
    first = client.backup(str(src), put_key)
    server.settled()
    before = dir_size(os.path.join(server.repo, "packs"))
    again = json.loads(client.run("--json", "backup", str(src), put_key, check=True).stdout)
    assert again["bytes_new"] == 0 and again["files_cached"] > 0
    server.settled()
    grown = dir_size(os.path.join(server.repo, "packs")) - before
    assert grown < 0.01 * before, (grown, before)
    (src / "d1" / "new.txt").write_text("changed\n")
    third = client.backup(str(src), put_key)
    expected = {first: original, again["backup_id"]: original, third: snapshot_tree(str(src))}
    for backup_id, tree in expected.items():
        out = tmp_path / f"out-{backup_id}"
        client.run("restore", backup_id, str(out), key_file, check=True)
        assert snapshot_tree(str(out / "src")) == tree
    # The master key's own backup of the same data deduplicates against the put key's.
    report = json.loads(client.run("--json", "backup", str(src), key_file, check=True).stdout)
    assert report["bytes_new"] == 0


def test_put_key_cannot_read_or_destroy(tmp_path, client, key_file, put_key):
    src = tmp_path / "src"
    _tree(src, files=5)
    backup_id = client.backup(str(src), put_key)
    out = str(tmp_path / "out")
    for args in (
        ("restore", backup_id, out, put_key),
        ("delete", backup_id, put_key),
        ("list", "--key-file", put_key),
        ("check", "--key-file", put_key),
        ("key", "put-only", put_key, str(tmp_path / "again.key")),
    ):
        _one_line_error(client.run(*args), "put-only")
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "again.key")
    assert backup_id in client.run("list", check=True).stdout
    shown = client.run("key", "show-public", put_key, check=True).stdout
    assert "kind: put-only" in shown


def test_server_refuses_a_put_keys_destroy_and_its_session_keys_stay_sealed(
    tmp_path, client, key_file, put_key, server
):
    src = tmp_path / "src"
    _tree(src, files=3)
    backup_id = client.backup(str(src), put_key)
    put = keyfile.load_key_file(put_key)
    with Peer(server, put) as peer:
        ids = b"".join(oid for oid, _ in peer.all_ids())
        digest = auth.snapshot_set_digest([backup_id])
        challenge = peer.challenge()
        request = service_pb2.CondemnRequest(
            ids=ids,
            snapshot_set=digest,
            challenge=challenge,
            signature=put.write_key.sign(
                auth.condemn_message(peer.repo_id, challenge, digest, ids)
            ),
        )
        with pytest.raises(grpc.RpcError) as info:
            peer.stub.Condemn(request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        challenge = peer.challenge()
        delete = service_pb2.DeleteSnapshotRequest(
            snapshot_id=backup_id,
            challenge=challenge,
            signature=put.write_key.sign(auth.delete_message(peer.repo_id, challenge, backup_id)),
        )
        with pytest.raises(grpc.RpcError) as info:
            peer.stub.DeleteSnapshot(delete)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # What the put client stored for its session cannot be opened without the master key.
    from pysrbup.errors import WrongKeyError
    from pysrbup.repo import envelope

    sealed = [
        (bytes.fromhex(name), _read(os.path.join(server.repo, "keys", name), "rb"))
        for name in os.listdir(os.path.join(server.repo, "keys"))
    ]
    put_sealed = [(k, v) for k, v in sealed if len(v) == envelope.SEALED_SIZE]
    assert put_sealed
    master = keyfile.load_key_file(key_file)
    for key_id, stored in put_sealed:
        with pytest.raises(WrongKeyError):
            envelope.open_session_key(os.urandom(32), None, key_id, stored)
        assert len(envelope.open_session_key(master.wrap_key, master.seal_private, key_id, stored))
    out = tmp_path / "out"
    client.run("restore", backup_id, str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))


def test_put_clients_files_cache_survives_kill_9(tmp_path, client, key_file, put_key):
    import glob

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02}.bin").write_bytes(random_bytes(3 * 1024 * 1024, 300 + i))
    time.sleep(1.2)  # old enough to be cached
    proc = client.spawn("backup", str(src), put_key)
    cache = os.path.join(client.env["PYSRBUP_CACHE_DIR"], "*", "files")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(os.path.getsize(p) > 0 for p in glob.glob(cache)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the backup finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    rerun = json.loads(client.run("--json", "backup", str(src), put_key, check=True).stdout)
    assert 0 < rerun["files_cached"] < 40  # what the killed run finished is not read again
    out = tmp_path / "out"
    client.run("restore", rerun["backup_id"], str(out), key_file, check=True)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))


def _passfile(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    return str(path)


def test_passphrase_protected_key_files(tmp_path, client, server):
    key = str(tmp_path / "locked.key")
    env = dict(client.env, PYSRBUP_PASSWORD_FILE=_passfile(tmp_path, "pw", "correct horse"))
    client.run("generate_key", key, check=True, env=env)
    text = _read(key)
    master = keyfile.loads(text, passphrase=lambda: "correct horse")
    secret = master.secret
    raw = _read(key, "rb")
    for form in (secret, base64.b64encode(secret), secret.hex().encode()):
        assert form not in raw
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    src = tmp_path / "src"
    _tree(src, files=3)
    backup_id = backup_id_in(client.run("backup", str(src), key, check=True, env=env).stdout)
    # A wrong passphrase, and no passphrase at all, are one clear line each.
    wrong = dict(client.env, PYSRBUP_PASSWORD_FILE=_passfile(tmp_path, "bad", "wrong horse"))
    _one_line_error(client.run("list", "--key-file", key, env=wrong), "wrong passphrase")
    _one_line_error(client.run("list", "--key-file", key), "protected by a passphrase")
    # The command source works too.
    command = dict(client.env, PYSRBUP_PASSWORD_COMMAND="echo 'correct horse'")
    assert backup_id in client.run("list", "--key-file", key, check=True, env=command).stdout
    # key passwd: the new passphrase opens it, the old one no longer does.
    change = dict(env, PYSRBUP_NEW_PASSWORD_FILE=_passfile(tmp_path, "new", "battery staple"))
    client.run("key", "passwd", key, check=True, env=change)
    _one_line_error(client.run("list", "--key-file", key, env=env), "wrong passphrase")
    renewed = dict(client.env, PYSRBUP_PASSWORD_FILE=str(tmp_path / "new"))
    out = tmp_path / "out"
    client.run("restore", backup_id, str(out), key, check=True, env=renewed)
    assert snapshot_tree(str(out / "src")) == snapshot_tree(str(src))
    assert keyfile.loads(_read(key), passphrase=lambda: "battery staple") == master


def test_unprotected_key_without_a_terminal_warns(tmp_path, client):
    key = str(tmp_path / "plain.key")
    proc = client.run("generate_key", key, check=True)
    assert "not protected by a passphrase" in proc.stderr
    assert not keyfile.is_protected(_read(key))
    os.chmod(key, 0o644)
    shown = client.run("key", "show-public", key, check=True)
    assert "can be read by others" in shown.stderr and "kind: master" in shown.stdout
