"""The sans-io frame reader and the connection state machine: bytes in, frames (or errors) out."""

from __future__ import annotations

import os
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mortar.core.fops import FOPS
from mortar.rpc import buffers
from mortar.rpc.frame import (
    HEADER,
    HEADER_SIZE,
    LARGE,
    MAGIC,
    MAX_META,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameReader,
    Kind,
    Op,
    ProtocolError,
    encode_frame,
    encode_head,
)
from mortar.rpc.state import PREAUTH_MAX_META, ConnectionState, Phase

WRITEV = FOPS["writev"].op
READV = FOPS["readv"].op
STAT = FOPS["stat"].op


def sample_frames() -> list[Frame]:
    return [
        Frame(Kind.REQUEST, Op.PING, 1),
        Frame(Kind.REQUEST, STAT, 2, 0, b"\x93\x90\x90\xc0"),
        Frame(Kind.REQUEST, WRITEV, 3, 0, b"m" * 40, b"p" * 4096),
        Frame(Kind.REPLY, READV, 4, 0, b"r", bytes(range(256)) * 300),  # large: own buffer
        Frame(Kind.REPLY, STAT, 5, 2, b"e" * (LARGE + 10)),  # large meta, no payload
        Frame(Kind.REQUEST, WRITEV, 6, 0, b"M" * (LARGE + 1), b"P" * (LARGE * 2 + 3)),  # both large
        Frame(Kind.EVENT, Op.UPCALL, 0, 0, b"\x80"),
        Frame(Kind.REPLY, READV, 7, 0, b"", b"x"),
    ]


def normalized(frames: list[Frame]) -> list[tuple[int, int, int, int, bytes, bytes | None]]:
    return [
        (f.kind, f.op, f.xid, f.status, bytes(f.meta), None if f.payload is None else bytes(f.payload))
        for f in frames
    ]


def test_round_trip_many_frames_in_one_chunk() -> None:
    frames = sample_frames()
    stream = b"".join(encode_frame(f) for f in frames)
    assert normalized(FrameReader().feed(stream)) == normalized(frames)


def test_every_split_point_of_small_frames() -> None:
    frames = [f for f in sample_frames() if len(f.meta) + len(f.payload or b"") < 5000]
    stream = b"".join(encode_frame(f) for f in frames)
    for cut in range(len(stream) + 1):
        reader = FrameReader()
        out = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert normalized(out) == normalized(frames), cut


def test_byte_by_byte_including_large_frames() -> None:
    frames = sample_frames()
    stream = b"".join(encode_frame(f) for f in frames)
    reader = FrameReader()
    out = []
    for i in range(len(stream)):
        out.extend(reader.feed(stream[i : i + 1]))
    assert normalized(out) == normalized(frames)
    assert reader.pending == 0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_chunking(data: st.DataObject) -> None:
    frames = sample_frames()
    stream = b"".join(encode_frame(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    reader = FrameReader()
    out = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.extend(reader.feed(stream[prev:cut]))
        prev = cut
    assert normalized(out) == normalized(frames)


def test_large_payload_gets_its_own_exact_buffer() -> None:
    payload = os.urandom(1 << 20)
    head = encode_head(Kind.REQUEST, WRITEV, 9, 0, b"meta", len(payload))
    reader = FrameReader()
    assert reader.feed(head + payload[:1000]) == []
    # the socket now writes straight into the payload's own buffer, in one piece
    buf = reader.get_buffer(-1)
    assert len(buf) == len(payload) - 1000
    buf[:] = payload[1000:]
    (frame,) = reader.buffer_updated(len(buf))
    # a request's payload (writev data) starts on a page, ready for an O_DIRECT write
    assert isinstance(frame.payload, memoryview) and len(frame.payload) == len(payload)
    assert buffers.is_aligned(frame.payload)
    assert frame.payload == payload and frame.meta == b"meta"
    # and the shared buffer is back for the next small frame
    assert normalized(reader.feed(encode_frame(Frame(Kind.REQUEST, Op.PING, 10)))) == [
        (Kind.REQUEST, Op.PING, 10, 0, b"", None)
    ]


def test_shared_buffer_compacts_for_a_frame_straddling_its_end() -> None:
    reader = FrameReader(bufsize=2 * (LARGE + HEADER_SIZE))
    frame = Frame(Kind.REQUEST, WRITEV, 1, 0, b"m", b"d" * (LARGE - 100))
    stream = encode_frame(frame) * 5
    assert len(reader.feed(stream)) == 5


def bad_head(**fields: int | bytes) -> bytes:
    values: dict[str, int | bytes] = dict(
        magic=MAGIC, version=VERSION, kind=Kind.REQUEST, op=STAT, xid=1, status=0, mlen=0, plen=0
    )
    values.update(fields)
    return HEADER.pack(*values.values())


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (bad_head(magic=b"HTTP"), "magic"),
        (bad_head(version=VERSION + 1), "version"),
        (bad_head(kind=7), "kind"),
        (bad_head(mlen=MAX_META + 1), "meta"),
        (bad_head(op=WRITEV, plen=MAX_PAYLOAD + 1), "payload"),
        (bad_head(op=STAT, plen=10), "may not carry"),  # stat requests have no payload
        (bad_head(kind=Kind.REPLY, op=WRITEV, plen=10), "may not carry"),
        (bad_head(kind=Kind.EVENT, op=Op.UPCALL, plen=1), "may not carry"),
    ],
)
def test_malformed_headers_are_refused(head: bytes, reason: str) -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError, match=reason):
        reader.feed(head)
    with pytest.raises(ProtocolError):  # and the reader stays broken
        reader.feed(encode_frame(Frame(Kind.REQUEST, Op.PING, 1)))


def test_absurd_length_refused_without_allocating() -> None:
    reader = FrameReader()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            reader.feed(bad_head(op=WRITEV, plen=0xFFFFFFFF))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10


def test_truncated_frame_is_held_not_returned() -> None:
    whole = encode_frame(Frame(Kind.REQUEST, WRITEV, 1, 0, b"meta", b"x" * 100_000))
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 2, len(whole) - 1):
        reader = FrameReader()
        assert reader.feed(whole[:cut]) == []
        assert reader.pending == cut


def test_header_layout_is_stable() -> None:
    """Peers of different builds must agree on this: network order, 28 bytes."""
    head = encode_head(Kind.REPLY, 19, 0x0102030405060708, -5, b"ab", 3)
    assert head[:4] == b"MRTR" and len(head) == HEADER_SIZE + 2
    fields = struct.unpack("!4sBBHQiII", head[:HEADER_SIZE])
    assert fields == (b"MRTR", 1, 1, 19, 0x0102030405060708, -5, 2, 3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_protocol_error(blob: bytes) -> None:
    reader = FrameReader()
    try:
        for frame in reader.feed(blob):
            assert isinstance(frame, Frame)
    except ProtocolError:
        pass


# ---- the connection state machine ------------------------------------------------------------


def server_state() -> tuple[ConnectionState, FrameReader]:
    reader = FrameReader()
    return ConnectionState(server=True, reader=reader), reader


def test_server_allows_only_handshake_and_ping_first() -> None:
    state, _ = server_state()
    state.check(Frame(Kind.REQUEST, Op.PING, 1))
    with pytest.raises(ProtocolError, match="before a successful handshake"):
        state.check(Frame(Kind.REQUEST, STAT, 2))
    state.check(Frame(Kind.REQUEST, Op.HANDSHAKE, 3))
    with pytest.raises(ProtocolError, match="before a successful handshake"):
        state.check(Frame(Kind.REQUEST, STAT, 4))  # handshake sent but not yet accepted
    state.established()
    state.check(Frame(Kind.REQUEST, STAT, 5))
    with pytest.raises(ProtocolError, match="second handshake"):
        state.check(Frame(Kind.REQUEST, Op.HANDSHAKE, 6))


@pytest.mark.parametrize(
    "frame",
    [
        Frame(Kind.REPLY, STAT, 1),
        Frame(Kind.EVENT, Op.UPCALL, 1),
        Frame(Kind.REQUEST, Op.PING, 1, status=5),
    ],
)
def test_server_refuses_what_clients_never_send(frame: Frame) -> None:
    state, _ = server_state()
    state.established()
    with pytest.raises(ProtocolError):
        state.check(frame)


def test_preauth_limits_then_full_limits() -> None:
    state, reader = server_state()
    with pytest.raises(ProtocolError, match="payload"):
        reader.feed(bad_head(op=WRITEV, plen=10))
    state, reader = server_state()
    with pytest.raises(ProtocolError, match="meta"):
        reader.feed(bad_head(op=Op.HANDSHAKE, mlen=PREAUTH_MAX_META + 1))
    state, reader = server_state()
    state.established()
    (frame,) = reader.feed(encode_frame(Frame(Kind.REQUEST, WRITEV, 1, 0, b"m", b"x" * 10)))
    assert frame.payload == b"x" * 10


def test_client_state() -> None:
    state = ConnectionState(server=False)
    state.check(Frame(Kind.REPLY, Op.HANDSHAKE, 1))
    state.check(Frame(Kind.REPLY, Op.PING, 2))
    for early in (Frame(Kind.REPLY, STAT, 3), Frame(Kind.EVENT, Op.UPCALL, 0)):
        with pytest.raises(ProtocolError):
            state.check(early)
    state.established()
    state.check(Frame(Kind.REPLY, STAT, 4))
    state.check(Frame(Kind.EVENT, Op.UPCALL, 0))
    with pytest.raises(ProtocolError, match="requests"):
        state.check(Frame(Kind.REQUEST, STAT, 5))
    state.close()
    assert state.phase is Phase.CLOSED
    with pytest.raises(ProtocolError):
        state.check(Frame(Kind.REPLY, STAT, 6))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.integers(0, 3),
    op=st.sampled_from([Op.HANDSHAKE, Op.PING, STAT, WRITEV, READV, 999, 65535]),
    mlen=st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
    plen=st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
    tail=st.binary(max_size=300),
)
def test_plausible_headers_with_garbage(kind: int, op: int, mlen: int, plen: int, tail: bytes) -> None:
    """Valid magic and version, anything else: frames or ProtocolError, never a big allocation."""
    reader = FrameReader()
    blob = HEADER.pack(MAGIC, VERSION, kind, op, 1, 0, mlen, plen) + tail
    try:
        for frame in reader.feed(blob):
            assert len(frame.meta) <= MAX_META and len(frame.payload or b"") <= MAX_PAYLOAD
    except ProtocolError:
        return
    assert mlen <= MAX_META and plen <= MAX_PAYLOAD


def test_small_limits_small_buffer_then_growth_keeps_partial_data() -> None:
    reader = FrameReader(max_meta=PREAUTH_MAX_META, max_payload=0)
    assert len(reader.get_buffer(-1)) <= 2 * (PREAUTH_MAX_META + HEADER_SIZE)  # idle peers are cheap
    frame = Frame(Kind.REQUEST, Op.HANDSHAKE, 1, 0, b"h" * 100)
    second = encode_frame(Frame(Kind.REQUEST, WRITEV, 2, 0, b"m", b"w" * 50_000))
    assert len(reader.feed(encode_frame(frame) + second[:10])) == 1
    reader.set_limits(MAX_META, MAX_PAYLOAD)  # the handshake succeeded
    assert len(reader.get_buffer(-1)) > LARGE
    (got,) = reader.feed(second[10:])
    assert got.xid == 2 and got.payload == b"w" * 50_000


def test_large_reply_payload_is_a_plain_bytearray() -> None:
    payload = os.urandom(256 << 10)
    head = encode_head(Kind.REPLY, READV, 3, 0, b"m", len(payload))
    (frame,) = FrameReader().feed(head + payload)
    assert type(frame.payload) is bytearray and frame.payload == payload
