"""A live server fed hostile bytes over raw sockets: it closes the offending connection, says why,
answers malformed requests with errors, and keeps serving well-behaved clients throughout.

The server runs on uvloop in a thread of its own, so these tests talk to it with plain blocking
sockets, the way a hostile peer would.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import tracemalloc
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mortar.core.fops import FOPS
from mortar.core.gfid import ROOT_GFID
from mortar.core.translator import Event
from mortar.rpc import codec
from mortar.rpc.frame import HEADER, MAGIC, MAX_PAYLOAD, VERSION, Frame, FrameReader, Kind, Op, encode_frame
from mortar.rpc.messages import Handshake
from mortar.xlators.protocol.client import ClientTranslator
from mortar.xlators.protocol.server import ServerTranslator

from .conftest import Recorder
from .memfs import MemFs, make_loc

pytestmark = pytest.mark.timeout(120)
_T = TypeVar("_T")
STAT = FOPS["stat"].op
WRITEV = FOPS["writev"].op


class ThreadedBrick:
    """memfs behind a ServerTranslator, on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-brick", daemon=True)
        self.thread.start()
        self.fs = MemFs("brick")
        self.server = ServerTranslator("server", {}, [self.fs])
        self.run(self.server.init())
        assert self.server.listen_port is not None
        self.port: int = self.server.listen_port

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 10) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.fini())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[ThreadedBrick]:
    brick = ThreadedBrick()
    yield brick
    brick.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def handshake(xid: int = 1) -> bytes:
    meta = Handshake("brick", f"fuzzer-{xid}").encode()
    return encode_frame(Frame(Kind.REQUEST, Op.HANDSHAKE, xid, 0, meta))


def read_frames(sock: socket.socket, want: int) -> list[Frame] | None:
    """`want` frames, or None when the server closes the connection first."""
    reader = FrameReader()
    frames: list[Frame] = []
    while len(frames) < want:
        data = sock.recv(1 << 16)
        if not data:
            return None
        frames.extend(reader.feed(data))
    return frames


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while data := sock.recv(1 << 16):
            del data  # whatever replies came before the close
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def authenticated(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(handshake())
    frames = read_frames(sock, 1)
    assert frames is not None and frames[0].status == 0
    return sock


def request(op: int, xid: int, meta: bytes) -> bytes:
    return encode_frame(Frame(Kind.REQUEST, op, xid, 0, meta))


def ping(xid: int) -> bytes:
    return encode_frame(Frame(Kind.REQUEST, Op.PING, xid))


# ---- deterministic cases ---------------------------------------------------------------------


def test_bad_magic_closes_with_a_logged_reason(live: ThreadedBrick, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mortar"), connect(live.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: brick\r\n\r\n")
        assert closed_by_server(sock)
    assert any("bad magic" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_fop_before_handshake_closes(live: ThreadedBrick) -> None:
    with connect(live.port) as sock:
        sock.sendall(ping(1))  # allowed before the handshake
        frames = read_frames(sock, 1)
        assert frames is not None and frames[0].op == Op.PING
        sock.sendall(
            request(STAT, 2, codec.pack([[0, 0, [], 0, b""], [[bytes(ROOT_GFID), None, "", "/"]], None]))
        )
        assert closed_by_server(sock)


def test_garbage_meta_gets_einval_and_the_connection_lives(live: ThreadedBrick) -> None:
    with authenticated(live.port) as sock:
        sock.sendall(request(STAT, 2, b"\xc1\xc1") + request(STAT, 3, codec.pack(["not", "a request"])))
        sock.sendall(request(999, 4, codec.pack([])) + ping(5))
        frames = read_frames(sock, 4)
        assert frames is not None
        by_xid = {f.xid: f for f in frames}
        assert by_xid[2].status == errno.EINVAL and by_xid[3].status == errno.EINVAL
        assert by_xid[4].status == errno.ENOSYS
        assert "unknown op" in codec.decode_error(by_xid[4].meta)
        assert by_xid[5].op == Op.PING


@pytest.mark.parametrize("authenticate", [False, True])
def test_absurd_payload_length_closes_without_allocating(live: ThreadedBrick, authenticate: bool) -> None:
    sock = authenticated(live.port) if authenticate else connect(live.port)
    with sock:
        tracemalloc.start()
        try:
            sock.sendall(HEADER.pack(MAGIC, VERSION, Kind.REQUEST, WRITEV, 9, 0, 10, 0xFFFFFFFF) + b"x" * 100)
            assert closed_by_server(sock)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 4 << 20


def test_handshake_for_another_brick_is_refused(live: ThreadedBrick) -> None:
    with connect(live.port) as sock:
        meta = Handshake("not-this-brick", "fuzzer").encode()
        sock.sendall(encode_frame(Frame(Kind.REQUEST, Op.HANDSHAKE, 1, 0, meta)) + ping(2))
        frames = read_frames(sock, 1)
        assert frames is not None and frames[0].status == errno.ENOENT
        assert closed_by_server(sock)


# ---- hypothesis ------------------------------------------------------------------------------

headers = st.builds(
    HEADER.pack,
    st.sampled_from([MAGIC, b"MRTX"]),
    st.sampled_from([VERSION, VERSION + 1]),
    st.integers(0, 3),
    st.sampled_from([Op.HANDSHAKE, Op.PING, STAT, WRITEV, FOPS["readv"].op, 0, 999, 65535]),
    st.integers(0, (1 << 64) - 1),
    st.integers(-(1 << 31), (1 << 31) - 1),
    st.one_of(st.integers(0, 100), st.integers(0, 0xFFFFFFFF)),
    st.one_of(st.integers(0, 100), st.integers(MAX_PAYLOAD + 1, 0xFFFFFFFF)),
)
valid_frames = st.sampled_from([handshake(), ping(7), request(STAT, 8, codec.pack([None, [], None]))])
attacks = st.one_of(
    st.binary(min_size=1, max_size=500),  # random bytes
    st.tuples(valid_frames, st.integers(1, 40)).map(lambda t: t[0][: t[1]]),  # truncated valid frames
    st.tuples(headers, st.binary(max_size=200)).map(lambda t: t[0] + t[1]),  # plausible headers, junk
    st.tuples(st.just(handshake()), headers, st.binary(max_size=200)).map(lambda t: t[0] + t[1] + t[2]),
    st.tuples(st.just(handshake()), st.binary(max_size=300)).map(lambda t: t[0] + t[1]),
)


@pytest.fixture(scope="module")
def witness(live: ThreadedBrick) -> Iterator[tuple[ClientTranslator, Recorder]]:
    """A well-behaved client connected before the fuzzing starts and checked after it."""

    async def start() -> tuple[ClientTranslator, Recorder]:
        rec = Recorder()
        client = ClientTranslator("witness", {"remote-port": live.port, "remote-subvolume": "brick"})
        client.parents.append(rec)
        await client.init()
        client.notify(Event.PARENT_UP, None)
        await client.wait_connected(5)
        return client, rec

    client, rec = live.run(start())
    yield client, rec
    live.run(client.fini())


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(attacks, min_size=1, max_size=3))
def test_fuzz_live_server(
    live: ThreadedBrick, witness: tuple[ClientTranslator, Recorder], blobs: list[bytes]
) -> None:
    socks = [connect(live.port) for _ in blobs]  # several hostile connections at once
    try:
        for sock, blob in zip(socks, blobs, strict=True):
            sock.sendall(blob)
        for sock in socks:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the server may already have closed on us
    finally:
        for sock in socks:
            sock.close()


def test_after_fuzzing_everyone_else_is_still_served(
    live: ThreadedBrick, witness: tuple[ClientTranslator, Recorder]
) -> None:
    client, rec = witness
    reply = live.run(client.stat(make_loc(gfid=ROOT_GFID)))
    assert reply.iatt.gfid == ROOT_GFID
    assert client.connected and rec.count(Event.CHILD_DOWN) == 0
    with authenticated(live.port) as sock:  # and new clients get in
        sock.sendall(ping(2))
        assert read_frames(sock, 1) is not None

    async def settle() -> int:
        async with asyncio.timeout(5):
            while len(live.server.sessions) > 2:  # the witness and the socket just closed
                await asyncio.sleep(0.01)
        return len(live.server.sessions)

    assert live.run(settle()) <= 2  # no hostile connection lingers
