"""The LVM2 backend against the real `lvm` on a loop device: what this kernel allows.

Volume groups work everywhere; thin pools need device-mapper. Without it (this machine) the test
checks that creating the pool fails with a clear ENODEV naming device-mapper; with it, the pool
serves volumes, snapshots and clones for real. Every command is confined to the loop device
(`--devices`), and the VG, PV label and loop device are removed in teardown whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.thinpool.bdpool import Location, create_pool
from mortar.thinpool.lvm import Lvm, LvmPool, create_volume_group, dm_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and LVM"),
    pytest.mark.skipif(shutil.which("lvm") is None, reason="lvm2 is not installed"),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup is not installed"),
]


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "pv.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    made = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, timeout=30, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30, check=False)


@pytest.fixture
def vg(loop_device: str) -> Iterator[tuple[Lvm, str, str]]:
    lvm = Lvm(devices=[loop_device])
    name = f"mortartest{uuid.uuid4().hex[:8]}"
    try:
        yield lvm, name, loop_device
    finally:
        with contextlib.suppress(FopError):
            lvm.vgremove(name)
        with contextlib.suppress(FopError):
            lvm.pvremove(loop_device)


def test_volume_group_on_a_loop_device_and_the_thin_pool(vg: tuple[Lvm, str, str]) -> None:
    lvm, name, device = vg
    info = create_volume_group(lvm, name, [device])
    assert info.name == name and info.extent_size == 4 << 20
    assert info.size == info.extent_count * info.extent_size and info.free == info.size
    assert 56 << 20 <= info.size <= 64 << 20
    assert len(info.uuid) == 38 and info.uuid.count("-") == 6
    pv = next(p for p in lvm.pvs() if p.name == device)
    assert pv.vg == name and pv.size == info.size
    assert lvm.lvs(name) == []
    if not dm_available():
        with pytest.raises(FopError) as exc:
            LvmPool.create(name, "pool", 32 << 20, lvm=lvm)
        assert exc.value.errno == errno.ENODEV
        assert "device-mapper is not available in this kernel" in str(exc.value)
        assert lvm.lvs(name) == []  # nothing half made
        return
    with LvmPool.create(name, "pool", 40 << 20, lvm=lvm) as pool:  # pragma: no cover - needs device-mapper
        vol = pool.create_volume("img", 1000)
        assert vol.size == 1000
        vol.write(b"hello", 100)
        snap = pool.snapshot("img", "img-snap")
        snap.write(b"snap!", 100)
        assert vol.read(100, 5) == b"hello" and snap.read(100, 5) == b"snap!"
        copy = pool.clone("img", "img-copy")
        assert copy.read(0, 1000) == vol.read(0, 1000)
        for v in ("img-copy", "img-snap", "img"):
            pool.delete_volume(v)


def test_missing_volume_group_and_lvm_pool_create(vg: tuple[Lvm, str, str], tmp_path: Path) -> None:
    lvm, name, device = vg
    with pytest.raises(FopError) as exc:
        lvm.vgs(name)
    assert exc.value.errno == errno.ENOENT
    create_volume_group(lvm, name, [device])
    loc = Location(str(tmp_path / "lvmpool"), "lvm", vg=name, thinpool="pool")
    if dm_available():  # pragma: no cover - needs device-mapper
        create_pool(loc, size=32 << 20, lvm=lvm).close()
        return
    with pytest.raises(FopError) as exc:
        create_pool(loc, size=32 << 20, lvm=lvm)
    assert exc.value.errno == errno.ENODEV and "thin" in str(exc.value)
