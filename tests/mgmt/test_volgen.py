"""volgen: brick and client volfiles of each volume shape, built by the real graph builder."""

from __future__ import annotations

import uuid

import pytest

from mortar.graph import from_text, parse
from mortar.mgmt.volgen import Brick, VolumeDescription, bind_address, brick_volfile, client_volfile, dashed
from mortar.mgmt.volopts import OptionKeyError, apply, validate
from tests.integration.afr import HAVE_AFR

VID = str(uuid.uuid4())


def _desc(n: int, replica: int = 1, arbiter: int = 0, **kw: object) -> VolumeDescription:
    bricks = [Brick(f"10.0.0.{i % 3 + 1}", f"/bricks/b{i}", 49152 + i) for i in range(n)]
    return VolumeDescription("vol", VID, bricks, replica, arbiter, username="u", password="p", **kw)  # type: ignore[arg-type]


def test_names() -> None:
    assert dashed("/data/brick1") == "data-brick1"
    assert dashed("/") == "root"
    assert _desc(2).brick_volfile_name(1) == "vol.10.0.0.2.bricks-b1.vol"
    assert bind_address("10.0.0.7") == "10.0.0.7"
    assert bind_address("::1") == "::1"
    assert bind_address("node1.example") == "0.0.0.0"


def test_brick_volfile_shape_and_options() -> None:
    desc = _desc(
        2, xlator_options={"storage/posix": {"reserve": "3"}, "performance/io-threads": {"thread-count": "8"}}
    )
    desc.auth_allow = "10.0.0.*"
    specs = parse(brick_volfile(desc, 1, create=True))
    assert [s.type for s in specs] == [
        "storage/posix",
        "features/locks",
        "features/index",
        "performance/io-threads",
        "debug/io-stats",
        "protocol/server",
    ]
    posix, server = specs[0].options, specs[-1].options
    assert posix == {"directory": "/bricks/b1", "volume-id": VID, "brick-create": "on", "reserve": "3"}
    assert specs[3].options == {"thread-count": "8"}
    assert specs[4].name == "vol-brick-1"
    assert server["transport.socket.bind-address"] == "10.0.0.2"
    assert server["auth.addr.vol-brick-1.allow"] == "10.0.0.*"
    assert server["auth.login.vol-brick-1.allow"] == "u" and server["auth.login.u.password"] == "p"
    assert "brick-create" not in parse(brick_volfile(desc, 1))[0].options
    graph = from_text(brick_volfile(desc, 1))  # every option is one the translators declare
    assert graph.top.type_name == "protocol/server"


def test_client_volfile_distribute_with_client_io_threads() -> None:
    desc = _desc(3, xlator_options={"protocol/client": {"ping-timeout": "20"}})
    desc.client_io_threads = True
    specs = parse(client_volfile(desc))
    assert [s.type for s in specs] == ["protocol/client"] * 3 + [
        "cluster/distribute",
        "performance/io-threads",
        "performance/nl-cache",
        "performance/md-cache",
        "debug/io-stats",
    ]
    c0 = specs[0].options
    assert c0["remote-host"] == "10.0.0.1" and c0["remote-port"] == "49152"
    assert c0["remote-subvolume"] == "vol-brick-0" and c0["ping-timeout"] == "20"
    assert (c0["username"], c0["password"]) == ("u", "p")
    assert specs[-1].name == "vol" and specs[-1].subvolumes == ["vol-md-cache"]
    assert specs[-3].subvolumes == ["vol-io-threads"]
    from_text(client_volfile(desc))


def test_client_caches_can_be_turned_off() -> None:
    """`performance.stat-prefetch off` / `performance.nl-cache off` take them out of the graph;
    their timeouts reach the translators."""
    desc = _desc(1)
    apply(desc, {"performance.md-cache-timeout": "3", "performance.nl-cache-timeout": "2"})
    apply(desc, {"performance.nl-cache": "off"})
    specs = parse(client_volfile(desc))
    assert [s.type for s in specs] == ["protocol/client", "performance/md-cache", "debug/io-stats"]
    assert specs[1].options["md-cache-timeout"] == "3"
    graph = from_text(client_volfile(desc))
    assert graph.xlators["vol-md-cache"].opts["md-cache-timeout"] == 3.0
    apply(desc, {"performance.stat-prefetch": "off"})
    assert [s.type for s in parse(client_volfile(desc))] == ["protocol/client", "debug/io-stats"]
    with pytest.raises(OptionKeyError):
        validate("performance.md-cache-timeout", "-1")


def test_client_volfile_single_brick_and_unix_sockets() -> None:
    desc = VolumeDescription("one", VID, [Brick("localhost", "/b", 0, "/run/one.sock")], transport="unix")
    specs = parse(client_volfile(desc))
    assert [s.type for s in specs] == [
        "protocol/client",
        "performance/nl-cache",
        "performance/md-cache",
        "debug/io-stats",
    ]
    assert specs[0].options["transport.socket.connect-path"] == "/run/one.sock"
    assert "remote-port" not in specs[0].options
    server = parse(brick_volfile(desc, 0))[-1].options
    assert server["transport.socket.listen-path"] == "/run/one.sock"


def test_client_volfile_distributed_replicate_with_arbiter() -> None:
    specs = parse(client_volfile(_desc(6, replica=3, arbiter=1)))
    afr = [s for s in specs if s.type == "cluster/replicate"]
    assert [s.name for s in afr] == ["vol-replicate-0", "vol-replicate-1"]
    assert afr[1].subvolumes == ["vol-client-3", "vol-client-4", "vol-client-5"]
    assert afr[1].options["afr-pending-xattr"] == "vol-client-3,vol-client-4,vol-client-5"
    assert afr[0].options["arbiter-count"] == "1" and afr[0].options["volume-name"] == "vol"
    dht = next(s for s in specs if s.type == "cluster/distribute")
    assert dht.subvolumes == ["vol-replicate-0", "vol-replicate-1"]


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_replicate_volfiles_build() -> None:
    from_text(client_volfile(_desc(6, replica=3)))
    from_text(client_volfile(_desc(3, replica=3, arbiter=1)))
