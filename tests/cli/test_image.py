"""`mortar image create|info|resize|delete` against a volume of real brick processes (replica 3
once cluster/replicate exists), checked by qemu-img and qemu-io over the same private NBD export
the commands use; and `mortar nbd serve`'s argument handling."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mortar.cli.main import main as mortar
from mortar.client import Volume
from mortar.virt.images import FORMAT_XATTR, ImageError, PrivateExport, format_size, parse_size, qemu_img
from tests.interop.cluster import BIN, Cluster, cluster

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")

MiB = 1024 * 1024
GiB = 1024 * MiB


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("images"), name="vms") as served:
        yield served


def cli(capsys: pytest.CaptureFixture[str], vol: Cluster, *args: str) -> tuple[int, str, str]:
    status = mortar([*args, "--volfile", str(vol.client_volfile)])
    out, err = capsys.readouterr()
    return status, out, err


def cli_json(capsys: pytest.CaptureFixture[str], vol: Cluster, *args: str) -> dict[str, Any]:
    status, out, err = cli(capsys, vol, "--json", *args)
    assert status == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def qemu(vol: Cluster, path: str, *args: str) -> str:
    """qemu-img or qemu-io (args[0]) on the image, over a private export of the volume."""

    async def run() -> str:
        from mortar.client import AsyncVolume

        volume = await AsyncVolume.from_volfile(vol.client_volfile, timeout=10)
        try:
            async with PrivateExport(volume) as export:
                uri = export.uri(path)
                if args[0] == "qemu-io":
                    proc = await asyncio.create_subprocess_exec(
                        *args, uri, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                    )
                    out, _ = await asyncio.wait_for(proc.communicate(), 120)
                    assert proc.returncode == 0, out.decode()
                    return out.decode()
                return await qemu_img(*args[1:], uri, timeout=120)
        finally:
            await volume.aclose()

    return asyncio.run(run())


# ---- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("10G", 10 * GiB),
        ("512M", 512 * MiB),
        ("1.5G", 3 * GiB // 2),
        ("2GiB", 2 * GiB),
        ("1k", 1024),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "1.3", "10X", "1e9"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ImageError):
        parse_size(text)


def test_format_size() -> None:
    assert (format_size(GiB), format_size(1536), format_size(100)) == ("1 GiB", "1.5 KiB", "100 B")


# ---- the commands --------------------------------------------------------------------------------


def test_raw_round_trip(capsys: pytest.CaptureFixture[str], vol: Cluster) -> None:
    created = cli_json(capsys, vol, "image", "create", "vms/vm1/disk.raw", "64M")
    assert created["image"] == "vms/vm1/disk.raw" and created["path"] == "/vm1/disk.raw"
    assert (created["format"], created["virtual_size"], created["file_size"]) == ("raw", 64 * MiB, 64 * MiB)
    assert created["allocated"] < MiB  # sparse

    status, out, _ = cli(capsys, vol, "image", "info", "vms/vm1/disk.raw")
    assert status == 0 and "format: raw" in out and f"virtual size: 64 MiB ({64 * MiB} bytes)" in out

    grown = cli_json(capsys, vol, "image", "resize", "vms/vm1/disk.raw", "+64M", "--preallocation", "full")
    assert (grown["virtual_size"], grown["previous_size"]) == (128 * MiB, 64 * MiB)
    assert 64 * MiB <= grown["allocated"] < 65 * MiB  # the new half is reserved, the old one still sparse

    status, _, err = cli(capsys, vol, "image", "resize", "vms/vm1/disk.raw", "-100M")
    assert status == 1 and "--shrink" in err and err.count("\n") == 1
    shrunk = cli_json(capsys, vol, "image", "resize", "vms/vm1/disk.raw", "-100M", "--shrink")
    assert shrunk["virtual_size"] == 28 * MiB

    assert cli_json(capsys, vol, "image", "delete", "vms/vm1/disk.raw") == {
        "image": "vms/vm1/disk.raw",
        "path": "/vm1/disk.raw",
        "deleted": True,
    }
    status, _, err = cli(capsys, vol, "image", "info", "vms/vm1/disk.raw")
    assert status == 1 and err == "mortar: vms/vm1/disk.raw: No such file or directory\n"


def test_qcow2_round_trip(capsys: pytest.CaptureFixture[str], vol: Cluster) -> None:
    created = cli_json(capsys, vol, "image", "create", "vms/vm2/disk.qcow2", "64M", "--format", "qcow2")
    assert (created["format"], created["virtual_size"], created["cluster_size"]) == ("qcow2", 64 * MiB, 65536)
    assert created["file_size"] > 64 * MiB and created["allocated"] < MiB  # a sparse container
    with Volume.from_volfile(vol.client_volfile, timeout=10) as volume:
        assert volume.getxattr("/vm2/disk.qcow2", FORMAT_XATTR) == b"qcow2"

    grown = cli_json(capsys, vol, "image", "resize", "vms/vm2/disk.qcow2", "128M")
    assert grown["virtual_size"] == 128 * MiB and grown["file_size"] > 128 * MiB
    # every cluster of the grown image fits in the container, at its very end too
    qemu(
        vol,
        "/vm2/disk.qcow2",
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x61 0 128M",
        "-c",
        "read -P 0x61 127M 1M",
    )
    check = json.loads(qemu(vol, "/vm2/disk.qcow2", "qemu-img", "check", "--output=json", "-f", "qcow2"))
    assert check["check-errors"] == 0 and check.get("corruptions", 0) == 0
    assert check["allocated-clusters"] == 128 * MiB // 65536

    info = cli_json(capsys, vol, "image", "info", "vms/vm2/disk.qcow2")
    assert info["allocated"] >= 128 * MiB and not info["dirty"] and not info["corrupt"]
    shrunk = cli_json(capsys, vol, "image", "resize", "vms/vm2/disk.qcow2", "96M", "--shrink")
    assert shrunk["virtual_size"] == 96 * MiB
    qemu(vol, "/vm2/disk.qcow2", "qemu-img", "check", "-f", "qcow2")
    assert cli(capsys, vol, "image", "delete", "vms/vm2/disk.qcow2")[0] == 0


@pytest.mark.parametrize(
    ("fmt", "preallocation"), [("qcow2", "metadata"), ("qcow2", "full"), ("raw", "full")]
)
def test_preallocation(
    capsys: pytest.CaptureFixture[str], vol: Cluster, fmt: str, preallocation: str
) -> None:
    name = f"vms/prealloc/{preallocation}.{fmt}"
    created = cli_json(
        capsys, vol, "image", "create", name, "32M", "-f", fmt, "--preallocation", preallocation
    )
    if preallocation == "full":
        assert created["allocated"] >= 32 * MiB
    else:  # L2 tables written: all clusters mapped, yet only metadata allocated
        assert 0 < created["allocated"] < 4 * MiB
        check = json.loads(
            qemu(vol, f"/prealloc/{preallocation}.{fmt}", "qemu-img", "check", "--output=json")
        )
        assert check["allocated-clusters"] == 32 * MiB // 65536
    if fmt == "qcow2":
        qemu(vol, f"/prealloc/{preallocation}.{fmt}", "qemu-img", "check", "-f", "qcow2")


def test_refusals(capsys: pytest.CaptureFixture[str], vol: Cluster) -> None:
    assert cli(capsys, vol, "image", "create", "vms/taken.raw", "1M")[0] == 0
    cases = [
        (("image", "create", "vms/taken.raw", "1M"), 1, "mortar: vms/taken.raw: File exists\n"),
        (("image", "create", "vms/x.raw", "12Q"), 2, "bad size"),
        (("image", "create", "vms/x.raw", "1M", "--format", "vmdk"), 2, "invalid choice"),
        (("image", "create", "vms/x.raw", "1M", "--preallocation", "metadata"), 1, "no metadata"),
        (("image", "create", "vms/x.qcow2", "1000", "-f", "qcow2"), 1, "multiple of 512"),
        (("image", "create", "novolume", "1M"), 2, "VOLUME/path"),
        (("image", "info", "vms/prealloc"), 1, "not an image file"),
        (("image", "delete", "vms/nothing"), 1, "No such file"),
        (("image", "create", "vms/x.raw"), 2, "usage: mortar image create"),
        (("image", "create", "vms/x.qcow2", "100T", "-f", "qcow2"), 1, "File too large"),  # ext4's limit
    ]
    for args, status, message in cases:
        got, _, err = cli(capsys, vol, *args)
        assert (got, message in err) == (status, True), (args, err)
    with Volume.from_volfile(vol.client_volfile, timeout=10) as volume:
        assert not volume.exists("/x.raw") and not volume.exists("/x.qcow2")  # nothing left behind


def test_image_info_probes_without_a_recorded_format(
    capsys: pytest.CaptureFixture[str], vol: Cluster
) -> None:
    """An image not made by mortar (no format xattr) is probed by qemu-img."""
    with (
        Volume.from_volfile(vol.client_volfile, timeout=10) as volume,
        volume.open("/foreign.raw", "wb") as f,
    ):
        f.truncate(2 * MiB)
    info = cli_json(capsys, vol, "image", "info", "vms/foreign.raw")
    assert (info["format"], info["virtual_size"]) == ("raw", 2 * MiB)
    status, _, err = cli(capsys, vol, "image", "resize", "vms/foreign.raw", "4M")
    assert status == 1 and "format is not recorded" in err  # a probe is never trusted to write
    status, _, err = cli(capsys, vol, "image", "resize", "vms/taken.raw", "4M", "--format", "qcow2")
    assert status == 1 and "is a raw image, not qcow2" in err
    assert (
        cli_json(capsys, vol, "image", "resize", "vms/foreign.raw", "4M", "-f", "raw")["virtual_size"]
        == 4 * MiB
    )


def test_nbd_serve_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    refusals = [
        ([], "name at least one volume"),
        (["a/b"], "not a volume name"),
        (["--bogus", "vms"], "unrecognized arguments: --bogus"),
        (["--volfile", str(tmp_path / "missing.vol")], "no such file"),
        (["--volume", "a/b=x.vol"], "expected NAME=VOLFILE"),
        (["--log-level", "loud", "vms"], "invalid choice"),
    ]
    for args, message in refusals:
        assert mortar(["nbd", "serve", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "usage: mortar nbd serve" in err, err
    assert mortar(["help", "nbd", "serve"]) == 0
    assert "VOLUME/path/to/image" in capsys.readouterr().out


def test_nbd_serve_reports_a_volume_it_cannot_serve(tmp_path: Path) -> None:
    """One line and status 1, from a process of its own (the server sets up its process's logging)."""
    bad = tmp_path / "bad.vol"
    bad.write_text("volume x\n    type no/such\nend-volume\n")
    result = subprocess.run(
        [str(BIN / "mortar"), "nbd", "serve", "--volfile", str(bad), "--socket", str(tmp_path / "nbd.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "mortar: nbd serve: " in result.stderr and "no/such" in result.stderr
