"""Live graph switch under an open volume: new options or new brick addresses without an error.

A connected volume's fops go through `GraphSwitch`, a pass-through translator above the current
graph that remembers every open fd. When a new volfile arrives:

- only options changed (and none that decides where a client connects): the running graph is
  reconfigured in place;
- otherwise a new graph is built and started beside the old one; once it is up, new calls are
  held at the volume's `CallGate`, calls already running finish on the old graph, every open file
  and directory is reopened on the new graph by gfid (the same `Fd` objects, so file handles held
  by the application keep working), the volume moves to the new graph, the held calls proceed, and
  the old graph releases its fds and stops in the background.

Byte-range locks held through the old graph are not carried over (GlusterFS migrates them).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from mortar.client.resolve import Resolver
from mortar.core.context import call_context
from mortar.core.fops import EntryReply, Fd, Loc, Xdata, XdataReply
from mortar.core.inode import InodeTable
from mortar.core.translator import Event, Translator
from mortar.graph.builder import Graph, build
from mortar.graph.volfile import VolumeSpec, parse

if TYPE_CHECKING:
    from mortar.client.volume import AsyncVolume

log = logging.getLogger(__name__)

#: protocol/client options a running connection can take in place; any other change of a
#: protocol/client (host, port, subvolume, transport, login) needs a new graph
SOFT_CLIENT_OPTIONS = frozenset({"ping-timeout", "frame-timeout", "reconnect-backoff-max"})
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC
_inside = contextvars.ContextVar("mortar_inside_call", default=False)


class SwitchError(RuntimeError):
    """The new graph could not be put in place; the volume stays on the old one."""


class CallGate:
    """Counts the volume's running calls and can hold new ones while a switch happens."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = 0

    @contextlib.asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        if _inside.get():  # a call made from inside a call: already counted
            yield
            return
        await self._open.wait()
        self._running += 1
        self._idle.clear()
        token = _inside.set(True)
        try:
            yield
        finally:
            _inside.reset(token)
            self._running -= 1
            if not self._running:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def closed(self, drain_timeout: float) -> AsyncIterator[None]:
        """Hold new calls and wait for the running ones; TimeoutError if they do not finish."""
        self._open.clear()
        try:
            async with asyncio.timeout(drain_timeout):
                await self._idle.wait()
            yield
        finally:
            self._open.set()


class GraphSwitch(Translator):
    """Pass-through above the current graph's top that keeps track of open fds."""

    type_name = "mortar/graph-switch"

    def __init__(self, graph: Graph) -> None:
        super().__init__(graph.top.name, {}, [graph.top])
        self.fds: weakref.WeakSet[Fd] = weakref.WeakSet()

    def attach(self, graph: Graph) -> None:
        old = self.children[0]
        if self in old.parents:
            old.parents.remove(self)
        self.children = [graph.top]
        graph.top.parents.append(self)

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        reply = await self.children[0].open(loc, flags, fd, xdata)
        self.fds.add(fd)
        return reply

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        reply = await self.children[0].create(loc, flags, mode, umask, fd, xdata)
        self.fds.add(fd)
        return reply

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        reply = await self.children[0].opendir(loc, fd, xdata)
        self.fds.add(fd)
        return reply

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self.fds.discard(fd)
        return await self.children[0].release(fd, xdata)

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self.fds.discard(fd)
        return await self.children[0].releasedir(fd, xdata)


def needs_new_graph(old: Sequence[VolumeSpec], new: Sequence[VolumeSpec]) -> bool:
    """A topology change, or a protocol/client told to connect somewhere else or otherwise."""
    if [(s.name, s.type, list(s.subvolumes)) for s in old] != [
        (s.name, s.type, list(s.subvolumes)) for s in new
    ]:
        return True
    for a, b in zip(old, new, strict=True):
        if a.type != "protocol/client":
            continue
        keys = (set(a.options) | set(b.options)) - SOFT_CLIENT_OPTIONS
        if any(a.options.get(k) != b.options.get(k) for k in keys):
            return True
    return False


class Switcher:
    """Applies new volfiles to one volume (see the module docstring)."""

    def __init__(
        self, volume: AsyncVolume, proxy: GraphSwitch, *, timeout: float = 30, drain_timeout: float = 30
    ):
        self.volume = volume
        self.proxy = proxy
        self.timeout = timeout
        self.drain_timeout = drain_timeout
        self.switches = 0
        self.reconfigures = 0
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()

    async def apply(self, text: str, filename: str) -> str:
        """Put the volfile in effect: returns "unchanged", "reconfigured" or "switched"."""
        specs = parse(text, filename)
        async with self._lock:
            graph = self.volume.graph
            if specs == graph.specs and [list(s.options) for s in specs] == [
                list(s.options) for s in graph.specs
            ]:
                return "unchanged"
            if not needs_new_graph(graph.specs, specs):
                changed = graph.reconfigure(specs, filename)
                self.reconfigures += 1
                log.info(
                    "volume %s: reconfigured %s in place", graph.top.name, ", ".join(changed) or "nothing"
                )
                return "reconfigured"
            await self._switch(build(specs, filename))
            self.switches += 1
            return "switched"

    async def _switch(self, new: Graph) -> None:
        vol = self.volume
        try:
            await new.start(self.timeout)
            if not await new.wait_up(self.timeout):
                raise SwitchError(f"{new.filename}: the new graph did not come up within {self.timeout:g}s")
        except BaseException:
            await new.stop()
            raise
        assert vol.gate is not None
        try:
            async with vol.gate.closed(self.drain_timeout):
                old = vol.graph
                reopened = await self._move(old, new)
        except BaseException:
            await new.stop()
            raise
        log.info("volume %s: switched to a new graph (%d open files moved)", new.top.name, len(reopened))
        task = asyncio.get_running_loop().create_task(self._retire(old, reopened))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _move(self, old: Graph, new: Graph) -> list[tuple[Fd, dict[object, Any]]]:
        """Point the volume at `new` and reopen every open fd there; returns (fd, old ctx) pairs."""
        vol = self.volume
        table = InodeTable()
        resolver = Resolver(self.proxy, table, vol.resolver.entry_timeout)
        self.proxy.attach(new)
        vol.graph, vol.table, vol.resolver = new, table, resolver
        listeners = list(old._listeners)  # the application's subscriptions follow the volume
        old._listeners.clear()
        new._listeners.extend(cb for cb in listeners if cb not in new._listeners)
        moved: list[tuple[Fd, dict[object, Any]]] = []
        token = call_context.set(vol._identity())
        try:
            for fd in list(self.proxy.fds):
                old_ctx, fd.ctx = fd.ctx, {}
                moved.append((fd, old_ctx))
                try:
                    await self._reopen(fd, resolver, table, new.top)
                except Exception as exc:  # the file may be gone; its handle now fails, the rest go on
                    log.warning("could not reopen %r on the new graph: %s", fd, exc)
        finally:
            call_context.reset(token)
        for cb in listeners:
            with contextlib.suppress(Exception):
                cb(Event.GRAPH_SWITCH, new)
        return moved

    @staticmethod
    async def _reopen(fd: Fd, resolver: Resolver, table: InodeTable, top: Translator) -> None:
        path = f"<gfid:{fd.gfid}>"
        iatt = await resolver.revalidate(fd.gfid, path)
        fd.inode = table.link(None, "", iatt)
        loc = Loc(path, fd.gfid, inode=fd.inode)
        if fd.is_dir:
            await top.opendir(loc, fd)
        else:
            await top.open(loc, fd.flags & ~_REOPEN_DROP, fd)

    async def _retire(self, old: Graph, moved: list[tuple[Fd, dict[object, Any]]]) -> None:
        """Release the old graph's fds, then stop it."""
        for fd, ctx in moved:
            shadow = Fd(fd.gfid, fd.flags, fd.is_dir)
            shadow.ctx = ctx
            with contextlib.suppress(Exception):
                await (old.top.releasedir(shadow) if fd.is_dir else old.top.release(shadow))
        try:
            await old.stop()
        except Exception:
            log.exception("stopping the replaced graph %s failed", old.filename)

    async def close(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
