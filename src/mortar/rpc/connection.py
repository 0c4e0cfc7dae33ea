"""The thin layer that owns a socket: asyncio BufferedProtocol in, frames to a handler, frames out.

Everything about meaning (handshake, fops, pings) lives in the handler; this module only moves
bytes, tunes sockets (2 MiB buffers: MiB-sized messages need them, TCP_NODELAY for small ones),
applies write backpressure and closes a connection that sent a malformed frame, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any, Protocol, cast

from mortar.core.fops import Buffer
from mortar.rpc.frame import LARGE, Frame, FrameReader, ProtocolError, encode_head

SOCKET_BUFFER = 2 << 20
#: transport write buffer above which writers wait (backpressure towards the request producers)
WRITE_HIGH = 8 << 20

_log = logging.getLogger(__name__)
_allocator_tuned = False


def tune_allocator() -> None:
    """Keep glibc from handing MiB-sized payload buffers back to the kernel after each frame.

    By default glibc serves 1 MiB allocations with fresh mmap or trims the heap top after they
    are freed, so every payload buffer costs 256 page faults: measured, that cut 1 MiB writes
    from ~4.6 to ~1.5 GiB/s. Fixed thresholds keep freed buffers for reuse (process-wide, once;
    a no-op where the C library is not glibc).
    """
    global _allocator_tuned
    if _allocator_tuned:
        return
    _allocator_tuned = True
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum; larger requests still get mmap
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class FrameHandler(Protocol):
    """What a connection reports to: the server's per-connection session or the client."""

    def connection_made(self, conn: Connection) -> None: ...

    def frames_received(self, frames: list[Frame]) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


def tune_socket(sock: Any) -> None:
    """Large buffers and no Nagle delay; failures only cost speed, so they are logged, not raised."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        _log.warning("could not tune socket: %s", exc)


def normalize_host(host: str) -> str:
    """IPv4-mapped IPv6 addresses (::ffff:1.2.3.4) as plain IPv4, so address rules match either."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class Connection(asyncio.BufferedProtocol):
    """One socket. `peer_host` is the remote IP, or None for a unix socket (a local peer)."""

    def __init__(self, handler: FrameHandler, log: Any = _log) -> None:
        tune_allocator()
        self.handler = handler
        self.log = log
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_host: str | None = None
        self._loop = asyncio.get_running_loop()
        self.last_rx = self._loop.time()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._closing = False
        #: why this side dropped the connection (empty when it was closed in an orderly way)
        self.close_reason = ""
        self._writable = asyncio.Event()
        self._writable.set()
        self._out: list[Buffer] = []
        self._flush_pending = False
        self._vectored = False  # transport.writelines sends without joining (uvloop)

    # ---- asyncio protocol callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have the same methods
        self.transport = transport = cast(asyncio.Transport, transport)
        self._vectored = type(transport).__module__.startswith("uvloop") or sys.version_info >= (3, 12)
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer_host = normalize_host(str(peername[0]))
            self.peer = f"{self.peer_host}:{peername[1]}"
        else:
            name = transport.get_extra_info("sockname") or peername or "?"
            if isinstance(name, bytes):
                name = os.fsdecode(name)
            self.peer = "unix:" + ("@" + name[1:] if name.startswith("\0") else name)
        self.handler.connection_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing:
            return
        self.last_rx = self._loop.time()
        try:
            frames = self.reader.buffer_updated(nbytes)
            if frames:
                self.handler.frames_received(frames)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
        except Exception:
            self.log.exception("closing connection from %s: internal error handling its frames", self.peer)
            self.abort("internal error")

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader.pending and not self.close_reason:
            self.log.debug(
                "connection to %s closed inside a frame (%d bytes held)", self.peer, self.reader.pending
            )
        self._closing = True
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)
        self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ---- used by handlers -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self._closing

    def send(
        self, kind: int, op: int, xid: int, status: int = 0, meta: Buffer = b"", payload: Buffer | None = None
    ) -> None:
        """Queue one frame; header and meta go as one piece, the payload as another, never joined.

        Frames queued in one loop iteration leave in one vectored write at its end: transports
        write at once when idle, and a syscall per small frame would cost more than the frame.
        """
        if not self.is_open:
            return
        plen = len(payload) if payload is not None else 0
        self._out.append(encode_head(kind, op, xid, status, meta, plen))
        if plen:
            self._out.append(payload)  # type: ignore[arg-type]
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        out, self._out = self._out, []
        if not out or not self.is_open:
            return
        try:
            self._write(out)
        except Exception as exc:  # a buffer the transport cannot send: fail loudly, not hang
            self.log.exception("writing to %s failed", self.peer)
            self.abort(f"write failed: {exc!r}")

    def _write(self, out: list[Buffer]) -> None:
        assert self.transport is not None
        if self._vectored:
            self.transport.writelines(out)
            return
        # asyncio's own transports join writelines (Python < 3.12): join only the small pieces
        small: list[Buffer] = []
        for piece in out:
            if len(piece) < LARGE:
                small.append(piece)
                continue
            if small:
                self.transport.write(b"".join(small))
                small = []
            self.transport.write(piece)
        if small:
            self.transport.write(b"".join(small))

    @property
    def write_blocked(self) -> bool:
        return not self._writable.is_set()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        await self._writable.wait()

    def pause_reading(self) -> None:
        if self.is_open:
            assert self.transport is not None
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.is_open:
            assert self.transport is not None
            self.transport.resume_reading()

    def close(self) -> None:
        """Close after queued frames are written."""
        if self.is_open:
            assert self.transport is not None
            self._flush()
            self._closing = True
            self.transport.close()

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Drop the connection now; `reason` goes to the log with the peer's address."""
        if self.transport is not None and not self._closing:
            self.log.log(level, "closing connection to %s: %s", self.peer, reason)
            self.close_reason = reason
            self._closing = True
            self.transport.abort()


# ---- listening and connecting ----------------------------------------------------------------

HandlerFactory = Callable[[], FrameHandler]


async def listen_tcp(factory: HandlerFactory, host: str, port: int, log: Any = _log) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Connection(factory(), log), host, port, reuse_address=True)


def unix_address(path: str) -> str:
    """The socket address of `path`: `@name` is Linux's abstract namespace (as `ss -x` shows it), which
    belongs to the network namespace, leaves no file behind and is freed when its process dies."""
    return "\0" + path[1:] if path.startswith("@") else path


async def listen_unix(factory: HandlerFactory, path: str, log: Any = _log) -> asyncio.Server:
    """Listen on a unix socket, replacing a stale socket file left by a dead process (not a live one).
    An abstract address (`@name`) in use by a live process fails with EADDRINUSE."""
    loop = asyncio.get_running_loop()
    if path.startswith("@"):
        return await loop.create_unix_server(lambda: Connection(factory(), log), unix_address(path))
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except ConnectionRefusedError:
                    os.unlink(path)
                else:
                    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
    return await loop.create_unix_server(lambda: Connection(factory(), log), path)


async def connect_tcp(handler: FrameHandler, host: str, port: int, log: Any = _log) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(handler, log), host, port)
    return conn


async def connect_unix(handler: FrameHandler, path: str, log: Any = _log) -> Connection:
    """Connect to a unix socket; `@name` is an abstract address (connected by hand: uvloop refuses
    abstract addresses given as a path)."""
    loop = asyncio.get_running_loop()
    if not path.startswith("@"):
        _, conn = await loop.create_unix_connection(lambda: Connection(handler, log), path)
        return conn
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, os.fsencode(unix_address(path)))
        _, conn = await loop.create_unix_connection(lambda: Connection(handler, log), sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(conn: Connection) -> int | None:
    """The user id of the process at the other end of a unix socket (SO_PEERCRED), None otherwise."""
    if conn.transport is None:
        return None
    sock = conn.transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        _pid, uid, _gid = _PEERCRED.unpack(raw)
    except OSError:
        return None
    return int(uid)
