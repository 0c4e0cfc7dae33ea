"""protocol/client and lock requests whose caller goes away (a timeout) after they went on the wire:
a grant that arrives later is given back, so the lock is not held on the brick forever."""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, EntrylkCmd, Fd, Flock, LockCmd, LockType
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Event, Translator
from mortar.xlators.features.locks import LocksTranslator
from mortar.xlators.protocol.client import ClientTranslator
from mortar.xlators.protocol.server import ServerTranslator
from mortar.xlators.storage.posix import PosixTranslator

from .memfs import make_loc

pytestmark = pytest.mark.timeout(60)
Connect = Callable[[str], Awaitable[ClientTranslator]]


@pytest.fixture
async def connect(tmp_path: Path) -> AsyncIterator[Connect]:
    """A posix + locks brick behind a server on loopback; `await connect(name)` gives a client."""
    store = PosixTranslator(
        "b0-posix", {"directory": str(tmp_path / "b0"), "volume-id": str(uuid.uuid4()), "brick-create": "on"}
    )
    lk = LocksTranslator("b0-locks", {}, [store])
    server = ServerTranslator("b0-server", {"auth.addr./bricks/b0.allow": "127.0.0.1"}, [lk])
    graph: list[Translator] = [store, lk, server]
    for xl in graph:
        await xl.init()
    clients: list[ClientTranslator] = []

    async def make(name: str) -> ClientTranslator:
        opts = {"remote-port": server.listen_port, "remote-subvolume": "/bricks/b0", "ping-timeout": "5"}
        client = ClientTranslator(name, opts)
        clients.append(client)
        await client.init()
        client.notify(Event.PARENT_UP, None)
        await client.wait_connected(5)
        return client

    yield make
    for client in clients:
        await client.fini()
    for xl in reversed(graph):
        await xl.fini()


def as_owner(owner: bytes) -> None:
    call_context.set(CallContext(lk_owner=owner))


async def until_free(attempt: Callable[[], Awaitable[object]]) -> None:
    """Retry a non-blocking lock until it is granted (EAGAIN while another owner holds it)."""
    async with asyncio.timeout(5):
        while True:
            try:
                await attempt()
                return
            except FopError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            await asyncio.sleep(0.02)


async def test_inodelk_granted_after_its_caller_timed_out_is_given_back(connect: Connect) -> None:
    holder, waiter, third = await connect("holder"), await connect("waiter"), await connect("third")
    gfid = Gfid.random()
    fd = Fd(gfid, os.O_RDWR)
    await holder.create(make_loc(ROOT_GFID, "f"), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: gfid})
    loc = make_loc(gfid=gfid)
    as_owner(b"holder")
    await holder.inodelk("dom", loc, LockCmd.SETLK, Flock(LockType.WRLCK, 0, 100))

    async def wait_then_give_up() -> None:
        as_owner(b"waiter")
        async with asyncio.timeout(0.2):
            await waiter.inodelk("dom", loc, LockCmd.SETLKW, Flock(LockType.WRLCK, 10, 20))

    with pytest.raises(TimeoutError):
        await wait_then_give_up()
    as_owner(b"holder")
    await holder.inodelk("dom", loc, LockCmd.SETLK, Flock(LockType.UNLCK, 0, 100))
    # the brick grants the abandoned request now; the waiter's client unlocks it at once
    as_owner(b"third")
    await until_free(lambda: third.inodelk("dom", loc, LockCmd.SETLK, Flock(LockType.WRLCK, 0, 0)))
    await third.inodelk("dom", loc, LockCmd.SETLK, Flock(LockType.UNLCK, 0, 0))
    await holder.release(fd)


async def test_entrylk_granted_after_its_caller_was_cancelled_is_given_back(connect: Connect) -> None:
    holder, waiter, third = await connect("holder"), await connect("waiter"), await connect("third")
    root = make_loc(gfid=ROOT_GFID)
    as_owner(b"holder")
    await holder.entrylk("dom", root, "name", EntrylkCmd.LOCK_NB, LockType.WRLCK)

    async def wait_for_it() -> None:
        as_owner(b"waiter")
        await waiter.entrylk("dom", root, "name", EntrylkCmd.LOCK, LockType.WRLCK)

    task = asyncio.ensure_future(wait_for_it())
    await asyncio.sleep(0.1)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    as_owner(b"holder")
    await holder.entrylk("dom", root, "name", EntrylkCmd.UNLOCK, LockType.WRLCK)
    as_owner(b"third")
    await until_free(lambda: third.entrylk("dom", root, "name", EntrylkCmd.LOCK_NB, LockType.WRLCK))
    await third.entrylk("dom", root, "name", EntrylkCmd.UNLOCK, LockType.WRLCK)
    # a lock held by someone else is not the cancelled caller's to give back: it stays
    await third.entrylk("dom", root, "name", EntrylkCmd.LOCK_NB, LockType.WRLCK)
    as_owner(b"other")
    with pytest.raises(FopError) as exc:
        await holder.entrylk("dom", root, "name", EntrylkCmd.LOCK_NB, LockType.WRLCK)
    assert exc.value.errno == errno.EAGAIN
