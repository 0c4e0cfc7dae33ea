"""The NBD state machine with bytes in and events out: no sockets, no server."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mortar.frontends.nbd import protocol as p
from tests.frontends.nbd.nbdclient import info_query, meta_query

INFO = p.ExportInfo(name="vol/img", size=1 << 20, description="an image")


def opt(option: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, option, len(data)) + data


def req(
    cmd: int, offset: int = 0, length: int = 0, *, cookie: int = 7, flags: int = 0, data: bytes = b""
) -> bytes:
    if cmd == p.Cmd.WRITE:
        length = len(data)
    return struct.pack(">IHHQQI", p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def option_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into (option, reply type, data) records."""
    replies, pos = [], 0
    while pos < len(out):
        magic, option, rep, length = struct.unpack_from(">QIII", out, pos)
        assert magic == p.OPTION_REPLY_MAGIC
        replies.append((option, rep, out[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return replies


def events(conn: p.ServerConnection) -> list[p.Event | p.Status]:
    out: list[p.Event | p.Status] = []
    while True:
        ev = conn.next_event()
        if isinstance(ev, p.Status):
            out.append(ev)
            return out
        out.append(ev)


def negotiated(client_flags: int = 3) -> p.ServerConnection:
    """A connection past the greeting, waiting for options."""
    conn = p.ServerConnection()
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", client_flags))
    assert conn.next_event() is p.NEED_DATA
    return conn


def in_transmission(
    structured: bool = True, meta: bool = True, info: p.ExportInfo = INFO
) -> p.ServerConnection:
    conn = negotiated()
    if structured:
        conn.receive_data(opt(p.Opt.STRUCTURED_REPLY))
        if meta:
            conn.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_query(info.name, [p.BASE_ALLOCATION])))
    conn.receive_data(opt(p.Opt.GO, info_query(info.name, [])))
    ev = events(conn)
    assert isinstance(ev[0], p.InfoRequest) and ev[0].go
    conn.reply_info(info, ev[0].requests)
    conn.data_to_send()
    assert conn.state is p.State.TRANSMISSION
    return conn


# ---- handshake -------------------------------------------------------------------------------


def test_greeting_offers_fixed_newstyle_and_no_zeroes() -> None:
    conn = p.ServerConnection()
    magic, opt_magic, flags = struct.unpack(">QQH", conn.data_to_send())
    assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
    assert flags == p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES
    assert conn.next_event() is p.NEED_DATA


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_enters_transmission(no_zeroes: bool) -> None:
    conn = negotiated(1 | (2 if no_zeroes else 0))
    conn.receive_data(opt(p.Opt.EXPORT_NAME, b"vol/img"))
    assert events(conn) == [p.ExportNameRequest("vol/img"), p.PAUSED]
    conn.accept_export_name(INFO)
    out = conn.data_to_send()
    assert len(out) == 10 + (0 if no_zeroes else 124)
    size, flags = struct.unpack_from(">QH", out)
    assert size == INFO.size
    assert flags & p.TxFlag.HAS_FLAGS and flags & p.TxFlag.SEND_FLUSH and not flags & p.TxFlag.READ_ONLY
    assert not flags & p.TxFlag.SEND_DF  # structured replies were not negotiated
    assert conn.state is p.State.TRANSMISSION
    assert conn.next_event() is p.NEED_DATA


def test_refused_export_name_ends_the_session_silently() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.EXPORT_NAME, b"missing"))
    events(conn)
    conn.reject_option(p.Rep.ERR_UNKNOWN, "no such export")
    assert conn.data_to_send() == b""
    assert conn.next_event() is p.CLOSED


def test_go_with_structured_replies_and_base_allocation() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_query("vol/img", [p.BASE_ALLOCATION])))
    conn.receive_data(
        opt(p.Opt.GO, info_query("vol/img", [p.Info.NAME, p.Info.DESCRIPTION, p.Info.BLOCK_SIZE]))
    )
    ev = events(conn)
    assert ev == [p.InfoRequest("vol/img", (1, 2, 3), go=True), p.PAUSED]
    assert conn.next_event() is p.PAUSED  # nothing moves until the application answers
    assert isinstance(ev[0], p.InfoRequest)
    conn.reply_info(INFO, ev[0].requests)
    replies = option_replies(conn.data_to_send())
    assert replies[0] == (p.Opt.STRUCTURED_REPLY, p.Rep.ACK, b"")
    assert replies[1] == (p.Opt.SET_META_CONTEXT, p.Rep.META_CONTEXT, b"\0\0\0\x01base:allocation")
    assert replies[2] == (p.Opt.SET_META_CONTEXT, p.Rep.ACK, b"")
    infos = {struct.unpack_from(">H", d)[0]: d[2:] for o, r, d in replies[3:] if r == p.Rep.INFO}
    size, flags = struct.unpack(">QH", infos[p.Info.EXPORT])
    assert size == INFO.size
    expected = (
        p.TxFlag.HAS_FLAGS
        | p.TxFlag.SEND_FLUSH
        | p.TxFlag.SEND_FUA
        | p.TxFlag.SEND_TRIM
        | p.TxFlag.SEND_DF
        | p.TxFlag.SEND_WRITE_ZEROES
        | p.TxFlag.SEND_FAST_ZERO
        | p.TxFlag.SEND_CACHE
    )
    assert flags == expected
    assert infos[p.Info.NAME] == b"vol/img"
    assert infos[p.Info.DESCRIPTION] == b"an image"
    assert struct.unpack(">III", infos[p.Info.BLOCK_SIZE]) == (1, 4096, p.MAX_PAYLOAD)
    assert replies[-1] == (p.Opt.GO, p.Rep.ACK, b"")
    assert conn.state is p.State.TRANSMISSION and conn.base_allocation and conn.structured


def test_read_only_multi_conn_flags() -> None:
    conn = in_transmission(info=p.ExportInfo("x", 4096, read_only=True, can_multi_conn=True))
    assert conn.tx_flags & p.TxFlag.READ_ONLY and conn.tx_flags & p.TxFlag.CAN_MULTI_CONN
    assert not conn.tx_flags & (p.TxFlag.SEND_TRIM | p.TxFlag.SEND_WRITE_ZEROES)


def test_info_then_go_and_unknown_export() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.INFO, info_query("nope", [])))
    assert events(conn) == [p.InfoRequest("nope", (), go=False), p.PAUSED]
    conn.reject_option(p.Rep.ERR_UNKNOWN, "no export named 'nope'")
    assert option_replies(conn.data_to_send()) == [(p.Opt.INFO, p.Rep.ERR_UNKNOWN, b"no export named 'nope'")]
    conn.receive_data(opt(p.Opt.INFO, info_query("vol/img", [])))
    events(conn)
    conn.reply_info(INFO)
    assert conn.state is p.State.OPTIONS  # INFO does not end the handshake
    assert option_replies(conn.data_to_send())[-1] == (p.Opt.INFO, p.Rep.ACK, b"")
    conn.receive_data(opt(p.Opt.GO, info_query("vol/img", [])))
    events(conn)
    conn.reply_info(INFO)
    assert conn.state is p.State.TRANSMISSION
    assert not conn.base_allocation


def test_list_exports() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.LIST))
    assert events(conn) == [p.ListRequest(), p.PAUSED]
    conn.reply_list([("a", ""), ("vol/dir/b", "desc")])
    replies = option_replies(conn.data_to_send())
    assert replies == [
        (p.Opt.LIST, p.Rep.SERVER, b"\0\0\0\x01a"),
        (p.Opt.LIST, p.Rep.SERVER, b"\0\0\0\x09vol/dir/bdesc"),
        (p.Opt.LIST, p.Rep.ACK, b""),
    ]
    conn.receive_data(opt(p.Opt.LIST, b"junk"))
    assert events(conn) == [p.NEED_DATA]
    assert option_replies(conn.data_to_send())[0][1] == p.Rep.ERR_INVALID


@pytest.mark.parametrize(
    ("queries", "listed"),
    [([], True), (["base:"], True), ([p.BASE_ALLOCATION], True), (["qemu:dirty-bitmap:b"], False)],
)
def test_list_meta_context(queries: list[str], listed: bool) -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(p.Opt.LIST_META_CONTEXT, meta_query("vol/img", queries)))
    assert events(conn) == [p.NEED_DATA]
    replies = option_replies(conn.data_to_send())[1:]
    contexts = [d[4:] for _, r, d in replies if r == p.Rep.META_CONTEXT]
    assert contexts == ([b"base:allocation"] if listed else [])
    assert replies[-1][1] == p.Rep.ACK


def test_meta_context_needs_structured_replies_and_a_matching_export() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_query("vol/img", [p.BASE_ALLOCATION])))
    events(conn)
    assert option_replies(conn.data_to_send())[0][1] == p.Rep.ERR_INVALID
    conn.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_query("other", [p.BASE_ALLOCATION])))
    conn.receive_data(opt(p.Opt.GO, info_query("vol/img", [])))
    events(conn)
    conn.reply_info(INFO)
    assert not conn.base_allocation  # selected for another export
    assert conn.check_request(p.Request(p.Cmd.BLOCK_STATUS, 0, 1, 0, 4096)) == p.EINVAL


@pytest.mark.parametrize(
    ("option", "data", "rep"),
    [
        (p.Opt.STARTTLS, b"", p.Rep.ERR_POLICY),
        (p.Opt.EXTENDED_HEADERS, b"", p.Rep.ERR_UNSUP),
        (p.Opt.PEEK_EXPORT, b"", p.Rep.ERR_UNSUP),
        (12345, b"whatever data", p.Rep.ERR_UNSUP),
        (p.Opt.STRUCTURED_REPLY, b"x", p.Rep.ERR_INVALID),
        (p.Opt.GO, b"\0\0", p.Rep.ERR_INVALID),
        (p.Opt.GO, b"\0\0\0\x09ab\0\0", p.Rep.ERR_INVALID),  # name longer than the option
        (p.Opt.INFO, info_query("x", [1])[:-1], p.Rep.ERR_INVALID),  # count does not match
        (p.Opt.GO, info_query("a\0b", []), p.Rep.ERR_INVALID),  # NUL in a name
        (p.Opt.GO, b"\0\0\0\x02\xff\xfe\0\0", p.Rep.ERR_INVALID),  # not UTF-8
    ],
)
def test_options_answered_without_dropping_the_connection(option: int, data: bytes, rep: int) -> None:
    conn = negotiated()
    conn.receive_data(opt(option, data))
    assert events(conn) == [p.NEED_DATA]
    [(replied_option, replied, message)] = option_replies(conn.data_to_send())
    assert (replied_option, replied) == (option, rep)
    assert message.decode()  # errors carry a message for the user
    conn.receive_data(opt(p.Opt.LIST))  # the session goes on
    assert events(conn)[0] == p.ListRequest()


def test_meta_context_malformed_is_invalid() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.STRUCTURED_REPLY))
    conn.receive_data(opt(p.Opt.SET_META_CONTEXT, meta_query("x", ["base:allocation"])[:-3]))
    events(conn)
    assert option_replies(conn.data_to_send())[-1][1] == p.Rep.ERR_INVALID


def test_abort() -> None:
    conn = negotiated()
    conn.receive_data(opt(p.Opt.ABORT))
    assert events(conn) == [p.Abort(), p.CLOSED]
    assert option_replies(conn.data_to_send()) == [(p.Opt.ABORT, p.Rep.ACK, b"")]


@pytest.mark.parametrize(
    ("client_flags", "stream"),
    [
        (0xFF, b""),  # unknown client flags
        (3, opt(p.Opt.LIST, magic=0x1234)),  # bad option magic
        (3, struct.pack(">QII", p.IHAVEOPT, p.Opt.GO, p.MAX_OPTION + 1)),  # absurd option length
        (3, opt(p.Opt.EXPORT_NAME, b"\xff")),  # an EXPORT_NAME cannot be answered with an error
        (0, opt(p.Opt.GO, info_query("x", []))),  # options other than EXPORT_NAME need fixed newstyle
    ],
)
def test_handshake_violations(client_flags: int, stream: bytes) -> None:
    conn = p.ServerConnection()
    conn.receive_data(struct.pack(">I", client_flags) + stream)
    with pytest.raises(p.ProtocolError):
        events(conn)


def test_too_many_options() -> None:
    conn = negotiated()
    conn.receive_data(opt(999) * (p.MAX_OPTIONS + 1))
    with pytest.raises(p.ProtocolError):
        events(conn)


def test_answer_without_pending_option_is_a_bug() -> None:
    conn = negotiated()
    with pytest.raises(RuntimeError):
        conn.reply_info(INFO)


# ---- transmission: parsing ---------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 20 + b"tail"
STREAM = [
    (req(p.Cmd.READ, 4096, 512, cookie=1), p.Request(p.Cmd.READ, 0, 1, 4096, 512)),
    (
        req(p.Cmd.WRITE, 8192, cookie=2, flags=1, data=PAYLOAD),
        p.Request(p.Cmd.WRITE, 1, 2, 8192, len(PAYLOAD), bytearray(PAYLOAD)),
    ),
    (req(p.Cmd.FLUSH, cookie=3), p.Request(p.Cmd.FLUSH, 0, 3, 0, 0)),
    (req(p.Cmd.WRITE, 1, cookie=4, data=b"x"), p.Request(p.Cmd.WRITE, 0, 4, 1, 1, bytearray(b"x"))),
    (req(p.Cmd.WRITE, 0, cookie=5, data=b""), p.Request(p.Cmd.WRITE, 0, 5, 0, 0, bytearray())),
    (
        req(p.Cmd.BLOCK_STATUS, 0, 1 << 20, cookie=2**64 - 1, flags=8),
        p.Request(p.Cmd.BLOCK_STATUS, 8, 2**64 - 1, 0, 1 << 20),
    ),
    (req(p.Cmd.DISC, cookie=6), p.Request(p.Cmd.DISC, 0, 6, 0, 0)),
]
STREAM_BYTES = b"".join(raw for raw, _ in STREAM)
EXPECTED = [ev for _, ev in STREAM]


def drain(conn: p.ServerConnection) -> list[p.Request]:
    out = []
    while isinstance(ev := conn.next_event(), p.Request):
        out.append(ev)
    return out


def test_requests_parsed_at_every_split_point() -> None:
    for cut in range(len(STREAM_BYTES) + 1):
        conn = in_transmission()
        conn.receive_data(STREAM_BYTES[:cut])
        got = drain(conn)
        conn.receive_data(STREAM_BYTES[cut:])
        got += drain(conn)
        assert got == EXPECTED, cut
        assert conn.next_event() is p.CLOSED  # nothing is parsed after DISC


def test_requests_fed_one_byte_at_a_time() -> None:
    conn = in_transmission()
    got = []
    for i in range(len(STREAM_BYTES)):
        conn.receive_data(STREAM_BYTES[i : i + 1])
        got += drain(conn)
    assert got == EXPECTED


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=40))
def test_requests_in_random_pieces(sizes: list[int]) -> None:
    conn = in_transmission()
    got, pos, i = [], 0, 0
    while pos < len(STREAM_BYTES):
        n = sizes[i % len(sizes)]
        conn.receive_data(STREAM_BYTES[pos : pos + n])
        got += drain(conn)
        pos, i = pos + n, i + 1
    assert got == EXPECTED


def test_write_payload_is_received_in_place() -> None:
    """After a WRITE header, the receive buffer handed out is the payload's own memory."""
    conn = in_transmission()
    length = 3 * 1024 * 1024
    conn.receive_data(struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 9, 0, length))
    assert conn.next_event() is p.NEED_DATA
    buf = conn.get_buffer()
    assert len(buf) == length  # the whole payload, in one buffer of its size
    buf[:] = b"\x5a" * length
    conn.buffer_updated(length)
    ev = conn.next_event()
    assert isinstance(ev, p.Request) and ev.data is not None
    assert ev.data.startswith(b"\x5a\x5a") and len(ev.data) == length
    assert buf.obj is ev.data  # same memory: no copy on the way to the backend
    assert conn.next_event() is p.NEED_DATA


def test_unparsed_bytes_are_kept_while_the_application_does_not_ask() -> None:
    """The glue may stop pulling events (backpressure); bytes keep arriving until it pauses reading."""
    conn = in_transmission()
    many = req(p.Cmd.READ, 0, 512) * 5000  # 140 kB, more than the 64 KiB header buffer
    conn.receive_data(many)
    assert len(drain(conn)) == 5000


def test_header_buffer_compaction_keeps_every_byte() -> None:
    """Unparsed bytes move to the buffer's front when it fills; source and target overlap there."""
    conn = in_transmission()
    stream = b"".join(req(p.Cmd.READ, i * 512, 512, cookie=i) for i in range(4000))
    conn.receive_data(stream[: 2230 * p.REQUEST_SIZE])  # 62440 bytes: 3096 free of the 64 KiB buffer
    got = [conn.next_event() for _ in range(36)]  # consume 1008 bytes: the rest overlaps its new place
    conn.receive_data(stream[2230 * p.REQUEST_SIZE :])
    got += drain(conn)
    assert [ev.cookie for ev in got if isinstance(ev, p.Request)] == list(range(4000))
    assert all(ev.offset == ev.cookie * 512 for ev in got if isinstance(ev, p.Request))


def test_runaway_client_is_stopped() -> None:
    conn = in_transmission()
    with pytest.raises(p.ProtocolError):
        conn.receive_data(req(p.Cmd.READ, 0, 512) * 100_000)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512),  # bad magic
        struct.pack(">IHHQQI", 0x21E41C71, 0, 0, 1, 0, 512),  # extended header, never negotiated
        req(99, 0, 512),  # unknown command
        struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, p.MAX_PAYLOAD + 1),  # absurd write
    ],
)
def test_transmission_violations(raw: bytes) -> None:
    conn = in_transmission()
    conn.receive_data(raw)
    with pytest.raises(p.ProtocolError):
        conn.next_event()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_never_crash_the_parser(junk: bytes, transmission: bool) -> None:
    conn = in_transmission() if transmission else p.ServerConnection()
    conn.receive_data(junk)
    try:
        for _ in range(200):
            ev = conn.next_event()
            if ev is p.NEED_DATA or ev is p.CLOSED:
                break
            if ev is p.PAUSED:
                conn.reject_option(p.Rep.ERR_UNKNOWN, "test")
    except p.ProtocolError:
        pass


# ---- transmission: checks and replies -----------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "read_only", "error"),
    [
        (p.Cmd.READ, 0, 0, 4096, False, 0),
        (p.Cmd.READ, p.CmdFlag.DF | p.CmdFlag.FUA, 0, 4096, False, 0),
        (p.Cmd.READ, 0, INFO.size - 1, 2, False, p.EINVAL),
        (p.Cmd.READ, 0, 0, p.MAX_PAYLOAD + 1, False, p.EINVAL),
        (p.Cmd.READ, p.CmdFlag.REQ_ONE, 0, 1, False, p.EINVAL),  # flag not valid for READ
        (p.Cmd.READ, 0x8000, 0, 1, False, p.EINVAL),  # unknown flag
        (p.Cmd.WRITE, p.CmdFlag.FUA, INFO.size - 1, 1, False, 0),
        (p.Cmd.WRITE, 0, INFO.size, 1, False, p.ENOSPC),
        (p.Cmd.WRITE, 0, 0, 1, True, p.EPERM),
        (p.Cmd.TRIM, 0, 0, INFO.size, True, p.EPERM),
        (p.Cmd.TRIM, 0, 0, INFO.size + 1, False, p.ENOSPC),
        (p.Cmd.WRITE_ZEROES, p.CmdFlag.NO_HOLE | p.CmdFlag.FAST_ZERO, 0, 4096, False, 0),
        (p.Cmd.WRITE_ZEROES, p.CmdFlag.DF, 0, 4096, False, p.EINVAL),
        (p.Cmd.BLOCK_STATUS, p.CmdFlag.REQ_ONE, 0, INFO.size, False, 0),
        (p.Cmd.BLOCK_STATUS, 0, 0, 0, False, p.EINVAL),
        (p.Cmd.BLOCK_STATUS, 0, 1, INFO.size, False, p.EINVAL),
        (p.Cmd.CACHE, 0, INFO.size, 1, False, p.EINVAL),
        (p.Cmd.FLUSH, p.CmdFlag.FUA, 0, 0, True, 0),
    ],
)
def test_check_request(cmd: int, flags: int, offset: int, length: int, read_only: bool, error: int) -> None:
    info = p.ExportInfo(INFO.name, INFO.size, read_only=read_only)
    conn = in_transmission(info=info)
    assert conn.check_request(p.Request(cmd, flags, 1, offset, length)) == error


def test_df_needs_structured_replies() -> None:
    conn = in_transmission(structured=False)
    assert conn.check_request(p.Request(p.Cmd.READ, p.CmdFlag.DF, 1, 0, 512)) == p.EINVAL
    assert conn.check_request(p.Request(p.Cmd.BLOCK_STATUS, 0, 1, 0, 512)) == p.EINVAL


def test_simple_replies() -> None:
    conn = in_transmission(structured=False)
    assert conn.reply_ok(5) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 5)
    assert conn.reply_error(5, p.EIO, "ignored") == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, p.EIO, 5)
    assert conn.reply_read(6, 100, 512) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, 6)


def test_structured_replies() -> None:
    conn = in_transmission()
    header = conn.reply_read(6, 100, 512)
    assert header == struct.pack(">IHHQIQ", p.STRUCTURED_REPLY_MAGIC, 1, p.ReplyType.OFFSET_DATA, 6, 520, 100)
    assert conn.reply_read(6, 100, 0) == struct.pack(
        ">IHHQI", p.STRUCTURED_REPLY_MAGIC, 1, p.ReplyType.NONE, 6, 0
    )
    err = conn.reply_error(7, p.ENOSPC, "full")
    assert (
        err
        == struct.pack(">IHHQIIH", p.STRUCTURED_REPLY_MAGIC, 1, p.ReplyType.ERROR, 7, 10, p.ENOSPC, 4)
        + b"full"
    )
    bs = conn.reply_block_status(8, [(4096, 3), (512, 0)])
    assert bs == struct.pack(
        ">IHHQIIIIII", p.STRUCTURED_REPLY_MAGIC, 1, p.ReplyType.BLOCK_STATUS, 8, 20, 1, 4096, 3, 512, 0
    )


def test_clip_extents() -> None:
    assert p.clip_extents([(100, 3), (100, 3), (50, 0), (999, 3)], 220, False) == [(200, 3), (20, 0)]
    assert p.clip_extents([(100, 3), (100, 0)], 1000, True) == [(100, 3)]
    assert p.clip_extents([(0, 3), (-5, 0)], 10, False) == [(10, 0)]  # nothing usable: "data"
    assert p.clip_extents([(10, 0xFF)], 10, False) == [(10, 3)]  # unknown flag bits dropped
    assert len(p.clip_extents([(1, i % 2) for i in range(10)], 10, False, max_extents=4)) == 4


def test_errno_mapping() -> None:
    assert p.nbd_errno(errno.EDQUOT) == p.ENOSPC
    assert p.nbd_errno(errno.EROFS) == p.EPERM
    assert p.nbd_errno(errno.ENOTSUP) == p.ENOTSUP
    assert p.nbd_errno(errno.ESTALE) == p.EIO
    assert p.nbd_errno(None) == p.EIO
