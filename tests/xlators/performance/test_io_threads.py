"""performance/io-threads: its pool serves the subtree's blocking calls, bounded, and goes at fini."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from mortar.core.fops import AttrReply, EntryReply, Fd, Flock, Loc, LockType, Xdata, XdataReply
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.options import OptionError
from mortar.core.translator import Translator
from mortar.graph.registry import translator_class
from mortar.xlators.performance.io_threads import QUEUE_FACTOR, IoThreadsTranslator
from mortar.xlators.storage.posix import PosixTranslator


def make_posix(directory: Path) -> PosixTranslator:
    opts = {"directory": str(directory), "volume-id": str(uuid.uuid4()), "brick-create": "on"}
    return PosixTranslator("posix", {**opts, "health-check-interval": "0"})


def by_gfid(gfid: Gfid) -> Loc:
    return Loc(str(gfid), gfid=gfid)


async def create(posix: PosixTranslator, name: str, data: bytes) -> tuple[EntryReply, Fd]:
    fd = Fd(Gfid.random())
    loc = Loc(name, pargfid=ROOT_GFID, name=name)
    reply = await posix.create(loc, os.O_RDWR, 0o644, 0o022, fd, {"gfid-req": bytes(fd.gfid)})
    await posix.writev(fd, data, 0, 0)
    return reply, fd


class Probe(Translator):
    """Records the thread its blocking work ran on and how many calls were inside at once."""

    type_name = "test/probe"

    def __init__(self, child: Translator) -> None:
        super().__init__("probe", children=[child])
        self.threads: list[str] = []
        self.inside = 0
        self.most = 0
        self.hold: asyncio.Event | None = None
        self.locks = 0

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            self.threads.append(await self.offload(lambda: threading.current_thread().name))
            if self.hold is not None:
                await self.hold.wait()
            return AttrReply(Iatt(ROOT_GFID, 0o40755))
        finally:
            self.inside -= 1

    async def inodelk(self, domain: str, loc: Loc, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        self.locks += 1
        return XdataReply()


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    posix = make_posix(tmp_path / "brick")
    probe = Probe(posix)
    iot = IoThreadsTranslator("iot", {"thread-count": "2"}, [probe])
    await posix.init()
    await probe.init()
    await iot.init()
    yield iot, probe, posix
    await iot.fini()
    await probe.fini()
    await posix.fini()


def test_registry_names_the_class() -> None:
    assert translator_class("performance/io-threads") is IoThreadsTranslator


async def test_pool_serves_the_subtree_off_the_loop(stack: Any) -> None:
    iot, probe, posix = stack
    assert iot.pool is not None
    assert posix.executor is iot.pool and probe.executor is iot.pool and iot.executor is iot.pool
    await iot.stat(by_gfid(ROOT_GFID))
    assert probe.threads[0].startswith("iot-iot")
    assert threading.current_thread().name != probe.threads[0]
    # a real brick's fops pass through the gate and run in the same pool
    loc = Loc("f", pargfid=ROOT_GFID, name="f")
    fd = Fd(Gfid.random())
    reply = await iot.create(loc, os.O_RDWR, 0o644, 0o022, fd, {"gfid-req": bytes(fd.gfid)})
    assert reply.iatt.gfid == fd.gfid
    await iot.writev(fd, b"data", 0, 0)
    assert (await iot.readv(fd, 10, 0, 0)).data == b"data"
    await iot.release(fd)


async def test_in_flight_fops_are_bounded(stack: Any) -> None:
    iot, probe, _ = stack
    probe.hold = asyncio.Event()
    calls = [asyncio.ensure_future(iot.stat(by_gfid(ROOT_GFID))) for _ in range(40)]
    for _ in range(100):
        await asyncio.sleep(0.005)
        if probe.inside == QUEUE_FACTOR * 2:
            break
    assert probe.inside == QUEUE_FACTOR * 2  # the rest wait at the gate
    # lock fops are not held back by a full gate (an unlock must always get through)
    await asyncio.wait_for(iot.inodelk("d", by_gfid(ROOT_GFID), 6, Flock(LockType.UNLCK)), 5)
    assert probe.locks == 1
    probe.hold.set()
    await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert probe.most == QUEUE_FACTOR * 2


async def test_reconfigure_replaces_the_pool(stack: Any) -> None:
    iot, probe, posix = stack
    old = iot.pool
    iot.reconfigure({"thread-count": "5"})
    assert iot.pool is not old and iot.pool._max_workers == 5
    assert posix.executor is iot.pool and probe.executor is iot.pool
    assert old._shutdown
    await iot.stat(by_gfid(ROOT_GFID))
    iot.reconfigure({"thread-count": "5"})  # unchanged: the pool stays
    assert posix.executor is iot.pool


async def test_fini_shuts_the_pool_down(tmp_path: Path) -> None:
    posix = make_posix(tmp_path / "brick")
    iot = IoThreadsTranslator("iot", {}, [posix])
    await posix.init()
    await iot.init()
    pool = iot.pool
    assert pool is not None and pool._max_workers == 16
    _, fd = await create(posix, "f", b"x")
    await iot.fini()
    assert pool._shutdown and iot.pool is None
    assert posix.executor is None  # the child may still finish its own work on the default pool
    with pytest.raises(RuntimeError):
        pool.submit(print)
    await posix.release(fd)
    await posix.fini()
    assert not [t for t in threading.enumerate() if t.name.startswith("iot-iot")]


async def test_thread_count_range() -> None:
    for bad in ("0", "65"):
        with pytest.raises(OptionError):
            IoThreadsTranslator("iot", {"thread-count": bad})
    assert IoThreadsTranslator("iot", {"thread-count": "64"}).thread_count == 64
