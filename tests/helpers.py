"""What the tests share besides fixtures: real servers and clients as subprocesses.

Import from here (``from helpers import ...``); conftest.py only defines fixtures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYSRBUP_CACHE_DIR"] = cache_dir
    # Pinned server certificates (known_servers) per test: ports are reused across tests.
    env["PYSRBUP_CONFIG_DIR"] = os.path.normpath(cache_dir) + "-config"
    for name in (
        "PYSRBUP_SERVER",
        "PYSRBUP_KEY_FILE",
        "PYSRBUP_TLS_CA",
        "PYSRBUP_TLS_FINGERPRINT",
        "PYSRBUP_PLAINTEXT",
    ):
        env.pop(name, None)
    return env


@dataclass
class ServerProcess:
    """A pysrbup-server subprocess on 127.0.0.1."""

    repo: str
    port: int
    env: dict
    log_path: str
    extra: tuple = ()
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pysrbup.cli.server",
                f"--bind-to={self.address}",
                "--num-threads=2",
                *self.extra,
                self.repo,
            ],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def settled(self, timeout: float = 30) -> None:
        """Waits until every pack has left staging for packs/ with its parity sidecar.

        A backup's last pack is moved there, and its parity written beside it, by a
        server thread after the backup returned.
        """
        from pysrbup.server.ecc import sidecar_path

        staging = os.path.join(self.repo, "staging")
        parity = "--ecc=none" not in self.extra

        def pending() -> list[str]:
            left = [name for name in os.listdir(staging) if name.endswith(".pack")]
            for folder, _, names in os.walk(os.path.join(self.repo, "packs")):
                for name in names:
                    path = os.path.join(folder, name)
                    if parity and name.endswith(".pack") and not os.path.exists(sidecar_path(path)):
                        left.append(path)
            return left

        deadline = time.monotonic() + timeout
        while pending():
            if time.monotonic() > deadline:
                raise AssertionError(f"packs not settled after {timeout} s: {pending()}")
            time.sleep(0.01)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    @property
    def init_token(self) -> str:
        """The one-time init token of a new repository ("" once initialised)."""
        try:
            with open(os.path.join(self.repo, "init-token")) as handle:
                return handle.read().strip()
        except FileNotFoundError:
            return ""

    def client(self, cache_dir: str) -> Client:
        """A client of this server whose first backup initialises a new repository."""
        env = base_env(cache_dir)
        env["PYSRBUP_INIT_TOKEN"] = self.init_token
        return Client(self.address, env)


@dataclass
class Client:
    """Runs pysrbup-client as a subprocess against one server."""

    address: str
    env: dict

    def command(self, *args: str) -> list[str]:
        """The pysrbup-client command line for ``args`` against this server."""
        return [
            sys.executable,
            "-m",
            "pysrbup.cli.client",
            f"--server-address={self.address}",
            "--num-threads=2",
            *args,
        ]

    def run(self, *args: str, check: bool = False, timeout: float = 300, prefix=(), **kwargs):
        kwargs.setdefault("env", self.env)
        cmd = [*prefix, *self.command(*args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def spawn(self, *args: str) -> subprocess.Popen:
        """Starts the client in the background (text pipes), for concurrency and kill tests."""
        return subprocess.Popen(
            self.command(*args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def backup(self, source: str, key: str) -> str:
        return backup_id_in(self.run("backup", source, key, check=True).stdout)


def backup_id_in(stdout: str) -> str:
    """The id from backup's last line, ``Completed backup id: <ID>``."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("Completed backup id: "), stdout
    return last.removeprefix("Completed backup id: ")


def assert_no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def server_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``pysrbup-server ARGS`` to its end (``--scrub``, ``--init``, a refused start)."""
    return subprocess.run(
        [sys.executable, "-m", "pysrbup.cli.server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def initialise_repository(repo, key) -> None:
    """Initialises a server-side ``Repository`` for ``key``, as ``init`` does over the wire."""
    from pysrbup.repo import auth

    token = repo.init_token().encode()
    message = auth.init_message(repo.repo_id, token, key.write_public_key, key.destroy_public_key)
    repo.initialise(
        token,
        key.write_public_key,
        key.destroy_public_key,
        key.write_key.sign(message),
        key.destroy_key.sign(message),
    )
