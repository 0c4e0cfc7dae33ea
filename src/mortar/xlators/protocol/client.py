"""protocol/client: one brick seen as a translator; every fop is one request on one connection.

Requests are pipelined (any number in flight, matched by xid, bounded for memory). The client
connects when the graph sends PARENT_UP, reports CHILD_UP after the handshake and CHILD_DOWN when
the connection is lost or the brick falls silent for `ping-timeout`; it then fails everything in
flight with ENOTCONN and reconnects with capped exponential backoff until `fini`. Fds opened on an
earlier connection answer EBADF afterwards: the server released them when that connection died.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import FOPS, Buffer, EntrylkCmd, Fd, FopSpec, LockCmd, LockType, Xdata, XdataReply
from mortar.core.options import Option, OptionError
from mortar.core.translator import Event, Translator
from mortar.rpc import codec
from mortar.rpc.connection import Connection, connect_tcp, connect_unix, peer_uid
from mortar.rpc.frame import Frame, Kind, Op, ProtocolError
from mortar.rpc.messages import Handshake, HandshakeReply, decode_upcall
from mortar.rpc.state import ConnectionState

#: requests in flight per client before callers queue (memory bound, not a protocol limit)
MAX_INFLIGHT = 256
_BACKOFF_MIN = 0.05
_RELEASES = ("release", "releasedir")
#: options whose change needs a new connection (the others apply to the current one; a new
#: transport.socket.local-path is tried at the next connection: a working one is not dropped for it)
_CONNECTION_OPTIONS = (
    "remote-host",
    "remote-port",
    "remote-subvolume",
    "transport-type",
    "transport.socket.connect-path",
    "username",
    "password",
)


class _NotLocal(Exception):
    """The brick's local socket cannot be used (absent, someone else's, another brick): use TCP."""


class _Link:
    """One connection attempt: its pending requests and what the server said on it."""

    def __init__(self, client: ClientTranslator, generation: int) -> None:
        self.client = client
        self.generation = generation
        self.conn: Connection = None  # type: ignore[assignment]  # set by connection_made
        self.state = ConnectionState(server=False)
        self.loop = asyncio.get_running_loop()
        #: xid -> (future of the reply frame, time sent); insertion order is age order
        self.pending: dict[int, tuple[asyncio.Future[Frame], float]] = {}
        self.lost_reason = ""
        self._xid = 0

    def connection_made(self, conn: Connection) -> None:
        self.conn = conn
        self.state = ConnectionState(server=False, reader=conn.reader)

    def frames_received(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.state.check(frame)
            if frame.kind == Kind.EVENT:
                self.client._event(frame)
                continue
            entry = self.pending.pop(frame.xid, None)
            if entry is not None and not entry[0].done():  # else a ping, or too late
                entry[0].set_result(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.close()
        if not self.lost_reason:
            self.lost_reason = self.conn.close_reason or (str(exc) if exc else "closed by the server")
        self.fail_all(FopError(errno.ENOTCONN, f"{self.client.name}: connection lost ({self.lost_reason})"))

    def fail_all(self, err: FopError) -> None:
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(err)

    def request(self, op: int, meta: bytes, payload: Buffer | None = None) -> asyncio.Future[Frame]:
        if not self.conn.is_open:  # lost, and the client has not noticed yet
            raise FopError(errno.ENOTCONN, f"{self.client.name}: connection lost ({self.lost_reason})")
        self._xid += 1
        fut: asyncio.Future[Frame] = self.loop.create_future()
        self.pending[self._xid] = (fut, self.loop.time())
        self.conn.send(Kind.REQUEST, op, self._xid, 0, meta, payload)
        return fut

    def ping(self) -> None:
        self._xid += 1
        self.conn.send(Kind.REQUEST, Op.PING, self._xid)

    def expire(self, timeout: float) -> None:
        """Fail requests older than `timeout` (frame-timeout); their late replies are dropped."""
        limit = self.loop.time() - timeout
        while self.pending:
            xid, (fut, sent) = next(iter(self.pending.items()))
            if sent > limit:
                break
            del self.pending[xid]
            if not fut.done():
                fut.set_exception(FopError(errno.ETIMEDOUT, f"{self.client.name}: no reply in {timeout:g}s"))

    def fd_number(self, fd: Fd) -> int:
        entry = fd.ctx.get(self.client)
        if entry is None or entry[0] != self.generation:
            raise FopError(errno.EBADF, f"{self.client.name}: {fd!r} is not open on the current connection")
        return int(entry[1])


class ClientTranslator(Translator):
    type_name = "protocol/client"
    options = {
        "remote-host": Option("str", "127.0.0.1", "host of the brick's server"),
        "remote-port": Option("int", 0, "TCP port of the brick's server", min=0, max=65535),
        "remote-subvolume": Option("str", "", "name of the brick on the server"),
        "transport-type": Option("enum", "tcp", "connect over TCP or a unix socket", choices=("tcp", "unix")),
        "transport.socket.connect-path": Option("path", "", "unix socket path (transport-type unix)"),
        "transport.socket.local-path": Option(
            "str",
            "",
            "with transport-type tcp, the brick's local unix socket (/PATH or @NAME): used instead of "
            "TCP when it exists here and the server behind it proves to be remote-subvolume on remote-port",
        ),
        "username": Option("str", "", "login name when the brick requires one"),
        "password": Option("str", "", "password for username"),
        "ping-timeout": Option("time", 42.0, "a brick silent this long is down", min=0.1),
        "frame-timeout": Option("time", 1800.0, "a request unanswered this long fails", min=0.1),
        "reconnect-backoff-max": Option("time", 5.0, "longest wait between reconnect attempts", min=0.01),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._link: _Link | None = None
        self._generation = 0
        self._uid = uuid.uuid4().hex[:12]
        self._up = asyncio.Event()
        self._announced: bool | None = None  # last of CHILD_UP (True) / CHILD_DOWN (False) sent
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopper: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        #: unlocks of locks granted to callers that had gone away (see _give_back_when_granted)
        self._late_unlocks: set[asyncio.Task[None]] = set()
        self.remote = self._describe_remote()
        #: how the current connection reaches the brick: "tcp", "unix" or "local" (its local socket)
        self.via = ""
        self._local_refusal = ""  # why the local socket was last passed over (logged once per reason)

    def _give_back_when_granted(
        self, fut: asyncio.Future[Frame], spec: FopSpec, undo: tuple[Any, ...], generation: int
    ) -> None:
        """The caller of a lock request already on the wire was cancelled: the brick may still grant
        it, and then nobody would ever unlock it. When the reply says granted, send the unlock (same
        owner, same range or name); a lost connection needs none (the brick drops a dead client's
        locks)."""
        who = call_context.get()

        def on_reply(f: asyncio.Future[Frame]) -> None:
            if f.cancelled() or f.exception() is not None or f.result().status:
                return
            task = asyncio.get_running_loop().create_task(self._give_back(spec, undo, who, generation))
            self._late_unlocks.add(task)
            task.add_done_callback(self._late_unlocks.discard)

        fut.add_done_callback(on_reply)

    async def _give_back(
        self, spec: FopSpec, undo: tuple[Any, ...], who: CallContext, generation: int
    ) -> None:
        call_context.set(who)  # this task's own copy of the context
        link = self._link
        if link is None or link.generation != generation:
            return
        try:
            await self._call(spec, undo, None)
            self.log.debug("%s granted after its caller went away: unlocked", spec.name)
        except FopError as exc:
            self.log.warning("unlocking a %s granted after its caller went away: %s", spec.name, exc)

    def _describe_remote(self) -> str:
        o = self.opts
        if o["transport-type"] == "unix":
            return f"unix:{o['transport.socket.connect-path']}/{o['remote-subvolume']}"
        return f"{o['remote-host']}:{o['remote-port']}/{o['remote-subvolume']}"

    # ---- lifecycle and events ---------------------------------------------------------------

    async def init(self) -> None:
        o = self.opts
        if not o["remote-subvolume"]:
            raise OptionError(f"{self.name}: remote-subvolume is required")
        if o["transport-type"] == "unix" and not o["transport.socket.connect-path"]:
            raise OptionError(f"{self.name}: transport-type unix needs transport.socket.connect-path")
        if o["transport-type"] == "tcp" and not o["remote-port"]:
            raise OptionError(f"{self.name}: remote-port is required")
        local = o["transport.socket.local-path"]
        if local and not local.startswith(("/", "@")):
            raise OptionError(f"{self.name}: transport.socket.local-path {local!r} is not /PATH or @NAME")

    async def fini(self) -> None:
        if self._stopper is None:
            self._stopper = asyncio.get_running_loop().create_task(self._stop())
        await self._stopper

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        if event is Event.PARENT_UP:
            if self._runner is None and not self._stopping:
                self._runner = asyncio.get_running_loop().create_task(
                    self._run(), name=f"{self.name}-connect"
                )
        elif event is Event.PARENT_DOWN:
            if self._stopper is None:
                self._stopper = asyncio.get_running_loop().create_task(self._stop())
        else:
            super().notify(event, source, data)

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        """New options apply at once; a new address or identity means a new connection."""
        before = {k: self.opts[k] for k in _CONNECTION_OPTIONS}
        super().reconfigure(options)
        self.remote = self._describe_remote()
        link = self._link
        if link is not None and any(self.opts[k] != v for k, v in before.items()):
            link.lost_reason = "reconfigured"
            link.conn.abort("reconfigured: reconnecting", logging.INFO)

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.conn.is_open

    async def wait_connected(self, timeout: float) -> None:
        """Until the handshake succeeded; raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._up.wait()

    def _announce(self, up: bool) -> None:
        if self._announced is up:
            return
        self._announced = up
        for parent in list(self.parents):
            parent.notify(Event.CHILD_UP if up else Event.CHILD_DOWN, self, None)

    def _event(self, frame: Frame) -> None:
        if frame.op != Op.UPCALL:
            self.log.debug("ignoring event op %d from %s", frame.op, self.remote)
            return
        data = decode_upcall(frame.meta)
        for parent in list(self.parents):
            parent.notify(Event.UPCALL, self, data)

    # ---- the connection loop ----------------------------------------------------------------

    async def _run(self) -> None:
        delay = _BACKOFF_MIN
        failures = 0
        while not self._stopping:
            try:
                link = await self._connect()
            except Exception as exc:
                failures += 1
                expected = isinstance(exc, OSError | TimeoutError | FopError | ProtocolError)
                level = logging.ERROR if not expected else logging.WARNING if failures == 1 else logging.DEBUG
                self.log.log(
                    level, "cannot connect to %s: %r (retrying)", self.remote, exc, exc_info=not expected
                )
                self._announce(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.opts["reconnect-backoff-max"])
                continue
            delay, failures = _BACKOFF_MIN, 0
            self._link = link
            self._up.set()
            if self.via == "local":
                self.log.info("connected to %s through its local socket", self.remote)
            else:
                self.log.info("connected to %s", self.remote)
            self._announce(True)
            try:
                await self._keepalive(link)
            finally:
                self._lost(link)

    async def _connect(self) -> _Link:
        """A handshaken connection: through the brick's local socket when it has one on this host
        (cheaper than TCP loopback), else over the configured transport."""
        o = self.opts
        local = o["transport.socket.local-path"] if o["transport-type"] == "tcp" else ""
        if local:
            try:
                return await self._connect_via("local", local)
            except _NotLocal as exc:
                reason = str(exc)
                if reason != self._local_refusal:
                    self._local_refusal = reason
                    self.log.info("local socket %s not used, connecting over TCP: %s", local, reason)
        return await self._connect_via(o["transport-type"], o["transport.socket.connect-path"])

    async def _connect_via(self, via: str, path: str) -> _Link:
        link = _Link(self, self._generation + 1)
        o = self.opts
        hs = Handshake(
            subvolume=o["remote-subvolume"],
            client_uid=f"{socket.gethostname()}-{os.getpid()}-{self.name}-{self._uid}-{link.generation}",
            username=o["username"] or None,
            password=o["password"] or None,
        )
        local = via == "local"
        try:
            async with asyncio.timeout(o["ping-timeout"]):
                if via == "tcp":
                    conn = await connect_tcp(link, o["remote-host"], o["remote-port"], self.log)
                else:
                    conn = await connect_unix(link, path, self.log)
                if local and (uid := peer_uid(conn)) not in (0, os.getuid()):
                    conn.abort("local socket owned by another user", logging.DEBUG)
                    raise _NotLocal(f"it belongs to uid {uid}, not root or us")
                try:
                    frame = await link.request(Op.HANDSHAKE, hs.encode())
                except BaseException:
                    conn.abort("handshake not completed", logging.DEBUG if local else logging.WARNING)
                    raise
        except (OSError, TimeoutError, FopError, ProtocolError) as exc:
            if local:  # absent, stale or not a mortar brick: TCP decides
                raise _NotLocal(f"{exc!r}") from None
            raise
        if frame.status:
            conn.close()
            if local:
                raise _NotLocal(f"the brick there refused: {codec.decode_error(frame.meta)}")
            raise FopError(frame.status, f"handshake refused: {codec.decode_error(frame.meta)}")
        reply = HandshakeReply.decode(frame.meta)
        if local and (reply.local_path != path or reply.port != o["remote-port"]):
            conn.abort("not the brick's local socket", logging.DEBUG)
            raise _NotLocal(
                f"the server there is not {self.remote} (its local socket {reply.local_path!r}, "
                f"its port {reply.port})"
            )
        link.state.established()
        self._generation = link.generation
        self.via = via
        return link

    async def _keepalive(self, link: _Link) -> None:
        """Ping while the server is quiet; a silence of ping-timeout drops the connection."""
        conn = link.conn
        while conn.is_open:
            timeout = self.opts["ping-timeout"]  # read each round: reconfigure may change them
            frame_timeout = self.opts["frame-timeout"]
            ping_every = timeout / 4
            tick = min(timeout, frame_timeout) / 4
            silent = link.loop.time() - conn.last_rx
            if silent >= timeout:
                link.lost_reason = f"no answer within ping-timeout ({timeout:g}s)"
                conn.abort(link.lost_reason)
                break
            if silent >= ping_every:
                link.ping()
            link.expire(frame_timeout)
            await asyncio.wait([conn.closed], timeout=min(tick, timeout - silent))

    def _lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
            self._up.clear()
        link.conn.abort(link.lost_reason or "client stopping", logging.DEBUG)
        link.fail_all(FopError(errno.ENOTCONN, f"{self.name}: disconnected from {self.remote}"))
        if not self._stopping:
            self.log.warning("disconnected from %s: %s", self.remote, link.lost_reason or "closed")
        self._announce(False)

    async def _stop(self) -> None:
        self._stopping = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    # ---- fops -------------------------------------------------------------------------------

    async def _call(self, spec: FopSpec, args: tuple[Any, ...], xdata: Xdata) -> Any:
        link = self._link
        if spec.name in _RELEASES:
            entry = args[0].ctx.get(self)
            if link is None or entry is None or entry[0] != link.generation:
                args[0].ctx.pop(self, None)
                return XdataReply()  # its connection is gone and the server already released it
        if link is None:
            raise FopError(errno.ENOTCONN, f"{self.name}: not connected to {self.remote}")
        try:
            meta, payload = codec.encode_request(spec, args, xdata, call_context.get(), link.fd_number)
            async with self._slots:
                if link is not self._link:
                    raise FopError(errno.ENOTCONN, f"{self.name}: disconnected from {self.remote}")
                fut = link.request(spec.op, meta, payload)
                undo = _lock_undo(spec, args)
                try:
                    if link.conn.write_blocked:
                        await link.conn.drain()
                    # a lock's reply is awaited through a shield: a caller that goes away must not
                    # cancel it, since a grant that arrives later has to be given back (see _give_back)
                    frame = await (fut if undo is None else asyncio.shield(fut))
                except asyncio.CancelledError:
                    if undo is not None:
                        self._give_back_when_granted(fut, spec, undo, link.generation)
                    raise
        finally:
            if spec.name in _RELEASES:
                args[0].ctx.pop(self, None)
        if frame.status:
            raise FopError(frame.status, codec.decode_error(frame.meta))
        try:
            reply, new_fd = codec.decode_reply(spec, frame.meta, frame.payload)
        except ProtocolError as exc:
            link.lost_reason = f"malformed {spec.name} reply: {exc}"
            link.conn.abort(link.lost_reason)
            raise FopError(errno.EIO, f"{self.name}: {link.lost_reason}") from None
        if new_fd is not None:
            i = codec.newfd_index(spec)
            assert i is not None
            args[i].ctx[self] = (link.generation, new_fd)
        return reply


def _lock_undo(spec: FopSpec, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """For a request that takes an inode or entry lock, the arguments of the matching unlock."""
    if spec.name in ("inodelk", "finodelk"):
        domain, target, cmd, flock = args
        if flock.type == LockType.UNLCK or cmd not in (LockCmd.SETLK, LockCmd.SETLKW):
            return None
        return domain, target, LockCmd.SETLK, replace(flock, type=LockType.UNLCK)
    if spec.name in ("entrylk", "fentrylk"):
        domain, target, basename, cmd, lktype = args
        if cmd == EntrylkCmd.UNLOCK:
            return None
        return domain, target, basename, EntrylkCmd.UNLOCK, lktype
    return None


def _bind(spec: FopSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], Xdata]:
    """Arguments given by keyword, as the Translator method signature allows."""
    names = [name for name, _ in spec.args] + ["xdata"]
    if len(args) > len(names):
        raise TypeError(f"{spec.name}() takes {len(names)} arguments, got {len(args)}")
    values = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names or key in values:
            raise TypeError(f"{spec.name}() got an unexpected or repeated argument {key!r}")
        values[key] = value
    missing = [n for n in names[:-1] if n not in values]
    if missing:
        raise TypeError(f"{spec.name}() missing arguments: {', '.join(missing)}")
    return tuple(values[n] for n in names[:-1]), values.get("xdata")


def _make_fop(spec: FopSpec) -> Any:
    nargs = len(spec.args)

    async def fop(self: ClientTranslator, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != nargs:
            args, xdata = _bind(spec, args, kwargs)
        else:
            xdata = None
        return await self._call(spec, args, xdata)

    fop.__name__ = fop.__qualname__ = spec.name
    fop.__doc__ = f"{spec.name} on the remote brick (one request)."
    return fop


for _name, _spec in FOPS.items():
    setattr(ClientTranslator, _name, _make_fop(_spec))
