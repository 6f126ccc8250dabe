"""TLS on the transport: certificates, pinning, CAs, plaintext, and men in the middle.

Real servers on loopback, real client subprocesses. The proxies below are
small TCP relays on 127.0.0.1 (threads and sockets), bounded by timeouts.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import os
import re
import select
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import ServerProcess, assert_no_traceback, backup_id_in, base_env, free_port
from trees import random_bytes, snapshot_tree

from pysrbup.client.connection import CONNECT_TIMEOUT
from pysrbup.client.tls import fingerprint

FINGERPRINT_LINE = re.compile(r"pysrbup-server: TLS certificate fingerprint (SHA256:[0-9a-f]{64})")


# ---- helpers ------------------------------------------------------------------


def _server(tmp_path, name: str, cache_dir: str, port: int | None = None, extra=()):
    srv = ServerProcess(
        repo=str(tmp_path / name),
        port=port or free_port(),
        env=base_env(cache_dir),
        log_path=str(tmp_path / f"{name}.log"),
        extra=tuple(extra),
    )
    srv.start()
    return srv


def _printed_fingerprint(srv: ServerProcess) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = FINGERPRINT_LINE.search(srv.log())
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no fingerprint in the server log: {srv.log()}")


def _source(tmp_path, name: str = "src", size: int = 3 * 1024 * 1024, seed: int = 1):
    src = tmp_path / name
    src.mkdir()
    (src / "data.bin").write_bytes(random_bytes(size, seed))
    (src / "note.txt").write_text("over TLS\n" * 1000)
    return src


def _error_line(proc) -> str:
    """The client's stderr must be exactly one error line (no traceback, no gRPC noise)."""
    assert_no_traceback(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pysrbup-client: error: "), proc.stderr
    return lines[0]


def _known_servers(client) -> str:
    return os.path.join(client.env["PYSRBUP_CONFIG_DIR"], "known_servers")


def _nothing_stored(srv: ServerProcess) -> bool:
    packs = [f for _, _, files in os.walk(os.path.join(srv.repo, "packs")) for f in files]
    snapshots = os.listdir(os.path.join(srv.repo, "snapshots"))
    return not packs and not snapshots and bool(srv.init_token)


def _make_cert(
    common_name: str,
    names: list[str],
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ca: bool = False,
):
    """(certificate, key): self-signed, or signed by ``issuer`` (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _write_pem(path, cert: x509.Certificate, key=None) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return str(path)


class Proxy:
    """A loopback TCP proxy to ``target``.

    mode "relay" forwards bytes untouched (TLS end to end), "terminate" ends the
    client's TLS with its own certificate and opens its own TLS to the target (a
    man in the middle), "switch" relays the first connection and terminates the
    rest (a man in the middle that lets a certificate check pass, then steps in).
    """

    def __init__(self, target_port: int, mode: str, tmp_path, port: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.mode = mode
        self.accepted = 0
        self.bytes_to_target = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        if mode != "relay":
            cert, key = _make_cert("mallory", ["localhost", "127.0.0.1"])
            cert_path = _write_pem(tmp_path / f"mitm-{time.monotonic_ns()}.pem", cert, key)
            self.fingerprint = fingerprint(cert.public_bytes(serialization.Encoding.DER))
            self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._server_ctx.load_cert_chain(cert_path, cert_path[: -len(".pem")] + ".key")
            self._server_ctx.set_alpn_protocols(["h2"])
            self._client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self._client_ctx.check_hostname = False
            self._client_ctx.verify_mode = ssl.CERT_NONE
            self._client_ctx.set_alpn_protocols(["h2"])
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port or 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._spawn(self._accept_loop)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _track(self, sock):
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            terminate = self.mode == "terminate" or (self.mode == "switch" and self.accepted > 1)
            self._spawn(self._handle, self._track(conn), terminate)

    def _handle(self, conn: socket.socket, terminate: bool) -> None:
        try:
            conn.settimeout(10)
            upstream = self._track(socket.create_connection(self.target, timeout=10))
            if terminate:
                conn = self._track(self._server_ctx.wrap_socket(conn, server_side=True))
                upstream = self._track(self._client_ctx.wrap_socket(upstream))
            self._pump(conn, upstream)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self._stop.is_set():
            ready = [s for s in peers if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                ready, _, _ = select.select(list(peers), [], [], 0.2)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                if sock is a:
                    self.bytes_to_target += len(data)
                peers[sock].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def proxies():
    made: list[Proxy] = []

    def make(*args, **kwargs) -> Proxy:
        made.append(Proxy(*args, **kwargs))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


# ---- the default: a self-signed certificate, pinned on first contact ------------


def test_default_server_certificate_pinned_round_trip(tmp_path, server, cache_dir, key_file):
    cert_path = os.path.join(server.repo, "tls", "cert.pem")
    key_path = os.path.join(server.repo, "tls", "key.pem")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    with open(cert_path, "rb") as handle:
        cert_pem = handle.read()
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in alt.get_values_for_type(x509.DNSName)
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")} <= set(
        alt.get_values_for_type(x509.IPAddress)
    )
    assert cert.not_valid_after_utc.year >= 2100
    printed = _printed_fingerprint(server)
    assert printed == fingerprint(cert_pem)

    client = server.client(cache_dir)
    src = _source(tmp_path)
    first = client.run("backup", str(src), key_file, check=True)
    backup_id = backup_id_in(first.stdout)
    assert f"pinned the TLS certificate of {server.address} ({printed})" in first.stderr
    # The line holds the certificate itself too (so the next connection needs no handshake
    # of its own first): the host name gRPC checks, and the DER whose SHA-256 is pinned.
    address, pinned, name, der = _known_line(client, server.address)
    assert (address, pinned, name) == (server.address, printed, "localhost")
    assert der == cert.public_bytes(serialization.Encoding.DER)

    # Restarted on its repository, the server keeps its certificate: still trusted, no re-pin.
    server.stop()
    server.start()
    assert _printed_fingerprint(server) == printed
    again = client.run("restore", backup_id, str(tmp_path / "out"), key_file, check=True)
    assert "pinned" not in again.stderr
    assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
    assert (tmp_path / "out" / "src" / "data.bin").read_bytes() == (src / "data.bin").read_bytes()


def _known_line(client, address: str) -> tuple[str, str, str, bytes]:
    """(address, fingerprint, host name, certificate DER) of ``address`` in known_servers."""
    with open(_known_servers(client)) as handle:
        for line in handle.read().splitlines():
            parts = line.split()
            if parts and parts[0] == address:
                assert len(parts) == 4, line
                return parts[0], parts[1], parts[2], base64.b64decode(parts[3], validate=True)
    raise AssertionError(f"{address} is not in known_servers")


def test_fingerprint_only_lines_get_the_certificate_and_bad_ones_are_not_trusted(
    tmp_path, server, cache_dir, key_file
):
    """A line of an older client (or written by hand) is checked by a handshake, then completed."""
    client = server.client(cache_dir)
    printed = _printed_fingerprint(server)
    path = _known_servers(client)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    other = "127.0.0.9:1 SHA256:" + "ab" * 32  # another server's line stays as it is
    with open(path, "w") as handle:
        handle.write(f"# mine\n{other}\n{server.address} {printed}\n")
    proc = client.run("list", check=True)
    assert "pinned" not in proc.stderr
    with open(path) as handle:
        lines = handle.read().splitlines()
    assert lines[:2] == ["# mine", other] and len(lines) == 3
    _, pinned, name, der = _known_line(client, server.address)
    assert pinned == printed and fingerprint(der) == printed and name == "localhost"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert client.run("list", check=True).returncode == 0

    # A certificate that does not hash to the line's fingerprint is not used: the
    # handshake decides, against the fingerprint, and the line is mended.
    forged = base64.b64encode(der[:-1] + bytes([der[-1] ^ 1])).decode()
    with open(path, "w") as handle:
        handle.write(f"{server.address} {printed} localhost {forged}\n")
    client.run("list", check=True)
    assert _known_line(client, server.address)[3] == der

    # A wrong fingerprint beside the real certificate: refused, whatever the rest says.
    wrong = "SHA256:" + "00" * 32
    with open(path, "w") as handle:
        handle.write(f"{server.address} {wrong} localhost {base64.b64encode(der).decode()}\n")
    proc = client.run("list")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert printed in line and wrong in line and "line 1" in line


def test_replaced_server_is_refused_before_anything_is_sent(tmp_path, cache_dir, key_file):
    first = _server(tmp_path, "repo_a", cache_dir)
    try:
        client = first.client(cache_dir)
        client.backup(str(_source(tmp_path)), key_file)
    finally:
        first.stop()
    # Someone else now answers on the same address, with another certificate.
    impostor = _server(tmp_path, "repo_b", cache_dir, port=first.port)
    try:
        client.env["PYSRBUP_INIT_TOKEN"] = impostor.init_token  # even with the token at hand
        started = time.monotonic()
        proc = client.run("backup", str(tmp_path / "src"), key_file)
        assert proc.returncode == 1
        assert time.monotonic() - started < CONNECT_TIMEOUT
        line = _error_line(proc)
        assert _printed_fingerprint(impostor) in line
        assert _known_servers(client) in line and "line 2" in line and "remove" in line
        assert _nothing_stored(impostor)

        # The named line removed by hand (the replacement was legitimate): pinned anew.
        path = _known_servers(client)
        with open(path) as handle:
            lines = handle.read().splitlines()
        with open(path, "w") as handle:
            handle.write("".join(f"{x}\n" for x in lines if not x.startswith(first.address)))
        proc = client.run("backup", str(tmp_path / "src"), key_file, check=True)
        assert _printed_fingerprint(impostor) in proc.stderr
    finally:
        impostor.stop()


def test_explicit_fingerprint(tmp_path, server, cache_dir, key_file):
    client = server.client(cache_dir)
    printed = _printed_fingerprint(server)
    colons = "SHA256:" + ":".join(re.findall("..", printed.removeprefix("SHA256:"))).upper()
    for given in (printed, colons):
        proc = client.run("--tls-fingerprint", given, "list", check=True)
        assert "pinned" not in proc.stderr
    assert not os.path.exists(_known_servers(client))  # an explicit pin is not remembered
    wrong = "SHA256:" + "00" * 32
    proc = client.run("--tls-fingerprint", wrong, "list")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert printed in line and wrong in line
    proc = client.run("--tls-fingerprint", "SHA256:abc", "list")
    assert proc.returncode == 2 and "malformed TLS fingerprint" in _error_line(proc)
    proc = client.run("--plaintext", "--tls-fingerprint", printed, "list")
    assert proc.returncode == 2
    env = dict(client.env, PYSRBUP_TLS_FINGERPRINT=wrong)
    assert client.run("list", env=env).returncode == 1


# ---- men in the middle -------------------------------------------------------------


def test_relay_works_and_terminating_proxies_are_refused(
    tmp_path, server, cache_dir, key_file, proxies
):
    printed = _printed_fingerprint(server)
    relay = proxies(server.port, "relay", tmp_path)
    client = server.client(cache_dir)
    client.address = relay.address
    src = _source(tmp_path)
    backup_id = client.backup(str(src), key_file)  # TLS end to end through a dumb relay
    assert relay.bytes_to_target > 3 * 1024 * 1024
    with open(_known_servers(client)) as handle:
        assert f"{relay.address} {printed}" in handle.read()
    assert client.run("list", check=True).stdout.count(backup_id) == 1
    relay.close()

    # The relay replaced by a man in the middle on the same address: refused at once.
    mitm = proxies(server.port, "terminate", tmp_path, port=relay.port)
    for flags in ((), ("--tls-fingerprint", printed)):
        proc = client.run(*flags, "restore", backup_id, str(tmp_path / "out"), key_file)
        assert proc.returncode == 1
        line = _error_line(proc)
        assert mitm.fingerprint in line and printed in line
    assert not (tmp_path / "out").exists()
    # It is a working proxy: a client told to trust its certificate gets through it.
    proc = client.run("--tls-fingerprint", mitm.fingerprint, "list", check=True)
    assert backup_id in proc.stdout
    mitm.close()

    # One that shows the real certificate to the first connection (the client's check) and
    # its own to the next (the channel): gRPC itself refuses it, and the client says why.
    # (With the certificate in known_servers there is no check before the channel, so the
    # gap it aims at exists where the fingerprint alone is known.)
    switch = proxies(server.port, "switch", tmp_path, port=relay.port)
    started = time.monotonic()
    proc = client.run(
        "--tls-fingerprint", printed, "restore", backup_id, str(tmp_path / "out"), key_file
    )
    assert proc.returncode == 1
    assert time.monotonic() - started < CONNECT_TIMEOUT + 5
    assert switch.accepted >= 2
    line = _error_line(proc)
    assert switch.fingerprint in line
    assert not (tmp_path / "out").exists()


# ---- a CA instead of pinning -------------------------------------------------------


def test_ca_signed_server_certificate(tmp_path, cache_dir, key_file):
    ca, ca_key = _make_cert("test CA", [], ca=True)
    other_ca, _ = _make_cert("another CA", [], ca=True)
    leaf, leaf_key = _make_cert("pysrbup test server", ["localhost"], issuer=(ca, ca_key))
    ca_file = _write_pem(tmp_path / "ca.pem", ca)
    other_file = _write_pem(tmp_path / "other-ca.pem", other_ca)
    cert_file = _write_pem(tmp_path / "server.pem", leaf, leaf_key)
    srv = _server(
        tmp_path,
        "repo",
        cache_dir,
        extra=("--tls-cert", cert_file, "--tls-key", str(tmp_path / "server.key")),
    )
    try:
        assert not os.path.exists(os.path.join(srv.repo, "tls"))
        assert _printed_fingerprint(srv) == fingerprint(
            leaf.public_bytes(serialization.Encoding.PEM)
        )
        client = srv.client(cache_dir)
        client.address = f"localhost:{srv.port}"  # the name in the certificate
        src = _source(tmp_path)
        proc = client.run("--tls-ca", ca_file, "backup", str(src), key_file, check=True)
        backup_id = backup_id_in(proc.stdout)
        env = dict(client.env, PYSRBUP_TLS_CA=ca_file)
        client.run("restore", backup_id, str(tmp_path / "out"), key_file, env=env, check=True)
        assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
        assert not os.path.exists(_known_servers(client))

        proc = client.run("--tls-ca", other_file, "list")
        assert proc.returncode == 1 and "not trusted by" in _error_line(proc)
        # Hostname checks are the usual ones: 127.0.0.1 is not in this certificate.
        client.address = srv.address
        proc = client.run("--tls-ca", ca_file, "list")
        assert proc.returncode == 1 and "not trusted by" in _error_line(proc)
        # A CA-issued certificate cannot be gRPC's only root: pinning it is refused, clearly.
        proc = client.run("list")
        assert proc.returncode == 1 and "--tls-ca" in _error_line(proc)
        assert not os.path.exists(_known_servers(client))
    finally:
        srv.stop()


# ---- plaintext -------------------------------------------------------------------


def test_plaintext_both_sides(tmp_path, cache_dir, key_file):
    srv = _server(tmp_path, "repo", cache_dir, extra=("--plaintext",))
    try:
        assert "serving without TLS" in srv.log()
        assert not os.path.exists(os.path.join(srv.repo, "tls"))
        client = srv.client(cache_dir)
        src = _source(tmp_path)
        proc = client.run("--plaintext", "backup", str(src), key_file, check=True)
        backup_id = backup_id_in(proc.stdout)
        env = dict(client.env, PYSRBUP_PLAINTEXT="1")
        client.run("restore", backup_id, str(tmp_path / "out"), key_file, env=env, check=True)
        assert snapshot_tree(str(tmp_path / "out" / "src")) == snapshot_tree(str(src))
        assert not os.path.exists(_known_servers(client))

        # A TLS client at a plaintext server: told so, quickly, and nothing is pinned.
        started = time.monotonic()
        proc = client.run("list")
        assert time.monotonic() - started < CONNECT_TIMEOUT
        assert proc.returncode == 1
        line = _error_line(proc)
        assert "does not speak TLS" in line and "--plaintext" in line
        assert not os.path.exists(_known_servers(client))
    finally:
        srv.stop()


def test_plaintext_client_at_a_tls_server(tmp_path, server, cache_dir, key_file):
    client = server.client(cache_dir)
    started = time.monotonic()
    proc = client.run("--plaintext", "backup", str(_source(tmp_path)), key_file)
    assert time.monotonic() - started < CONNECT_TIMEOUT
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "speaks TLS" in line and "plaintext mode" in line
    assert _nothing_stored(server)


def test_tls_client_at_a_plaintext_server_with_a_ca(tmp_path, cache_dir):
    ca, _ = _make_cert("test CA", [], ca=True)
    srv = _server(tmp_path, "repo", cache_dir, extra=("--plaintext",))
    try:
        client = srv.client(cache_dir)
        started = time.monotonic()
        proc = client.run("--tls-ca", _write_pem(tmp_path / "ca.pem", ca), "list")
        assert time.monotonic() - started < CONNECT_TIMEOUT
        assert proc.returncode == 1 and "does not speak TLS" in _error_line(proc)
    finally:
        srv.stop()


def test_server_tls_usage_errors(tmp_path, cache_dir):
    srv = ServerProcess(str(tmp_path / "repo"), free_port(), base_env(cache_dir), "")
    cmd = ["--tls-cert", str(tmp_path / "missing.pem")]

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "pysrbup.cli.server", *args, srv.repo],
            env=srv.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    proc = run(*cmd)
    assert proc.returncode == 2 and "--tls-key" in proc.stderr
    proc = run(*cmd, "--tls-key", str(tmp_path / "missing.key"))
    assert proc.returncode == 1 and "cannot read the TLS certificate" in proc.stderr
    assert_no_traceback(proc)
    assert "--plaintext" in run("--help").stdout
