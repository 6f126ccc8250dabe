"""The server's TLS certificate: given on the command line, or made on first start.

Without ``--tls-cert``/``--tls-key`` the server makes a self-signed EC P-256
certificate (gRPC's TLS stack offers no Ed25519 signatures) and keeps it in
``<backups_dir>/tls/``: ``cert.pem`` and ``key.pem`` (mode 0600). It is its own
trust anchor (basicConstraints CA:TRUE), so a client that pinned it can hand
exactly this certificate to gRPC as the only root it trusts.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass

from pysrbup.client.tls import fingerprint
from pysrbup.errors import PysrbupError

TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
#: RFC 5280 §4.1.2.5: "no well-defined expiration date". A pinned certificate must not expire.
NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


class TlsSetupError(PysrbupError):
    """The server's certificate or key is missing, unreadable or mismatched."""


@dataclass(frozen=True)
class ServerCertificate:
    """A PEM certificate chain (leaf first) and its unencrypted PEM private key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """``SHA256:<hex>`` of the leaf certificate (what clients pin)."""
        return fingerprint(self.cert_pem)

    def credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def _host_names() -> list[str]:
    names = []
    for name in (socket.gethostname(), socket.getfqdn()):
        name = name.strip().rstrip(".").lower()
        if name and name.isascii() and name not in names and name != "localhost":
            names.append(name)
    return names


def create_self_signed(host_names: list[str] | None = None) -> ServerCertificate:
    """A new P-256 key and a self-signed CA:TRUE certificate for loopback and this host."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = _host_names() if host_names is None else host_names
    key = ec.generate_private_key(ec.SECP256R1())
    cn = f"pysrbup-server {hosts[0]}" if hosts else "pysrbup-server"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])])
    alt: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clocks a little behind
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return ServerCertificate(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsSetupError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None


def check(cert: ServerCertificate, cert_path: str, key_path: str) -> ServerCertificate:
    """Checks that both parse and that the key belongs to the (first) certificate."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(cert.cert_pem)
    except ValueError:
        raise TlsSetupError(f"{cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(cert.key_pem, password=None)
    except TypeError:
        raise TlsSetupError(f"{key_path} is encrypted: give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsSetupError(f"{key_path} holds no usable PEM private key: {exc}") from None
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise TlsSetupError(
            f"{key_path}: gRPC's TLS cannot use Ed25519/Ed448 keys; use an EC (P-256) or RSA key"
        )
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != chain[0].public_key().public_bytes(der, pub):
        raise TlsSetupError(f"the key {key_path} does not belong to the certificate {cert_path}")
    return cert


def load(cert_path: str, key_path: str) -> ServerCertificate:
    """The certificate (chain) and key given with ``--tls-cert`` and ``--tls-key``."""
    cert = ServerCertificate(_read(cert_path, "certificate"), _read(key_path, "key"))
    return check(cert, cert_path, key_path)


def _write_new(path: str, data: bytes, mode: int) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_or_create(backups_dir: str) -> ServerCertificate:
    """``<backups_dir>/tls/{cert,key}.pem``, made (self-signed) if neither exists yet."""
    folder = os.path.join(backups_dir, TLS_DIR)
    cert_path = os.path.join(folder, CERT_FILE)
    key_path = os.path.join(folder, KEY_FILE)
    if os.path.exists(cert_path):
        if not os.path.exists(key_path):
            raise TlsSetupError(
                f"{cert_path} exists but its key {key_path} is missing "
                f"(remove {cert_path} to make a new certificate; clients will have to re-pin)"
            )
        return load(cert_path, key_path)
    # No certificate: none was ever served from here, so a lone key (a crash between
    # the two writes below) is simply replaced.
    cert = create_self_signed()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        _write_new(key_path, cert.key_pem, 0o600)
        _write_new(cert_path, cert.cert_pem, 0o644)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise TlsSetupError(f"cannot write the TLS certificate in {folder}: {exc}") from None
    return cert
