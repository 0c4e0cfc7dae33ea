"""Data through the mount: the kernel's request sizes (1 MiB), fio with verification, direct and
buffered I/O compared byte for byte, and direct-io-mode."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.frontends.fuse.ops import IO_SIZE

from . import recorder
from .conftest import Mount, force_unmount, mounted, mounted_on, run

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


@contextlib.contextmanager
def recorded_mount(volume: Path, mnt: Path) -> Iterator[Path]:
    """A foreground mount (`-f`) whose graph has test/recorder on top."""
    volfile = mnt.parent / "recorder.vol"
    volfile.write_text(recorder.volfile(volume.read_text()))
    mnt.mkdir()
    log = mnt.parent / "recorder.log"
    cmd = [sys.executable, "-m", "tests.frontends.fuse.recorder", "-f", "-o", f"log-file={log}"]
    proc = subprocess.Popen([*cmd, "--volfile", str(volfile), str(mnt)], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not mounted_on(mnt) or "mounted" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield mnt
        run("umount", mnt, timeout=30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        force_unmount(mnt, None)
    assert "Traceback" not in log.read_text()


def test_requests_are_one_mebibyte(volume: Path, base: Path) -> None:
    with recorded_mount(volume, base / "io-recorded") as mnt:
        data = os.urandom(8 * MiB)
        fd = os.open(mnt / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            buf = mmap.mmap(-1, 8 * MiB)  # page aligned, so the kernel cuts at exactly max_pages
            buf[:] = data
            assert os.write(fd, memoryview(buf)) == 8 * MiB
            got = json.loads(os.getxattr(mnt, recorder.KEY))
            assert got["max_write"] == IO_SIZE and got["writes"] == 8
            assert os.preadv(fd, [buf], 0) == 8 * MiB and bytes(buf) == data
            got = json.loads(os.getxattr(mnt, recorder.KEY))
            assert got["max_read"] == IO_SIZE and got["reads"] == 8
        finally:
            os.close(fd)
        with open(mnt / "buffered", "wb") as f:  # a big buffered write is cut at max_write too
            f.write(data)
        assert json.loads(os.getxattr(mnt, recorder.KEY))["max_write"] == IO_SIZE
        reads = json.loads(os.getxattr(mnt, recorder.KEY))["reads"]
        assert (mnt / "buffered").read_bytes() == data  # an open drops cached pages: read from the volume
        got = json.loads(os.getxattr(mnt, recorder.KEY))
        assert got["reads"] > reads and got["max_read"] == IO_SIZE


def test_fio_verify(mnt: Mount, tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed")
    work = mnt.path / "fio"
    work.mkdir()
    common = [
        "fio",
        "--output-format=json",
        f"--directory={work}",
        "--size=32m",
        "--ioengine=psync",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--runtime=20",
    ]
    jobs = [
        ["--name=seq", "--rw=write", "--bs=1m", "--direct=1"],
        ["--name=mixed", "--rw=randrw", "--bs=1m,4k", "--direct=1", "--io_size=8m"],
        ["--name=buffered", "--rw=randwrite", "--bsrange=4k-1m", "--fsync_on_close=1"],
    ]
    for job in jobs:
        done = subprocess.run([*common, *job], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
        assert result["error"] == 0
        assert result["write"]["io_bytes"] > 0 and result["read"]["io_bytes"] > 0  # verify read it all back
    assert not list(tmp_path.glob("*.state"))


def test_direct_and_buffered_agree(volume: Path, base: Path, mnt: Mount) -> None:
    data = os.urandom(5 * MiB + 12345)
    digest = hashlib.sha256(data).hexdigest()
    (mnt.path / "agree").write_bytes(data)
    with mounted(volume, base / "io-direct", "direct-io-mode=on") as direct:
        got = (direct.path / "agree").read_bytes()
        assert hashlib.sha256(got).hexdigest() == digest
        for offset, size in ((0, 1), (MiB - 1, 2), (3 * MiB + 7, 2 * MiB), (len(data) - 10, 100)):
            with open(direct.path / "agree", "rb") as f:
                f.seek(offset)
                assert f.read(size) == data[offset : offset + size]
        with open(direct.path / "agree", "r+b") as f:
            f.seek(MiB + 3)
            f.write(b"patched")
        run("dd", "if=/dev/zero", f"of={direct.path / 'dd'}", "bs=1M", "count=16", "oflag=direct", timeout=60)
    expect = data[: MiB + 3] + b"patched" + data[MiB + 10 :]
    assert (mnt.path / "agree").read_bytes() == expect
    assert (mnt.path / "dd").stat().st_size == 16 * MiB
    done = run("dd", f"if={mnt.path / 'dd'}", "of=/dev/null", "bs=1M", "iflag=direct", timeout=60)
    assert "16777216 bytes" in done.stderr
