"""A pool on a real block device: a loop device over a temp file (needs root and losetup)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.thinpool import ThinPool

MiB = 1 << 20


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(48 * MiB)
    try:
        dev = subprocess.run(
            ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no loop device available: {exc}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=30)


def test_pool_on_loop_device(loop_device: str, tmp_path: Path) -> None:
    meta = tmp_path / "pool.meta"
    with pytest.raises(FopError) as exc:
        ThinPool.create(loop_device)  # a device has no "beside": metadata must be named
    assert exc.value.errno == errno.EINVAL
    with ThinPool.create(loop_device, metadata_path=meta, block_size=128 << 10, commit_interval=0) as pool:
        assert pool.stats().data_blocks == (48 * MiB - (128 << 10)) // (128 << 10)
        vol = pool.create_volume("disk", 1 << 30)
        payload = os.urandom(3 * MiB + 17)
        vol.write(payload, 5 * MiB - 9)
        pool.snapshot("disk", "snap").write(b"s" * 10, 5 * MiB)
        pool.clone("disk", "copy")  # copy_file_range refuses block devices: the fallback copies
        vol.flush()
    with ThinPool.open(loop_device, commit_interval=0) as pool:  # metadata path from the superblock
        assert pool.check() == []
        assert pool.volume("disk").read(5 * MiB - 9, len(payload)) == payload
        assert pool.volume("copy").read(5 * MiB - 9, len(payload)) == payload
        assert pool.volume("snap").read(5 * MiB - 9, 19) == payload[:9] + b"s" * 10
