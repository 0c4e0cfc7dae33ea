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
def recorded_mount(volume: Path, mnt: Path, *options: str, write_delay: float = 0) -> Iterator[Path]:
    """A foreground mount (`-f`) whose graph has test/recorder on top."""
    volfile = mnt.parent / f"{mnt.name}-recorder.vol"
    volfile.write_text(recorder.volfile(volume.read_text(), write_delay))
    mnt.mkdir()
    log = mnt.parent / f"{mnt.name}-recorder.log"
    opts = ",".join((f"log-file={log}", *options))
    cmd = [sys.executable, "-m", "tests.frontends.fuse.recorder", "-f", "-o", opts]
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


def _figures(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, recorder.KEY)))


def _overlapping_writes(mnt: Path, tmp_path: Path) -> int:
    """fio (libaio) keeps 8 O_DIRECT 4 KiB writes in flight on one file, each held 0.2 s below the
    mount: how many did the volume see at once?"""
    job = ["--name=qd8", "--rw=randwrite", "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=8"]
    job += [f"--filename={mnt / 'qd'}", "--size=1m", "--io_size=64k", "--randrepeat=0", "--fallocate=none"]
    done = subprocess.run(["fio", *job], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return _figures(mnt)["max_inflight_writes"]


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_o_direct_writes_overlap(volume: Path, base: Path, tmp_path: Path) -> None:
    """O_DIRECT requests through the mount (direct-io-mode=auto, the default, gives their opens
    FOPEN_DIRECT_IO) reach the volume as the application made them, several at once, and are
    never answered from a cache. The choice per open is test_units' `_opened` test; the speed it
    brings (4 KiB random writes at 32 in flight ~2.2x the IOPS of direct-io-mode=off, where the
    volume saw at most 2 at once) belongs to bench/."""
    with recorded_mount(volume, base / "io-auto", write_delay=0.2) as mnt:
        (mnt / "qd").write_bytes(bytes(1 << 20))
        assert _overlapping_writes(mnt, tmp_path) >= 4
        data = os.urandom(64 * 1024)
        (mnt / "f").write_bytes(data)
        fd = os.open(mnt / "f", os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwrite(fd, b"xyz", 7) == 3
            assert _figures(mnt)["last_write"] == 3  # as the application wrote it
            reads = _figures(mnt)["reads"]
            assert os.pread(fd, 100, 0) == data[:7] + b"xyz" + data[10:100]
            assert os.pread(fd, 100, 0) == data[:7] + b"xyz" + data[10:100]
            assert _figures(mnt)["reads"] == reads + 2  # nothing cached: asked again
        finally:
            os.close(fd)
        assert (mnt / "f").read_bytes() == data[:7] + b"xyz" + data[10:]


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
