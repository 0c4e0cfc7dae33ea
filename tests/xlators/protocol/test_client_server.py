"""protocol/client against protocol/server over real sockets (TCP and unix), memfs as the brick."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import socket
import stat

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, AttrSet, Fd, Flock, SetAttrValid
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Event
from mortar.rpc.frame import MAX_PAYLOAD
from mortar.xlators.protocol import server as server_module
from mortar.xlators.protocol.client import ClientTranslator

from .conftest import Brick, Recorder, start_brick, stop_brick
from .memfs import make_loc

pytestmark = pytest.mark.timeout(60)


async def create_file(client: ClientTranslator, name: str) -> tuple[Gfid, Fd]:
    gfid = Gfid.random()
    fd = Fd(gfid, os.O_RDWR)
    await client.create(make_loc(ROOT_GFID, name), os.O_RDWR | os.O_CREAT, 0o644, 0o022, fd, {GFID_REQ: gfid})
    return gfid, fd


async def test_file_fops_round_trip(brick: Brick) -> None:
    client = await brick.client()
    assert client.connected
    gfid, fd = await create_file(client, "disk.img")
    assert brick.fs.nodes[gfid].mode == stat.S_IFREG | 0o644

    data = os.urandom(3 << 20)  # above the large-frame threshold, below the payload limit
    w = await client.writev(fd, data, 4096, 0)
    assert w.post is not None and w.post.size == 4096 + len(data)
    r = await client.readv(fd, len(data), 4096, 0)
    assert bytes(r.data) == data
    small = await client.readv(fd, 100, 4096 + 10, 0)
    assert bytes(small.data) == data[10:110]
    eof = await client.readv(fd, 4096, 100 << 20, 0)
    assert bytes(eof.data) == b""

    found = await client.lookup(make_loc(ROOT_GFID, "disk.img"))
    assert found.iatt.gfid == gfid and found.iatt.size == 4096 + len(data)
    st = await client.stat(make_loc(gfid=gfid))
    assert st.iatt == found.iatt
    assert (await client.fstat(fd)).iatt.gfid == gfid

    ch = await client.fsetattr(fd, AttrSet(SetAttrValid.MODE | SetAttrValid.UID, mode=0o600, uid=42))
    assert ch.post is not None and ch.post.uid == 42 and stat.S_IMODE(ch.post.mode) == 0o600
    assert (await client.ftruncate(fd, 10)).post.size == 10  # type: ignore[union-attr]

    await client.fsetxattr(fd, {"user.a": b"\x00\xff", "trusted.b": b""}, 0)
    assert (await client.fgetxattr(fd, None)).xattrs == {"user.a": b"\x00\xff", "trusted.b": b""}
    assert (await client.getxattr(make_loc(gfid=gfid), "user.a")).xattrs == {"user.a": b"\x00\xff"}
    lk = await client.lk(fd, 6, Flock(1, 0, 100, 7, b"owner"))
    assert lk.flock == Flock(1, 0, 100, 7, b"owner")
    assert (await client.rchecksum(fd, 0, 10)).weak > 0
    await client.flush(fd)
    await client.release(fd)
    assert brick.fs.open_fds == set()
    with pytest.raises(FopError) as exc:
        await client.fstat(fd)
    assert exc.value.errno == errno.EBADF


async def test_namespace_fops_and_listing(brick: Brick) -> None:
    client = await brick.client()
    dgfid = Gfid.random()
    mk = await client.mkdir(make_loc(ROOT_GFID, "dir"), 0o755, 0o022, {GFID_REQ: dgfid})
    assert mk.iatt.is_dir and mk.parent_post is not None
    await client.symlink("../target", make_loc(dgfid, "link"), 0o022, {GFID_REQ: Gfid.random()})
    assert (await client.readlink(make_loc(dgfid, "link"))).target == "../target"
    await client.mknod(make_loc(dgfid, "node"), stat.S_IFREG | 0o600, 0, 0, {GFID_REQ: Gfid.random()})

    dfd = Fd(dgfid, is_dir=True)
    await client.opendir(make_loc(gfid=dgfid), dfd)
    listing = await client.readdirp(dfd, 4096, 0)
    assert [e.name for e in listing.entries] == ["link", "node"]
    assert listing.entries[0].iatt is not None and listing.entries[0].iatt.is_lnk
    assert (await client.readdirp(dfd, 4096, listing.entries[-1].offset)).entries == []
    await client.releasedir(dfd)

    await client.unlink(make_loc(dgfid, "link"), 0)
    with pytest.raises(FopError) as exc:
        await client.rmdir(make_loc(ROOT_GFID, "dir"), 0)
    assert exc.value.errno == errno.ENOTEMPTY
    vfs = (await client.statfs(make_loc(gfid=ROOT_GFID))).statvfs
    assert vfs.bsize == 4096 and vfs.namemax == 255


async def test_errors_xdata_and_caller_identity_travel(brick: Brick) -> None:
    client = await brick.client()
    with pytest.raises(FopError) as exc:
        await client.lookup(make_loc(ROOT_GFID, "missing"))
    assert exc.value.errno == errno.ENOENT
    assert "missing" in exc.value.message

    reply = await client.lookup(make_loc(gfid=ROOT_GFID), {"want": [1, "two", b"3"], "n": None})
    assert reply.xdata == {"echo": {"want": [1, "two", b"3"], "n": None}}

    # the caller's identity travels; `client` is the server's name for the connection, not the caller's
    ctx = CallContext(uid=1000, gid=100, groups=(4, 24), pid=4321, lk_owner=b"\x01" * 8, client="forged")
    token = call_context.set(ctx)
    try:
        await client.stat(make_loc(gfid=ROOT_GFID))
    finally:
        call_context.reset(token)
    (session,) = brick.server.sessions
    assert session.client_uid and client.name in session.client_uid
    assert brick.fs.last_ctx == dataclasses.replace(ctx, client=session.client_uid)

    # keyword arguments bind like the Translator signature
    assert (await client.access(loc=make_loc(gfid=ROOT_GFID), mask=0, xdata=None)).xdata is None
    with pytest.raises(TypeError):
        await client.access(make_loc(gfid=ROOT_GFID))  # type: ignore[call-arg]


async def test_frames_beyond_the_limits_fail_one_call_not_the_connection(tcp_brick: Brick) -> None:
    client = await tcp_brick.client()
    gfid, fd = await create_file(client, "big")
    with pytest.raises(FopError) as exc:
        await client.writev(fd, bytes(MAX_PAYLOAD + 1), 0, 0)
    assert exc.value.errno == errno.EINVAL
    tcp_brick.fs.nodes[gfid].xattrs = {f"user.{i}": bytes(1000) for i in range(2000)}  # 2 MB listing
    with pytest.raises(FopError) as exc:
        await client.fgetxattr(fd, None)
    assert exc.value.errno == errno.EINVAL and "exceed" in exc.value.message
    assert client.connected
    assert len((await client.fgetxattr(fd, "user.7")).xattrs) == 1


async def test_pipelined_requests_answered_out_of_order(brick: Brick) -> None:
    """200 reads in flight at once; later ones finish first, every reply lands at its caller."""
    client = await brick.client()
    _, fd = await create_file(client, "blocks")
    n = 200
    blocks = [os.urandom(1000 + i) for i in range(n)]
    offsets = [i * 4096 for i in range(n)]
    await asyncio.gather(*(client.writev(fd, b, off, 0) for b, off in zip(blocks, offsets, strict=True)))
    brick.fs.calls.clear()

    answered: list[int] = []

    async def read(i: int) -> bytes:
        # earlier requests wait longer, so the brick answers them last
        r = await client.readv(fd, len(blocks[i]), offsets[i], 0, {"test-delay": (n - i) * 0.001})
        answered.append(i)
        return bytes(r.data)

    results = await asyncio.gather(*(read(i) for i in range(n)))
    assert results == blocks  # every reply reached the caller that asked for it
    assert brick.fs.calls.count("readv") == n
    assert brick.fs.max_waiting > 1 and answered != sorted(answered)


async def test_backpressure_bounds_requests_in_flight(sockdir: str) -> None:
    b = await start_brick("tcp", sockdir, **{"rpc.outstanding-rpc-limit": 4})
    try:
        client = await b.client()
        b.fs.gate.clear()
        tasks = [asyncio.ensure_future(client.stat(make_loc(gfid=ROOT_GFID))) for _ in range(40)]
        async with asyncio.timeout(5):
            while b.fs.waiting < 4:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # give a wrongly unbounded server the chance to start more
        assert b.fs.waiting == 4
        b.fs.gate.set()
        await asyncio.gather(*tasks)
        assert b.fs.max_waiting == 4
    finally:
        await stop_brick(b)


async def test_frame_timeout_fails_one_request_not_the_connection(tcp_brick: Brick) -> None:
    client = await tcp_brick.client(**{"frame-timeout": "0.3", "ping-timeout": "5"})
    tcp_brick.fs.gate.clear()
    with pytest.raises(FopError) as exc:
        await client.stat(make_loc(gfid=ROOT_GFID))
    assert exc.value.errno == errno.ETIMEDOUT
    tcp_brick.fs.gate.set()
    assert client.connected
    await client.stat(make_loc(gfid=ROOT_GFID))


async def test_disconnect_releases_fds_and_tells_the_brick(brick: Brick) -> None:
    client = await brick.client()
    await create_file(client, "left-open")
    assert len(brick.fs.open_fds) == 1
    session = next(iter(brick.server.sessions))
    await client.fini()
    async with asyncio.timeout(5):
        while brick.fs.open_fds:
            await asyncio.sleep(0.01)
    assert brick.fs.disconnected == [session.client_uid]
    assert brick.server.sessions == set()


async def test_upcall_reaches_the_client_parents(brick: Brick) -> None:
    rec = Recorder()
    await brick.client(rec)
    brick.fs.notify(Event.UPCALL, brick.fs, {"invalidate": bytes(ROOT_GFID)})
    await rec.wait_for(Event.UPCALL)
    assert (Event.UPCALL, {"invalidate": bytes(ROOT_GFID)}) in rec.events


# ---- handshake and authentication -----------------------------------------------------------


async def refused(brick: Brick, **client_opts: object) -> Recorder:
    """A client that must not get in: it reports CHILD_DOWN and never CHILD_UP."""
    rec = Recorder()
    client = await brick.client(rec, False, **client_opts)
    await rec.wait_for(Event.CHILD_DOWN)
    with pytest.raises(TimeoutError):
        await client.wait_connected(0.3)
    assert rec.count(Event.CHILD_UP) == 0
    with pytest.raises(FopError) as exc:
        await client.stat(make_loc(gfid=ROOT_GFID))
    assert exc.value.errno == errno.ENOTCONN
    return rec


async def test_login_required_and_checked(sockdir: str) -> None:
    opts = {"auth.login.brick.allow": "alice,bob", "auth.login.alice.password": "s3cret"}
    b = await start_brick("tcp", sockdir, **opts)
    try:
        await refused(b, username="alice", password="wrong")
        await refused(b)  # no credentials at all
        await refused(b, username="mallory", password="s3cret")
        await refused(b, username="bob", password="")  # allowed user without a password set
        client = await b.client(username="alice", password="s3cret")
        await client.stat(make_loc(gfid=ROOT_GFID))
    finally:
        await stop_brick(b)


async def test_address_rules(sockdir: str) -> None:
    b = await start_brick("tcp", sockdir, **{"auth.addr.brick.allow": "10.0.0.*,192.168.0.0/16"})
    try:
        await refused(b)
        await b.restart(**{"auth.addr.brick.allow": "10.0.0.*,127.0.0.0/8"})
        await (await b.client()).stat(make_loc(gfid=ROOT_GFID))
    finally:
        await stop_brick(b)


async def test_alias_cannot_dodge_login(sockdir: str) -> None:
    """The brick is known by its child's name and by the name in its auth options: same rules."""
    b = await start_brick(
        "tcp", sockdir, **{"auth.login./b/1.allow": "alice", "auth.login.alice.password": "x"}
    )
    try:
        await refused(b)  # asks for "brick", the child's name
        await refused(b, **{"remote-subvolume": "/b/1"})
        await refused(b, **{"remote-subvolume": "no-such-brick"}, username="alice", password="x")
        await b.client(**{"remote-subvolume": "/b/1"}, username="alice", password="x")
    finally:
        await stop_brick(b)


async def test_server_reconfigure_drops_clients_no_longer_allowed(tcp_brick: Brick) -> None:
    rec = Recorder()
    client = await tcp_brick.client(rec)
    tcp_brick.server.reconfigure(tcp_brick.server_options(**{"auth.addr.brick.allow": "127.0.0.1"}))
    assert client.connected  # still allowed
    tcp_brick.server.reconfigure(tcp_brick.server_options(**{"auth.addr.brick.allow": "10.0.0.*"}))
    await rec.wait_for(Event.CHILD_DOWN)
    with pytest.raises(TimeoutError):
        await client.wait_connected(0.3)  # and refused on every retry


async def test_client_reconfigure_moves_to_a_new_address(tcp_brick: Brick, sockdir: str) -> None:
    rec = Recorder()
    client = await tcp_brick.client(rec)
    other = await start_brick("unix", sockdir)
    try:
        other.fs.nodes[ROOT_GFID].xattrs["user.which"] = b"other"
        client.reconfigure(other.client_options())
        await rec.wait_for(Event.CHILD_UP, 2)
        assert rec.count(Event.CHILD_DOWN) == 1
        assert (await client.getxattr(make_loc(gfid=ROOT_GFID), "user.which")).xattrs == {
            "user.which": b"other"
        }
        client.reconfigure(other.client_options(**{"ping-timeout": "7"}))  # no new connection for this
        await asyncio.sleep(0.05)
        assert rec.count(Event.CHILD_UP) == 2 and client.connected
    finally:
        await client.fini()
        await stop_brick(other)


# ---- failures and recovery -------------------------------------------------------------------


async def test_silent_server_turns_into_child_down(tcp_brick: Brick) -> None:
    rec = Recorder()
    client = await tcp_brick.client(rec, **{"ping-timeout": "0.5"})
    await rec.wait_for(Event.CHILD_UP)
    for session in tcp_brick.server.sessions:  # the brick stops reading: no replies, no pongs
        session.conn.pause_reading()
    pending = asyncio.ensure_future(client.stat(make_loc(gfid=ROOT_GFID)))
    with pytest.raises(FopError) as exc:
        async with asyncio.timeout(10):  # a bound against hanging, not a measurement
            await pending
    assert exc.value.errno == errno.ENOTCONN
    await rec.wait_for(Event.CHILD_DOWN)
    # the listener still accepts: the client reconnects on a fresh connection
    await rec.wait_for(Event.CHILD_UP, 2)
    await client.stat(make_loc(gfid=ROOT_GFID))


async def test_server_restart_reconnects_same_client(brick: Brick) -> None:
    rec = Recorder()
    client = await brick.client(rec)
    _, fd = await create_file(client, "survivor")
    await client.writev(fd, b"before", 0, 0)

    await brick.server.fini()
    await rec.wait_for(Event.CHILD_DOWN)
    assert not client.connected
    with pytest.raises(FopError) as exc:  # fails fast, does not wait for the server
        async with asyncio.timeout(1):
            await client.stat(make_loc(gfid=ROOT_GFID))
    assert exc.value.errno == errno.ENOTCONN
    await asyncio.sleep(0.2)  # a few reconnect attempts hit a closed port

    await brick.restart()
    await rec.wait_for(Event.CHILD_UP, 2)
    await client.wait_connected(5)
    with pytest.raises(FopError) as exc:
        await client.readv(fd, 6, 0, 0)
    assert exc.value.errno == errno.EBADF  # opened on the old connection
    await client.release(fd)  # releasing a dead fd is fine
    fd2 = Fd(fd.gfid)
    await client.open(make_loc(ROOT_GFID, "survivor"), os.O_RDONLY, fd2)
    assert bytes((await client.readv(fd2, 6, 0, 0)).data) == b"before"
    assert [e for e, _ in rec.events] == [Event.CHILD_UP, Event.CHILD_DOWN, Event.CHILD_UP]


async def test_pending_requests_fail_when_connection_drops(brick: Brick) -> None:
    client = await brick.client()
    brick.fs.gate.clear()
    pending = [asyncio.ensure_future(client.stat(make_loc(gfid=ROOT_GFID))) for _ in range(10)]
    async with asyncio.timeout(5):
        while brick.fs.waiting < 10:
            await asyncio.sleep(0.01)
    for session in list(brick.server.sessions):
        session.conn.abort("test drops the connection")
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert all(isinstance(r, FopError) and r.errno == errno.ENOTCONN for r in results)
    brick.fs.gate.set()
    await client.wait_connected(5)
    await client.stat(make_loc(gfid=ROOT_GFID))


async def test_idle_connection_without_handshake_is_dropped(
    tcp_brick: Brick, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_brick.server.listen_port)
    try:
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server
    finally:
        writer.close()


async def test_unix_socket_path_in_use_or_stale(sockdir: str) -> None:
    b = await start_brick("unix", sockdir)
    try:
        path = b.server.listen_path
        assert path is not None
        with pytest.raises(OSError) as exc:  # a live server's socket is not stolen
            await start_brick("unix", sockdir)
        assert exc.value.errno == errno.EADDRINUSE
    finally:
        await stop_brick(b)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # bound, never listening: what a killed brick leaves behind
    stale.close()
    b = await start_brick("unix", sockdir)
    try:
        await (await b.client()).stat(make_loc(gfid=ROOT_GFID))
    finally:
        await stop_brick(b)


async def test_no_server_at_all_reports_child_down(sockdir: str) -> None:
    rec = Recorder()
    client = ClientTranslator(
        "lonely",
        {
            "remote-subvolume": "x",
            "transport-type": "unix",
            "transport.socket.connect-path": f"{sockdir}/none",
        },
    )
    client.parents.append(rec)
    await client.init()
    client.notify(Event.PARENT_UP, None)
    try:
        await rec.wait_for(Event.CHILD_DOWN)
        with pytest.raises(FopError) as exc:
            await client.lookup(make_loc(ROOT_GFID, "x"))
        assert exc.value.errno == errno.ENOTCONN
    finally:
        await client.fini()
