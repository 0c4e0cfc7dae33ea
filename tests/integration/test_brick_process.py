"""The foundation end to end: real `mortar-brick` processes on loopback and the native client."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.client import Volume
from mortar.rpc.frame import HEADER
from tests.integration.brickproc import TestVolume

MIB = 1 << 20
pytestmark = pytest.mark.integration


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[TestVolume]:
    tv = TestVolume(tmp_path, **{"ping-timeout": "2"})
    try:
        yield tv
    finally:
        tv.stop()


def test_256_mib_written_and_read_back_with_checksum(volume: TestVolume) -> None:
    with Volume.from_volfile(volume.start()) as vol:
        digest = hashlib.sha256()
        with vol.open("/big.bin", "wb") as f:
            for _ in range(256):
                chunk = os.urandom(64 * 1024) * 16
                digest.update(chunk)
                f.write(chunk)
        back = hashlib.sha256()
        with vol.open("/big.bin", "rb", buffering=0) as f:
            while chunk := f.read(4 * MIB):
                back.update(chunk)
        assert vol.stat("/big.bin").st_size == 256 * MIB
    assert back.hexdigest() == digest.hexdigest()
    # the bytes are on the brick's disk, where the brick's own path says
    on_disk = hashlib.sha256(Path(volume.desc.bricks[0].path, "big.bin").read_bytes()).hexdigest()
    assert on_disk == digest.hexdigest()


def test_two_thousand_small_files_in_nested_directories(volume: TestVolume) -> None:
    with Volume.from_volfile(volume.start()) as vol:
        expected = {}
        for d in range(20):
            vol.makedirs(f"/tree/d{d:02}/sub", exist_ok=True)
            for f in range(100):
                path = f"/tree/d{d:02}/sub/f{f:03}.txt" if f % 2 else f"/tree/d{d:02}/f{f:03}.txt"
                data = f"{path}\n".encode() * (f % 7 + 1)
                with vol.open(path, "wb") as fh:
                    fh.write(data)
                expected[path] = data
        seen = {}
        for root, _dirs, files in vol.walk("/tree"):
            for name in files:
                path = f"{root}/{name}"
                with vol.open(path, "rb") as fh:
                    seen[path] = fh.read()
    assert seen == expected


def test_two_clients_share_a_file_and_a_directory(volume: TestVolume) -> None:
    volfile = volume.start()
    with Volume.from_volfile(volfile) as a, Volume.from_volfile(volfile) as b:
        a.mkdir("/shared")
        h = a.create("/shared/disk.img")
        a.ftruncate(h, 64 * MIB)
        a.close(h)
        patterns = {0: b"A", 1: b"B"}

        def writer(vol: Volume, who: int) -> None:
            fh = vol.open_fd("/shared/disk.img", os.O_RDWR)
            for i in range(32):  # interleaved 1 MiB regions: client 0 even, client 1 odd
                vol.pwrite(fh, patterns[who] * MIB, (2 * i + who) * MIB)
            vol.fsync(fh)
            vol.close(fh)
            for i in range(200):  # distinct names in the same directory at the same time
                vol.close(vol.create(f"/shared/c{who}-{i:03}"))

        threads = [threading.Thread(target=writer, args=(v, i)) for i, v in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        for vol in (a, b):
            fh = vol.open_fd("/shared/disk.img", os.O_RDONLY)
            for i in range(64):
                assert vol.pread(fh, MIB, i * MIB) == patterns[i % 2] * MIB
            vol.close(fh)
        names_a, names_b = sorted(a.listdir("/shared")), sorted(b.listdir("/shared"))
    assert names_a == names_b
    assert len(names_a) == 401


def _errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_every_call_over_the_wire_with_its_errors(volume: TestVolume) -> None:
    with Volume.from_volfile(volume.start()) as vol:
        vol.mkdir("/d")
        h = vol.create("/d/f", 0o640)
        assert vol.pwrite(h, b"hello world", 0) == 11
        assert vol.pread(h, 5, 6) == b"world"
        buf = bytearray(5)
        assert vol.preadinto(h, buf, 0) == 5 and bytes(buf) == b"hello"
        vol.fsync(h)
        vol.fsync(h, datasync=True)
        vol.ftruncate(h, 4 * MIB)
        vol.fallocate(h, 0, 0, 4096)
        vol.pwrite(h, b"x" * 4096, 2 * MIB)
        vol.discard(h, 2 * MIB, 4096)
        vol.zerofill(h, 0, 4096)
        assert vol.pread(h, 11, 0) == b"\0" * 11
        assert vol.seek_hole(h, 0) >= 4096
        assert vol.fstat(h).st_size == 4 * MIB
        vol.close(h)
        vol.truncate("/d/f", 100)
        assert vol.stat("/d/f").st_size == 100
        vol.chmod("/d/f", 0o600)
        vol.chown("/d/f", 1000, 1000)
        vol.utime("/d/f", ns=(1_000_000_000, 2_000_000_000))
        st = vol.stat("/d/f")
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid, st.st_mtime_ns) == (
            0o600,
            1000,
            1000,
            2_000_000_000,
        )
        vol.setxattr("/d/f", "user.color", b"blue")
        assert vol.getxattr("/d/f", "user.color") == b"blue"
        assert "user.color" in vol.listxattr("/d/f")
        vol.removexattr("/d/f", "user.color")
        vol.link("/d/f", "/d/hard")
        assert vol.stat("/d/hard").st_nlink == 2
        vol.symlink("f", "/d/soft")
        assert vol.readlink("/d/soft") == "f"
        assert vol.lstat("/d/soft").st_mode & 0o170000 == 0o120000
        vol.rename("/d/hard", "/d/renamed")
        assert sorted(vol.listdir("/d")) == ["f", "renamed", "soft"]
        assert vol.statvfs("/").f_bsize > 0
        assert vol.access("/d/f", os.R_OK)
        # the errors travel with the brick's errno
        assert _errno_of(vol.stat, "/nope") == errno.ENOENT
        assert _errno_of(vol.mkdir, "/d") == errno.EEXIST
        assert _errno_of(vol.rmdir, "/d") == errno.ENOTEMPTY
        assert _errno_of(vol.unlink, "/d") == errno.EISDIR
        assert _errno_of(vol.listdir, "/d/f") == errno.ENOTDIR
        assert _errno_of(vol.getxattr, "/d/f", "user.missing") == errno.ENODATA
        assert _errno_of(vol.setxattr, "/d/f", "trusted.mortar.gfid", b"x" * 16) == errno.EPERM
        assert _errno_of(vol.mkdir, "/d/bad\0name") == errno.EINVAL
        vol.unlink("/d/soft")
        vol.unlink("/d/renamed")
        vol.unlink("/d/f")
        vol.rmdir("/d")
        assert vol.listdir("/") == []


def test_full_brick_file_system_gives_enospc_and_changes_nothing(tmp_path: Path) -> None:
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)]).returncode != 0:
        pytest.skip("cannot loop-mount a test file system here")
    tv = TestVolume(mnt / "brick")
    tv.workdir = tmp_path  # logs and volfiles stay off the small file system
    for b in tv.bricks:
        b.workdir, b.log = tmp_path, tmp_path / "brick-0.log"
    try:
        with Volume.from_volfile(tv.start()) as vol:
            h = vol.create("/fill")
            written = 0
            with pytest.raises(OSError) as exc:
                while written < 64 * MIB:
                    vol.pwrite(h, b"z" * MIB, written)
                    written += MIB
            assert exc.value.errno == errno.ENOSPC
            assert vol.fstat(h).st_size == written  # the failed write left the size as it was
            vol.close(h)
            vol.unlink("/fill")
            h = vol.create("/after")  # space is back once the file is gone
            vol.pwrite(h, b"ok" * 1000, 0)
            vol.close(h)
    finally:
        tv.stop()
        subprocess.run(["umount", "-l", str(mnt)])


def test_killed_brick_fails_fast_and_the_same_client_resumes(volume: TestVolume) -> None:
    volfile = volume.start()
    brick = volume.bricks[0]
    with Volume.from_volfile(volfile) as vol:
        h = vol.create("/before")
        vol.pwrite(h, b"1" * MIB, 0)
        errors: list[int] = []
        stop = threading.Event()

        def keep_writing() -> None:
            off = MIB
            while not stop.is_set():
                try:
                    vol.pwrite(h, b"2" * MIB, off)
                    off += MIB
                except OSError as exc:
                    errors.append(exc.errno or 0)
                    return

        t = threading.Thread(target=keep_writing)
        t.start()
        time.sleep(0.3)
        killed_at = time.monotonic()
        brick.kill(signal.SIGKILL)
        t.join(10)
        stop.set()
        assert not t.is_alive(), "a write hung after the brick died"
        assert errors and errors[0] in (errno.ENOTCONN, errno.EBADF, errno.ECONNRESET)
        assert time.monotonic() - killed_at < 10
        with pytest.raises(OSError):
            vol.stat("/before")
        brick.start()  # same port, same data
        deadline = time.monotonic() + 20
        while True:  # the client reconnects by itself (backoff), no new Volume
            try:
                st = vol.stat("/before")
                break
            except OSError:
                assert time.monotonic() < deadline, "client did not reconnect"
                time.sleep(0.2)
        assert st.st_size >= MIB
        h2 = vol.open_fd("/before", os.O_RDONLY)
        assert vol.pread(h2, MIB, 0) == b"1" * MIB
        vol.close(h2)


def test_silent_brick_is_declared_down_within_ping_timeout(volume: TestVolume) -> None:
    volfile = volume.start()
    brick = volume.bricks[0]
    with Volume.from_volfile(volfile) as vol:
        vol.mkdir("/alive")
        assert brick.proc is not None
        os.killpg(brick.proc.pid, signal.SIGSTOP)  # connection open, nobody answering
        try:
            start = time.monotonic()
            with pytest.raises(OSError) as exc:
                vol.listdir("/alive")  # a listing always asks the brick (md-cache may answer a stat)
            elapsed = time.monotonic() - start
            assert exc.value.errno in (errno.ENOTCONN, errno.ETIMEDOUT)
            assert elapsed < 2 * 2 + 3  # ping-timeout is 2 s in this volume
        finally:
            os.killpg(brick.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert vol.stat("/alive").st_mode & 0o40000
                break
            except OSError:
                assert time.monotonic() < deadline, "client did not come back after the brick woke"
                time.sleep(0.2)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_hostile_frames_against_a_brick_process(volume: TestVolume) -> None:
    volfile = volume.start()
    brick = volume.bricks[0]
    assert brick.proc is not None
    with Volume.from_volfile(volfile) as vol:
        vol.mkdir("/still-here")
        rss_before = _rss_kib(brick.proc.pid)
        header = HEADER
        attacks = [
            os.urandom(4096),
            header.pack(b"MRTR", 1, 1, 1000, 1, 0, 0xFFFFFFFF, 0xFFFFFFFF),  # absurd lengths
            header.pack(b"MRTR", 1, 1, 20, 7, 0, 16, 1 << 30)
            + b"\x90" * 16,  # a 1 GiB write, before handshake
            header.pack(b"XXXX", 9, 9, 0, 0, 0, 0, 0),
            header.pack(b"MRTR", 1, 1, 1000, 1, 0, 40, 0)[:10],  # truncated
            header.pack(b"MRTR", 1, 1, 1000, 1, 0, 8, 0) + b"\xc1" * 8,  # invalid msgpack
        ]
        for _ in range(5):
            for attack in attacks:
                with socket.create_connection(("127.0.0.1", brick.port), timeout=5) as s:
                    try:
                        s.sendall(attack)
                        s.shutdown(socket.SHUT_WR)
                        s.recv(4096)
                    except OSError:
                        pass  # the brick closing on us is the expected answer
        assert brick.proc.poll() is None, "the brick died"
        assert vol.stat("/still-here").st_mode & 0o40000
        vol.mkdir("/and-serving")
        assert _rss_kib(brick.proc.pid) < rss_before + 64 * 1024  # nothing near the lengths announced
