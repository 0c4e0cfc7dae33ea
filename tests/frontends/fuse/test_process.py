"""The mount process: `mortar mount` failing with one clear line, ending on umount and SIGTERM with
status 0 and the graph stopped, read-only mounts, SIGUSR1 statedump, and `mortar umount`."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.cli.main import main as cli_main
from mortar.frontends.fuse.mount import canonical, find_mount

from .conftest import MORTAR, Mount, as_nobody, force_unmount, mounted, mounted_on, read_pid, run, wait_gone


def refused(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """`mortar ARGS` (the CLI, in this process) must fail with exactly one line on stderr."""
    capsys.readouterr()
    assert cli_main([str(a) for a in args]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_mount_errors(volume: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    assert "does not exist" in refused(capsys, "mount", "--volfile", volume, tmp_path / "missing")
    (tmp_path / "file").write_text("")
    assert "not a directory" in refused(capsys, "mount", "--volfile", volume, tmp_path / "file")
    assert "unknown mount option 'bogus'" in refused(capsys, "mount", "-o", "bogus", "--volfile", volume, mnt)
    assert "attr-timeout" in refused(capsys, "mount", "-o", "attr-timeout=x", "--volfile", volume, mnt)
    logged = f"log-file={tmp_path / 'm.log'}"
    assert "No such file" in refused(capsys, "mount", "-o", logged, "--volfile", tmp_path / "none.vol", mnt)
    bad = tmp_path / "bad.vol"
    bad.write_text("volume x\n    type no/such\nend-volume\n")
    assert "unknown translator type" in refused(capsys, "mount", "-o", logged, "--volfile", bad, mnt)
    down = tmp_path / "down.vol"  # a brick port nothing listens on
    port_line = next(line for line in volume.read_text().splitlines() if "remote-port" in line)
    lines = volume.read_text().replace(port_line, "    option remote-port 1").splitlines()
    # nor a local socket: a client on the brick's host would reach it there whatever the port
    down.write_text("\n".join(line for line in lines if "transport.socket.local-path" not in line) + "\n")
    line = refused(capsys, "mount", "-o", logged, "--timeout", "1", "--volfile", down, mnt)
    assert "not reachable" in line
    assert not mounted_on(mnt)
    assert "is not mounted" in refused(capsys, "umount", mnt)
    assert "usage" in refused(capsys, "umount")


def test_umount_ends_the_process(volume: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mnt = base / "p-umount"
    mnt.mkdir()
    log = base / "p-umount.log"
    done = run(MORTAR, "mount", "-o", f"log-file={log}", "--volfile", volume, mnt, timeout=90)
    assert str(mnt) in done.stdout
    pid = read_pid(mnt)
    try:
        info = find_mount(canonical(str(mnt)))
        assert info is not None and info.fstype == "fuse.mortar"
        assert "already a mortar mount" in refused(capsys, "mount", "--volfile", volume, mnt)
        (mnt / "kept").write_text("still here")
        run("umount", mnt, timeout=30)
        if not wait_gone(pid, 10):
            # a mount namespace made meanwhile (unshare -m on this host) holds a copy of the mount
            # that keeps the session alive: only then is the process right to go on serving
            pytest.skip("another mount namespace holds a copy of the mount")
    finally:
        force_unmount(mnt, pid)
    text = log.read_text()
    assert "exiting with status 0" in text and "Traceback" not in text
    with mounted(volume, mnt) as again:  # the data is on the volume, not in the process
        assert (again.path / "kept").read_text() == "still here"


def test_sigterm_unmounts(volume: Path, base: Path) -> None:
    mnt = base / "p-term"
    mnt.mkdir()
    log = base / "p-term.log"
    run(MORTAR, "mount", "-o", f"log-file={log}", "--volfile", volume, mnt, timeout=90)
    pid = read_pid(mnt)
    try:
        fd = os.open(mnt, os.O_RDONLY)  # a busy mount: SIGTERM still ends it (lazily)
        try:
            log.rename(log.with_suffix(".log.1"))  # logrotate moves the file, then sends SIGHUP
            os.kill(pid, signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not log.exists() or "reopened" not in log.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(pid, signal.SIGUSR1)
            while "statedump" not in log.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(pid, signal.SIGTERM)
            assert wait_gone(pid, 20)
        finally:
            os.close(fd)
        assert not mounted_on(mnt)
    finally:
        force_unmount(mnt, pid)
    text = log.read_text()
    assert "SIGTERM: unmounting" in text and "exiting with status 0" in text and "Traceback" not in text
    assert "statedump:" in text and "task fuse-session" in text


def test_read_only_mount(volume: Path, base: Path, mnt: Mount) -> None:
    (mnt.path / "ro-test").write_text("data")
    with mounted(volume, base / "p-ro", "ro") as ro:
        assert (ro.path / "ro-test").read_text() == "data"
        for attempt in (
            lambda: (ro.path / "new").write_text("x"),
            lambda: (ro.path / "ro-test").write_text("y"),
            lambda: os.mkdir(ro.path / "d"),
            lambda: os.unlink(ro.path / "ro-test"),
            lambda: os.chmod(ro.path / "ro-test", 0o600),
        ):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert "ro" in run("findmnt", "-n", "-o", "OPTIONS", ro.path).stdout.split(",")


def test_user_cannot_unmount_roots_mount(mnt: Mount) -> None:
    done = as_nobody(MORTAR, "umount", mnt.path)  # fusermount3 refuses: not the user's mount
    assert done.returncode == 1 and done.stderr.startswith("mortar: ") and done.stderr.count("\n") == 1
    assert mounted_on(mnt.path)


def test_mount_by_host_and_volume(volume: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """HOST:PORT:/VOLUME fetches the volfile over HTTP as from a node daemon (GET
    /v1/volumes/VOLUME/volfile); a plain file server stands in for one here."""
    served = base / "volfile-service"
    (served / "v1" / "volumes" / "data").mkdir(parents=True)
    (served / "v1" / "volumes" / "data" / "volfile").write_text(volume.read_text())
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.02)
        with mounted_source(f"127.0.0.1:{port}:/data", base / "p-remote") as mnt:
            info = find_mount(canonical(str(mnt)))
            assert info is not None and info.source == f"127.0.0.1:{port}:/data"
            (mnt / "over-http").write_text("fetched")
            assert (mnt / "over-http").read_text() == "fetched"
        line = refused(capsys, "mount", "--timeout", "2", f"127.0.0.1:{port}:/nosuch", base / "p-remote")
        assert "cannot fetch the volfile" in line
    finally:
        server.terminate()
        server.wait(10)


@contextlib.contextmanager
def mounted_source(source: str, mnt: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    log = mnt.parent / f"{mnt.name}.log"
    run(MORTAR, "mount", "-o", f"log-file={log}", source, mnt, timeout=90)
    pid = read_pid(mnt)
    try:
        yield mnt
        run(MORTAR, "umount", mnt, timeout=60)
    finally:
        force_unmount(mnt, pid)
    assert "exiting with status 0" in log.read_text() and "Traceback" not in log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
