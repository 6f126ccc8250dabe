"""Key files: a master or put-only key on disk, optionally under a passphrase.

A key file is one line of JSON, mode 0600::

    {"format": "pysrbup-key", "version": 2, "kind": "master" | "put",
     "key": "<base64 of the key's bytes>"}                       (unprotected)

    {"format": "pysrbup-key", "version": 2, "kind": "master" | "put",
     "kdf": {"name": "scrypt", "n": 65536, "r": 8, "p": 1, "salt": "<base64 16 bytes>"},
     "sealed": "<base64 of nonce (12) || AES-256-GCM(kdf(passphrase), key bytes, aad)>"}

with ``aad = "pysrbup-key" || version || kind``, so the kind cannot be
swapped under the seal. A master key's bytes are its 32-byte secret, a put
key's the 160 bytes of ``PutKey.payload``. Version 1 files
(``{"format", "version": 1, "key"}``) are unprotected master keys and still
load. The passphrase comes from ``PYSRBUP_PASSWORD_FILE``, then
``PYSRBUP_PASSWORD_COMMAND``, then the terminal (restic's and borg's
conventions).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import json
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pysrbup.crypto.keys import Key, MasterKey, PutKey
from pysrbup.errors import KeyFileError

FORMAT = "pysrbup-key"
VERSION = 2
ENV_PASSWORD_FILE = "PYSRBUP_PASSWORD_FILE"
ENV_PASSWORD_COMMAND = "PYSRBUP_PASSWORD_COMMAND"
ENV_NEW_PASSWORD_FILE = "PYSRBUP_NEW_PASSWORD_FILE"
#: scrypt cost: 64 MiB and about 0.2 s here (restic calibrates to ~0.5 s, borg 2 uses 64 MiB).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 16, 8, 1
_MAX_N = 1 << 22
_NONCE = 12


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text) -> bytes:
    return base64.b64decode(text, validate=True)


def _aad(kind: str) -> bytes:
    return f"{FORMAT}\0{VERSION}\0{kind}".encode()


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode())


# ---- passphrases ---------------------------------------------------------------


def _first_line_of(variable: str) -> str | None:
    """The first line of the file that environment ``variable`` names, if it is set."""
    path = os.environ.get(variable)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read {variable} {path}: {exc}") from None


def passphrase_from_environment() -> str | None:
    """The passphrase from PYSRBUP_PASSWORD_FILE or PYSRBUP_PASSWORD_COMMAND, if set."""
    from_file = _first_line_of(ENV_PASSWORD_FILE)
    if from_file is not None:
        return from_file
    command = os.environ.get(ENV_PASSWORD_COMMAND)
    if command:
        try:
            done = subprocess.run(
                shlex.split(command), capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise KeyFileError(f"{ENV_PASSWORD_COMMAND} failed: {exc}") from None
        if done.returncode != 0:
            raise KeyFileError(f"{ENV_PASSWORD_COMMAND} exited {done.returncode}")
        return done.stdout.split("\n", 1)[0].rstrip("\r")
    return None


def ask_passphrase(prompt: str, confirm: bool = False) -> str | None:
    """The passphrase from the environment, else from the terminal; None with neither."""
    given = passphrase_from_environment()
    if given is not None:
        return given
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("enter it again: ") != first:
        raise KeyFileError("the passphrases do not match")
    return first


def new_passphrase_for_change(path: str) -> str:
    """The new passphrase for ``key passwd``: PYSRBUP_NEW_PASSWORD_FILE, else the terminal."""
    from_file = _first_line_of(ENV_NEW_PASSWORD_FILE)
    if from_file is not None:
        return from_file
    if not sys.stdin.isatty():
        raise KeyFileError(
            f"no new passphrase: set {ENV_NEW_PASSWORD_FILE} or run this on a terminal"
        )
    first = getpass.getpass(f"new passphrase for {path} (empty: none): ")
    if getpass.getpass("enter it again: ") != first:
        raise KeyFileError("the passphrases do not match")
    return first


# ---- reading and writing -----------------------------------------------------


def dumps(key: Key, passphrase: str | None = None) -> str:
    """The key file's text; sealed under ``passphrase`` when one is given (non-empty)."""
    kind = "master" if isinstance(key, MasterKey) else "put"
    body: dict = {"format": FORMAT, "version": VERSION, "kind": kind}
    if not passphrase:
        body["key"] = _b64(key.payload())
    else:
        salt = os.urandom(16)
        nonce = os.urandom(_NONCE)
        secret = _kdf(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        sealed = AESGCM(secret).encrypt(nonce, key.payload(), _aad(kind))
        body["kdf"] = {
            "name": "scrypt",
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": _b64(salt),
        }
        body["sealed"] = _b64(nonce + sealed)
    return json.dumps(body) + "\n"


def is_protected(text: str) -> bool:
    try:
        return "sealed" in json.loads(text)
    except (ValueError, TypeError):
        return False


def loads(
    text: str, source: str = "key", passphrase: Callable[[], str | None] | None = None
) -> Key:
    """Parses a key file's text; ``passphrase`` supplies one for a protected file."""
    try:
        body = json.loads(text)
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise ValueError("not a pysrbup key")
        version = body.get("version")
        if version == 1:
            return MasterKey(_unb64(body["key"]))
        if version != VERSION:
            raise ValueError(f"unsupported key version {version!r}")
        kind = body.get("kind")
        if kind not in ("master", "put"):
            raise ValueError(f"unknown key kind {kind!r}")
        if "sealed" in body:
            payload = _unseal(body, kind, source, passphrase)
        else:
            payload = _unb64(body["key"])
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise KeyFileError(f"{source} is not a valid pysrbup key file ({exc})") from None
    return MasterKey(payload) if kind == "master" else PutKey.from_payload(payload)


def _unseal(body: dict, kind: str, source: str, passphrase) -> bytes:
    kdf = body["kdf"]
    if kdf.get("name") != "scrypt":
        raise ValueError(f"unknown key derivation {kdf.get('name')!r}")
    n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError("unreasonable key derivation parameters")
    salt = _unb64(kdf["salt"])
    sealed = _unb64(body["sealed"])
    given = passphrase() if passphrase is not None else None
    if given is None:
        raise KeyFileError(
            f"{source} is protected by a passphrase: give it on a terminal, in "
            f"{ENV_PASSWORD_FILE} or in {ENV_PASSWORD_COMMAND}"
        )
    try:
        return AESGCM(_kdf(given, salt, n, r, p)).decrypt(
            sealed[:_NONCE], sealed[_NONCE:], _aad(kind)
        )
    except InvalidTag:
        raise KeyFileError(f"wrong passphrase for {source}") from None


def read_key_text(path: str) -> str:
    """The text of the key file at ``path``, with a clear error when it is missing or bad."""
    try:
        with open(path, encoding="utf-8") as handle:
            st = os.fstat(handle.fileno())
            text = handle.read(64 * 1024)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(
            f"pysrbup: warning: key file {path} can be read by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it",
            file=sys.stderr,
        )
    return text


def load_key_file(path: str) -> Key:
    """Reads the key file at ``path``, asking for its passphrase if it has one."""
    return loads(
        read_key_text(path),
        source=f"key file {path}",
        passphrase=lambda: ask_passphrase(f"passphrase for {path}: "),
    )


def write_key_file(path: str, key: Key, passphrase: str | None = None) -> None:
    """Writes ``key`` to a new file with mode 0600; never overwrites."""
    text = dumps(key, passphrase)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None


def replace_key_file(path: str, key: Key, passphrase: str | None) -> None:
    """Rewrites the key file at ``path`` (a new passphrase) atomically, keeping mode 0600."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    write_key_file(tmp, key, passphrase)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise KeyFileError(f"cannot replace key file {path}: {exc.strerror}") from None
