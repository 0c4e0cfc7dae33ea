"""mortard's NBD server, driven by clients nobody here wrote (qemu-img, qemu-io, nbdinfo): every
started volume is served on TCP and on the unix socket, a volume started later shows up, a stopped
one disappears (and an open connection to it gets I/O errors, not a hang), a SIGKILLed server is
restarted, and a restarted mortard adopts the running server instead of cutting QEMU off."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mortar.client import Volume
from tests.integration.harness import Mortard, alive, free_port, kill_all_under, wait_for

TOOLS = ("qemu-img", "qemu-io", "nbdinfo")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.interop,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS),
        reason=f"needs {', '.join(TOOLS)} (qemu-utils, libnbd-bin)",
    ),
]
MiB = 1024 * 1024


def run(*cmd: str, timeout: float = 60) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mortard]:
    base = tmp_path_factory.mktemp("nbdsvc")
    daemon = Mortard(base, "n1", nbd=True)
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        kill_all_under(base)


def tcp(node: Mortard) -> str:
    return f"nbd://127.0.0.1:{node.nbd_port}"


def unix(node: Mortard, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={node.workdir / 'run' / 'nbd.sock'}"


def exports(url: str) -> list[str]:
    listed = json.loads(run("nbdinfo", "--list", "--json", url))
    return sorted(e["export-name"] for e in listed["exports"])


def nbd_status(node: Mortard, volume: str) -> dict[str, Any]:
    (row,) = node.api("GET", f"/v1/volumes/{volume}/status")["nbd"]
    return dict(row)


def make_volume(node: Mortard, bricks: Path, name: str, images: dict[str, int]) -> None:
    """A started one-brick volume holding empty image files (NBD serves files that exist)."""
    node.ok("volume", "create", name, f"127.0.0.1:{bricks / name}", "force")
    node.ok("volume", "start", name)
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=30) as vol:
        for path, size in images.items():
            vol.makedirs(os.path.dirname(path), exist_ok=True)
            with vol.open(path, "wb") as f:
                f.truncate(size)


def test_started_volume_over_tcp_and_unix(node: Mortard, tmp_path: Path) -> None:
    make_volume(node, tmp_path, "vms", {"/vm1/disk.qcow2": 64 * MiB, "/raw.img": 4 * MiB})
    want = ["vms/raw.img", "vms/vm1/disk.qcow2"]
    wait_for(lambda: exports(tcp(node)) == want, 30, what="the volume's images as exports")
    assert exports(unix(node)) == want

    image = f"{tcp(node)}/vms/vm1/disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", image, "32M")
    info = json.loads(run("qemu-img", "info", "--output=json", unix(node, "vms/vm1/disk.qcow2")))
    assert info["format"] == "qcow2" and info["virtual-size"] == 32 * MiB
    out = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", "-c", "flush", image)
    assert "wrote 2097152/2097152 bytes" in out
    out = run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "read -P 0x5a 1M 2M",
        "-c",
        "read -P 0 0 1M",
        unix(node, "vms/vm1/disk.qcow2"),
    )
    assert out.count("read ") == 2 and "Pattern verification failed" not in out
    run("qemu-img", "check", image)

    st = nbd_status(node, "vms")
    assert st["online"] and st["serving"] and st["port"] == node.nbd_port and st["pid"]
    assert st["socket"] == str(node.workdir / "run" / "nbd.sock")
    text = node.ok("volume", "status", "vms")
    row = next(ln for ln in text.splitlines() if ln.startswith("NBD Server on "))
    assert row.split()[-3:] == [str(node.nbd_port), "Y", str(st["pid"])]
    assert f"nbd://127.0.0.1:{node.nbd_port}/vms/PATH" in text


def test_volume_started_later_then_stopped(node: Mortard, tmp_path: Path) -> None:
    make_volume(node, tmp_path, "late", {"/a.img": 2 * MiB})
    wait_for(lambda: "late/a.img" in exports(tcp(node)), 30, what="the later volume's export")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", f"{tcp(node)}/late/a.img")

    # a client with the image open while the volume stops: its next requests fail, they do not hang
    served = served_count(node, "late/a.img")
    session = subprocess.Popen(
        ["qemu-io", "-f", "raw", unix(node, "late/a.img")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: served_count(node, "late/a.img") > served, 15, what="the qemu-io connection")
        node.ok("volume", "stop", "late", "force")
        wait_for(lambda: "late/a.img" not in exports(tcp(node)), 30, what="the stopped volume to go")
        assert "late" not in node.api("GET", "/v1/internal/nbd")["nbd"]["volumes"]
        out, _ = session.communicate("read 0 64k\nwrite 0 4k\nquit\n", timeout=60)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert "read failed" in out and "write failed" in out, out
    assert any(e.startswith("vms/") for e in exports(tcp(node)))  # the other volume stays

    node.ok("volume", "start", "late")
    wait_for(lambda: "late/a.img" in exports(unix(node)), 30, what="the restarted volume's export")
    run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", f"{tcp(node)}/late/a.img")
    node.ok("volume", "stop", "late", "force")
    node.ok("volume", "delete", "late")
    wait_for(lambda: "late/a.img" not in exports(tcp(node)), 30, what="the deleted volume to go")


def served_count(node: Mortard, export: str) -> int:
    """Connections that reached the transmission phase on `export` so far (the server logs each)."""
    try:
        return (node.logdir / "nbd.log").read_text().count(f"serving export {export!r}")
    except FileNotFoundError:
        return 0


def test_sigkill_restart_and_adoption(node: Mortard, tmp_path: Path) -> None:
    make_volume(node, tmp_path, "crash", {"/c.img": 1 * MiB})
    wait_for(lambda: nbd_status(node, "crash")["serving"], 30, what="the volume to be served")
    old = nbd_status(node, "crash")
    os.kill(old["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(old["pid"]), 10, what="the NBD server to die")

    def back() -> bool:
        st = nbd_status(node, "crash")
        return bool(st["serving"] and st["pid"] not in (0, old["pid"]))

    wait_for(back, 30, what="mortard to restart the NBD server")
    st = nbd_status(node, "crash")
    assert st["restarts"] == old["restarts"] + 1
    run("qemu-io", "-f", "raw", "-c", "read -P 0 0 1M", f"{tcp(node)}/crash/c.img")

    # a mortard restart keeps the server (and its clients' connections): the new daemon adopts it
    node.stop()
    assert alive(st["pid"])
    run("qemu-io", "-f", "raw", "-c", "read -P 0 0 1M", unix(node, "crash/c.img"))  # served meanwhile
    node.start()
    wait_for(lambda: nbd_status(node, "crash")["online"], 30, what="the adopted NBD server")
    assert nbd_status(node, "crash")["pid"] == st["pid"]


def test_every_host_serves_every_started_volume(tmp_path: Path) -> None:
    """Two hosts (127.0.0.1 and .2): a volume whose only brick is on the second is served by the
    NBD servers of both, and `volume status` lists both servers."""
    base = tmp_path / "pool"
    hosts = []
    try:
        for i in (1, 2):
            addr = f"127.0.0.{i}"
            host = Mortard(base, f"h{i}", addr=addr, port=free_port(addr), nbd=True)
            host.extra = [
                "--etcd-client-port",
                str(free_port(addr)),
                "--etcd-peer-port",
                str(free_port(addr)),
            ]
            hosts.append(host.start())
        h1, h2 = hosts
        h1.ok("peer", "probe", h2.remote)
        h1.ok("volume", "create", "far", f"127.0.0.2:{tmp_path / 'far'}", "force")
        h1.ok("volume", "start", "far")
        with Volume.connect(f"mortar://{h1.remote}/far", timeout=30) as vol, vol.open("/disk.img", "wb") as f:
            f.truncate(4 * MiB)
        for host in hosts:
            url = f"nbd://{host.addr}:{host.nbd_port}"
            wait_for(lambda url=url: exports(url) == ["far/disk.img"], 60, what=f"{url} to serve far")
            run(
                "qemu-io",
                "-f",
                "raw",
                "-c",
                "write -P 0x42 0 1M",
                "-c",
                "read -P 0x42 0 1M",
                f"{url}/far/disk.img",
            )
        rows = h1.api("GET", "/v1/volumes/far/status")["nbd"]
        assert sorted(r["host"] for r in rows) == ["127.0.0.1", "127.0.0.2"]
        assert all(r["serving"] and r["online"] and r["pid"] for r in rows)
        assert sorted(r["port"] for r in rows) == sorted(h.nbd_port for h in hosts)
        text = h2.ok("volume", "status", "far")
        assert "NBD Server on 127.0.0.1" in text and "NBD Server on 127.0.0.2" in text
    finally:
        for host in hosts:
            host.stop()
        kill_all_under(base)
