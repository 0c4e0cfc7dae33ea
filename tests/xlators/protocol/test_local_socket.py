"""A TCP brick's local unix socket (`transport.socket.local-path`): clients on the brick's host use
it instead of TCP loopback, and fall back to TCP when it is absent or is not that brick's."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from mortar.core.gfid import ROOT_GFID
from mortar.core.translator import Event
from mortar.rpc.connection import peer_uid
from mortar.xlators.protocol.server import ServerTranslator

from .conftest import Brick, Recorder, start_brick, stop_brick
from .memfs import MemFs, make_loc
from .test_client_server import create_file, refused

pytestmark = pytest.mark.timeout(60)


def abstract_name() -> str:
    return f"@mortar/test/{os.getpid()}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["abstract", "file"])
def local_path(request: pytest.FixtureRequest, sockdir: str) -> str:
    return abstract_name() if request.param == "abstract" else f"{sockdir}/local.sock"


async def test_client_on_the_brick_host_uses_the_local_socket(local_path: str, sockdir: str) -> None:
    b = await start_brick("tcp", sockdir, **{"transport.socket.local-path": local_path})
    try:
        assert b.server.local_path == local_path and b.server.listen_port
        client = await b.client(**{"transport.socket.local-path": local_path})
        assert client.via == "local"
        (session,) = b.server.sessions
        assert session.local and session.conn.peer_host is None
        assert peer_uid(session.conn) == os.getuid()
        _gfid, fd = await create_file(client, "vm.img")
        data = os.urandom(3 << 20)  # large frames: the aligned receive path on the server
        await client.writev(fd, data, 0, 0)
        assert bytes((await client.readv(fd, len(data), 0, 0)).data) == data
        # a client without the option, or told to use TCP only, still comes over TCP
        plain = await b.client()
        assert plain.via == "tcp"
        assert sorted(s.local for s in b.server.sessions) == [False, True]
    finally:
        await stop_brick(b)
    if local_path.startswith("/"):
        assert not os.path.exists(local_path)  # the brick removes its socket file when it stops


async def test_absent_local_socket_falls_back_to_tcp(tcp_brick: Brick, sockdir: str) -> None:
    for missing in (abstract_name(), f"{sockdir}/nothing.sock"):
        client = await tcp_brick.client(**{"transport.socket.local-path": missing})
        assert client.via == "tcp"
        await client.stat(make_loc(gfid=ROOT_GFID))


async def test_local_socket_of_another_brick_is_not_used(sockdir: str) -> None:
    """The socket answers, but for another brick: the handshake refuses, the client uses TCP and
    its writes land on its own brick."""
    other_path = abstract_name()
    other = await start_brick("tcp", sockdir, **{"transport.socket.local-path": other_path})
    mine = await start_brick("tcp", sockdir)
    mine.fs.name = "mine"  # the subvolume its server serves and its clients ask for
    try:
        client = await mine.client(**{"transport.socket.local-path": other_path})
        assert client.via == "tcp"
        await create_file(client, "here")
        assert "here" in mine.fs.nodes[ROOT_GFID].entries
        assert "here" not in other.fs.nodes[ROOT_GFID].entries
        assert not other.server.sessions  # its refused local session is gone
    finally:
        await stop_brick(mine)
        await stop_brick(other)


async def test_same_brick_name_on_a_socket_it_does_not_claim_is_not_used(sockdir: str) -> None:
    """A server of the same brick name listening on that path as a plain unix transport does not
    say it is the brick's local socket: the client does not trust it and goes over TCP."""
    path = f"{sockdir}/impostor.sock"
    impostor = ServerTranslator(
        "impostor", {"transport-type": "unix", "transport.socket.listen-path": path}, [MemFs("brick")]
    )
    await impostor.children[0].init()
    await impostor.init()
    b = await start_brick("tcp", sockdir)
    try:
        client = await b.client(**{"transport.socket.local-path": path})
        assert client.via == "tcp"
        assert len(b.server.sessions) == 1
    finally:
        await stop_brick(b)
        await impostor.fini()


async def test_something_else_on_the_socket_falls_back_to_tcp(tcp_brick: Brick, sockdir: str) -> None:
    """Not a mortar brick at all (it hangs up at once): TCP."""
    path = f"{sockdir}/other.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_unix_server(hang_up, path)
    try:
        client = await tcp_brick.client(**{"transport.socket.local-path": path})
        assert client.via == "tcp"
    finally:
        server.close()


async def test_address_rules_apply_to_local_clients(sockdir: str) -> None:
    """The local socket is no way around auth.addr: its clients count as coming from the brick's
    own address (here loopback), which these rules refuse over TCP and locally alike."""
    local = abstract_name()
    b = await start_brick(
        "tcp", sockdir, **{"transport.socket.local-path": local, "auth.addr.brick.allow": "10.0.0.*"}
    )
    try:
        await refused(b, **{"transport.socket.local-path": local})
    finally:
        await stop_brick(b)


async def test_brick_restart_frees_its_local_socket_and_clients_return(sockdir: str) -> None:
    local = abstract_name()
    b = await start_brick("tcp", sockdir, **{"transport.socket.local-path": local})
    try:
        rec = Recorder()
        client = await b.client(rec, True, **{"transport.socket.local-path": local})
        assert client.via == "local"
        await b.restart()
        assert b.server.local_path == local  # the name was free again at once
        await rec.wait_for(Event.CHILD_UP, 2)
        assert client.via == "local"
        await client.stat(make_loc(gfid=ROOT_GFID))
    finally:
        await stop_brick(b)


async def test_local_socket_in_use_leaves_tcp_serving(sockdir: str) -> None:
    local = abstract_name()
    first = await start_brick("tcp", sockdir, **{"transport.socket.local-path": local})
    second = await start_brick("tcp", sockdir, **{"transport.socket.local-path": local})
    try:
        assert first.server.local_path == local
        assert second.server.local_path is None and second.server.listen_port
        client = await second.client()
        assert client.via == "tcp"
    finally:
        await stop_brick(second)
        await stop_brick(first)


async def test_local_path_from_a_new_volfile_waits_for_the_next_connection(sockdir: str) -> None:
    """A client that learns the local socket by reconfigure keeps its working TCP connection (no
    reconnect, so nothing in flight fails) and uses the socket from its next connection on."""
    local = abstract_name()
    b = await start_brick("tcp", sockdir, **{"transport.socket.local-path": local})
    try:
        rec = Recorder()
        client = await b.client(rec)
        assert client.via == "tcp"
        client.reconfigure(b.client_options(**{"transport.socket.local-path": local}))
        await asyncio.sleep(0.05)
        assert client.via == "tcp" and client.connected and rec.count(Event.CHILD_DOWN) == 0
        await b.restart()
        await rec.wait_for(Event.CHILD_UP, 2)
        assert client.via == "local"
    finally:
        await stop_brick(b)


async def test_local_socket_only_stands_in_for_the_port_the_volfile_names(sockdir: str) -> None:
    """The local socket is a shortcut to remote-host:remote-port, never a way around it: a volfile
    naming another port (a stale one, or a test cutting a brick off) does not reach the brick."""
    local = abstract_name()
    b = await start_brick("tcp", sockdir, **{"transport.socket.local-path": local})
    try:
        await refused(b, **{"transport.socket.local-path": local, "remote-port": "1"})
        assert not b.server.sessions
    finally:
        await stop_brick(b)
