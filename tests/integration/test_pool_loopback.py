"""A pool of three mortards on loopback, each with its own 127.0.0.x address, workdir and ports:
probe (the pool moves to etcd), refusals, a replica-3 volume across the hosts, a host crash
(daemon and etcd member SIGKILLed) with the volume still usable and a config change made by 2 of
3, the host's return (it catches up), loss of quorum (changes refused, clearly), and detach."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mortar.client import Volume
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, free_port, kill_all_under, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _node(base: Path, i: int) -> Mortard:
    addr = f"127.0.0.{i}"
    node = Mortard(base, f"n{i}", addr=addr, port=free_port(addr))
    node.extra = ["--etcd-client-port", str(free_port(addr)), "--etcd-peer-port", str(free_port(addr))]
    return node


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Mortard]]:
    base = tmp_path_factory.mktemp("pool")
    started: list[Mortard] = []
    try:
        for i in (1, 2, 3, 4):
            started.append(_node(base, i).start())
        yield started
    finally:
        for node in started:
            node.stop()
        kill_all_under(base)


def _uuids(node: Mortard) -> set[str]:
    return {p["uuid"] for p in json.loads(node.ok("--json", "pool", "list"))["peers"]}


def _option(node: Mortard, volume: str, key: str) -> str:
    return str(json.loads(node.ok("--json", "volume", "get", volume, key))["options"][0]["value"])


def test_pool_of_three(nodes: list[Mortard]) -> None:
    n1, n2, n3, n4 = nodes
    ids = [n.api("GET", "/v1/node")["uuid"] for n in nodes]

    data = json.loads(n1.ok("--json", "peer", "probe", n2.remote))
    assert data["peer"]["uuid"] == ids[1] and data["message"] == "success"
    assert n1.api("GET", "/v1/node")["store"] == n2.api("GET", "/v1/node")["store"] == "etcd"
    assert n1.ok("peer", "probe", n2.remote).startswith("peer probe: success. host 127.0.0.2")  # already in
    assert n2.ok("peer", "probe", n3.remote).strip() == "peer probe: success"  # any member may probe
    for n in (n1, n2, n3):
        assert _uuids(n) == set(ids[:3])
    status = json.loads(n1.ok("--json", "peer", "status"))["peers"]
    assert {p["hostname"]: p["connected"] for p in status} == {"127.0.0.2": True, "127.0.0.3": True}
    text = n1.ok("peer", "status")
    assert text.startswith("Number of Peers: 2") and "State: Peer in Cluster (Connected)" in text

    # refusals: a host of another pool, a host with volumes of its own, this node, nobody
    assert "already part of another pool" in n4.fails("peer", "probe", n3.remote)
    n4.ok("volume", "create", "own", f"{n4.addr}:{n4.base}/n4/own", "force")
    assert "has volumes of its own" in n1.fails("peer", "probe", n4.remote)
    assert "this node" in n1.fails("peer", "probe", n1.remote)
    assert "is not reachable" in n1.fails("peer", "probe", f"127.0.0.5:{free_port()}")
    assert "not in the pool" in n1.fails("volume", "create", "x", f"{n4.addr}:/b", "force")

    # a volume across the three hosts, created and started through different daemons
    bricks = [f"{n.addr}:{n.base}/{n.name}/brick" for n in (n1, n2, n3)]
    layout = ["replica", "3"] if HAVE_AFR else []
    n2.ok("volume", "create", "rv", *layout, *bricks, "force")
    n3.ok("volume", "start", "rv")
    rows = json.loads(n1.ok("--json", "volume", "status", "rv"))["volumes"][0]["bricks"]
    assert [r["name"] for r in rows] == bricks and all(r["online"] and r["source"] == "node" for r in rows)
    assert "still holds bricks of volume(s) rv" in n1.fails("peer", "detach", "127.0.0.3")
    assert "still holds bricks" in n1.fails("peer", "detach", "127.0.0.3", "force")

    uri = f"mortar://{n1.remote},{n2.remote}/rv"
    payload = os.urandom(2 << 20)
    with Volume.connect(uri) as vol:
        for i in range(6):
            with vol.open(f"/f{i}", "wb") as f:
                f.write(payload)

        # host 3 crashes: daemon and etcd member; its brick process survives, as a brick would
        n3.kill()
        assert not n3.etcd_pids() and n3.brick_pids()
        n1.ok("volume", "set", "rv", "performance.io-thread-count", "8")  # 2 of 3: quorum
        assert _option(n2, "rv", "performance.io-thread-count") == "8"
        if HAVE_AFR:  # the volume stays usable
            brick_pid = n3.brick_pids()[0]
            os.kill(brick_pid, 9)  # and even without that host's brick
            with vol.open("/after-crash", "wb") as f:
                f.write(payload)
            with vol.open("/f3", "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()

        # host 3 comes back: it catches up from the store and makes its brick match it
        n3.start()
        assert _option(n3, "rv", "performance.io-thread-count") == "8"
        volfile = next((n3.workdir / "vols" / "rv").glob("*.vol"))
        wait_for(lambda: "thread-count 8" in volfile.read_text(), 30, what="host 3's brick volfile")
        wait_for(lambda: all(r["online"] for r in n1.api("GET", "/v1/volumes/rv/status")["bricks"]), 30)
        if HAVE_AFR:
            with vol.open("/after-crash", "rb") as f:
                assert len(f.read()) == len(payload)

    # two hosts down: no quorum, and a change is refused with a clear line
    n2.kill()
    n3.kill()
    line = n1.fails("volume", "set", "rv", "network.ping-timeout", "30")
    assert line.startswith(
        "mortar: volume set: failed: the pool has no quorum: its configuration cannot change"
    ), line
    n2.start(store=False)
    n3.start(store=False)
    n2.wait_store()
    n3.wait_store()
    wait_for(lambda: n1.cli("volume", "set", "rv", "network.ping-timeout", "30").status == 0, 60, 1,
             what="quorum to return")  # fmt: skip
    assert _option(n3, "rv", "network.ping-timeout") == "30"

    n1.ok("volume", "stop", "rv")
    n1.ok("volume", "delete", "rv")
    data = json.loads(n1.ok("--json", "peer", "detach", "127.0.0.3"))
    assert data == {"host": "127.0.0.3", "message": "success"}
    assert _uuids(n1) == set(ids[:2])
    alone = n3.api("GET", "/v1/node")
    assert alone["store"] == "sqlite" and alone["peer_count"] == 1
    assert not n3.etcd_pids()
    assert "not part of the pool" in n1.fails("peer", "detach", "127.0.0.3")
    assert n1.ok("peer", "probe", n3.remote).strip() == "peer probe: success"  # it may join again
    assert _uuids(n3) == set(ids[:3])

    # a host is down: start needs force, and then starts what it can; the host catches up later
    n4.ok("volume", "delete", "own")
    n1.ok("volume", "create", "two", f"{n1.addr}:{n1.base}/n1/two", f"{n2.addr}:{n2.base}/n2/two", "force")
    n2.kill()
    assert "127.0.0.2 not connected (use 'force')" in n1.fails("volume", "start", "two")
    text = n1.ok("volume", "start", "two", "force")
    assert "warning: brick 127.0.0.2:" in text and "host 127.0.0.2 is not connected" in text
    n2.start()
    wait_for(lambda: all(r["online"] for r in n1.api("GET", "/v1/volumes/two/status")["bricks"]), 30,
             what="host 2 to start its brick")  # fmt: skip
    n1.ok("volume", "stop", "two")
    n1.ok("volume", "delete", "two")

    # a dead host leaves the pool only with force
    n3.kill()
    assert "127.0.0.3 is not connected: detach it with 'force'" in n1.fails("peer", "detach", "127.0.0.3")
    n1.ok("peer", "detach", "127.0.0.3", "force")
    assert _uuids(n1) == _uuids(n2) == set(ids[:2])
    assert "127.0.0.3" not in n1.api("GET", "/v1/node")["store_detail"]
