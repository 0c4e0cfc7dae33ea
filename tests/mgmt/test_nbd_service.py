"""The NBD service's settings (mortard's flags), the server's command line and status, and the long
poll of the volume list the NBD server follows; the server itself is driven by real clients in
tests/integration/test_nbd_service.py."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from mortar.frontends.nbd.backend import FileExportProvider
from mortar.frontends.nbd.server import NbdServer
from mortar.mgmt.daemon import nbd_config, parse_args
from mortar.mgmt.nbd_service import DEFAULT_SOCKET, NbdConfig, NbdService, default_socket
from tests.integration.harness import Mortard


def test_default_socket_follows_the_workdir(tmp_path: Path) -> None:
    assert default_socket(Path("/var/lib/mortar")) == DEFAULT_SOCKET == "/run/mortar/nbd.sock"
    assert default_socket(tmp_path / "w") == str(tmp_path / "w" / "run" / "nbd.sock")


def test_flags(tmp_path: Path) -> None:
    base = ["--workdir", str(tmp_path), "--listen", "10.1.2.3"]
    assert nbd_config(parse_args(base), tmp_path) == NbdConfig(
        "10.1.2.3", 10809, str(tmp_path / "run" / "nbd.sock")
    )
    cfg = nbd_config(parse_args([*base, "--nbd-listen", "::", "--nbd-port", "11000"]), tmp_path)
    assert (cfg.host, cfg.port, cfg.enabled) == ("::", 11000, True)
    assert nbd_config(parse_args([*base, "--nbd-socket", "/x/n.sock"]), tmp_path).socket == "/x/n.sock"
    tcp_only = nbd_config(parse_args([*base, "--nbd-socket", "none"]), tmp_path)
    assert tcp_only.socket == "" and tcp_only.port == 10809 and tcp_only.enabled
    unix_only = nbd_config(parse_args([*base, "--nbd-port", "0"]), tmp_path)
    assert unix_only.port == 0 and unix_only.socket and unix_only.enabled
    assert not nbd_config(parse_args([*base, "--nbd-port", "0", "--nbd-socket", "none"]), tmp_path).enabled
    assert not nbd_config(parse_args([*base, "--no-nbd"]), tmp_path).enabled
    for bad in (["--nbd-port", "70000"], ["--nbd-socket", "/" + "s" * 120]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])


def test_command_line_and_status_when_off(tmp_path: Path) -> None:
    svc = NbdService(
        tmp_path / "w", tmp_path / "l", "127.0.0.1:24007", NbdConfig("0.0.0.0", 10809, "/r/n.sock")
    )
    args = svc.args()
    assert args[:2] == ["-m", "mortar.mgmt.nbdd"]
    assert args[args.index("--daemon") + 1] == "127.0.0.1:24007"
    assert args[args.index("--port") + 1] == "10809" and args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--socket") + 1] == "/r/n.sock"
    assert "--port" not in NbdService(tmp_path, tmp_path, "h:1", NbdConfig(port=0, socket="/s")).args()
    assert "--socket" not in NbdService(tmp_path, tmp_path, "h:1", NbdConfig(socket="")).args()

    off = NbdService(tmp_path, tmp_path, "h:1", NbdConfig(port=0, socket="")).status()
    assert off["enabled"] is False and off["online"] is False and off["pid"] == 0 and off["error"]
    down = svc.status()  # on, but not started: not online, no pid
    assert down["enabled"] and not down["online"] and down["pid"] == 0 and down["volumes"] == []


def test_volume_list_long_poll(node: Mortard, bricks: Path) -> None:
    first = node.api("GET", "/v1/volumes")
    revision = first["revision"]
    assert revision
    assert node.api("GET", f"/v1/volumes?wait={revision}&timeout=0.2")["revision"] == revision
    assert node.api("GET", "/v1/volumes?wait=other&timeout=30")["revision"] == revision  # differs: at once

    def create() -> None:
        node.ok("volume", "create", "lp", f"127.0.0.1:{bricks / 'lp'}", "force")

    maker = threading.Timer(0.3, create)
    maker.start()
    try:
        changed = node.api("GET", f"/v1/volumes?wait={revision}&timeout=60", timeout=90)
    finally:
        maker.join(timeout=60)
    assert changed["revision"] != revision and [v["name"] for v in changed["volumes"]] == ["lp"]
    node.ok("volume", "delete", "lp")


def test_status_with_the_service_off(node: Mortard, bricks: Path) -> None:
    """The suite's daemons run without NBD: status says so in JSON and prints no NBD row."""
    node.ok("volume", "create", "off", f"127.0.0.1:{bricks / 'off'}", "force")
    node.ok("volume", "start", "off")
    try:
        (row,) = node.api("GET", "/v1/volumes/off/status")["nbd"]
        assert row["enabled"] is False and row["serving"] is False and row["host"] and row["node"]
        assert "NBD Server" not in node.ok("volume", "status", "off")
    finally:
        node.ok("volume", "stop", "off", "force")
        node.ok("volume", "delete", "off")


async def test_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    """mortard's NBD server and `mortar nbd serve` share a default socket path: the second server
    is refused instead of silently stealing the path from the first."""
    path = str(tmp_path / "nbd.sock")
    first = NbdServer(FileExportProvider(str(tmp_path)))
    second = NbdServer(FileExportProvider(str(tmp_path)))
    try:
        await first.listen_unix(path)
        with pytest.raises(OSError) as refused:
            await second.listen_unix(path)
        assert refused.value.errno == errno.EADDRINUSE
        await first.close()
        await second.listen_unix(path)  # a stale socket file is replaced
    finally:
        await first.close()
        await second.close()
