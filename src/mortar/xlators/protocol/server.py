"""protocol/server: the top of a brick graph, serving its one child to clients over the wire.

Per connection: a handshake gate (version, subvolume, peer address, login), then requests served
concurrently (each its own task, replies in any order) with at most `rpc.outstanding-rpc-limit`
running; beyond that the connection stops being read, which is the backpressure a fast client
feels. Each connection has its own fd table. Every fop runs with the caller's CallContext whose
`client` is the connection's uid (from the handshake; never taken from the request). When a
connection goes away, Event.CLIENT_DISCONNECT(uid) goes down the brick graph at once (blocked lock
waiters fail instead of waiting forever), again after its last in-flight fop has finished (a lock
granted in that window is dropped too; handlers must be idempotent), and then its fds are released.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hmac
import ipaddress
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import FOPS, FOPS_BY_OP, Fd
from mortar.core.options import Option, OptionError
from mortar.core.translator import Event, Translator
from mortar.rpc import codec
from mortar.rpc.connection import Connection, listen_tcp, listen_unix, normalize_host
from mortar.rpc.frame import VERSION, Frame, Kind, Op, ProtocolError
from mortar.rpc.messages import Handshake, HandshakeReply, encode_upcall
from mortar.rpc.state import ConnectionState, Phase


def address_allowed(host: str, rules: str) -> bool:
    """`rules` is comma-separated: `*`, globs such as `10.0.0.*`, plain addresses or CIDR networks."""
    for rule in (r.strip() for r in rules.split(",")):
        if not rule:
            continue
        if "/" in rule:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(rule, strict=False):
                    return True
            except ValueError:
                continue
        elif fnmatch.fnmatchcase(host, rule):
            return True
    return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: a connection that has not completed its handshake by then is dropped (idle sockets cost memory)
HANDSHAKE_TIMEOUT = 10.0


class ServerTranslator(Translator):
    type_name = "protocol/server"
    options = {
        "transport-type": Option("enum", "tcp", "listen on TCP or on a unix socket", choices=("tcp", "unix")),
        "transport.socket.listen-port": Option("int", 0, "TCP port; 0 picks a free one", min=0, max=65535),
        "transport.socket.bind-address": Option("str", "127.0.0.1", "address to listen on"),
        "transport.socket.listen-path": Option("path", "", "unix socket path (transport-type unix)"),
        "transport.socket.local-path": Option(
            "str",
            "",
            "with transport-type tcp, also listen on this unix socket for clients on the same host "
            "(an absolute path, or @name in the abstract namespace); clients that find it skip TCP",
        ),
        "auth.addr.*.allow": Option(
            "str", "", "addresses allowed to use brick *: globs, CIDRs or '*' (unset: loopback only)"
        ),
        "auth.login.*.allow": Option("str", "", "user names allowed to use brick * (comma-separated)"),
        "auth.login.*.password": Option("str", "", "password of user *"),
        "rpc.outstanding-rpc-limit": Option(
            "int", 64, "requests served at once per connection before it stops being read", min=1, max=65536
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listen_port: int | None = None
        self.listen_path: str | None = None
        #: the local unix socket served beside TCP (None when not asked for or not available)
        self.local_path: str | None = None
        self.listening = asyncio.Event()
        #: live client connections (for status listings and tests)
        self.sessions: set[ServerSession] = set()
        self._server: asyncio.Server | None = None
        self._local_server: asyncio.Server | None = None
        self._methods: dict[int, Callable[..., Awaitable[Any]]] = {}
        self._cleanups: set[asyncio.Task[None]] = set()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def init(self) -> None:
        if len(self.children) != 1:
            raise OptionError(f"{self.name}: protocol/server needs exactly one subvolume")
        child = self.children[0]
        self._methods = {spec.op: getattr(child, name) for name, spec in FOPS.items()}
        if self.opts["transport-type"] == "unix":
            path = self.opts["transport.socket.listen-path"]
            if not path:
                raise OptionError(f"{self.name}: transport-type unix needs transport.socket.listen-path")
            self._server = await listen_unix(lambda: ServerSession(self), path, self.log)
            self.listen_path = path
            where = path
        else:
            host = self.opts["transport.socket.bind-address"]
            self._server = await listen_tcp(
                lambda: ServerSession(self), host, self.opts["transport.socket.listen-port"], self.log
            )
            self.listen_port = self._server.sockets[0].getsockname()[1]
            where = f"{host}:{self.listen_port}"
            if await self._listen_local():
                where += f" and {self.local_path}"
        self.listening.set()
        self.log.info("serving %s on %s", child.name, where)

    async def _listen_local(self) -> bool:
        """Listen on `transport.socket.local-path` too. Failing only costs speed (clients then come
        over TCP), so it is logged, not raised."""
        path = self.opts["transport.socket.local-path"]
        if not path:
            return False
        if not path.startswith(("/", "@")) or len(path.encode()) > 107:
            raise OptionError(f"{self.name}: transport.socket.local-path {path!r} is not /PATH or @NAME")
        try:
            self._local_server = await listen_unix(lambda: ServerSession(self, local=True), path, self.log)
        except OSError as exc:
            self.log.warning("not serving the local socket %s (clients use TCP): %s", path, exc)
            return False
        self.local_path = path
        return True

    def local_peer_host(self) -> str:
        """The address auth.addr rules judge a local-socket client by: the one it would come from
        over TCP (the brick's own address, or loopback when the brick listens on every address)."""
        host = normalize_host(self.opts["transport.socket.bind-address"])
        try:
            if not ipaddress.ip_address(host).is_unspecified:
                return host
        except ValueError:
            pass
        return "127.0.0.1"

    async def fini(self) -> None:
        """Stop listening, drop every connection, release their fds."""
        self.listening.clear()
        for server in (self._server, self._local_server):
            if server is not None:
                server.close()
        self._server = self._local_server = None
        if self.local_path and self.local_path.startswith("/"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local_path)
        sessions = list(self.sessions)
        for session in sessions:
            session.shutdown()
        if sessions:  # connection_lost comes a loop iteration or two later and starts each cleanup
            await asyncio.wait([s.conn.closed for s in sessions], timeout=5)
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        if self.listen_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_path)

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        """New auth rules apply to connected clients too: those they now refuse are dropped.
        The listening address is fixed for the process's life."""
        listen = {k: self.opts[k] for k in self.opts if k.startswith("transport")}
        super().reconfigure(options)
        if any(self.opts[k] != v for k, v in listen.items()):
            self.log.warning("new listening options take effect when the brick restarts")
        for session in list(self.sessions):
            if session.handshake is None:
                continue
            refusal = self.authorize(session.handshake, session.peer_host)
            if refusal is not None:
                session.conn.abort(f"no longer allowed: {refusal[1]}")

    # ---- handshake policy ---------------------------------------------------------------------

    def subvolume_names(self) -> set[str]:
        """Names a client may ask for: the child's, and any brick name the auth options use."""
        names = {self.children[0].name}
        for key in self.opts:
            for prefix, suffix in (("auth.addr.", ".allow"), ("auth.login.", ".allow")):
                if key.startswith(prefix) and key.endswith(suffix):
                    names.add(key[len(prefix) : -len(suffix)])
        return names

    def authorize(self, hs: Handshake, peer_host: str | None) -> tuple[int, str] | None:
        """None to accept, or (errno, reason). Every alias of the brick shares one policy, so a
        client cannot dodge a rule by asking for the brick under another name."""
        if hs.version != VERSION:
            return errno.EPROTONOSUPPORT, f"protocol version {hs.version} (server speaks {VERSION})"
        names = self.subvolume_names()
        if hs.subvolume not in names:
            return errno.ENOENT, f"no subvolume {hs.subvolume!r} here"
        if peer_host is not None:  # TCP; a unix socket is local and guarded by its file mode
            rules = [r for n in names if (r := self.opts.get(f"auth.addr.{n}.allow"))]
            ok = all(address_allowed(peer_host, r) for r in rules) if rules else _is_loopback(peer_host)
            if not ok:
                return errno.EACCES, f"address {peer_host} not allowed"
        user_rules = [r for n in names if (r := self.opts.get(f"auth.login.{n}.allow"))]
        if user_rules:
            user = hs.username or ""
            if not all(user in [u.strip() for u in r.split(",")] for r in user_rules):
                return errno.EACCES, f"user {user!r} not allowed"
            expected = self.opts.get(f"auth.login.{user}.password")
            given = hs.password or ""
            if expected is None or not hmac.compare_digest(expected.encode(), given.encode()):
                return errno.EACCES, f"wrong password for user {user!r}"
        return None

    # ---- events -------------------------------------------------------------------------------

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        """An UPCALL from the brick goes to the clients: to one when `data` names its
        `client-uid`, otherwise to all."""
        if event is Event.UPCALL and source in self.children and isinstance(data, dict):
            target = data.get("client-uid")
            meta = encode_upcall(data)
            for session in list(self.sessions):
                if session.established and (target is None or target == session.client_uid):
                    session.conn.send(Kind.EVENT, Op.UPCALL, 0, 0, meta)
            return
        super().notify(event, source, data)

    def announce_disconnect(self, client_uid: str) -> None:
        try:
            self.children[0].notify(Event.CLIENT_DISCONNECT, self, client_uid)
        except Exception:
            self.log.exception("handling the disconnect of client %s failed", client_uid)


class ServerSession:
    """One client connection: its handshake state, fd table and in-flight requests."""

    def __init__(self, server: ServerTranslator, local: bool = False) -> None:
        self.server = server
        #: came in through the brick's local socket (`transport.socket.local-path`)
        self.local = local
        self.log = server.log
        self.conn: Connection = None  # type: ignore[assignment]  # set by connection_made
        self.state = ConnectionState(server=True)
        self.client_uid: str | None = None  # set by a successful handshake
        self.handshake: Handshake | None = None
        self.fds: dict[int, Fd] = {}
        self._next_fd = 1
        self._limit: int = server.opts["rpc.outstanding-rpc-limit"]
        self._queue: deque[Frame] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._deadline: asyncio.TimerHandle | None = None

    @property
    def peer_host(self) -> str | None:
        """The address auth.addr rules apply to; None for an explicit unix transport (file mode)."""
        return self.server.local_peer_host() if self.local else self.conn.peer_host

    @property
    def established(self) -> bool:
        return self.state.phase is Phase.ESTABLISHED

    # ---- FrameHandler -------------------------------------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        self.conn = conn
        self.state = ConnectionState(server=True, reader=conn.reader)
        self.server.sessions.add(self)
        self._deadline = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._no_handshake)
        self.log.debug("connection from %s", conn.peer)

    def _no_handshake(self) -> None:
        if self.state.phase is Phase.HANDSHAKE:
            self.conn.abort(f"no handshake within {HANDSHAKE_TIMEOUT:g}s")

    def frames_received(self, frames: list[Frame]) -> None:
        for frame in frames:
            if not self.conn.is_open:
                return
            self.state.check(frame)
            if frame.op == Op.PING:
                self.conn.send(Kind.REPLY, Op.PING, frame.xid)
            elif frame.op == Op.HANDSHAKE:
                self._handshake(frame)
            elif len(self._tasks) < self._limit:
                self._start(frame)
            else:
                self._queue.append(frame)
                self.conn.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.state.close()
        self._queue.clear()
        self.server.sessions.discard(self)
        if self.client_uid is None:
            return
        self.log.info("client %s (%s) disconnected", self.client_uid, self.conn.peer)
        self.server.announce_disconnect(self.client_uid)
        task = asyncio.get_running_loop().create_task(self._cleanup())
        self.server._cleanups.add(task)
        task.add_done_callback(self.server._cleanups.discard)

    def shutdown(self) -> None:
        """Server going down: drop the connection and stop waiting for in-flight fops."""
        for task in self._tasks:
            task.cancel()
        self.conn.abort("server shutting down", logging.INFO)

    # ---- handshake ----------------------------------------------------------------------------

    def _handshake(self, frame: Frame) -> None:
        hs = Handshake.decode(frame.meta)  # malformed: ProtocolError closes the connection
        refusal = self.server.authorize(hs, self.peer_host)
        if refusal is not None:
            err, reason = refusal
            self.log.warning("refusing client %s from %s: %s", hs.client_uid, self.conn.peer, reason)
            self.conn.send(Kind.REPLY, Op.HANDSHAKE, frame.xid, err, codec.encode_error(reason))
            self.state.close()
            self.conn.close()
            return
        self.client_uid = hs.client_uid
        self.handshake = hs
        self.state.established()
        if self._deadline is not None:
            self._deadline.cancel()
        name = self.server.children[0].name
        if self.local:
            reply = HandshakeReply(name, local_path=self.server.local_path, port=self.server.listen_port)
        else:
            reply = HandshakeReply(name)
        self.conn.send(Kind.REPLY, Op.HANDSHAKE, frame.xid, 0, reply.encode())
        self.log.info("accepted client %s from %s", hs.client_uid, self.conn.peer)

    # ---- requests -----------------------------------------------------------------------------

    def _start(self, frame: Frame) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(frame))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self.state.phase is not Phase.ESTABLISHED:
            return
        while self._queue and len(self._tasks) < self._limit:
            self._start(self._queue.popleft())
        if not self._queue:
            self.conn.resume_reading()

    def _lookup_fd(self, number: int) -> Fd:
        fd = self.fds.get(number)
        if fd is None:
            raise FopError(errno.EBADF, f"fd {number} is not open on this connection")
        return fd

    async def _serve(self, frame: Frame) -> None:
        spec = FOPS_BY_OP.get(frame.op)
        meta: bytes
        payload = None
        status = 0
        if spec is None:
            status, meta = errno.ENOSYS, codec.encode_error(f"unknown op {frame.op}")
        else:
            req = None
            try:
                req = codec.decode_request(spec, frame.meta, frame.payload, self._lookup_fd, self.client_uid)
                call_context.set(req.ctx)
                reply = await self.server._methods[spec.op](*req.args, req.xdata)
                new_fd = None
                if (i := codec.newfd_index(spec)) is not None:
                    new_fd = self._register(req.args[i])
                meta, payload = codec.encode_reply(spec, reply, new_fd)
            except FopError as exc:
                status, meta = exc.errno, codec.encode_error(exc.message)
            except ProtocolError as exc:
                self.log.info("bad %s request from %s: %s", spec.name, self.conn.peer, exc)
                status, meta = errno.EINVAL, codec.encode_error(str(exc))
            except Exception as exc:
                self.log.exception("%s failed for %s", spec.name, self.conn.peer)
                status, meta = errno.EIO, codec.encode_error(f"{spec.name}: internal error: {exc!r}")
            if req is not None and spec.name in ("release", "releasedir"):
                self._unregister(req.args[0])  # gone whatever the child said
        conn = self.conn
        conn.send(Kind.REPLY, frame.op, frame.xid, status, meta, payload)
        if conn.write_blocked:
            await conn.drain()

    def _register(self, fd: Fd) -> int:
        number = self._next_fd
        self._next_fd += 1
        self.fds[number] = fd
        fd.ctx[self] = number
        return number

    def _unregister(self, fd: Fd) -> None:
        number = fd.ctx.pop(self, None)
        if number is not None:
            self.fds.pop(number, None)

    async def _cleanup(self) -> None:
        """After the last in-flight fop of a lost client: drop its locks again, release its fds."""
        assert self.client_uid is not None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.server.announce_disconnect(self.client_uid)
        fds, self.fds = self.fds, {}
        if not fds:
            return
        call_context.set(CallContext(client=self.client_uid))
        child = self.server.children[0]
        for fd in fds.values():
            fd.ctx.pop(self, None)
            try:
                await (child.releasedir(fd) if fd.is_dir else child.release(fd))
            except Exception as exc:
                self.log.warning("releasing %r of client %s: %s", fd, self.client_uid, exc)
        self.log.debug("released %d fds of client %s", len(fds), self.client_uid)
