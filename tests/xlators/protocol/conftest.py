"""Fixtures for protocol tests: a memfs brick behind a real ServerTranslator, clients that connect to it.

Every async test here runs twice, on asyncio's own loop and on uvloop (what mortar runs on): the
two differ in transports and buffering in ways the protocol must not care about.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from mortar.core.translator import Event, Translator
from mortar.xlators.protocol.client import ClientTranslator
from mortar.xlators.protocol.server import ServerTranslator

from .memfs import MemFs


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Recorder:
    """Stands in for a parent translator: records the events a client sends up."""

    def __init__(self) -> None:
        self.events: list[tuple[Event, Any]] = []
        self._changed = asyncio.Event()

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        self.events.append((event, data))
        self._changed.set()

    def count(self, event: Event) -> int:
        return sum(1 for e, _ in self.events if e is event)

    async def wait_for(self, event: Event, n: int = 1, timeout: float = 5.0) -> None:
        """Until `event` has been seen `n` times."""
        async with asyncio.timeout(timeout):
            while self.count(event) < n:
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Brick:
    fs: MemFs
    server: ServerTranslator
    transport: str
    sockdir: str
    clients: list[ClientTranslator] = field(default_factory=list)

    def server_options(self, **extra: Any) -> dict[str, Any]:
        opts = dict(self.server.opts)
        opts.update(extra)
        return {k: v for k, v in opts.items() if v != ""}

    def client_options(self, **extra: Any) -> dict[str, Any]:
        opts: dict[str, Any] = {"remote-subvolume": self.fs.name, "transport-type": self.transport}
        if self.transport == "unix":
            opts["transport.socket.connect-path"] = self.server.listen_path
        else:
            opts["remote-port"] = self.server.listen_port
        opts.update({"reconnect-backoff-max": "0.1", "ping-timeout": "5"})
        opts.update(extra)
        return opts

    async def client(
        self, recorder: Recorder | None = None, connect: bool = True, /, **opts: Any
    ) -> ClientTranslator:
        client = ClientTranslator(f"client-{len(self.clients)}", self.client_options(**opts))
        self.clients.append(client)
        if recorder is not None:
            client.parents.append(recorder)
        await client.init()
        client.notify(Event.PARENT_UP, None)
        if connect:
            await client.wait_connected(5)
        return client

    async def restart(self, **server_opts: Any) -> None:
        """Stop the server and start a new one at the same address, over the same memfs."""
        opts = self.server_options(**server_opts)
        if self.transport == "tcp":
            opts["transport.socket.listen-port"] = self.server.listen_port
        await self.server.fini()
        self.fs.parents.remove(self.server)
        self.server = ServerTranslator("server", opts, [self.fs])
        await self.server.init()


async def start_brick(transport: str, sockdir: str, **server_opts: Any) -> Brick:
    fs = MemFs("brick")
    opts: dict[str, Any] = {"transport-type": transport}
    if transport == "unix":
        opts["transport.socket.listen-path"] = f"{sockdir}/brick.sock"
    opts.update(server_opts)
    server = ServerTranslator("server", opts, [fs])
    graph: list[Translator] = [fs, server]
    for xl in graph:  # children first, as the graph does
        await xl.init()
    return Brick(fs, server, transport, sockdir)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for unix sockets (their paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="mrtr", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def stop_brick(b: Brick) -> None:
    for client in b.clients:
        await client.fini()
    await b.server.fini()


@pytest.fixture(params=["tcp", "unix"])
async def brick(request: pytest.FixtureRequest, sockdir: str) -> AsyncIterator[Brick]:
    b = await start_brick(request.param, sockdir)
    yield b
    await stop_brick(b)


@pytest.fixture
async def tcp_brick(sockdir: str) -> AsyncIterator[Brick]:
    """For tests about TCP only (peer addresses) or about the protocol, not the transport."""
    b = await start_brick("tcp", sockdir)
    yield b
    await stop_brick(b)
