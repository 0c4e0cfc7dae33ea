"""Live graph switches under a writing client (`Volume.connect`): an option change applied in place,
an option that changes the graph's shape, and a brick restarted by mortard on a new port, all
while a 64 MiB file is being written; no call fails and the checksum is right."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mortar.client import Volume
from mortar.core.translator import Event
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHUNK = 1 << 20
CHUNKS = 64


class Switches:
    """GRAPH_SWITCH events seen by the application's subscription."""

    def __init__(self, vol: Volume) -> None:
        self.count = 0
        self._cond = threading.Condition()
        vol.subscribe(self._on_event)

    def _on_event(self, event: Event, data: Any) -> None:
        if event is Event.GRAPH_SWITCH:
            with self._cond:
                self.count += 1
                self._cond.notify_all()

    def wait(self, count: int, timeout: float = 30) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= count, timeout), (
                f"{self.count} switches, not {count}"
            )


def _brick_pid(node: Mortard, volume: str, index: int) -> int:
    rows = node.api("GET", f"/v1/volumes/{volume}/status")["bricks"]
    return int(rows[index]["pid"])


def _write_through_changes(node: Mortard, volume: str, victim: Callable[[], int]) -> None:
    """Write 64 MiB while: ping-timeout changes (in place), client-io-threads turns on (new graph),
    brick `victim` is SIGKILLed (mortard restarts it on another port: new graph)."""
    expected = hashlib.sha256()
    with Volume.connect(f"mortar://{node.remote}/{volume}", timeout=20) as vol:
        switches = Switches(vol)
        with vol.open("/disk.img", "wb") as f:
            for i in range(CHUNKS):
                chunk = os.urandom(CHUNK)
                expected.update(chunk)
                f.write(chunk)
                if i == 8:
                    node.ok("volume", "set", volume, "network.ping-timeout", "9")
                elif i == 12:
                    wait_for(
                        lambda: vol.avolume.graph.xlators[f"{volume}-client-0"].opts["ping-timeout"] == 9,
                        20,
                        what="ping-timeout reconfigured in place",
                    )
                    assert switches.count == 0
                elif i == 16:
                    node.ok("volume", "set", volume, "performance.client-io-threads", "on")
                elif i == 20:
                    switches.wait(1)
                    assert "performance/io-threads" in [s.type for s in vol.avolume.graph.specs]
                elif i == 28:
                    os.kill(_brick_pid(node, volume, victim()), signal.SIGKILL)
                elif i == 32:
                    switches.wait(2)  # restarted on a new port: clients moved to a graph that reaches it
        graph = vol.avolume.graph
        assert graph.xlators[f"{volume}-client-0"].opts["ping-timeout"] == 9  # carried into the new graphs
        assert vol.stat("/disk.img").st_size == CHUNKS * CHUNK
    with (
        Volume.connect(f"mortar://{node.remote}/{volume}", watch=False) as vol,
        vol.open("/disk.img", "rb") as f,
    ):
        got = hashlib.sha256()
        while block := f.read(4 * CHUNK):
            got.update(block)
    assert got.hexdigest() == expected.hexdigest()


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_replica3_write_across_option_changes_and_a_brick_restart(node: Mortard, tmp_path: Path) -> None:
    bricks = [f"127.0.0.1:{tmp_path}/r{i}" for i in range(3)]
    node.ok("volume", "create", "live3", "replica", "3", *bricks, "force")
    node.ok("volume", "start", "live3")
    _write_through_changes(node, "live3", victim=lambda: 0)


def test_distribute_write_and_listing_across_switches(node: Mortard, tmp_path: Path) -> None:
    bricks = [f"127.0.0.1:{tmp_path}/d{i}" for i in range(2)]
    node.ok("volume", "create", "live2", *bricks, "force")
    node.ok("volume", "start", "live2")

    def other_brick() -> int:  # restart the brick that does not hold the file: distribute has no copy
        return next(i for i in range(2) if not (tmp_path / f"d{i}" / "disk.img").exists())

    _write_through_changes(node, "live2", victim=other_brick)

    # an open file and a directory listing in progress both survive a switch to a new graph
    with Volume.connect(f"mortar://{node.remote}/live2", readdir_size=2048) as vol:
        switches = Switches(vol)
        vol.mkdir("/many")
        for n in range(120):
            vol.open(f"/many/f{n:03}", "wb").close()
        f = vol.open("/disk.img", "rb")
        first = f.read(CHUNK)
        listing = vol.scandir("/many")
        names = [next(listing).name for _ in range(10)]
        os.kill(_brick_pid(node, "live2", other_brick()), signal.SIGKILL)
        switches.wait(1)
        names += [e.name for e in listing]
        assert sorted(names) == [f"f{n:03}" for n in range(120)]
        assert len(first) == CHUNK and len(f.read(CHUNK)) == CHUNK
        f.close()
