"""QEMU's own tools against images on a mortar volume, over `mortar nbd serve`: qemu-img create,
info, check, convert, compare and map; qemu-io write and read-verify patterns."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.interop.conftest import MiB, Served, need, random_file, run

pytestmark = [pytest.mark.interop, need("qemu-img", "qemu-io")]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def qemu_io(uri: str, fmt: str, *commands: str) -> str:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    out = run(*args, uri)
    assert "fail" not in out.lower() and "pattern verification failed" not in out, out
    return out


def test_qcow2_created_by_qemu_img_on_a_mortar_image(served: Served) -> None:
    """`mortar image create` makes the container; qemu-img formats it over NBD; QEMU uses it."""
    measured = json.loads(run("qemu-img", "measure", "--output=json", "-O", "qcow2", "--size", "1G"))
    uri = served.image("vm1/disk.qcow2", measured["fully-allocated"])
    run("qemu-img", "create", "-f", "qcow2", uri, "1G")
    info = json.loads(run("qemu-img", "info", "--output=json", uri))
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == ("qcow2", 1 << 30, 65536)
    run("qemu-img", "check", "-f", "qcow2", uri)
    qemu_io(
        uri,
        "qcow2",
        "write -P 0x5a 0 1M",
        "write -P 0xa5 1000M 3M",
        "write -P 0x33 12345 4321",  # unaligned: qcow2 does read-modify-write of the cluster
        "read -P 0x5a 0 12345",
        "read -P 0x33 12345 4321",
        "read -P 0xa5 1000M 3M",
        "read -P 0 500M 1M",
    )
    check = run("qemu-img", "check", "--output=json", "-f", "qcow2", uri)
    report = json.loads(check)
    assert report["check-errors"] == 0 and report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0
    assert report["allocated-clusters"] == 16 + 48  # 1 MiB and 3 MiB of 64 KiB clusters


def test_convert_512m_in_and_out(served: Served, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 512 * MiB)
    uri = served.image("big/src.raw", 512 * MiB)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), uri, timeout=300)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri, timeout=300)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back), timeout=300)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(back), timeout=300)
    assert sha256(back) == sha256(src)


def test_convert_into_qcow2_made_by_mortar(served: Served, tmp_path: Path) -> None:
    """qemu-img convert into a qcow2 image `mortar image create -f qcow2` made, and back out."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:  # data, a hole, data
        f.write(os.urandom(8 * MiB))
        f.seek(40 * MiB)
        f.write(os.urandom(8 * MiB + 512))
    uri = served.image("vm2/disk.qcow2", 64 * MiB, "--format", "qcow2")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(src), uri, timeout=120)
    run("qemu-img", "check", "-f", "qcow2", uri)
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", uri, str(back), timeout=120)
    expected = src.read_bytes() + bytes(64 * MiB - src.stat().st_size)
    assert back.read_bytes() == expected
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", uri))
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(0, 8 * MiB), (40 * MiB, 8 * MiB + 64 * 1024)]  # whole clusters


def test_map_shows_sparse_regions_as_holes(served: Served) -> None:
    uri = served.image("sparse.raw", 64 * MiB)
    qemu_io(uri, "raw", "write -P 0x11 4M 1M", "write -P 0x22 40M 256k")
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri))
    assert [(e["start"], e["length"]) for e in extents if e["data"]] == [
        (4 * MiB, MiB),
        (40 * MiB, 256 * 1024),
    ]
    assert all(e["zero"] for e in extents if not e["data"])
    assert sum(e["length"] for e in extents) == 64 * MiB


@pytest.mark.parametrize("tcp", [False, True])
def test_qemu_io_patterns(served: Served, tcp: bool) -> None:
    name = f"io-{'tcp' if tcp else 'unix'}.raw"
    served.image(name, 32 * MiB)
    out = qemu_io(
        served.uri(name, tcp),
        "raw",
        "write -P 0x11 0 64k",
        "write -P 0x22 512 1536",  # inside the first write, sector aligned
        "write -P 0x33 65537 7777",  # odd offset and size
        "write -P 0x34 1048575 2",  # across a 1 MiB boundary (two client fops)
        "write -f -P 0x44 3M 1M",  # FUA
        "aio_write -P 0x55 8M 256k",
        "aio_write -P 0x66 9M 256k",
        "aio_write -P 0x77 10M 5M",  # larger than one client fop
        "aio_flush",
        "read -P 0x11 0 512",
        "read -P 0x22 512 1536",
        "read -P 0x11 2048 63488",
        "read -P 0x33 65537 7777",
        "read -P 0 73314 1000",
        "read -P 0x34 1048575 2",
        "read -P 0x44 3M 1M",
        "read -P 0x55 8M 256k",
        "read -P 0x66 9M 256k",
        "read -P 0x77 10M 5M",
        "discard 3M 1M",
        "read -P 0 3M 1M",
        "discard 10M 64k",
        "read -P 0 10M 64k",
        "read -P 0x77 10551296 4k",  # just after the discarded range
        "write -z 8M 256k",
        "read -P 0 8M 256k",
        "write -z -u 9M 256k",  # may unmap
        "read -P 0 9M 256k",
        "flush",
    )
    assert out.count("read ") == 15
    assert out.count("discard ") == 2
