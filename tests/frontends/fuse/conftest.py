"""FUSE test fixtures: volumes of real `mortar-brick` processes on loopback, and kernel mounts made
with `mortar mount` that are always unmounted at teardown (lazily and by killing the process, if
they will not go quietly). Mountpoints live under a world-searchable directory so tests can act as
an unprivileged user (`setpriv`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mortar.frontends.fuse.mount import RUN_DIR, alive, canonical, default_path, find_mount
from tests.integration.brickproc import TestVolume

MORTAR = str(Path(sys.executable).parent / "mortar")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run(*cmd: str | Path, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with a bound on its time; with `check`, fail showing its output."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{cmd} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def as_nobody(*cmd: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(*NOBODY, *cmd, timeout=timeout, check=False)


@dataclass
class Mount:
    path: Path
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def mounted_on(path: Path) -> bool:
    return find_mount(canonical(str(path))) is not None


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def force_unmount(path: Path, pid: int | None) -> None:
    """Unmount however it takes: umount, then lazily, then kill the process."""
    if mounted_on(path) and run("umount", path, timeout=20, check=False).returncode != 0:
        run("umount", "-l", path, timeout=20, check=False)
    if pid is not None and not wait_gone(pid, 20):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)
    if mounted_on(path):
        run("fusermount3", "-u", "-z", path, timeout=20, check=False)


def read_pid(mountpoint: Path) -> int:
    return int(Path(default_path(RUN_DIR, canonical(str(mountpoint)), ".pid")).read_text())


@contextlib.contextmanager
def mounted(volfile: Path, mountpoint: Path, options: str = "", *extra: str) -> Iterator[Mount]:
    """`mortar mount` the volume; at the end, unmount and check the process left cleanly and
    logged no traceback."""
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    opts = f"log-file={log}" + (f",{options}" if options else "")
    done = run(MORTAR, "mount", "-o", opts, *extra, "--volfile", volfile, mountpoint, timeout=90, check=False)
    assert done.returncode == 0, f"mount failed: {done.stderr}\n{log.read_text() if log.exists() else ''}"
    mount = Mount(mountpoint, log, read_pid(mountpoint))
    clean = False
    try:
        yield mount
        clean = True
    finally:
        if clean:
            run(MORTAR, "umount", mountpoint, timeout=60)
            assert not alive(mount.pid), "the mount process did not exit after mortar umount"
        force_unmount(mountpoint, mount.pid)
    text = mount.log_text()
    assert "Traceback" not in text, text[-5000:]
    assert "exiting with status 0" in text, text[-3000:]


@pytest.fixture(scope="session")
def base() -> Iterator[Path]:
    """Where every mountpoint and brick of the session lives, searchable by any user."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or os.geteuid() != 0:
        pytest.skip("FUSE mounts need /dev/fuse, fusermount3 and root")
    path = Path(tempfile.mkdtemp(prefix="mortar-fuse-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for entry in path.iterdir():
            if entry.is_dir() and mounted_on(entry):
                force_unmount(entry, None)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def volume(base: Path) -> Iterator[Path]:
    """A one-brick volume; yields its client volfile."""
    vol = TestVolume(base / "vol1")
    (base / "vol1").mkdir()
    try:
        yield vol.start()
    finally:
        vol.stop()


@pytest.fixture(scope="session")
def dht_volume(base: Path) -> Iterator[Path]:
    """A two-brick distribute volume."""
    vol = TestVolume(base / "vol2", bricks=2)
    (base / "vol2").mkdir()
    try:
        yield vol.start()
    finally:
        vol.stop()


@pytest.fixture(scope="session")
def replica_volume(base: Path) -> Iterator[Path]:
    """A replica 3 volume."""
    vol = TestVolume(base / "vol3", bricks=3, replica=3)
    (base / "vol3").mkdir()
    try:
        yield vol.start()
    finally:
        vol.stop()


@pytest.fixture(scope="module")
def mnt(volume: Path, base: Path, request: pytest.FixtureRequest) -> Iterator[Mount]:
    """The one-brick volume mounted for a whole test module."""
    with mounted(volume, base / f"m-{request.module.__name__.rsplit('.', 1)[-1]}") as m:
        yield m


@pytest.fixture
def work(mnt: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory on the module's mount, world-writable, for one test."""
    path = mnt.path / request.node.name.replace("[", "-").replace("]", "")
    path.mkdir()
    path.chmod(0o777)
    return path
