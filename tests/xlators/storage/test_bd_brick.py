"""A bd volume end to end: a real `mortar-brick` process serving the brick volfile volgen makes for
storage/bd (locks, index, io-threads above it), and the native client over TCP."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mortar.client import Volume
from mortar.graph.volfile import parse
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile
from mortar.thinpool.bdpool import ORIGIN_XATTR

MIB = 1 << 20
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


@dataclass
class BdVolume:
    """One bd brick in its own process and the client volfile that reaches it."""

    workdir: Path
    desc: VolumeDescription
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Path:
        volfile = self.workdir / "brick.vol"
        volfile.write_text(brick_volfile(self.desc, 0, create=True))
        port_file = self.workdir / "brick.port"
        log = self.workdir / "brick.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "mortar-brick"),
                "--volfile",
                str(volfile),
                "--port-file",
                str(port_file),
                "--log-file",
                str(log),
            ],
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = log.read_text()[-3000:] if log.exists() else ""
                raise RuntimeError(f"bd brick did not start: {said}")
            time.sleep(0.02)
        brick = self.desc.bricks[0]
        self.desc.bricks[0] = Brick(brick.host, brick.path, int(port_file.read_text()))
        client = self.workdir / "client.vol"
        client.write_text(client_volfile(self.desc))
        return client

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def bd_volume(workdir: Path, pool_size: str) -> BdVolume:
    desc = VolumeDescription(
        "bdvol",
        str(uuid.uuid4()),
        [Brick("127.0.0.1", str(workdir / "pool"))],
        brick_type="bd",
        bd_options={"pool-size": pool_size, "block-size": "64KiB"},
        xlator_options={"protocol/client": {"ping-timeout": "5"}},
    )
    return BdVolume(workdir, desc)


@pytest.fixture
def make_volume(tmp_path: Path) -> Iterator[Callable[[str], BdVolume]]:
    started: list[BdVolume] = []

    def make(pool_size: str) -> BdVolume:
        vol = bd_volume(tmp_path, pool_size)
        started.append(vol)
        return vol

    yield make
    for vol in started:
        vol.stop()


def test_volgen_puts_storage_bd_under_the_brick_stack(tmp_path: Path) -> None:
    desc = bd_volume(tmp_path, "1GiB").desc
    specs = {s.type: s for s in parse(brick_volfile(desc, 0, create=True))}
    bd = specs["storage/bd"]
    assert bd.options == {
        "pool": str(tmp_path / "pool"),
        "volume-id": desc.volume_id,
        "pool-size": "1GiB",
        "block-size": "64KiB",
        "pool-create": "on",
    }
    assert specs["features/locks"].subvolumes == [bd.name] and "storage/posix" not in specs
    assert specs["features/index"].options == {"index-base": f"{tmp_path}/pool/.mortar/indices"}
    assert "pool-create" not in parse(brick_volfile(desc, 0))[0].options
    desc.brick_type = "posix"  # the default: posix volumes are generated as before
    assert "storage/bd" not in {s.type for s in parse(brick_volfile(desc, 0))}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(vol: Volume, path: str) -> bytes:
    with vol.open(path, "rb", buffering=0) as f:
        return f.read()


def test_write_clone_snapshot_and_read_back(make_volume: Callable[[str], BdVolume]) -> None:
    served = make_volume("256MiB")
    with Volume.from_volfile(served.start(), timeout=20) as vol:
        vfs0 = vol.statvfs("/")
        assert vfs0.f_frsize == 64 << 10 and vfs0.f_blocks * vfs0.f_frsize <= 256 * MIB
        data = os.urandom(64 * MIB)
        h = vol.create("/vm.img")
        for off in range(0, len(data), 8 * MIB):
            vol.pwrite(h, data[off : off + 8 * MIB], off)
        vol.fsync(h)
        vol.close(h)
        assert vol.stat("/vm.img").st_size == 64 * MIB
        vfs1 = vol.statvfs("/")
        assert vfs0.f_bfree - vfs1.f_bfree == 64 * MIB // vfs0.f_frsize

        vol.link("/vm.img", "/vm-clone.img")  # a full copy
        vol.symlink("vm.img", "/vm-snap.img")  # a snapshot: no blocks of its own yet
        vfs2 = vol.statvfs("/")
        assert vfs1.f_bfree - vfs2.f_bfree == 64 * MIB // vfs0.f_frsize
        snap = vol.stat("/vm-snap.img")
        assert snap.st_size == 64 * MIB and (snap.st_mode & 0o170000) == 0o100000
        assert vol.getxattr("/vm-snap.img", ORIGIN_XATTR) == b"vm.img"
        assert sorted(vol.listdir("/")) == ["vm-clone.img", "vm-snap.img", "vm.img"]

        # writes to the snapshot and the clone stay theirs
        h = vol.open_fd("/vm-snap.img", os.O_RDWR)
        vol.pwrite(h, b"S" * MIB, 10 * MIB)
        vol.close(h)
        h = vol.open_fd("/vm-clone.img", os.O_RDWR)
        vol.pwrite(h, b"C" * MIB, 20 * MIB)
        vol.close(h)
        assert sha(read_file(vol, "/vm.img")) == sha(data)
        assert sha(read_file(vol, "/vm-snap.img")) == sha(data[: 10 * MIB] + b"S" * MIB + data[11 * MIB :])
        assert sha(read_file(vol, "/vm-clone.img")) == sha(data[: 20 * MIB] + b"C" * MIB + data[21 * MIB :])

        vol.truncate("/vm-clone.img", 16 * MIB)  # shrink frees the tail's blocks
        assert vol.stat("/vm-clone.img").st_size == 16 * MIB
        assert vol.statvfs("/").f_bfree > vfs2.f_bfree
        with pytest.raises(PermissionError):
            vol.mkdir("/dir")


def test_full_pool_through_the_client(make_volume: Callable[[str], BdVolume]) -> None:
    served = make_volume("16MiB")
    with Volume.from_volfile(served.start(), timeout=20) as vol:
        keep = os.urandom(4 * MIB)
        h = vol.create("/keep.img")
        vol.pwrite(h, keep, 0)
        vol.close(h)
        filler = vol.create("/filler.img")
        vol.pwrite(filler, os.urandom(8 * MIB), 0)
        with pytest.raises(OSError) as exc:
            vol.pwrite(filler, os.urandom(8 * MIB), 8 * MIB)
        assert exc.value.errno == errno.ENOSPC
        vol.close(filler)
        assert read_file(vol, "/keep.img") == keep  # other images stay readable
        h = vol.create("/more.img")
        with pytest.raises(OSError) as exc:
            vol.pwrite(h, os.urandom(4 * MIB), 0)
        assert exc.value.errno == errno.ENOSPC
        before = vol.statvfs("/").f_bfree
        vol.unlink("/filler.img")  # deleting one image frees its space at once
        assert vol.statvfs("/").f_bfree >= before + 8 * MIB // (64 << 10)
        more = os.urandom(4 * MIB)
        vol.pwrite(h, more, 0)
        vol.close(h)
        assert read_file(vol, "/more.img") == more
        assert read_file(vol, "/keep.img") == keep
