"""A bd volume under the whole stack and clients nobody here wrote: qemu-img, qemu-io and nbdinfo
over `mortar nbd serve`, and coreutils on a FUSE mount (`ln`, `ln -s`, `truncate`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mortar.cli.main import main as mortar
from tests.interop.cluster import nbd_serve
from tests.xlators.storage.test_bd_brick import BdVolume, bd_volume

MIB = 1 << 20
MORTAR = str(Path(sys.executable).parent / "mortar")
pytestmark = [pytest.mark.integration, pytest.mark.interop]


def need(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def run(*cmd: str | Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{cmd} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Start a bd volume with a pool of the given size; its client volfile."""
    started: list[BdVolume] = []

    def start(pool_size: str) -> Path:
        vol = bd_volume(tmp_path, pool_size)
        started.append(vol)
        return vol.start()

    yield start
    for vol in started:
        vol.stop()


def sha_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


@need("qemu-img", "qemu-io", "nbdinfo")
def test_qemu_img_convert_snapshot_and_qemu_io(served: Callable[[str], Path], tmp_path: Path) -> None:
    volfile = served("768MiB")
    source = tmp_path / "source.raw"
    with open(source, "wb") as f:  # 256 MiB: data in the first 64 MiB and at 192 MiB, holes between
        f.truncate(256 * MIB)
        for at in (0, 192 * MIB):
            f.seek(at)
            for _ in range(16):
                f.write(os.urandom(4 * MIB) if at == 0 else os.urandom(MIB) * 4)
    want = sha_of(source)
    assert mortar(["bd", "create", "bdvol:/pool/vm.img", str(256 * MIB), "--volfile", str(volfile)]) == 0
    with nbd_serve(tmp_path, "--volfile", str(volfile)) as nbd:
        origin = nbd.uri("bdvol/vm.img")
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, origin, timeout=300)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, origin, timeout=300)
        # nbdinfo --map: the regions qemu-img left zero are holes of the thin volume
        extents = [ln.split() for ln in run("nbdinfo", "--map", origin).stdout.splitlines() if ln.strip()]
        holes = [(int(e[0]), int(e[1])) for e in extents if int(e[2]) & 1]
        assert any(off <= 64 * MIB and off + ln >= 192 * MIB for off, ln in holes), extents
        assert not any(off < 64 * MIB for off, _ in holes), extents

        assert mortar(["bd", "snapshot", "bdvol:/pool/vm.img", "vm-snap.img", "--volfile", str(volfile)]) == 0
        snap = nbd.uri("bdvol/vm-snap.img")
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 1M 2M", snap)
        run("qemu-io", "-f", "raw", "-c", "read -P 0xab 1M 2M", snap)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, origin, timeout=300)  # origin unchanged
        differs = run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, snap, check=False, timeout=300)
        assert differs.returncode == 1 and "Content mismatch at offset 1048576" in differs.stdout
    assert sha_of(source) == want


@contextlib.contextmanager
def fuse_mount(volfile: Path, mountpoint: Path) -> Iterator[Path]:
    mountpoint.mkdir()
    log = mountpoint.parent / "fuse.log"
    run(
        MORTAR,
        "mount",
        "-o",
        f"log-file={log},attr-timeout=0,entry-timeout=0",
        "--volfile",
        volfile,
        mountpoint,
    )
    try:
        yield mountpoint
    finally:
        if run(MORTAR, "umount", mountpoint, check=False, timeout=60).returncode != 0:
            run("umount", "-l", mountpoint, check=False, timeout=30)
        assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or os.geteuid() != 0,
    reason="FUSE mounts need /dev/fuse, fusermount3 and root",
)
def test_coreutils_on_a_fuse_mount(served: Callable[[str], Path], tmp_path: Path) -> None:
    volfile = served("128MiB")
    with fuse_mount(volfile, tmp_path / "mnt") as mnt:
        data = os.urandom(8 * MIB)
        (mnt / "disk.img").write_bytes(data)  # cp-like: create, then writes that grow the image
        run("truncate", "-s", "16M", mnt / "disk.img")  # resize up
        assert (mnt / "disk.img").stat().st_size == 16 * MIB
        run("ln", mnt / "disk.img", mnt / "clone.img")  # full clone
        run("ln", "-s", "disk.img", mnt / "snap.img")  # snapshot
        assert (mnt / "snap.img").exists() and not (mnt / "snap.img").is_symlink()
        assert os.getxattr(mnt / "snap.img", "user.mortar.bd.origin") == b"disk.img"
        with open(mnt / "snap.img", "r+b") as f:
            f.write(b"S" * MIB)
        with open(mnt / "clone.img", "r+b") as f:
            f.seek(MIB)
            f.write(b"C" * MIB)
        expect = data + bytes(8 * MIB)
        assert (mnt / "disk.img").read_bytes() == expect
        assert (mnt / "snap.img").read_bytes() == b"S" * MIB + expect[MIB:]
        assert (mnt / "clone.img").read_bytes() == expect[:MIB] + b"C" * MIB + expect[2 * MIB :]
        run("truncate", "-s", "4M", mnt / "clone.img")  # resize down
        assert (mnt / "clone.img").read_bytes() == expect[:MIB] + b"C" * MIB + expect[2 * MIB : 4 * MIB]
        assert sorted(os.listdir(mnt)) == ["clone.img", "disk.img", "snap.img"]
        assert run("mkdir", mnt / "dir", check=False).returncode != 0
        os.unlink(mnt / "disk.img")
        assert (mnt / "snap.img").read_bytes()[:MIB] == b"S" * MIB
