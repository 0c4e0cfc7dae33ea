"""Three hosts in three network namespaces (10.77.X.11-13 on a private bridge): a pool, a
replica-3 volume across it, one host cut off the network (the volume stays usable, the other two
still change the configuration), then reconnected (it catches up)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

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


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[netns.Lab, list[Mortard]]]:
    with netns.three_mortards(tmp_path_factory.mktemp("netns")) as lab_and_nodes:
        yield lab_and_nodes


def test_host_cut_off_and_back(hosts: tuple[netns.Lab, list[Mortard]]) -> None:
    lab, (n1, n2, n3) = hosts
    n1.ok("peer", "probe", n2.addr)  # default port 24100
    n1.ok("peer", "probe", n3.addr)
    peers = json.loads(n3.ok("--json", "pool", "list"))["peers"]
    assert sorted(p["hostname"] for p in peers) == sorted([n1.addr, n2.addr, n3.addr])

    bricks = [f"{n.addr}:{n.base}/{n.name}/brick" for n in (n1, n2, n3)]
    n1.ok("volume", "create", "nv", "replica", "3", *bricks, "force")
    n1.ok("volume", "set", "nv", "network.ping-timeout", "4")  # a silent host is given up quickly
    n2.ok("volume", "start", "nv")
    payload = os.urandom(1 << 20)
    with Volume.connect(f"mortar://{n1.addr},{n2.addr}/nv") as vol:
        with vol.open("/before", "wb") as f:
            f.write(payload)

        lab.cut(3)
        with vol.open("/during", "wb") as f:  # two replicas of three carry on
            f.write(payload)
        n1.ok("volume", "set", "nv", "storage.reserve", "2")
        rows = json.loads(n1.ok("--json", "volume", "status", "nv"))["volumes"][0]["bricks"]
        assert [r["source"] for r in rows] == ["node", "node", "store"]  # host 3 does not answer

        lab.restore(3)
        wait_for(lambda: n3.api("GET", "/v1/node", timeout=3)["store_ready"], 60, 0.5, what="host 3 back")
        got = wait_for(
            lambda: (
                json.loads(n3.ok("--json", "volume", "get", "nv", "storage.reserve"))["options"][0]["value"]
                == "2"
            ),
            60,
            0.5,
            what="host 3 to see the change",
        )
        assert got
        volfile = next((n3.workdir / "vols" / "nv").glob("*.vol"))
        wait_for(lambda: "reserve 2" in volfile.read_text(), 30, what="host 3's brick volfile")
        for name in ("/before", "/during"):
            with vol.open(name, "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    n1.ok("volume", "stop", "nv")
    n1.ok("volume", "delete", "nv")
