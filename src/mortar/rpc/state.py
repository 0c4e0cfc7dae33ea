"""What may happen next on a connection, sans-io: the handshake gate and the limits that follow it.

Before a successful handshake a peer may only handshake or ping, and may not send payloads or big
metadata, so an unauthenticated peer cannot make the server allocate anything of size.
"""

from __future__ import annotations

from enum import Enum

from mortar.rpc.frame import MAX_META, MAX_PAYLOAD, Frame, FrameReader, Kind, Op, ProtocolError

#: meta limit before the handshake: a handshake is a few hundred bytes
PREAUTH_MAX_META = 4 << 10


class Phase(Enum):
    HANDSHAKE = "handshake"  # waiting for the handshake (server) or its reply (client)
    ESTABLISHED = "established"
    CLOSED = "closed"


class ConnectionState:
    """One side of a connection. `check` raises ProtocolError for a frame the peer may not send now."""

    def __init__(self, server: bool, reader: FrameReader | None = None) -> None:
        self.server = server
        self.phase = Phase.HANDSHAKE
        self.reader = reader
        self._handshake_seen = False
        if reader is not None:
            reader.set_limits(PREAUTH_MAX_META, 0)

    def check(self, frame: Frame) -> None:
        if self.phase is Phase.CLOSED:
            raise ProtocolError("frame after close")
        if self.server:
            self._check_from_client(frame)
        else:
            self._check_from_server(frame)

    def _check_from_client(self, frame: Frame) -> None:
        if frame.kind != Kind.REQUEST:
            raise ProtocolError(f"a client may only send requests, got kind {frame.kind}")
        if frame.status != 0:
            raise ProtocolError("request with a status")
        if frame.op == Op.HANDSHAKE:
            if self._handshake_seen:
                raise ProtocolError("second handshake on one connection")
            self._handshake_seen = True
        elif frame.op != Op.PING and self.phase is not Phase.ESTABLISHED:
            raise ProtocolError(f"op {frame.op} before a successful handshake")

    def _check_from_server(self, frame: Frame) -> None:
        if frame.kind == Kind.REQUEST:
            raise ProtocolError("a server may not send requests")
        if frame.kind == Kind.EVENT:
            if self.phase is not Phase.ESTABLISHED:
                raise ProtocolError("event before the handshake")
        elif self.phase is not Phase.ESTABLISHED and frame.op not in (Op.HANDSHAKE, Op.PING):
            raise ProtocolError(f"reply to op {frame.op} before the handshake")

    def established(self) -> None:
        """The handshake succeeded: every op is allowed and the full limits apply."""
        self.phase = Phase.ESTABLISHED
        if self.reader is not None:
            self.reader.set_limits(MAX_META, MAX_PAYLOAD)

    def close(self) -> None:
        self.phase = Phase.CLOSED
