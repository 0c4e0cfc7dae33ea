"""debug/io-stats over a real brick: counts, errors, bytes and size histograms of a known sequence."""

from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import FOPS, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.graph.registry import translator_class
from mortar.xlators.debug.io_stats import IoStatsTranslator
from mortar.xlators.storage.posix import PosixTranslator


def make_posix(directory: Path) -> PosixTranslator:
    opts = {"directory": str(directory), "volume-id": str(uuid.uuid4()), "brick-create": "on"}
    return PosixTranslator("posix", {**opts, "health-check-interval": "0"})


def by_gfid(gfid: Gfid) -> Loc:
    return Loc(str(gfid), gfid=gfid)


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    posix = make_posix(tmp_path / "brick")
    stats = IoStatsTranslator("stats", {}, [posix])
    await posix.init()
    await stats.init()
    yield stats, posix
    await stats.fini()
    await posix.fini()


async def run_sequence(stats: IoStatsTranslator) -> None:
    fd = Fd(Gfid.random())
    loc = Loc("f", pargfid=ROOT_GFID, name="f")
    await stats.create(loc, os.O_RDWR, 0o644, 0o022, fd, {"gfid-req": bytes(fd.gfid)})
    for i in range(3):
        await stats.writev(fd, b"x" * 4096, i * 4096, 0)
    await stats.writev(fd, data=memoryview(b"y" * 100), offset=12288, flags=0)
    await stats.readv(fd, 4096, 0, 0)
    await stats.readv(fd, 4096, 4096, 0)
    await stats.readv(fd, 4096, 1 << 20, 0)  # past the end: 0 bytes
    with pytest.raises(FopError) as exc:
        await stats.stat(Loc("gone", gfid=Gfid.random()))
    assert exc.value.errno == errno.ESTALE
    await stats.release(fd)


def test_registry_and_every_fop_wrapped() -> None:
    assert translator_class("debug/io-stats") is IoStatsTranslator
    assert all(name in IoStatsTranslator.__dict__ for name in FOPS)


async def test_counts_bytes_and_histograms(stack: Any) -> None:
    stats, _ = stack
    await run_sequence(stats)
    snap = stats.snapshot()
    json.dumps(snap)  # ready for the CLI's --json and the HTTP API
    cum = snap["cumulative"]
    fops = cum["fops"]
    assert {k: v["calls"] for k, v in fops.items()} == {
        "create": 1,
        "writev": 4,
        "readv": 3,
        "stat": 1,
        "release": 1,
    }
    assert fops["stat"]["errors"] == 1 and fops["writev"]["errors"] == 0
    assert cum["totals"] == {"calls": 10, "errors": 1}
    assert cum["write"] == {"bytes": 3 * 4096 + 100, "histogram": {"4096": 3, "64": 1}}
    assert cum["read"] == {"bytes": 8192, "histogram": {"4096": 2, "0": 1}}
    lat = fops["writev"]["latency_us"]
    assert 0 <= lat["min"] <= lat["avg"] <= lat["max"]
    assert snap["interval"]["fops"] == fops and snap["interval"]["index"] == 0


async def test_intervals_and_reset(stack: Any) -> None:
    stats, _ = stack
    await stats.lookup(by_gfid(ROOT_GFID))
    first = stats.snapshot(reset_interval=True)
    assert first["interval"]["fops"]["lookup"]["calls"] == 1
    await stats.lookup(by_gfid(ROOT_GFID))
    await stats.statfs(by_gfid(ROOT_GFID))
    second = stats.snapshot()
    assert second["interval"]["index"] == 1
    assert second["interval"]["totals"]["calls"] == 2
    assert second["cumulative"]["fops"]["lookup"]["calls"] == 2
    stats.reset()
    assert stats.snapshot()["cumulative"]["totals"] == {"calls": 0, "errors": 0}


async def test_options_turn_counting_off(tmp_path: Path) -> None:
    posix: PosixTranslator = make_posix(tmp_path / "brick")
    stats = IoStatsTranslator("stats", {"latency-measurement": "off"}, [posix])
    await posix.init()
    try:
        await run_sequence(stats)
        cum = stats.snapshot()["cumulative"]
        assert cum["fops"]["writev"] == {"calls": 4, "errors": 0}  # counted, not timed
        stats.reconfigure({"latency-measurement": "off", "count-fop-hits": "off"})
        stats.reset()
        await run_sequence(stats)
        cum = stats.snapshot()["cumulative"]
        assert cum["fops"] == {} and cum["write"]["bytes"] == 3 * 4096 + 100  # bytes are always counted
    finally:
        await posix.fini()
