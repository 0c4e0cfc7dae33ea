"""A block-device volume through mortard: `volume create NAME device lv HOST:/POOL` makes bricks that
are thin pools (created at first start), and `mortar bd create/clone/snapshot/info/delete` work on
it through the node daemon; refusals of bad device options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mortar.client import Volume
from tests.integration.harness import Mortard

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_device_lv_volume_lifecycle_and_images(node: Mortard, tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    data = json.loads(
        node.ok(
            "--json",
            "volume",
            "create",
            "bdv",
            "device",
            "lv",
            "pool-size",
            "256M",
            "block-size",
            "64K",
            f"127.0.0.1:{pool}",
            "force",
        )
    )
    assert data["volume"]["brick_type"] == "bd" and data["volume"]["bd_options"]["pool-size"] == "256M"
    node.ok("volume", "start", "bdv")
    info = json.loads(node.ok("--json", "volume", "info", "bdv"))
    vols = info.get("volumes") or [info.get("volume")]
    assert vols[0]["status"] == "Started"
    assert "storage/bd" in next((node.workdir / "vols" / "bdv").glob("*.vol")).read_text()

    out = node.ok("bd", "create", "bdv:/pool/disk", "64M")
    assert "created bdv:/pool/disk" in out
    with Volume.connect(f"mortar://{node.remote}/bdv", timeout=20) as vol:
        with vol.open("/disk", "r+b") as f:
            f.write(b"boot" * 1024)
        assert vol.stat("/disk").st_size == 64 << 20
    node.ok("bd", "clone", "bdv:/pool/disk", "copy")
    node.ok("bd", "snapshot", "bdv:/pool/disk", "snap")
    snap = json.loads(node.ok("--json", "bd", "info", "bdv:/pool/snap"))
    assert snap["origin"] and snap["size"] == 64 << 20
    with Volume.connect(f"mortar://{node.remote}/bdv", timeout=20) as vol:
        for name in ("/copy", "/snap"):
            with vol.open(name, "rb") as f:
                assert f.read(4096) == b"boot" * 1024
        # the clone is independent: a write to the origin does not reach it
        with vol.open("/disk", "r+b") as f:
            f.write(b"XXXX")
        with vol.open("/copy", "rb") as f:
            assert f.read(4) == b"boot"
    node.ok("bd", "delete", "bdv:/pool/copy")
    assert "disk" in (node.ok("bd", "info", "bdv:/pool/disk"))
    node.ok("volume", "stop", "bdv")
    node.ok("volume", "delete", "bdv")


def test_device_lv_refusals(node: Mortard, tmp_path: Path) -> None:
    err = node.fails(
        "volume", "create", "bdx", "device", "lv", "pool-size", "lots", f"127.0.0.1:{tmp_path}/p", "force"
    )
    assert "pool-size" in err
    err = node.fails(
        "volume", "create", "bdx", "device", "lv", "backend", "lvm", f"127.0.0.1:{tmp_path}/p", "force"
    )
    assert "vg" in err
    assert node.cli("volume", "create", "bdx", "device", "vg", f"127.0.0.1:{tmp_path}/p").status == 2
