"""`mortar bd ...` and `mortar thinpool ...`: pools on this host, images through a served bd brick,
as text and as --json; errors are one line and a non-zero status."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mortar.cli.main import main
from mortar.client.sync import LoopThread
from mortar.graph import Graph, from_text

MIB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    return out


def ok_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    return json.loads(ok(capsys, "--json", *argv))


def fails(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 1) -> str:
    got, out, err = run(capsys, *argv)
    assert got == status, (out, err)
    assert err.startswith("mortar: ") and out == ""
    return err


def test_pool_create_and_info(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pool = tmp_path / "pool1"
    data = ok_json(
        capsys, "bd", "pool", "create", f"localhost:{pool}", "--size", "64M", "--block-size", "128K"
    )
    assert data["pool"]["data_bytes"] <= 64 * MIB and data["pool"]["block_size"] == 128 << 10
    assert data["volumes"] == [] and (pool / "data").is_file() and (pool / "data.meta").is_file()
    text = ok(capsys, "bd", "pool", "info", f"127.0.0.1:{pool}")
    assert f"pool: {pool} (thin)" in text and "block size 128 KiB" in text
    info = ok_json(capsys, "bd", "pool", "info", f"localhost:{pool}")
    assert (
        info["pool"]["uuid"] == data["pool"]["uuid"]
        and info["pool"]["free_bytes"] == data["pool"]["data_bytes"]
    )

    backing = tmp_path / "backing.img"
    text = ok(
        capsys,
        "bd",
        "pool",
        "create",
        f"localhost:{tmp_path}/pool2",
        "--backing",
        str(backing),
        "--size",
        "32M",
    )
    assert text.startswith(f"created pool localhost:{tmp_path}/pool2: 31.9") and "blocks of 64 KiB" in text
    assert os.readlink(tmp_path / "pool2" / "data") == str(backing) and backing.stat().st_size == 32 * MIB


def test_pool_refusals(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not an empty directory" in fails(
        capsys, "bd", "pool", "create", f"localhost:{tmp_path}/full", "--size", "8M"
    )
    assert "is not this host" in fails(
        capsys, "bd", "pool", "create", f"192.0.2.1:{tmp_path}/p", "--size", "8M"
    )
    assert "expected HOST:/POOL" in fails(capsys, "bd", "pool", "info", "nopath", status=2)
    assert "size" in fails(capsys, "bd", "pool", "create", f"localhost:{tmp_path}/nosize")
    assert "does not exist" in fails(capsys, "bd", "pool", "info", f"localhost:{tmp_path}/absent")
    assert "--vg" in fails(
        capsys, "bd", "pool", "create", f"localhost:{tmp_path}/l", "--backend", "lvm", status=2
    )
    assert "not supported" in fails(
        capsys, "--remote-host", "h", "bd", "pool", "info", f"localhost:{tmp_path}/p"
    )


@pytest.mark.skipif(shutil.which("lvm") is None, reason="lvm2 is not installed")
def test_lvm_pool_in_a_missing_volume_group(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    vg = f"mortarnovg{uuid.uuid4().hex[:6]}"
    err = fails(
        capsys,
        "bd",
        "pool",
        "create",
        f"localhost:{tmp_path}/l",
        "--backend",
        "lvm",
        "--vg",
        vg,
        "--size",
        "8M",
    )
    assert f'Volume group "{vg}" not found' in err
    assert not (tmp_path / "l").exists()  # nothing left behind


class ServedBrick:
    """A storage/bd brick behind protocol/server, served from its own loop thread."""

    def __init__(self, pool: Path) -> None:
        self.graph: Graph = from_text(
            f"volume bd\n    type storage/bd\n    option pool {pool}\n    option volume-id {uuid.uuid4()}\n"
            "    option pool-create on\n    option pool-size 128MiB\nend-volume\n\n"
            "volume server\n    type protocol/server\n    option transport.socket.listen-port 0\n"
            "    subvolumes bd\nend-volume\n",
            "bd-brick.vol",
        )
        self.loop = LoopThread("test-bd-brick")
        self.loop.run(self.graph.start(timeout=10))
        self.port = int(self.graph.top.listen_port)  # type: ignore[attr-defined]

    def stop(self) -> None:
        try:
            self.loop.run(self.graph.stop())
        finally:
            self.loop.stop()


@pytest.fixture
def volfile(tmp_path: Path) -> Iterator[str]:
    brick = ServedBrick(tmp_path / "pool")
    path = tmp_path / "client.vol"
    path.write_text(
        "volume bdvol-client-0\n    type protocol/client\n    option remote-host 127.0.0.1\n"
        f"    option remote-port {brick.port}\n    option remote-subvolume bd\nend-volume\n"
    )
    try:
        yield str(path)
    finally:
        brick.stop()


def test_images_through_the_volume(capsys: pytest.CaptureFixture[str], volfile: str, tmp_path: Path) -> None:
    pool = f"{tmp_path}/pool"
    created = ok_json(capsys, "bd", "create", f"bdvol:{pool}/vm1", "32M", "--volfile", volfile)
    assert created == {
        "name": "vm1",
        "size": 32 * MIB,
        "allocated_bytes": 0,
        "origin": None,
        "shared_bytes": 0,
    }
    text = ok(capsys, "bd", "clone", f"bdvol:{pool}/vm1", "vm1-copy", "--volfile", volfile)
    assert text.strip() == f"cloned bdvol:{pool}/vm1 to vm1-copy"
    snap = ok_json(
        capsys, "bd", "snapshot", f"bdvol:{pool}/vm1", f"bdvol:{pool}/vm1-snap", "--volfile", volfile
    )
    assert snap["origin"] == "vm1" and snap["size"] == 32 * MIB
    text = ok(capsys, "bd", "info", f"bdvol:{pool}/vm1-snap", "--volfile", volfile)
    assert "origin: vm1" in text and "size: 32 MiB (33554432 bytes)" in text
    info = ok_json(capsys, "bd", "info", "bdvol:/vm1-copy", "--volfile", volfile)
    assert info["image"] == "bdvol:/vm1-copy" and info["origin"] is None
    assert (
        ok(capsys, "bd", "delete", f"bdvol:{pool}/vm1", "--volfile", volfile).strip()
        == f"deleted bdvol:{pool}/vm1"
    )
    after = ok_json(capsys, "bd", "info", f"bdvol:{pool}/vm1-snap", "--volfile", volfile)
    assert after["origin"] is None  # the snapshot outlives its origin
    assert "No such file" in fails(capsys, "bd", "info", f"bdvol:{pool}/vm1", "--volfile", volfile)
    assert "stay on volume bdvol" in fails(
        capsys, "bd", "clone", f"bdvol:{pool}/vm1-copy", "other:/p/x", "--volfile", volfile, status=2
    )
    assert "expected VOL:/POOL/LV" in fails(capsys, "bd", "info", "novolume", status=2)
    assert "in use by its brick" in fails(capsys, "bd", "pool", "info", f"localhost:{pool}")


def test_thinpool_commands(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dev = str(tmp_path / "tp.img")
    data = ok_json(capsys, "thinpool", "create", dev, "--size", "16MiB", "--block-size", "64KiB")
    assert data["pool"]["block_size"] == 64 << 10 and data["device"] == dev
    assert "block_size" in ok(capsys, "thinpool", "info", dev)
    assert ok_json(capsys, "thinpool", "info", dev)["pool"]["uuid"] == data["pool"]["uuid"]
    assert ok(capsys, "thinpool", "check", dev).strip() == "clean"
    assert ok_json(capsys, "thinpool", "check", dev) == {"clean": True, "problems": []}
    assert "use force" in fails(capsys, "thinpool", "create", dev, "--size", "16MiB", status=2)
    assert "does not exist" in fails(capsys, "thinpool", "info", str(tmp_path / "none"), status=2)
