"""The NBD protocol without sockets: a server-side state machine fed with bytes, yielding events.

Written the way h11 writes HTTP/1.1, so the whole protocol is testable (and fuzzable) with no server
running. The glue (`server.py`) owns the socket and the backend; this module owns every byte.

Receiving is shaped for `asyncio.BufferedProtocol`: `get_buffer()` hands out the place the next
bytes should land and `buffer_updated(n)` records them. Headers land in one preallocated buffer;
the payload of a WRITE lands straight in a bytearray of exactly its size, so a 32 MiB write is read
from the socket into the buffer that goes to the backend, never copied on the way.

Handshake options the protocol can answer alone (structured replies, meta contexts, STARTTLS,
unknown options) are answered here, their replies queued for `data_to_send()`. Options that need
the application (EXPORT_NAME, LIST, INFO, GO) come out as events; the state machine then pauses
until the application answers with `accept_export_name`, `reply_list`, `reply_info` or
`reject_option`. Transmission requests come out as `Request` events; replies are built by the
`reply_*` methods, which return buffers for the glue to write.
"""

from __future__ import annotations

import errno as _errno
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag

# ---- constants (names follow the NBD specification) -----------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE; QEMU's own ceiling, advertised in BLOCK_SIZE
MAX_OPTION = 64 * 1024  # longest option payload accepted; names are at most 4096 bytes
MAX_STRING = 4096  # the specification's limit for export names and queries
MAX_OPTIONS = 1024  # options per connection before the client is treated as hostile
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # the id given to base:allocation by SET_META_CONTEXT


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    """Transmission flags: what the export can do, sent with its size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1
STATE_HOLE = 1  # base:allocation extent flags
STATE_ZERO = 2

# The errno values NBD defines on the wire; anything else is reported as EIO.
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
_ERRNO_MAP = {
    _errno.EPERM: EPERM,
    _errno.EACCES: EPERM,
    _errno.EROFS: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EINVAL: EINVAL,
    _errno.ENOSPC: ENOSPC,
    _errno.EDQUOT: ENOSPC,
    _errno.EFBIG: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ENOTSUP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
}


def nbd_errno(errno: int | None) -> int:
    """The NBD error code for a local errno (the specification restricts the set)."""
    return _ERRNO_MAP.get(errno or _errno.EIO, EIO)


_ALL = int(CmdFlag.FUA)  # FUA is valid on every command and ignored where nothing is written
_ALLOWED_FLAGS: dict[int, int] = {  # plain ints: `~` on an IntFlag would keep only the known bits
    Cmd.READ: int(_ALL | CmdFlag.DF),
    Cmd.WRITE: _ALL,
    Cmd.FLUSH: _ALL,
    Cmd.TRIM: _ALL,
    Cmd.CACHE: _ALL,
    Cmd.WRITE_ZEROES: int(_ALL | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    Cmd.BLOCK_STATUS: int(_ALL | CmdFlag.REQ_ONE),
    Cmd.DISC: _ALL,
}
_KNOWN_COMMANDS = frozenset(int(c) for c in Cmd)
_DF = int(CmdFlag.DF)  # `int & IntFlag` costs ~1 µs on Python 3.11, once per request

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CLIENT_FLAGS = _U32
_GREETING = struct.Struct(">QQH")
_OPT_HEADER = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_CHUNK_DATA = struct.Struct(">IHHQIQ")  # chunk header followed by the data's offset
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header, error, message length

REQUEST_SIZE = _REQUEST.size
_MIN_FREE = 4096  # compact the header buffer when less than this is left at its end


class ProtocolError(Exception):
    """The peer broke the protocol in a way that cannot be answered: the connection must close."""


class Status(Enum):
    """What `next_event` returns when there is no event."""

    NEED_DATA = "need-data"  # feed more bytes
    PAUSED = "paused"  # an option awaits the application's answer
    CLOSED = "closed"  # the session is over (abort, disconnect or failed EXPORT_NAME)


NEED_DATA = Status.NEED_DATA
PAUSED = Status.PAUSED
CLOSED = Status.CLOSED


class State(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    WAITING = "waiting"  # an option event is out; the application has not answered yet
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportNameRequest:
    """NBD_OPT_EXPORT_NAME: enter transmission on `name`; cannot be refused except by closing."""

    name: str


@dataclass(frozen=True, slots=True)
class ListRequest:
    """NBD_OPT_LIST: the client wants the export names."""


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """NBD_OPT_INFO or (`go`) NBD_OPT_GO: describe `name`, and for GO enter transmission."""

    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class Abort:
    """NBD_OPT_ABORT: acknowledged; the glue closes after sending what is queued."""


@dataclass(slots=True)
class Request:
    """A transmission-phase command. `data` is the WRITE payload, received in place."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytearray | None = None


Event = ExportNameRequest | ListRequest | InfoRequest | Abort | Request


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export."""

    name: str
    size: int
    read_only: bool = False
    can_multi_conn: bool = False
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096


def _string(data: bytes | bytearray | memoryview) -> str:
    """Decode a protocol string: UTF-8, no NUL, at most MAX_STRING bytes."""
    if len(data) > MAX_STRING:
        raise ValueError("string longer than 4096 bytes")
    if b"\0" in data:
        raise ValueError("string contains NUL")
    return bytes(data).decode("utf-8")


class _OptionInvalid(Exception):
    """An option's payload is malformed: answered with ERR_INVALID, the session goes on."""


# ---- the state machine ----------------------------------------------------------------------


class ServerConnection:
    """One client connection, server side, from greeting to disconnect."""

    def __init__(self, *, rx_size: int = 64 * 1024, max_payload: int = MAX_PAYLOAD) -> None:
        self.state = State.CLIENT_FLAGS
        self.max_payload = max_payload
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self.tx_flags = 0
        self.base_allocation = False  # base:allocation selected for the export in transmission
        self._meta_export: str | None = None  # export named by the last SET_META_CONTEXT
        self._meta_selected = False
        self._pending: int | None = None  # option awaiting the application's answer
        self._options_seen = 0
        greeting_flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self._out = bytearray(_GREETING.pack(NBDMAGIC, IHAVEOPT, greeting_flags))
        self._rx_cap = max(4 * rx_size, 1024 * 1024)
        self._rx = bytearray(rx_size)
        self._rx_view = memoryview(self._rx)
        self._start = 0  # unparsed bytes are _rx[_start:_end]
        self._end = 0
        self._payload: bytearray | None = None  # WRITE or option payload being received
        self._payload_view: memoryview | None = None
        self._fill = 0
        self._payload_header: tuple[int, int, int, int, int] | None = None  # request or option header

    # -- receiving --------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go: the pending payload's remainder, else the header buffer."""
        payload = self._payload_view
        if payload is not None and self._fill < len(payload):
            return payload[self._fill :]
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._rx) - self._end < _MIN_FREE:
            pending = self._end - self._start
            if self._start > 0:  # through bytes(): slice assignment memcpy()s, and these may overlap
                self._rx[:pending] = bytes(self._rx_view[self._start : self._end])
            elif pending == len(self._rx):  # full of unparsed bytes: only while the glue stopped parsing
                if pending * 2 > self._rx_cap:
                    raise ProtocolError("client sent too much data without waiting for replies")
                bigger = bytearray(pending * 2)
                bigger[:pending] = self._rx_view
                self._rx = bigger
                self._rx_view = memoryview(bigger)
            self._start, self._end = 0, pending
        return self._rx_view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        payload = self._payload_view
        if payload is not None and self._fill < len(payload):
            self._fill += nbytes
        else:
            self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes by copying (tests, fuzzers); the glue uses get_buffer/buffer_updated instead."""
        view = memoryview(data)
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def data_to_send(self) -> bytes:
        """Handshake bytes queued by the state machine (greeting, option replies)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- parsing ----------------------------------------------------------------------------

    def next_event(self) -> Event | Status:
        """The next event, or NEED_DATA / PAUSED / CLOSED. Raises ProtocolError on a violation."""
        while True:
            if self._payload is not None:
                if self._fill < len(self._payload):
                    return NEED_DATA
                event = self._payload_done()
            elif self.state is State.TRANSMISSION:
                return self._next_request()
            elif self.state is State.OPTIONS:
                event = self._next_option()
            elif self.state is State.CLIENT_FLAGS:
                event = self._client_flags()
            elif self.state is State.WAITING:
                return PAUSED
            else:
                return CLOSED
            if event is not None:
                return event

    def _take_payload(self, length: int, header: tuple[int, int, int, int, int]) -> None:
        """Start receiving `length` payload bytes into their own buffer, taking what is buffered."""
        have = min(length, self._end - self._start)
        payload = bytearray(length)
        if have:
            payload[:have] = self._rx_view[self._start : self._start + have]
            self._start += have
        self._payload = payload
        self._payload_view = memoryview(payload)
        self._fill = have
        self._payload_header = header

    def _payload_done(self) -> Event | Status | None:
        payload, header = self._payload, self._payload_header
        assert payload is not None and header is not None and self._payload_view is not None
        self._payload = self._payload_view = self._payload_header = None
        if self.state is State.TRANSMISSION:
            cmd, flags, cookie, offset, length = header
            return Request(cmd, flags, cookie, offset, length, payload)
        return self._option(header[0], payload)

    def _next_request(self) -> Request | Status:
        start = self._start
        if self._end - start < REQUEST_SIZE:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._rx, start)
        self._start = start + REQUEST_SIZE
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if cmd not in _KNOWN_COMMANDS:
            raise ProtocolError(f"unknown command type {cmd}")
        if cmd == Cmd.WRITE:
            if length > self.max_payload:
                raise ProtocolError(f"write of {length} bytes exceeds the {self.max_payload} byte maximum")
            self._take_payload(length, (cmd, flags, cookie, offset, length))
            if self._fill < length:
                return NEED_DATA
            event = self._payload_done()
            assert isinstance(event, Request)
            return event
        if cmd == Cmd.DISC:
            self.state = State.CLOSED
        return Request(cmd, flags, cookie, offset, length)

    def _client_flags(self) -> Status | None:
        if self._end - self._start < _CLIENT_FLAGS.size:
            return NEED_DATA
        (flags,) = _CLIENT_FLAGS.unpack_from(self._rx, self._start)
        self._start += _CLIENT_FLAGS.size
        if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):  # int: ~IntFlag keeps known bits
            raise ProtocolError(f"unknown client flags {flags:#x}")
        self.fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.state = State.OPTIONS
        return None

    def _next_option(self) -> Event | Status | None:
        if self._end - self._start < _OPT_HEADER.size:
            return NEED_DATA
        magic, option, length = _OPT_HEADER.unpack_from(self._rx, self._start)
        self._start += _OPT_HEADER.size
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION:
            raise ProtocolError(f"option {option} with {length} bytes of data")
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            raise ProtocolError("too many options")
        self._take_payload(length, (option, 0, 0, 0, length))
        if self._fill < length:
            return NEED_DATA
        return self._payload_done()

    def _option(self, option: int, data: bytearray) -> Event | None:
        """Act on one option: return an event for the application, or answer it here (None)."""
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            raise ProtocolError(f"option {option} without fixed newstyle negotiation")
        if option == Opt.EXPORT_NAME:
            try:
                name = _string(data)
            except ValueError as exc:
                raise ProtocolError(f"bad export name: {exc}") from None
            return self._wait(option, ExportNameRequest(name))
        if option == Opt.ABORT:
            self._reply(option, Rep.ACK)
            self.state = State.CLOSED
            return Abort()
        try:
            if option == Opt.LIST:
                if data:
                    raise _OptionInvalid("LIST takes no data")
                return self._wait(option, ListRequest())
            if option in (Opt.INFO, Opt.GO):
                return self._wait(option, self._parse_info(data, option == Opt.GO))
            if option == Opt.STRUCTURED_REPLY:
                if data:
                    raise _OptionInvalid("STRUCTURED_REPLY takes no data")
                self.structured = True
                self._reply(option, Rep.ACK)
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._meta_context(option, data)
            elif option == Opt.STARTTLS:
                self._reply(option, Rep.ERR_POLICY, b"TLS is not configured on this server")
            else:
                self._reply(option, Rep.ERR_UNSUP, b"option not supported")
        except _OptionInvalid as exc:
            self._reply(option, Rep.ERR_INVALID, str(exc).encode())
        return None

    def _wait(self, option: int, event: Event) -> Event:
        self._pending = option
        self.state = State.WAITING
        return event

    @staticmethod
    def _parse_info(data: bytearray, go: bool) -> InfoRequest:
        if len(data) < 6:
            raise _OptionInvalid("INFO/GO data too short")
        (name_len,) = _U32.unpack_from(data, 0)
        if 4 + name_len + 2 > len(data):
            raise _OptionInvalid("export name overruns the option")
        (count,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * count:
            raise _OptionInvalid("information request count does not match the option length")
        try:
            name = _string(data[4 : 4 + name_len])
        except ValueError as exc:
            raise _OptionInvalid(f"bad export name: {exc}") from None
        requests = struct.unpack_from(f">{count}H", data, 6 + name_len)
        return InfoRequest(name, tuple(requests), go)

    def _meta_context(self, option: int, data: bytearray) -> None:
        """LIST/SET_META_CONTEXT: the only context served is base:allocation."""
        if not self.structured:
            raise _OptionInvalid("meta contexts need structured replies first")
        view = memoryview(data)
        try:
            (name_len,) = _U32.unpack_from(view, 0)
            name = _string(view[4 : 4 + name_len])
            pos = 4 + name_len
            (count,) = _U32.unpack_from(view, pos)
            pos += 4
            queries = []
            for _ in range(count):
                (qlen,) = _U32.unpack_from(view, pos)
                if pos + 4 + qlen > len(view):
                    raise ValueError("query overruns the option")
                queries.append(_string(view[pos + 4 : pos + 4 + qlen]))
                pos += 4 + qlen
            if pos != len(view) or 4 + name_len > len(view):
                raise ValueError("trailing or missing bytes")
        except (struct.error, ValueError) as exc:
            raise _OptionInvalid(f"malformed meta context request: {exc}") from None
        if option == Opt.LIST_META_CONTEXT:
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._reply(option, Rep.META_CONTEXT, _U32.pack(0) + BASE_ALLOCATION.encode())
        else:
            self._meta_export = name
            self._meta_selected = BASE_ALLOCATION in queries
            if self._meta_selected:
                context = _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
                self._reply(option, Rep.META_CONTEXT, context)
        self._reply(option, Rep.ACK)

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out += _OPT_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data))
        self._out += data

    # -- the application's answers to option events --------------------------------------------

    def _answer(self, *options: Opt) -> int:
        if self.state is not State.WAITING or self._pending not in options:
            raise RuntimeError(f"no pending {'/'.join(o.name for o in options)} option to answer")
        option = self._pending
        self._pending = None
        self.state = State.OPTIONS
        return option

    def transmission_flags(self, info: ExportInfo) -> int:
        flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_CACHE
        if self.structured:
            flags |= TxFlag.SEND_DF
        if info.read_only:
            flags |= TxFlag.READ_ONLY
        else:
            flags |= TxFlag.SEND_FUA | TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO
        if info.can_multi_conn:
            flags |= TxFlag.CAN_MULTI_CONN
        return int(flags)

    def _enter_transmission(self, info: ExportInfo) -> None:
        self.export = info
        self.tx_flags = self.transmission_flags(info)
        self.base_allocation = self._meta_selected and self._meta_export == info.name
        self.state = State.TRANSMISSION

    def accept_export_name(self, info: ExportInfo) -> None:
        """Answer EXPORT_NAME: size and flags, then the transmission phase."""
        self._answer(Opt.EXPORT_NAME)
        self._enter_transmission(info)
        self._out += _EXPORT_NAME_REPLY.pack(info.size, self.tx_flags)
        if not self.no_zeroes:
            self._out += bytes(124)

    def reply_list(self, exports: Iterable[tuple[str, str]]) -> None:
        """Answer LIST with (name, description) pairs."""
        option = self._answer(Opt.LIST)
        for name, description in exports:
            raw = name.encode()
            self._reply(option, Rep.SERVER, _U32.pack(len(raw)) + raw + description.encode())
        self._reply(option, Rep.ACK)

    def reply_info(self, info: ExportInfo, requests: Sequence[int] = ()) -> None:
        """Answer INFO or GO with the export's records; after GO the transmission phase begins."""
        option = self._answer(Opt.INFO, Opt.GO)
        flags = self.transmission_flags(info)
        self._reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, info.size, flags))
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, _U16.pack(Info.NAME) + info.name.encode())
        if Info.DESCRIPTION in requests and info.description:
            self._reply(option, Rep.INFO, _U16.pack(Info.DESCRIPTION) + info.description.encode())
        block = _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, info.min_block, info.preferred_block, self.max_payload)
        self._reply(option, Rep.INFO, block)
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._enter_transmission(info)

    def reject_option(self, rep: Rep, message: str = "") -> None:
        """Refuse the pending option; a refused EXPORT_NAME can only end the session."""
        option = self._answer(Opt.EXPORT_NAME, Opt.LIST, Opt.INFO, Opt.GO)
        if option == Opt.EXPORT_NAME:
            self.state = State.CLOSED
        else:
            self._reply(option, rep, message.encode()[:MAX_STRING])

    # -- transmission: checking requests and building replies ---------------------------------

    def check_request(self, req: Request) -> int:
        """0 if the request may go to the backend, else the NBD errno to answer it with."""
        export = self.export
        assert export is not None
        cmd, flags, end = req.command, req.flags, req.offset + req.length
        if flags & ~_ALLOWED_FLAGS[cmd]:
            return EINVAL
        if cmd == Cmd.READ:
            if (flags & _DF and not self.structured) or req.length > self.max_payload:
                return EINVAL
            return EINVAL if end > export.size else 0
        if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
            if export.read_only:
                return EPERM
            return ENOSPC if end > export.size else 0
        if cmd == Cmd.BLOCK_STATUS:
            if not self.base_allocation or req.length == 0 or end > export.size:
                return EINVAL
            return 0
        if cmd == Cmd.CACHE:
            return EINVAL if end > export.size else 0
        return 0

    @staticmethod
    def reply_ok(cookie: int) -> bytes:
        """Success without data (a simple reply is allowed even after structured negotiation)."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def reply_error(self, cookie: int, error: int, message: str = "") -> bytes:
        if not self.structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        msg = message.encode()[:MAX_STRING]
        header = _CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.ERROR, cookie, 6 + len(msg), error, len(msg)
        )
        return header + msg

    def reply_read(self, cookie: int, offset: int, length: int) -> bytes:
        """The header that precedes `length` bytes of read data (which the glue writes after it)."""
        if not self.structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        if length == 0:
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)
        return _CHUNK_DATA.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, cookie, length + 8, offset
        )

    @staticmethod
    def reply_block_status(cookie: int, extents: Sequence[tuple[int, int]]) -> bytes:
        """One base:allocation chunk with (length, flags) extents; the caller has clipped them."""
        flat = [v for extent in extents for v in extent]
        body = struct.pack(f">I{len(flat)}I", BASE_ALLOCATION_ID, *flat)
        kind = ReplyType.BLOCK_STATUS
        header = _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, kind, cookie, len(body))
        return header + body


def clip_extents(
    extents: Iterable[tuple[int, int]], length: int, req_one: bool, max_extents: int = 4096
) -> list[tuple[int, int]]:
    """Make a backend's extents valid for a reply: positive, merged, within `length`, u32-sized."""
    out: list[tuple[int, int]] = []
    left = length
    for ext_len, ext_flags in extents:
        if left <= 0:
            break
        ext_len = min(ext_len, left, 0xFFFFFFFF)
        if ext_len <= 0:
            continue
        ext_flags &= STATE_HOLE | STATE_ZERO
        left -= ext_len
        if out and out[-1][1] == ext_flags and out[-1][0] + ext_len <= 0xFFFFFFFF:
            out[-1] = (out[-1][0] + ext_len, ext_flags)
        else:
            if len(out) == max_extents:
                break
            out.append((ext_len, ext_flags))
    if not out:
        out.append((length, 0))
    return out[:1] if req_one else out
