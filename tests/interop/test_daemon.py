"""Images reached through the node daemon: a volume made with `mortar volume create`, images made
with `mortar image` by volume name (`--remote-host`) and by `mortar://` reference, and
`mortar nbd serve VOLUME` serving them to qemu-img and qemu-io."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Mortard, kill_all_under
from tests.interop.cluster import BIN, REPLICA, nbd_serve
from tests.interop.conftest import MiB, need, run

pytestmark = [pytest.mark.interop, pytest.mark.integration, need("qemu-img", "qemu-io", "nbdinfo")]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mortard]:
    base = tmp_path_factory.mktemp("mortard")
    daemon = Mortard(base, "n1")
    try:
        yield daemon.start()
    finally:
        daemon.stop()
        kill_all_under(base)


def test_images_by_volume_name(node: Mortard, tmp_path: Path) -> None:
    bricks = [f"127.0.0.1:{tmp_path}/b{i}" for i in range(REPLICA)]
    replica = ["replica", str(REPLICA)] if REPLICA > 1 else []
    node.ok("volume", "create", "vmstore", *replica, *bricks, "force")
    node.ok("volume", "start", "vmstore")

    created = json.loads(
        node.ok("--json", "image", "create", "vmstore/vm1/disk.qcow2", "256M", "-f", "qcow2")
    )
    assert (created["format"], created["virtual_size"]) == ("qcow2", 256 * MiB)
    by_uri = f"mortar://{node.remote}/vmstore/vm1/data.raw"
    assert json.loads(node.ok("--json", "image", "create", by_uri, "8M"))["virtual_size"] == 8 * MiB
    line = node.fails("image", "info", "nosuchvolume/disk.raw")
    assert "cannot open the volume" in line

    remote = ["--remote-host", node.remote]
    with nbd_serve(tmp_path, *remote, "vmstore") as server:
        uri = server.uri("vmstore/vm1/disk.qcow2")
        info = json.loads(run("qemu-img", "info", "--output=json", uri))
        assert (info["format"], info["virtual-size"]) == ("qcow2", 256 * MiB)
        out = run("qemu-io", "-f", "qcow2", "-c", "write -P 0x17 100M 2M", "-c", "read -P 0x17 100M 2M", uri)
        assert "read 2097152/2097152" in out
        run("qemu-img", "check", "-f", "qcow2", uri)
        names = {
            e["export-name"]
            for e in json.loads(run("nbdinfo", "--list", "--json", server.uri("")))["exports"]
        }
        assert names == {"vmstore/vm1/disk.qcow2", "vmstore/vm1/data.raw"}

    resized = json.loads(node.ok("--json", "image", "resize", "vmstore/vm1/disk.qcow2", "+256M"))
    assert resized["virtual_size"] == 512 * MiB
    node.ok("image", "delete", "vmstore/vm1/data.raw")
    assert "No such file" in node.fails("image", "info", by_uri)


def test_nbd_serve_without_a_daemon(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "mortar"),
            "--remote-host",
            "127.0.0.1:1",
            "nbd",
            "serve",
            "vmstore",
            "--socket",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stderr.startswith("mortar: nbd serve: "), result.stderr
