"""`volume set|reset|get` through a real mortard: round trips, refusals, groups, and a brick-side
option that reaches the running brick in place (same process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mortar.graph import parse
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, wait_for

pytestmark = pytest.mark.timeout(120)


def _get(node: Mortard, volume: str, key: str) -> dict[str, str]:
    (row,) = json.loads(node.ok("--json", "volume", "get", volume, key))["options"]
    return dict(row)


def test_set_reset_get_round_trips_and_refusals(node: Mortard, bricks: Path) -> None:
    node.ok("volume", "create", "opts", f"127.0.0.1:{bricks}/o1", "force")
    default = _get(node, "opts", "network.ping-timeout")
    assert (default["value"], default["source"]) == ("42", "default")

    node.ok("volume", "set", "opts", "network.ping-timeout", "20", "storage.reserve", "3%")
    assert _get(node, "opts", "network.ping-timeout") == {**default, "value": "20", "source": "set"}
    assert _get(node, "opts", "storage.reserve")["value"] == "3%"
    node.ok("volume", "reset", "opts", "network.ping-timeout")
    assert _get(node, "opts", "network.ping-timeout")["source"] == "default"
    assert _get(node, "opts", "storage.reserve")["source"] == "set"
    node.ok("volume", "reset", "opts")
    assert _get(node, "opts", "storage.reserve")["source"] == "default"

    refusals = [
        (("volume", "set", "opts", "network.ping-timout", "5"), "did you mean 'network.ping-timeout'?"),
        (("volume", "set", "opts", "ping-timeout", "5"), "did you mean 'network.ping-timeout'?"),
        (("volume", "set", "opts", "network.ping-timeout", "soon"), "is not a duration"),
        (("volume", "set", "opts", "storage.reserve", "101"), "not between 0% and 100%"),
        (("volume", "set", "opts", "performance.io-thread-count", "1000"), "above the maximum 64"),
        (("volume", "set", "opts", "group", "nosuch"), "option group 'nosuch' does not exist"),
        (("volume", "set", "nosuch", "storage.reserve", "2"), "volume nosuch does not exist"),
        (("volume", "get", "opts", "storage.reserv"), "did you mean 'storage.reserve'?"),
        (("volume", "reset", "opts", "storage.reserv"), "did you mean 'storage.reserve'?"),
    ]
    for args, expected in refusals:
        assert expected in node.fails(*args), args
    assert json.loads(node.ok("--json", "volume", "info", "opts"))["volumes"][0]["options"] == {}

    # an operator's group in WORKDIR/groups, including a refusal for a key that does not exist
    groups = node.workdir / "groups"
    groups.mkdir(exist_ok=True)
    (groups / "site").write_text("network.ping-timeout=11\nstorage.reserve=4\n")
    (groups / "broken").write_text("network.ping-timeout=11\nfeatures.shard=on\n")
    node.ok("volume", "set", "opts", "group", "site")
    assert _get(node, "opts", "storage.reserve")["value"] == "4"
    assert "group broken line 2: option 'features.shard' does not exist" in node.fails(
        "volume", "set", "opts", "group", "broken"
    )
    node.ok("volume", "delete", "opts")


@pytest.mark.skipif(not HAVE_AFR, reason="the virt group sets cluster/replicate options")
def test_group_virt(node: Mortard, bricks: Path) -> None:
    node.ok(
        "volume", "create", "vms", "replica", "3", *[f"127.0.0.1:{bricks}/v{i}" for i in range(3)], "force"
    )
    node.ok("volume", "set", "vms", "group", "virt")
    options = json.loads(node.ok("--json", "volume", "info", "vms"))["volumes"][0]["options"]
    assert options["network.ping-timeout"] == "20" and options["cluster.quorum-type"] == "auto"
    assert options["cluster.eager-lock"] == "enable" and options["performance.client-io-threads"] == "on"
    node.ok("volume", "start", "vms")
    specs = parse(node.ok("volume", "volfile", "vms"))
    afr = next(s for s in specs if s.type == "cluster/replicate")
    assert afr.options["quorum-type"] == "auto" and afr.options["data-self-heal-algorithm"] == "full"
    assert any(s.type == "performance/io-threads" for s in specs)
    node.ok("volume", "stop", "vms")
    node.ok("volume", "delete", "vms")


def test_brick_side_option_reaches_the_running_brick(node: Mortard, bricks: Path) -> None:
    node.ok("volume", "create", "hot", f"127.0.0.1:{bricks}/h1", "force")
    node.ok("volume", "start", "hot")
    before = node.api("GET", "/v1/volumes/hot/status")["bricks"][0]
    node.ok("volume", "set", "hot", "performance.io-thread-count", "4", "storage.reserve", "7")
    volfile = next((node.workdir / "vols" / "hot").glob("*.vol"))
    wait_for(lambda: "thread-count 4" in volfile.read_text(), 10, what="the brick volfile")
    log = node.logdir / "bricks" / f"{str(bricks).strip('/').replace('/', '-')}-h1.log"
    wait_for(lambda: "now 4 I/O threads" in log.read_text(), 10, what="the brick to reconfigure")
    after = node.api("GET", "/v1/volumes/hot/status")["bricks"][0]
    assert (after["pid"], after["port"]) == (before["pid"], before["port"])  # in place, no restart
    client = parse(node.ok("volume", "volfile", "hot"))
    assert all("reserve" not in s.options for s in client)  # brick options stay on the bricks
    node.ok("volume", "stop", "hot")
    node.ok("volume", "delete", "hot")
