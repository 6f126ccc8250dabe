"""Parity sidecars on a pack-sized file: write (seal-time cost) and scrub (verify) in MB/s.

Run: ``pytest bench/native --benchmark-only -k ecc``. The pack is 32 MiB of
random data, the repository default size, at the default level 20+2 and a
denser 10+4.
"""

from __future__ import annotations

import numpy as np
import pytest

from pysrbup.server import ecc

PACK_BYTES = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def pack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ecc") / "bench.pack"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, PACK_BYTES, np.uint8).tobytes())
    return str(path)


@pytest.mark.parametrize("level", ["20+2", "10+4"])
def test_sidecar_write(throughput, pack_file, level):
    parsed = ecc.EccLevel.parse(level)
    throughput(lambda: ecc.write_sidecar(pack_file, parsed), PACK_BYTES, group="ecc write")


@pytest.mark.parametrize("level", ["20+2", "10+4"])
def test_scrub_clean_pack(throughput, pack_file, level):
    ecc.write_sidecar(pack_file, ecc.EccLevel.parse(level))
    throughput(lambda: ecc.check_pack(pack_file), PACK_BYTES, group="ecc scrub")


def test_scrub_with_repair(throughput, pack_file):
    ecc.write_sidecar(pack_file, ecc.DEFAULT_LEVEL)
    original = open(pack_file, "rb").read()  # noqa: SIM115 - small benchmark helper

    def damage_and_repair():
        with open(pack_file, "r+b") as handle:
            handle.seek(PACK_BYTES // 3)
            handle.write(b"\0" * 1_000_000)
        result = ecc.check_pack(pack_file)
        assert result.blocks_unrepairable == 0

    throughput(damage_and_repair, PACK_BYTES, group="ecc scrub")
    assert open(pack_file, "rb").read() == original  # noqa: SIM115
