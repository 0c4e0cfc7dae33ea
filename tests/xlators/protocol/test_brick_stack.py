"""protocol/server over the real brick translators (storage/posix on a tmp directory, features/locks)."""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, Fd, Flock, LockCmd, LockType
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Event, Translator
from mortar.xlators.protocol.client import ClientTranslator
from mortar.xlators.protocol.server import ServerTranslator

from .memfs import make_loc

posix = pytest.importorskip("mortar.xlators.storage.posix")
locks = pytest.importorskip("mortar.xlators.features.locks")
pytestmark = pytest.mark.timeout(60)


class Stack:
    def __init__(self, graph: list[Translator], server: ServerTranslator) -> None:
        self.graph = graph  # children first
        self.server = server
        self.clients: list[ClientTranslator] = []

    async def client(self, name: str) -> ClientTranslator:
        client = ClientTranslator(
            name,
            {"remote-port": self.server.listen_port, "remote-subvolume": "/bricks/b0", "ping-timeout": "5"},
        )
        self.clients.append(client)
        await client.init()
        client.notify(Event.PARENT_UP, None)
        await client.wait_connected(5)
        return client


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    store = posix.PosixTranslator(
        "b0-posix", {"directory": str(tmp_path / "b0"), "volume-id": str(uuid.uuid4()), "brick-create": "on"}
    )
    lk = locks.LocksTranslator("b0-locks", {}, [store])
    server = ServerTranslator("b0-server", {"auth.addr./bricks/b0.allow": "127.0.0.1"}, [lk])
    graph: list[Translator] = [store, lk, server]
    for xl in graph:
        await xl.init()
    s = Stack(graph, server)
    yield s
    for client in s.clients:
        await client.fini()
    for xl in reversed(graph):
        await xl.fini()


async def test_file_io_lands_on_disk(stack: Stack, tmp_path: Path) -> None:
    client = await stack.client("c0")
    gfid = Gfid.random()
    fd = Fd(gfid, os.O_RDWR)
    loc = make_loc(ROOT_GFID, "vm.img")
    await client.create(loc, os.O_RDWR | os.O_CREAT, 0o644, 0o022, fd, {GFID_REQ: gfid})
    data = os.urandom((1 << 20) + 4321)
    await client.writev(fd, data, 0, 0)
    await client.fsync(fd, 0)
    assert (tmp_path / "b0" / "vm.img").read_bytes() == data
    assert bytes((await client.readv(fd, 1 << 20, 4321, 0)).data) == data[4321:]
    found = await client.lookup(loc)
    assert found.iatt.gfid == gfid and found.iatt.size == len(data)

    dgfid = Gfid.random()
    await client.mkdir(make_loc(ROOT_GFID, "images"), 0o755, 0, {GFID_REQ: dgfid})
    dfd = Fd(ROOT_GFID, is_dir=True)
    await client.opendir(make_loc(gfid=ROOT_GFID), dfd)
    names = {e.name for e in (await client.readdirp(dfd, 65536, 0)).entries}
    assert {"vm.img", "images"} <= names
    await client.releasedir(dfd)
    await client.release(fd)
    with pytest.raises(FopError) as exc:
        await client.lookup(make_loc(dgfid, "../../etc"))
    assert exc.value.errno in (errno.EINVAL, errno.ENOENT, errno.EPERM, errno.EACCES)


async def test_dead_clients_locks_are_released(stack: Stack) -> None:
    """CLIENT_DISCONNECT reaches features/locks: a waiter gets the lock its dead holder had."""
    holder = await stack.client("holder")
    waiter = await stack.client("waiter")
    gfid = Gfid.random()
    fd = Fd(gfid, os.O_RDWR)
    await holder.create(make_loc(ROOT_GFID, "locked"), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: gfid})

    token = call_context.set(CallContext(lk_owner=b"holder"))
    try:
        await holder.inodelk("dom", make_loc(gfid=gfid), LockCmd.SETLK, Flock(LockType.WRLCK))
    finally:
        call_context.reset(token)

    async def wait_for_lock() -> None:
        call_context.set(CallContext(lk_owner=b"waiter"))
        await waiter.inodelk("dom", make_loc(gfid=gfid), LockCmd.SETLKW, Flock(LockType.WRLCK))

    blocked = asyncio.ensure_future(wait_for_lock())
    await asyncio.sleep(0.1)
    assert not blocked.done()
    await holder.fini()
    async with asyncio.timeout(5):
        await blocked
