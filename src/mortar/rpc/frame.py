"""Frames on the wire, sans-io: a fixed `struct` header, msgpack metadata, then raw payload bytes.

The reader is fed by `asyncio.BufferedProtocol` (`get_buffer` / `buffer_updated`) or by `feed` in
tests and fuzzers. Small frames are cut out of one preallocated receive buffer, so many frames cost
one recv; a large frame gets a buffer of exactly its size that the socket fills directly, so a 1 MiB
write travels from `recv_into` to `os.pwrite` without another copy. Request payloads (writev's data)
land page-aligned, so a brick honouring O_DIRECT writes them as they are. Every length is checked
against the limits before anything is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import IntEnum

from mortar.core.fops import FOPS, Buffer
from mortar.rpc.buffers import aligned

MAGIC = b"MRTR"
VERSION = 1
HEADER = struct.Struct("!4sBBHQiII")  # magic, version, kind, op, xid, status, meta length, payload length
HEADER_SIZE = HEADER.size

MAX_META = 1 << 20
MAX_PAYLOAD = 32 << 20
#: frames whose meta plus payload reach this size are received into their own buffers
LARGE = 64 << 10
RECV_BUFFER = 256 << 10


class Kind(IntEnum):
    REQUEST = 0
    REPLY = 1
    EVENT = 2


class Op(IntEnum):
    """Control operations; fop numbers (below 1000) come from `mortar.core.fops.FOPS`."""

    HANDSHAKE = 1000
    PING = 1001
    UPCALL = 1002  # EVENT frames: the brick tells the client something changed


class ProtocolError(Exception):
    """The peer broke the protocol; the connection it came from must be closed."""


@dataclass(slots=True)
class Frame:
    kind: int
    op: int
    xid: int
    status: int = 0
    meta: Buffer = b""
    payload: Buffer | None = None


def _payload_ops() -> dict[int, frozenset[int]]:
    """Which ops may carry a payload, by kind: requests with a payload argument, replies with data."""
    req = frozenset(s.op for s in FOPS.values() if any(kind == "payload" for _, kind in s.args))
    rep = frozenset(s.op for s in FOPS.values() if "data" in getattr(s.reply, "__dataclass_fields__", {}))
    return {Kind.REQUEST: req, Kind.REPLY: rep, Kind.EVENT: frozenset()}


PAYLOAD_OPS: Mapping[int, Collection[int]] = _payload_ops()


def encode_head(kind: int, op: int, xid: int, status: int, meta: Buffer, payload_len: int = 0) -> bytes:
    """Header plus meta as one bytes; the payload, if any, is written separately and never joined."""
    return HEADER.pack(MAGIC, VERSION, kind, op, xid, status, len(meta), payload_len) + meta


def encode_frame(frame: Frame) -> bytes:
    """A whole frame as bytes (tests and small control frames)."""
    payload = frame.payload or b""
    head = encode_head(frame.kind, frame.op, frame.xid, frame.status, frame.meta, len(payload))
    return head + bytes(payload)


class FrameReader:
    """Bytes in, frames out. Raises ProtocolError on malformed input; after that it stays broken.

    The limits can change between frames (`set_limits`: the connection state tightens them before
    the handshake); `payload_ops` says which (kind, op) may carry a payload at all.
    """

    def __init__(
        self,
        max_meta: int = MAX_META,
        max_payload: int = MAX_PAYLOAD,
        payload_ops: Mapping[int, Collection[int]] = PAYLOAD_OPS,
        bufsize: int = RECV_BUFFER,
    ) -> None:
        if bufsize < 2 * (LARGE + HEADER_SIZE):
            raise ValueError("receive buffer too small")
        self.payload_ops = payload_ops
        self._bufsize = bufsize
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._room = 0  # the most a frame kept whole in the shared buffer can need
        self.set_limits(max_meta, max_payload)
        self._head: tuple[int, int, int, int, int, int] | None = None
        self._meta: Buffer | None = None
        # direct receive target (a large meta or payload) and how much of it is filled
        self._dest: bytearray | memoryview | None = None
        self._dest_view: memoryview | None = None
        self._dest_pos = 0
        self._error: str | None = None

    def set_limits(self, max_meta: int, max_payload: int) -> None:
        """Limits for the next frames. The shared buffer is sized for the biggest frame it holds
        whole, so a peer kept to small limits costs a few KiB of memory, not the full buffer."""
        self.max_meta = max_meta
        self.max_payload = max_payload
        self._room = HEADER_SIZE + min(LARGE, max_meta + max_payload)
        size = self._bufsize if max_meta + max_payload >= LARGE else max(2 * self._room, 4096)
        if size > len(self._buf):
            n = self._end - self._start
            buf = bytearray(size)
            buf[:n] = self._view[self._start : self._end]
            self._buf, self._view = buf, memoryview(buf)
            self._start, self._end = 0, n

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as frames (0 between frames)."""
        held = self._end - self._start + self._dest_pos
        if self._head is not None:
            held += HEADER_SIZE + (len(self._meta) if self._meta is not None else 0)
        return held

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._dest_view is not None:
            return self._dest_view[self._dest_pos :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end > len(self._buf) - self._room:
            # what is left is less than one frame: move it to the front so that frame fits
            n = self._end - self._start
            self._buf[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._dest is not None:
            self._dest_pos += nbytes
            if self._dest_pos < len(self._dest):
                return []
            return self._dest_filled()
        self._end += nbytes
        return self._parse()

    def feed(self, data: Buffer) -> list[Frame]:
        """Push `data` through the same path the socket uses (for tests and fuzzers)."""
        frames: list[Frame] = []
        src = memoryview(data).cast("B")
        while src:
            buf = self.get_buffer(len(src))
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            src = src[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    # ---- internals ---------------------------------------------------------------------------

    def _fail(self, reason: str) -> ProtocolError:
        self._error = reason
        return ProtocolError(reason)

    def _check_head(self, raw: tuple[bytes, int, int, int, int, int, int, int]) -> None:
        magic, version, kind, op, _xid, _status, mlen, plen = raw
        if magic != MAGIC:
            raise self._fail(f"bad magic {magic!r}")
        if version != VERSION:
            raise self._fail(f"unsupported protocol version {version}")
        if kind not in (Kind.REQUEST, Kind.REPLY, Kind.EVENT):
            raise self._fail(f"unknown frame kind {kind}")
        if mlen > self.max_meta:
            raise self._fail(f"meta of {mlen} bytes exceeds the limit of {self.max_meta}")
        if plen > self.max_payload:
            raise self._fail(f"payload of {plen} bytes exceeds the limit of {self.max_payload}")
        if plen and op not in self.payload_ops.get(kind, ()):
            raise self._fail(f"op {op} of kind {kind} may not carry a payload")

    def _parse(self) -> list[Frame]:
        frames: list[Frame] = []
        view = self._view
        while True:
            avail = self._end - self._start
            if self._head is None:
                if avail < HEADER_SIZE:
                    return frames
                raw = HEADER.unpack_from(self._buf, self._start)
                self._check_head(raw)
                self._head = raw[2:]
                self._start += HEADER_SIZE
                continue
            kind, op, xid, status, mlen, plen = self._head
            s = self._start
            if self._meta is None:
                if mlen + plen < LARGE:
                    if avail < mlen + plen:
                        return frames
                    meta = bytes(view[s : s + mlen])
                    payload = bytes(view[s + mlen : s + mlen + plen]) if plen else None
                    self._start = s + mlen + plen
                    self._head = None
                    frames.append(Frame(kind, op, xid, status, meta, payload))
                    continue
                if mlen <= LARGE:
                    if avail < mlen:
                        return frames
                    self._meta = bytes(view[s : s + mlen])
                    self._start = s = s + mlen
                    avail -= mlen
                elif not self._start_dest(mlen, avail):
                    return frames
                else:
                    self._meta = self._take_dest()
                    continue
            if plen == 0:
                frames.append(self._emit(None))
                continue
            if not self._start_dest(plen, avail, kind == Kind.REQUEST):
                return frames
            frames.append(self._emit(self._take_dest()))

    def _start_dest(self, size: int, avail: int, align: bool = False) -> bool:
        """Begin a direct receive of `size` bytes, moving in what the shared buffer already holds;
        `align` puts them on a page boundary (a request's payload: data an O_DIRECT brick writes).

        Returns True when those bytes completed it (the result is then taken with `_take_dest`).
        """
        dest: bytearray | memoryview = aligned(size) if align else bytearray(size)
        n = min(size, avail)
        dest[:n] = self._view[self._start : self._start + n]
        self._start += n
        self._dest, self._dest_view, self._dest_pos = dest, memoryview(dest), n
        if n == size:
            return True
        self._start = self._end = 0  # everything in the shared buffer belonged to this frame
        return False

    def _take_dest(self) -> bytearray | memoryview:
        dest = self._dest
        assert dest is not None and self._dest_view is not None
        self._dest_view.release()
        self._dest, self._dest_view, self._dest_pos = None, None, 0
        return dest

    def _emit(self, payload: Buffer | None) -> Frame:
        assert self._head is not None and self._meta is not None
        kind, op, xid, status, _mlen, _plen = self._head
        frame = Frame(kind, op, xid, status, self._meta, payload)
        self._head, self._meta = None, None
        return frame

    def _dest_filled(self) -> list[Frame]:
        assert self._head is not None
        plen = self._head[5]
        if self._meta is None:
            self._meta = self._take_dest()
            if plen == 0:
                return [self._emit(None)]
            self._start_dest(plen, 0, self._head[0] == Kind.REQUEST)
            return []
        return [self._emit(self._take_dest())]
