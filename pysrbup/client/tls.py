"""How the client protects its channel to the server.

Three modes, chosen by the command line (or ``PYSRBUP_*`` variables):

- pinned (the default): the server's certificate must be exactly the one whose
  SHA-256 fingerprint is known, either given (``--tls-fingerprint``) or
  remembered on first contact in ``known_servers`` in the config directory
  (``$PYSRBUP_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/pysrbup``, else
  ``~/.config/pysrbup``), like ssh's known_hosts. The certificate is fetched
  with a plain TLS handshake, checked against the fingerprint, and then handed
  to gRPC as the only trusted root, so gRPC itself refuses any server that does
  not hold that certificate's key: nothing is trusted between the check and
  the channel. known_servers keeps the certificate beside its fingerprint, so
  later connections hand it to gRPC at once, with no handshake of their own
  first (a replaced certificate is then named once gRPC's handshake fails).
- CA (``--tls-ca FILE``): ordinary verification against that bundle, with
  hostname checks.
- plaintext (``--plaintext``): no TLS at all.

Mismatches (a plaintext server for a TLS client and the reverse, another
certificate, a CA that does not verify) become one-line errors instead of a
connect timeout.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pysrbup.errors import ServerUnavailableError, TransportSecurityError, UsageError

ENV_CONFIG_DIR = "PYSRBUP_CONFIG_DIR"
KNOWN_SERVERS = "known_servers"
#: One TLS handshake attempt (the connect timeout bounds the retries).
HANDSHAKE_TIMEOUT = 3.0
PLAINTEXT_HINT = "--plaintext or PYSRBUP_PLAINTEXT=1"
FINGERPRINT_HINT = "--tls-fingerprint or PYSRBUP_TLS_FINGERPRINT"


def config_dir() -> str:
    """The client's configuration folder (not created here)."""
    explicit = os.environ.get(ENV_CONFIG_DIR)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "pysrbup")


def _der(cert: bytes) -> bytes:
    if cert.lstrip().startswith(b"-----BEGIN"):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        leaf = x509.load_pem_x509_certificates(cert)[0]
        return leaf.public_bytes(serialization.Encoding.DER)
    return cert


def fingerprint(cert: bytes) -> str:
    """``SHA256:<64 hex digits>`` of a certificate (DER, or PEM: its first certificate)."""
    return "SHA256:" + hashlib.sha256(_der(cert)).hexdigest()


def parse_fingerprint(text: str) -> str:
    """Normalizes ``SHA256:<hex>`` (colons allowed) or ``SHA256:<base64>`` to ``SHA256:<hex>``."""
    body = text.strip()
    if body.lower().startswith("sha256:"):
        body = body[len("sha256:") :]
    digits = body.replace(":", "").lower()
    if len(digits) == 64 and all(c in "0123456789abcdef" for c in digits):
        return "SHA256:" + digits
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"+/", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return "SHA256:" + raw.hex()
    raise UsageError(
        f"malformed TLS fingerprint {text!r}: expected SHA256:<64 hex digits>, "
        "as pysrbup-server prints it at start"
    )


def split_address(address: str) -> tuple[str, int, str]:
    """(host, port, key) of ``host:port`` or ``[v6]:port``; key names it in known_servers."""
    text = address.strip()
    if text.startswith("dns:///"):
        text = text[len("dns:///") :]
    if "/" in text or text.startswith(("unix:", "vsock:")):
        raise UsageError(
            f"cannot use TLS with the server address {address!r}: give host:port "
            f"(or use {PLAINTEXT_HINT})"
        )
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else "443"
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        host, port_text = text, "443"  # a bare IPv6 address
    else:
        host, port_text = text, "443"  # gRPC's default port
    try:
        port = int(port_text)
        if not host or not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(f"malformed server address {address!r}: expected host:port") from None
    host = host.lower()
    key = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, port, key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _name_in(cert_der: bytes) -> str:
    """A host name the certificate is valid for (what gRPC is told to check)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(cert_der)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        alt = None
    if alt is not None:
        for name in alt.get_values_for_type(x509.DNSName):
            if "*" not in name:
                return name
        for ip in alt.get_values_for_type(x509.IPAddress):
            return str(ip)
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        return str(common[0].value)
    raise TransportSecurityError("the server's certificate names no host, so it cannot be pinned")


def _check_self_signed(cert_der: bytes, address: str) -> None:
    """A pinned certificate is gRPC's only root: it must be its own issuer."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(cert_der)
    try:
        if cert.issuer != cert.subject:
            raise ValueError
        cert.verify_directly_issued_by(cert)
    except Exception:  # ValueError, TypeError, InvalidSignature: not self-signed
        issuer = cert.issuer.rfc4514_string() or "an unnamed issuer"
        raise TransportSecurityError(
            f"the server at {address} presents a certificate issued by {issuer}, which cannot "
            "be pinned: verify it with --tls-ca FILE (the CA that issued it) instead"
        ) from None


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout: float) -> bytes:
    """The DER certificate the server presents; OSError (not SSLError) if unreachable."""
    server_name = None if _is_ip(host) else host
    if context.check_hostname:
        server_name = host
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls_sock,
    ):
        der = tls_sock.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the server presented no certificate")
    return der


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context


@dataclass
class ChannelSecurity:
    """What ``Connection`` builds its channel with.

    ``credentials`` is None for a plaintext channel. ``diagnose()`` is called
    when the channel does not become ready quickly: it raises a one-line error
    if the server speaks the other protocol or shows another certificate.
    """

    credentials: object | None
    options: list[tuple[str, str]] = field(default_factory=list)
    diagnose: Callable[[], None] = lambda: None
    fingerprint: str | None = None


class _Tls:
    def __init__(self, address: str, context: ssl.SSLContext, ca_file: str | None):
        self.address = address
        self.host, self.port, self.key = split_address(address)
        self.context = context
        self.ca_file = ca_file

    def fetch(self, timeout: float) -> bytes:
        """One handshake; definitive failures become one-line errors, OSError otherwise."""
        try:
            return _handshake(self.host, self.port, self.context, timeout)
        except ssl.SSLCertVerificationError as exc:
            reason = exc.verify_message or exc.reason or str(exc)
            raise TransportSecurityError(
                f"the certificate of the server at {self.address} is not trusted by "
                f"{self.ca_file}: {reason}"
            ) from None
        except ssl.SSLError:
            raise TransportSecurityError(
                f"the server at {self.address} does not speak TLS: it may be running with "
                f"--plaintext (then this client needs {PLAINTEXT_HINT} too, and the connection "
                "is unprotected)"
            ) from None

    def fetch_retrying(self, deadline: float) -> bytes:
        """Waits (like the channel would) for a server that is starting or restarting."""
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self.fetch(max(0.1, min(HANDSHAKE_TIMEOUT, remaining)))
            except OSError:
                if time.monotonic() + 0.2 >= deadline:
                    raise ServerUnavailableError(
                        f"cannot reach the server at {self.address} (is pysrbup-server running?)"
                    ) from None
                time.sleep(0.2)


@dataclass
class _Pin:
    """A ``known_servers`` line: the fingerprint, and the certificate once it was seen."""

    number: int
    fingerprint: str
    name: str | None = None  # the host name gRPC checks (see _name_in)
    der: bytes | None = None  # the certificate itself; its SHA-256 is the fingerprint


def _read_known(path: str, key: str) -> _Pin | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TransportSecurityError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and parts[0].lower() == key:
            try:
                pin = _Pin(number, parse_fingerprint(parts[1]))  # also when edited by hand
            except UsageError:
                return _Pin(number, parts[1])
            if len(parts) >= 4:
                with contextlib.suppress(binascii.Error, ValueError):
                    der = base64.b64decode(parts[3], validate=True)
                    if fingerprint(der) == pin.fingerprint:
                        pin.name, pin.der = parts[2], der
            return pin
    return None


def _known_line(key: str, fingerprint_text: str, name: str, der: bytes) -> str:
    return f"{key} {fingerprint_text} {name} {base64.b64encode(der).decode()}\n"


def _remember(path: str, line: str, replace: int | None = None) -> None:
    """Appends ``line`` to known_servers, or puts it in place of line number ``replace``."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if replace is not None:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines(keepends=True)
            lines[replace - 1] = line
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.writelines(lines)
            os.replace(tmp, path)
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            if handle.tell() == 0:
                handle.write(
                    "# pysrbup-client: pinned TLS certificates of servers "
                    "(address fingerprint host-name certificate)\n"
                )
            handle.write(line)
    except OSError as exc:
        raise TransportSecurityError(
            f"cannot record the server's certificate in {path}: {exc.strerror}"
        ) from None


def pinned_credentials(cert: bytes, name: str | None = None):
    """(credentials, options) trusting exactly ``cert`` (PEM or DER) and nothing else.

    ``name`` is the host name gRPC checks, read from the certificate if not given.
    """
    import grpc

    der = _der(cert)
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    return credentials, [("grpc.ssl_target_name_override", name or _name_in(der))]


def channel_security(
    address: str,
    *,
    plaintext: bool = False,
    tls_ca: str | None = None,
    tls_fingerprint: str | None = None,
    directory: str | None = None,
    timeout: float = 10.0,
) -> ChannelSecurity:
    """Checks the server at ``address`` and returns how to open a channel to it.

    Unless ``plaintext``, the server is contacted once before the channel
    exists (waiting up to ``timeout`` for it to come up): its certificate is
    verified against ``tls_ca``, or compared with ``tls_fingerprint``, or with
    the one pinned in ``directory``/known_servers (the config directory by
    default), where it is recorded on first contact.
    """
    import grpc

    ca_file = tls_ca
    if plaintext and (ca_file or tls_fingerprint):
        raise UsageError("--plaintext cannot be combined with --tls-ca or --tls-fingerprint")
    if ca_file and tls_fingerprint:
        raise UsageError("give either --tls-ca or --tls-fingerprint, not both")
    deadline = time.monotonic() + timeout
    if plaintext:
        return ChannelSecurity(None, diagnose=lambda: _diagnose_plaintext(address))

    if ca_file:
        try:
            with open(ca_file, "rb") as handle:
                roots = handle.read()
            context = ssl.create_default_context(cafile=ca_file)
        except OSError as exc:
            raise TransportSecurityError(
                f"cannot read the CA file {ca_file}: {exc.strerror}"
            ) from None
        except ssl.SSLError:
            raise TransportSecurityError(f"{ca_file} holds no PEM CA certificate") from None
        context.set_alpn_protocols(["h2"])
        probe = _Tls(address, context, ca_file)
        probe.fetch_retrying(deadline)  # fails fast and clearly where gRPC would just time out

        def diagnose_ca() -> None:
            with contextlib.suppress(OSError):  # unreachable: the caller keeps waiting
                probe.fetch(HANDSHAKE_TIMEOUT)

        return ChannelSecurity(
            grpc.ssl_channel_credentials(root_certificates=roots), [], diagnose_ca
        )

    probe = _Tls(address, _unverified_context(), None)
    advice = ""
    pin = None
    if tls_fingerprint:
        expected = parse_fingerprint(tls_fingerprint)
        path = None
        where = f"the expected {expected} ({FINGERPRINT_HINT})"
    else:
        path = os.path.join(directory or config_dir(), KNOWN_SERVERS)
        pin = _read_known(path, probe.key)
        expected = pin.fingerprint if pin else None
        if pin:
            where = f"{expected} pinned on line {pin.number} of {path}"
            advice = (
                "; if its certificate was replaced on purpose, remove that line "
                f'("{probe.key} {expected}") and connect again'
            )

    def refuse(presented: str) -> TransportSecurityError:
        return TransportSecurityError(
            f"the server at {address} presents TLS certificate {presented}, not {where}: "
            f"someone may be intercepting the connection{advice}"
        )

    def diagnose_pinned() -> None:
        try:
            now = fingerprint(probe.fetch(HANDSHAKE_TIMEOUT))
        except OSError:
            return
        if now != expected:
            raise refuse(now)

    if pin is not None and pin.der is not None:
        # The certificate was seen, checked and kept on first contact: gRPC is handed
        # it at once, and refuses a server without its key. No handshake of our own
        # first (nor the x509 parser): diagnose_pinned names a replaced one.
        credentials, options = pinned_credentials(pin.der, pin.name)
        return ChannelSecurity(credentials, options, diagnose_pinned, expected)

    der = probe.fetch_retrying(deadline)
    got = fingerprint(der)
    if expected is not None and got != expected:
        raise refuse(got)
    _check_self_signed(der, address)
    name = _name_in(der)
    credentials, options = pinned_credentials(der, name)
    if path is not None:
        # Pinned now, or pinned by fingerprint alone (by hand, or by an older client):
        # the certificate goes with it, so the next connection needs no handshake first.
        _remember(path, _known_line(probe.key, got, name, der), pin.number if pin else None)
    if expected is None:
        print(
            f"pysrbup-client: pinned the TLS certificate of {probe.key} ({got}) in {path}",
            file=sys.stderr,
            flush=True,
        )
        expected = got
        where = f"{expected}, pinned in {path} moments ago"
    return ChannelSecurity(credentials, options, diagnose_pinned, got)


def _diagnose_plaintext(address: str) -> None:
    """Raises if a plaintext client is talking to a server that speaks TLS."""
    try:
        host, port, _ = split_address(address)
        _handshake(host, port, _unverified_context(), HANDSHAKE_TIMEOUT)
    except (OSError, UsageError):
        return  # not TLS either (or unreachable): the caller's timeout message stands
    raise TransportSecurityError(
        f"the server at {address} speaks TLS, but this client is in plaintext mode "
        f"({PLAINTEXT_HINT}): drop that to connect over TLS"
    )
