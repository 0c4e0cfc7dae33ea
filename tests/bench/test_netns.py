"""bench/netns.py: the benchmark's own network namespace is made, used, and always removed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import netns

ROOT = Path(__file__).resolve().parents[2]


def _can_make() -> bool:
    if netns.available():
        return False
    probe = f"mbprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


pytestmark = pytest.mark.skipif(not _can_make(), reason="needs root, ip and nsenter")


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def leftovers() -> Iterator[list[str]]:
    """Namespace names a test makes by hand; deleted afterwards whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _local(addr: str) -> bool:
    """True when `addr` is an address of the calling thread's network namespace."""
    with socket.socket() as s:
        try:
            s.bind((addr, 0))
        except OSError:
            return False
        return True


def test_servers_and_children_live_in_the_namespace() -> None:
    with netns.bench_network() as net:
        assert net.name == f"{netns.PREFIX}{os.getpid()}"
        assert net.name in netns.bench_namespaces()
        assert _local(net.addr)
        with socket.socket() as server:
            server.bind((net.addr, 0))
            server.listen()
            port = server.getsockname()[1]
            # a child started inside the block inherits the namespace and reaches the server
            probe = f"import socket; socket.create_connection(('{net.addr}', {port}), timeout=5).close()"
            subprocess.run([sys.executable, "-c", probe], check=True, timeout=30)
            # `cmd` reaches the namespace from anywhere; the host side cannot see the listener
            listing = subprocess.run(net.cmd(["ss", "-ltnH"]), capture_output=True, text=True, check=True)
            assert f"{net.addr}:{port}" in listing.stdout
    assert not _local(net.addr)  # back in the host's namespace
    assert net.name not in netns.bench_namespaces()


def test_removed_on_error() -> None:
    with pytest.raises(ValueError), netns.bench_network() as net:
        raise ValueError("boom")
    assert net.name not in netns.bench_namespaces()
    assert not _local(net.addr)


def test_not_entered_when_asked() -> None:
    with netns.bench_network(enter=False) as net:
        assert not _local(net.addr)
        out = subprocess.run(net.cmd(["ip", "-br", "addr"]), capture_output=True, text=True, check=True)
        assert net.addr in out.stdout
    assert net.name not in netns.bench_namespaces()


def test_sweep_removes_only_namespaces_of_dead_pids(leftovers: list[str]) -> None:
    done = subprocess.Popen(["true"])
    done.wait()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        dead_name, live_name = f"{netns.PREFIX}{done.pid}", f"{netns.PREFIX}{alive.pid}"
        for name in (dead_name, live_name):
            leftovers.append(name)
            subprocess.run(["ip", "netns", "add", name], check=True)
        removed = netns.sweep_stale()
        assert dead_name in removed
        assert live_name not in removed
        assert live_name in netns.bench_namespaces()
        assert dead_name not in netns.bench_namespaces()
    finally:
        alive.kill()
        alive.wait()


_VICTIM = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from bench import netns
with netns.bench_network(unmount_under=[Path(sys.argv[2])]) as net:
    print(net.name, flush=True)
    time.sleep(60)
"""


def test_sigkill_of_the_benchmark_removes_namespace_and_mounts(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "bench-test", str(mnt)], check=True)
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert victim.stdout is not None
        name = victim.stdout.readline().strip()
        assert name in netns.bench_namespaces()
        victim.kill()
        victim.wait(10)
        assert _wait(lambda: name not in netns.bench_namespaces())
        assert _wait(lambda: not os.path.ismount(mnt))
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if victim.stdout is not None:
            victim.stdout.close()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_current_and_require() -> None:
    assert netns.current() is None
    netns.require("a loopback server", "127.0.0.1")
    with pytest.raises(RuntimeError, match="bench_network"):
        netns.require("a server", "192.0.2.7")
    with pytest.raises(RuntimeError, match="every address"):
        netns.require("a server")
    with netns.bench_network() as net:
        assert netns.current() == net
        netns.require("a server", net.addr)
        netns.require("a server")
    assert netns.current() is None


def test_host_network_steps_out_for_a_block() -> None:
    with netns.host_network():  # outside any namespace: nothing changes
        assert netns.current() is None
    with netns.bench_network() as net:
        with netns.host_network():
            assert netns.current() is None
            assert not _local(net.addr)
            out = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True)
            assert net.addr not in out.stdout
        assert netns.current() == net
        assert _local(net.addr)
    assert netns.current() is None


def test_nested_use_reuses_the_namespace() -> None:
    with netns.bench_network() as outer:
        with netns.bench_network() as inner:
            assert inner == outer
        assert netns.current() == outer  # the inner block did not remove it
        assert outer.name in netns.bench_namespaces()
    assert outer.name not in netns.bench_namespaces()
