"""libnbd's tools against a mortar volume over `mortar nbd serve`: nbdinfo (list, map) and
nbdcopy (four connections: multi-conn) in and out."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
from pathlib import Path

import pytest

from mortar.cli.main import main as mortar
from tests.interop.cluster import nbd_serve
from tests.interop.conftest import MiB, Served, need, random_file, run

pytestmark = [pytest.mark.interop, need("nbdinfo", "nbdcopy", "qemu-io")]


@pytest.mark.parametrize("tcp", [False, True])
def test_nbdinfo_lists_the_images(served: Served, tcp: bool) -> None:
    top = f"list-{'tcp' if tcp else 'unix'}"
    served.image(f"{top}/a.raw", MiB)
    served.image(f"{top}/deeper/b.qcow2", 16 * MiB, "--format", "qcow2")
    out = json.loads(run("nbdinfo", "--list", "--json", served.nbd.uri("", tcp), timeout=30))
    exports = {e["export-name"]: e for e in out["exports"]}
    assert exports[f"images/{top}/a.raw"]["export-size"] == MiB
    assert exports[f"images/{top}/deeper/b.qcow2"]["export-size"] > 16 * MiB  # the qcow2 container
    assert not any("/." in name for name in exports)


def test_nbdinfo_export_flags(served: Served) -> None:
    uri = served.image("flags.raw", 5 * MiB + 512)
    [export] = json.loads(run("nbdinfo", "--json", uri, timeout=30))["exports"]
    assert export["export-size"] == 5 * MiB + 512
    assert export["contexts"] == ["base:allocation"] and export["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert export[flag] is True, flag


def test_nbdinfo_map_reports_holes(served: Served) -> None:
    uri = served.image("mapped.raw", 16 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 7 5M 128k", "-c", "write -P 8 15M 1M", uri)
    extents = json.loads(run("nbdinfo", "--map", "--json", uri, timeout=30))
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, 5 * MiB, 3),  # hole, zero
        (5 * MiB, 128 * 1024, 0),  # data
        (5 * MiB + 128 * 1024, 10 * MiB - 128 * 1024, 3),
        (15 * MiB, MiB, 0),
    ]


def test_nbdcopy_in_and_out(served: Served, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.raw", 64 * MiB)
    uri = served.image("copy/disk.raw", 64 * MiB)
    run("nbdcopy", "--connections=4", "--requests=64", "--flush", str(src), uri, timeout=120)
    back = tmp_path / "back.raw"
    run("nbdcopy", "--connections=4", uri, str(back), timeout=120)
    assert filecmp.cmp(src, back, shallow=False)


def test_nbdcopy_keeps_holes(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "holes.raw"
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(7 * MiB)
        f.write(os.urandom(MiB))
    uri = served.image("copy/holes.raw", 32 * MiB)
    run("nbdcopy", str(src), uri, timeout=60)
    extents = json.loads(run("nbdinfo", "--map", "--json", uri, timeout=30))
    assert [(e["offset"], e["length"]) for e in extents if e["type"] == 0] == [(7 * MiB, MiB)]
    out = tmp_path / "out.raw"
    run("nbdcopy", uri, str(out), timeout=60)
    assert filecmp.cmp(src, out, shallow=False)
    assert out.stat().st_blocks * 512 < 4 * MiB  # holes were reported, not copied as zeros


def test_read_only_server(served: Served, tmp_path: Path) -> None:
    uri = served.image("golden.raw", 2 * MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 4k 4k", uri)
    default = f"{served.volume}/golden.raw"
    volfile = str(served.cluster.client_volfile)
    with nbd_serve(tmp_path, "--read-only", "--default", default, "--volfile", volfile) as ro:
        [export] = json.loads(run("nbdinfo", "--json", ro.uri(""), timeout=30))["exports"]  # empty name
        assert export["is_read_only"] is True and export["export-size"] == 2 * MiB
        refused = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", ro.uri(default)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 4k 4k", ro.uri(default))
    assert mortar(["image", "info", f"{served.volume}/golden.raw", "--volfile", volfile]) == 0
