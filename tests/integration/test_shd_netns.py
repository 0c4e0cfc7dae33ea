"""Three hosts in network namespaces, a replica-3 volume across them with each host's heal daemon:
one host cut off the network while a client writes; once it is back, the heal daemons of the
others heal its brick on their own and the three copies are byte-identical on disk."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.client import Volume
from tests.integration import netns
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not netns.available(), reason="needs root and ip netns"),
    pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate"),
]

MIB = 1 << 20


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[netns.Lab, list[Mortard]]]:
    with netns.three_mortards(tmp_path_factory.mktemp("shdnetns")) as lab_and_nodes:
        yield lab_and_nodes


def _clean(node: Mortard, volume: str) -> bool:
    rows = json.loads(node.ok("--json", "volume", "heal", volume, "info", "summary"))["bricks"]
    return len(rows) == 3 and all(r["status"] == "Connected" and r["count"] == 0 for r in rows)


@pytest.mark.xfail(
    strict=False,
    reason="now and then under load (once in a full-suite run, once in ~20 loaded runs) the writer "
    "is still inside a call "
    "60 s after the cut; not reproduced alone; open issue (the failure message carries the client's "
    "task stacks)",
)
def test_host_cut_off_during_writes_is_healed(hosts: tuple[netns.Lab, list[Mortard]]) -> None:
    lab, (n1, n2, n3) = hosts
    n1.ok("peer", "probe", n2.addr)
    n1.ok("peer", "probe", n3.addr)
    dirs = [Path(f"{n.base}/{n.name}/brick") for n in (n1, n2, n3)]
    bricks = [f"{n.addr}:{d}" for n, d in zip((n1, n2, n3), dirs, strict=True)]
    n1.ok("volume", "create", "hv", "replica", "3", *bricks, "force")
    for key, value in (
        ("network.ping-timeout", "3"),
        ("cluster.heal-timeout", "3"),
        ("cluster.background-self-heal-count", "0"),  # only the heal daemons heal
    ):
        n1.ok("volume", "set", "hv", key, value)
    n1.ok("volume", "start", "hv")
    size = 8 * MIB
    model = bytearray(size)
    small: dict[str, bytes] = {}
    errors: list[OSError] = []
    with Volume.connect(f"mortar://{n1.addr},{n2.addr}/hv", timeout=30) as vol:
        h = vol.create("/disk.img")
        vol.ftruncate(h, size)
        stop = threading.Event()

        def writer() -> None:
            n = 0
            while not stop.is_set():
                off = (n % (size // MIB)) * MIB
                data = bytes([n % 251 + 1]) * MIB
                try:
                    vol.pwrite(h, data, off)
                    if n % 8 == 0:
                        name = f"/f{n:04}"
                        with vol.open(name, "wb") as f:
                            f.write(data[:4096])
                        small[name] = data[:4096]
                except OSError as exc:
                    errors.append(exc)
                    return
                model[off : off + MIB] = data
                n += 1

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.0)
        lab.cut(3)
        time.sleep(6.0)  # past the ping-timeout: the writes go on with two copies
        stop.set()
        t.join(60)
        assert not t.is_alive(), "the writer is stuck:\n" + vol._loop.run(_task_stacks())
        assert errors == [], f"the application saw {errors[0]!r}"
        vol.fsync(h)
        vol.close(h)
        lab.restore(3)
        wait_for(lambda: n3.api("GET", "/v1/node", timeout=3)["store_ready"], 60, 0.5, what="host 3 back")
        wait_for(lambda: _clean(n1, "hv"), 120, interval=1.0, what="the heal daemons to heal host 3")
    digest = hashlib.sha256(model).hexdigest()
    assert [hashlib.sha256((d / "disk.img").read_bytes()).hexdigest() for d in dirs] == [digest] * 3
    for name, data in small.items():
        assert [(d / name.lstrip("/")).read_bytes() for d in dirs] == [data] * 3
    stats = json.loads(n1.ok("--json", "volume", "heal", "hv", "statistics"))
    assert sum(c["healed"] for host in stats["hosts"] for c in host["crawls"]) >= 1
    n1.ok("volume", "stop", "hv")


async def _task_stacks() -> str:
    """Every task of the client's loop with where it waits (for a writer that does not return)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"--- {task!r}\n")
        task.print_stack(file=out)
    return out.getvalue()
