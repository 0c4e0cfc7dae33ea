"""performance/md-cache over a real storage/posix brick: what it answers without a round trip, how
this client's own changes keep it right, and that another client's change shows after the timeout."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, AttrSet, EntryReply, Fd, Loc, SetAttrValid, Xdata
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Translator
from mortar.graph.registry import translator_class
from mortar.xlators.debug.error_gen import ErrorGenTranslator
from mortar.xlators.performance.md_cache import MdCacheTranslator
from mortar.xlators.storage.posix import PosixTranslator

ATTR_FOPS = ("lookup", "stat", "fstat")


class HeldLookups(Translator):
    """Passes everything through, but holds lookups until `gate` is set (to order a race)."""

    def __init__(self, child: Translator) -> None:
        super().__init__("held", {}, [child])
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        reply = await self.children[0].lookup(loc, xdata)
        self.waiting.set()
        await self.gate.wait()
        return reply


@pytest.fixture
async def posix(tmp_path: Path) -> AsyncIterator[PosixTranslator]:
    opts = {"directory": str(tmp_path / "b"), "volume-id": str(uuid.uuid4()), "brick-create": "on"}
    xl = PosixTranslator("posix", {**opts, "health-check-interval": "0"})
    await xl.init()
    yield xl
    await xl.fini()


async def client(posix: Translator, **opts: Any) -> tuple[MdCacheTranslator, ErrorGenTranslator]:
    """A client's md-cache over a counting pass-through to the shared brick."""
    gen = ErrorGenTranslator(f"gen-{uuid.uuid4().hex[:6]}", {}, [posix])
    md = MdCacheTranslator("md", {k.replace("_", "-"): v for k, v in opts.items()}, [gen])
    return md, gen


def named(name: str, parent: Gfid = ROOT_GFID) -> Loc:
    return Loc("/" + name, pargfid=parent, name=name)


async def make(xl: Translator, name: str, data: bytes = b"") -> Fd:
    fd = Fd(Gfid.random())
    await xl.create(named(name), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(fd.gfid)})
    if data:
        await xl.writev(fd, data, 0, 0)
    return fd


def round_trips(gen: ErrorGenTranslator) -> int:
    return sum(gen.counts[f] for f in ATTR_FOPS)


async def test_registered_with_declared_options() -> None:
    assert translator_class("performance/md-cache") is MdCacheTranslator
    md = MdCacheTranslator("md", {"md-cache-timeout": "2.5"}, [Translator("t")])
    assert md.opts["md-cache-timeout"] == 2.5 and md.opts["limit"] == 100_000


async def test_attributes_after_create_and_write_need_no_round_trip(posix: PosixTranslator) -> None:
    md, gen = await client(posix, md_cache_timeout="60")
    fd = await make(md, "f", b"x" * 1000)
    before = round_trips(gen)
    assert (await md.fstat(fd)).iatt.size == 1000
    assert (await md.stat(Loc("/f", gfid=fd.gfid))).iatt.size == 1000
    assert (await md.lookup(named("f"))).iatt.gfid == fd.gfid  # by name, from the create's reply
    assert round_trips(gen) == before
    await md.ftruncate(fd, 10)  # a change stores its post-op attributes
    await md.setattr(Loc("/f", gfid=fd.gfid), AttrSet(SetAttrValid.MODE, mode=0o600))
    st = (await md.fstat(fd)).iatt
    assert (st.size, st.mode & 0o777) == (10, 0o600)
    assert round_trips(gen) == before
    await md.release(fd)


async def test_lookup_asking_for_xattrs_goes_down(posix: PosixTranslator) -> None:
    md, gen = await client(posix, md_cache_timeout="60")
    fd = await make(md, "f")
    before = gen.counts["lookup"]
    await md.lookup(named("f"), {"xattrs": ["user.x"]})
    assert gen.counts["lookup"] == before + 1
    await md.release(fd)


async def test_own_unlink_and_rename_drop_names(posix: PosixTranslator) -> None:
    md, _ = await client(posix, md_cache_timeout="60")
    a = await make(md, "a")
    b = await make(md, "b")
    await md.rename(named("a"), named("c"))
    with pytest.raises(FopError):
        await md.lookup(named("a"))
    assert (await md.lookup(named("c"))).iatt.gfid == a.gfid
    await md.unlink(named("b"), 0)
    with pytest.raises(FopError):
        await md.lookup(named("b"))
    for fd in (a, b):
        await md.release(fd)


async def test_another_clients_change_shows_after_the_timeout(posix: PosixTranslator) -> None:
    mine, gen = await client(posix, md_cache_timeout="0.05")
    other, _ = await client(posix)
    fd = await make(mine, "f", b"1234")
    ofd = Fd(fd.gfid)
    await other.open(Loc("/f", gfid=fd.gfid), os.O_RDWR, ofd)
    await other.writev(ofd, b"y" * 100, 0, 0)
    await asyncio.sleep(0.1)  # past the timeout: the bricks are asked again
    before = round_trips(gen)
    assert (await mine.stat(Loc("/f", gfid=fd.gfid))).iatt.size == 100
    assert round_trips(gen) == before + 1
    for x, f in ((mine, fd), (other, ofd)):
        await x.release(f)


async def test_timeout_zero_caches_nothing(posix: PosixTranslator) -> None:
    md, gen = await client(posix, md_cache_timeout="0")
    fd = await make(md, "f")
    await md.fstat(fd)
    await md.fstat(fd)
    assert gen.counts["fstat"] == 2
    await md.release(fd)


async def test_a_lookup_answered_after_a_write_is_not_cached(posix: PosixTranslator) -> None:
    """The lookup leaves before the write and comes back after it with the old size: storing that
    would hide the write for a whole timeout."""
    held = HeldLookups(posix)
    md = MdCacheTranslator("md", {"md-cache-timeout": "60"}, [held])
    fd = Fd(Gfid.random())
    await posix.create(named("f"), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(fd.gfid)})
    slow = asyncio.ensure_future(md.lookup(named("f")))
    await asyncio.wait_for(held.waiting.wait(), 10)
    await md.writev(fd, b"z" * 4096, 0, 0)
    held.gate.set()
    assert (await asyncio.wait_for(slow, 10)).iatt.size == 0  # the old answer, as it was
    assert (await md.fstat(fd)).iatt.size == 4096  # ... but not remembered over the write's
    await posix.release(fd)


async def test_the_cache_is_bounded(posix: PosixTranslator) -> None:
    md, _ = await client(posix, md_cache_timeout="60", limit="3")
    fds = [await make(md, f"f{i}") for i in range(6)]
    assert len(md._iatts) <= 3 and len(md._names) <= 3
    for fd in fds:
        await md.release(fd)
