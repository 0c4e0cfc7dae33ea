"""volgen gives each TCP brick a local unix socket, and its clients the same address to try first."""

from __future__ import annotations

import uuid

from mortar.graph import parse
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile, local_socket


def _desc(transport: str = "tcp", volume_id: str = "") -> VolumeDescription:
    bricks = [Brick("10.0.0.1", "/bricks/b0", 49152, "/run/b0.sock"), Brick("10.0.0.2", "/bricks/b0", 49153)]
    return VolumeDescription("vol", volume_id or str(uuid.uuid4()), bricks, 2, transport=transport)


def _options(text: str, xl_type: str) -> list[dict[str, str]]:
    return [s.options for s in parse(text) if s.type == xl_type]


def test_tcp_bricks_serve_a_local_socket_their_clients_know() -> None:
    desc = _desc()
    clients = _options(client_volfile(desc), "protocol/client")
    paths = []
    for i, brick in enumerate(desc.bricks):
        (server,) = _options(brick_volfile(desc, i), "protocol/server")
        path = server["transport.socket.local-path"]
        assert path == local_socket(desc, brick) == clients[i]["transport.socket.local-path"]
        assert path.startswith("@mortar/brick/") and len(path) < 100
        assert clients[i]["transport-type"] == "tcp" and clients[i]["remote-port"] == str(brick.port)
        paths.append(path)
    # the same path on two hosts is two bricks: two sockets
    assert len(set(paths)) == 2
    # stable for the brick, different for the same brick path of another volume
    assert local_socket(desc, desc.bricks[0]) == local_socket(_desc(volume_id=desc.volume_id), desc.bricks[0])
    assert local_socket(desc, desc.bricks[0]) != local_socket(_desc(), desc.bricks[0])


def test_unix_volumes_have_no_second_socket() -> None:
    desc = _desc("unix")
    (server,) = _options(brick_volfile(desc, 0), "protocol/server")
    assert server["transport.socket.listen-path"] == "/run/b0.sock"
    assert "transport.socket.local-path" not in server
    for client in _options(client_volfile(desc), "protocol/client"):
        assert "transport.socket.local-path" not in client
