"""features/locks over a real brick: inodelk, entrylk, POSIX locks, cancellation, disconnects."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mortar.core.errors import FopError
from mortar.core.fops import EntrylkCmd, Fd, Flock, Loc, LockCmd, LockType
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Event, Translator
from mortar.graph.registry import translator_class
from mortar.xlators.features.locks import DUMP_KEY, OFFSET_INF, LocksTranslator, PosixQueue, RangeLock

from .conftest import as_owner, make_brick, new_file, settle

RD, WR, UN = LockType.RDLCK, LockType.WRLCK, LockType.UNLCK
SETLK, SETLKW, GETLK = LockCmd.SETLK, LockCmd.SETLKW, LockCmd.GETLK
DOM = "vol-replicate-0"
WAIT = 5.0  # upper bound for anything that should finish at once


class Recorder(Translator):
    """Passes fops through and remembers the events that reach it from above."""

    type_name = "test/recorder"

    def __init__(self, name: str, children: list[Translator]) -> None:
        super().__init__(name, children=children)
        self.events: list[tuple[Event, Any]] = []

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        self.events.append((event, data))
        super().notify(event, source, data)


@pytest.fixture
async def stack(brick_dir: Path) -> Any:
    posix = make_brick(brick_dir)
    recorder = Recorder("recorder", [posix])
    locks = LocksTranslator("locks", children=[recorder])
    for xl in (posix, recorder, locks):
        await xl.init()
    yield locks
    for xl in (locks, recorder, posix):
        await xl.fini()


def inodelk(
    locks: LocksTranslator,
    gfid: Gfid,
    cmd: int,
    type_: int,
    start: int = 0,
    length: int = 0,
    domain: str = DOM,
) -> Any:
    return locks.inodelk(domain, Loc("<gfid>", gfid=gfid), cmd, Flock(type_, start, length))


async def run(client: str, owner: bytes, coro: Any) -> Any:
    """Run one call as (client, owner) and wait for it, bounded."""
    return await asyncio.wait_for(as_owner(client, owner, coro), WAIT)


async def expect_errno(code: int, client: str, owner: bytes, coro: Any) -> None:
    with pytest.raises(FopError) as exc:
        await run(client, owner, coro)
    assert exc.value.errno == code


def dump(locks: LocksTranslator, gfid: Gfid) -> dict[str, Any]:
    return locks.dump(gfid)


# ---- inodelk --------------------------------------------------------------------------------


async def test_exclusive_and_shared(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"a", inodelk(stack, g, SETLK, RD))
    await run("c2", b"b", inodelk(stack, g, SETLK, RD))  # readers share
    await expect_errno(errno.EAGAIN, "c3", b"c", inodelk(stack, g, SETLK, WR))
    await run("c1", b"a", inodelk(stack, g, SETLK, UN))
    await run("c2", b"b", inodelk(stack, g, SETLK, UN))
    await run("c3", b"c", inodelk(stack, g, SETLK, WR))
    await expect_errno(errno.EAGAIN, "c1", b"a", inodelk(stack, g, SETLK, RD))
    # the same lk_owner on another connection is another owner
    await expect_errno(errno.EAGAIN, "c1", b"c", inodelk(stack, g, SETLK, WR))


async def test_ranges_and_to_eof(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"a", inodelk(stack, g, SETLK, WR, 0, 10))
    await run("c2", b"b", inodelk(stack, g, SETLK, WR, 10, 10))  # [10, 20) touches, does not overlap
    await run("c3", b"c", inodelk(stack, g, SETLK, WR, 100, 0))  # [100, EOF)
    await expect_errno(errno.EAGAIN, "c1", b"a", inodelk(stack, g, SETLK, RD, 1 << 40, 1))
    await expect_errno(errno.EAGAIN, "c1", b"a", inodelk(stack, g, SETLK, WR, 15, 1))
    await run("c1", b"a", inodelk(stack, g, SETLK, WR, 20, 80))  # the gap [20, 100)
    granted = dump(stack, g)["inodelk"][DOM]["granted"]
    assert sorted((x["start"], x["length"]) for x in granted) == [(0, 10), (10, 10), (20, 80), (100, 0)]


async def test_same_owner_relock_and_upgrade(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"a", inodelk(stack, g, SETLK, RD, 0, 10))
    await run("c1", b"a", inodelk(stack, g, SETLK, WR, 0, 10))  # upgrade: no conflict with itself
    await run("c1", b"a", inodelk(stack, g, SETLK, WR, 0, 10))  # and again
    await expect_errno(errno.EAGAIN, "c2", b"b", inodelk(stack, g, SETLK, RD, 5, 1))
    for _ in range(2):  # each unlock drops the owner's latest lock on that range
        await run("c1", b"a", inodelk(stack, g, SETLK, UN, 0, 10))
    await run("c2", b"b", inodelk(stack, g, SETLK, RD, 5, 1))  # the first read lock is left
    await expect_errno(errno.EAGAIN, "c2", b"b", inodelk(stack, g, SETLK, WR, 5, 1))
    await run("c1", b"a", inodelk(stack, g, SETLK, UN, 0, 10))
    await run("c2", b"b", inodelk(stack, g, SETLK, WR, 5, 1))
    # unlocking what one does not hold is refused
    await expect_errno(errno.EINVAL, "c1", b"a", inodelk(stack, g, SETLK, UN, 0, 10))


async def test_domains_are_independent(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"a", inodelk(stack, g, SETLK, WR, domain="d1"))
    await run("c2", b"b", inodelk(stack, g, SETLK, WR, domain="d2"))
    await expect_errno(errno.EAGAIN, "c2", b"b", inodelk(stack, g, SETLK, WR, domain="d1"))
    assert set(dump(stack, g)["inodelk"]) == {"d1", "d2"}


async def test_blocking_waiters_proceed_in_fifo_order(stack: LocksTranslator) -> None:
    g = Gfid.random()
    order: list[str] = []

    async def take(tag: str, type_: int) -> None:
        await inodelk(stack, g, SETLKW, type_)
        order.append(tag)

    await run("c0", b"holder", inodelk(stack, g, SETLK, WR))
    tasks = [
        as_owner(f"c{i}", tag.encode(), take(tag, t))
        for i, (tag, t) in enumerate([("w1", WR), ("r2", RD), ("r3", RD), ("w4", WR)], 1)
    ]
    await settle()
    assert order == [] and len(dump(stack, g)["inodelk"][DOM]["blocked"]) == 4
    await run("c0", b"holder", inodelk(stack, g, SETLK, UN))
    await settle()
    assert order == ["w1"]
    await run("c1", b"w1", inodelk(stack, g, SETLK, UN))
    await settle()
    assert order == ["w1", "r2", "r3"]  # both readers together, the writer behind them waits
    await run("c2", b"r2", inodelk(stack, g, SETLK, UN))
    await settle()
    assert order == ["w1", "r2", "r3"]
    await run("c3", b"r3", inodelk(stack, g, SETLK, UN))
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    assert order == ["w1", "r2", "r3", "w4"]


async def test_readers_do_not_starve_a_waiting_writer(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"r1", inodelk(stack, g, SETLK, RD))
    writer = as_owner("c2", b"w", inodelk(stack, g, SETLKW, WR))
    await settle()
    assert not writer.done()
    # a new reader would be compatible with the held lock, but it queues behind the writer
    await expect_errno(errno.EAGAIN, "c3", b"r3", inodelk(stack, g, SETLK, RD))
    reader = as_owner("c3", b"r3", inodelk(stack, g, SETLKW, RD))
    await settle()
    assert not reader.done()
    # ... except for an owner that already holds a lock there (nested locks must not deadlock)
    await run("c1", b"r1", inodelk(stack, g, SETLK, RD, 0, 4096))
    await run("c1", b"r1", inodelk(stack, g, SETLK, UN, 0, 4096))
    await run("c1", b"r1", inodelk(stack, g, SETLK, UN))
    await asyncio.wait_for(writer, WAIT)
    await settle()
    assert not reader.done()
    await run("c2", b"w", inodelk(stack, g, SETLK, UN))
    await asyncio.wait_for(reader, WAIT)


async def test_cancelled_waiter_leaves_the_queue(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"a", inodelk(stack, g, SETLK, WR, 0, 10))
    big = as_owner("c2", b"b", inodelk(stack, g, SETLKW, WR, 0, 100))
    await settle()
    small = as_owner("c3", b"c", inodelk(stack, g, SETLKW, WR, 50, 10))  # blocked only by `big` (FIFO)
    await settle()
    assert not small.done() and len(dump(stack, g)["inodelk"][DOM]["blocked"]) == 2
    big.cancel()
    await asyncio.wait_for(small, WAIT)  # nothing blocks it any more
    with pytest.raises(asyncio.CancelledError):
        await big
    state = dump(stack, g)["inodelk"][DOM]
    assert state["blocked"] == [] and [x["client"] for x in state["granted"]] == ["c1", "c3"]


async def test_cancel_racing_a_grant_gives_the_lock_back(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await run("c1", b"a", inodelk(stack, g, SETLK, WR))
    waiter = as_owner("c2", b"b", inodelk(stack, g, SETLKW, WR))
    await settle()
    stack.notify(Event.CLIENT_DISCONNECT, None, "c1")  # grants `waiter` without a loop turn ...
    assert [x["client"] for x in dump(stack, g)["inodelk"][DOM]["granted"]] == ["c2"]
    waiter.cancel()  # ... and its client goes away too, before the waiter could run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await run("c3", b"c", inodelk(stack, g, SETLK, WR))
    assert [x["client"] for x in dump(stack, g)["inodelk"][DOM]["granted"]] == ["c3"]


async def test_client_disconnect_releases_and_wakes(stack: LocksTranslator) -> None:
    g = Gfid.random()
    d = Gfid.random()
    await run("dead", b"a", inodelk(stack, g, SETLK, WR))
    await run("dead", b"a", stack.entrylk(DOM, Loc("<d>", gfid=d), "x", EntrylkCmd.LOCK, WR))
    waiter = as_owner("alive", b"b", inodelk(stack, g, SETLKW, WR))
    entry_waiter = as_owner("alive", b"b", stack.entrylk(DOM, Loc("<d>", gfid=d), None, EntrylkCmd.LOCK, WR))
    dead_waiter = as_owner("dead", b"z", inodelk(stack, g, SETLKW, RD, 5, 5))
    await settle()
    assert not (waiter.done() or entry_waiter.done() or dead_waiter.done())
    stack.notify(Event.CLIENT_DISCONNECT, None, "dead")
    await asyncio.wait_for(asyncio.gather(waiter, entry_waiter), WAIT)
    with pytest.raises(FopError) as exc:
        await asyncio.wait_for(dead_waiter, WAIT)
    assert exc.value.errno == errno.ENOTCONN
    assert {x["client"] for x in dump(stack, g)["inodelk"][DOM]["granted"]} == {"alive"}
    recorder = stack.children[0]
    assert isinstance(recorder, Recorder) and (Event.CLIENT_DISCONNECT, "dead") in recorder.events


async def test_lock_by_name_resolves_through_the_child(stack: LocksTranslator) -> None:
    gfid, fd = await new_file(stack, "img")
    by_name = Loc("/img", pargfid=ROOT_GFID, name="img")
    await run("c1", b"a", stack.inodelk(DOM, by_name, SETLK, Flock(WR)))
    await expect_errno(errno.EAGAIN, "c2", b"b", stack.finodelk(DOM, fd, SETLK, Flock(RD)))
    raw = (await stack.getxattr(Loc("/img", gfid=gfid), DUMP_KEY)).xattrs[DUMP_KEY]
    assert json.loads(raw)["inodelk"][DOM]["granted"][0]["owner"] == b"a".hex()
    missing = Loc("/nope", pargfid=ROOT_GFID, name="nope")
    await expect_errno(errno.ENOENT, "c1", b"a", stack.inodelk(DOM, missing, SETLK, Flock(WR)))
    await stack.release(fd)


async def test_bad_requests(stack: LocksTranslator) -> None:
    g = Gfid.random()
    await expect_errno(errno.EINVAL, "c", b"o", inodelk(stack, g, GETLK, WR))
    await expect_errno(errno.EINVAL, "c", b"o", inodelk(stack, g, SETLK, 7))
    await expect_errno(errno.EINVAL, "c", b"o", inodelk(stack, g, SETLK, WR, -5, 2))
    await expect_errno(errno.EINVAL, "c", b"o", stack.entrylk(DOM, Loc("<d>", gfid=g), "x", 9, WR))
    assert g not in stack._inodes  # nothing left behind by refused calls


# ---- entrylk --------------------------------------------------------------------------------


async def test_entrylk_names_and_whole_directory(stack: LocksTranslator) -> None:
    dgfid = Gfid.random()
    d = Loc("<dir>", gfid=dgfid)

    def ent(name: str | None, cmd: int, type_: int = WR) -> Any:
        return stack.entrylk(DOM, d, name, cmd, type_)

    await run("c1", b"a", ent("x", EntrylkCmd.LOCK_NB))
    await run("c2", b"b", ent("y", EntrylkCmd.LOCK_NB))  # another name: independent
    await expect_errno(errno.EAGAIN, "c2", b"b", ent("x", EntrylkCmd.LOCK_NB, RD))
    await expect_errno(errno.EAGAIN, "c3", b"c", ent(None, EntrylkCmd.LOCK_NB, RD))
    await run("c1", b"a", ent("z", EntrylkCmd.LOCK_NB, RD))
    await run("c2", b"b", ent("z", EntrylkCmd.LOCK_NB, RD))  # readers share a name
    whole = as_owner("c3", b"c", ent(None, EntrylkCmd.LOCK))
    await settle()
    assert not whole.done()
    await expect_errno(errno.EAGAIN, "c4", b"d", ent("w", EntrylkCmd.LOCK_NB))  # queued behind `whole`
    for client, owner, name in (("c1", b"a", "x"), ("c2", b"b", "y"), ("c1", b"a", "z"), ("c2", b"b", "z")):
        await run(client, owner, ent(name, EntrylkCmd.UNLOCK))
    await asyncio.wait_for(whole, WAIT)
    await expect_errno(errno.EAGAIN, "c1", b"a", ent("q", EntrylkCmd.LOCK_NB, RD))
    await expect_errno(errno.EINVAL, "c1", b"a", ent("q", EntrylkCmd.UNLOCK))
    await run("c3", b"c", stack.fentrylk(DOM, Fd(dgfid, is_dir=True), None, EntrylkCmd.UNLOCK, WR))
    assert dgfid not in stack._inodes  # an inode without locks costs nothing


async def test_entrylk_by_name_on_a_real_directory(stack: LocksTranslator) -> None:
    reply = await stack.mkdir(
        Loc("/d", pargfid=ROOT_GFID, name="d"), 0o755, 0o022, {"gfid-req": Gfid.random()}
    )
    by_name = Loc("/d", pargfid=ROOT_GFID, name="d")
    await run("c1", b"a", stack.entrylk(DOM, by_name, "child", EntrylkCmd.LOCK, WR))
    by_gfid = Loc("/d", gfid=reply.iatt.gfid)
    await expect_errno(errno.EAGAIN, "c2", b"b", stack.entrylk(DOM, by_gfid, None, EntrylkCmd.LOCK_NB, RD))
    entry = dump(stack, reply.iatt.gfid)["entrylk"][DOM]["granted"]
    assert [(x["basename"], x["type"]) for x in entry] == [("child", "WRLCK")]
    await run("c1", b"a", stack.entrylk(DOM, by_gfid, "child", EntrylkCmd.UNLOCK, WR))


# ---- POSIX locks ----------------------------------------------------------------------------


def held(locks: LocksTranslator, gfid: Gfid) -> list[tuple[str, str, int, int]]:
    return [(x["owner"], x["type"], x["start"], x["length"]) for x in dump(locks, gfid)["posix"]["granted"]]


async def test_posix_split_merge_and_getlk(stack: LocksTranslator) -> None:
    gfid, fd = await new_file(stack, "f")
    a = b"A".hex()
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(WR, 0, 100)))
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(UN, 40, 20)))
    assert held(stack, gfid) == [(a, "WRLCK", 0, 40), (a, "WRLCK", 60, 40)]
    got = (await run("c2", b"B", stack.lk(fd, GETLK, Flock(RD, 30, 50)))).flock
    assert (got.type, got.start, got.length, got.owner) == (WR, 0, 40, b"A")
    got = (await run("c2", b"B", stack.lk(fd, GETLK, Flock(WR, 40, 20)))).flock
    assert got.type == UN
    got = (await run("c1", b"A", stack.lk(fd, GETLK, Flock(WR, 0, 0)))).flock
    assert got.type == UN  # one's own locks never conflict
    await run("c2", b"B", stack.lk(fd, SETLK, Flock(WR, 45, 10)))
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(WR, 40, 5)))  # fills [40,45): merges with [0,40)
    assert held(stack, gfid) == [(a, "WRLCK", 0, 45), (b"B".hex(), "WRLCK", 45, 10), (a, "WRLCK", 60, 40)]
    await expect_errno(errno.EAGAIN, "c1", b"A", stack.lk(fd, SETLK, Flock(RD, 50, 1)))
    # a read lock in the middle of a write lock splits it into three
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(RD, 10, 10)))
    assert held(stack, gfid)[:3] == [(a, "WRLCK", 0, 10), (a, "RDLCK", 10, 10), (a, "WRLCK", 20, 25)]
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(UN, 0, 0)))
    await run("c2", b"B", stack.lk(fd, SETLK, Flock(UN, 0, 0)))
    assert held(stack, gfid) == []
    await stack.release(fd)


async def test_posix_waiter_wakes_on_downgrade_and_release(stack: LocksTranslator) -> None:
    gfid, fd = await new_file(stack, "f")
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(WR, 0, 0)))
    reader = as_owner("c2", b"B", stack.lk(fd, SETLKW, Flock(RD, 20, 10)))
    writer = as_owner("c3", b"C", stack.lk(fd, SETLKW, Flock(WR, 500, 10)))
    await settle()
    assert not (reader.done() or writer.done())
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(RD, 0, 100)))  # downgrade the head: the reader fits
    await asyncio.wait_for(reader, WAIT)
    await settle()
    assert not writer.done()
    await stack.release(fd)  # closing the file drops A's locks (and B's: B used this fd too)
    await asyncio.wait_for(writer, WAIT)
    assert [x[0] for x in held(stack, gfid)] == [b"C".hex()]


async def test_posix_waiter_cancelled_as_it_is_granted(stack: LocksTranslator) -> None:
    gfid, fd = await new_file(stack, "f")
    await run("c1", b"A", stack.lk(fd, SETLK, Flock(RD, 0, 10)))
    await run("c2", b"B", stack.lk(fd, SETLK, Flock(RD, 0, 100)))
    waiter = as_owner("c2", b"B", stack.lk(fd, SETLKW, Flock(WR, 0, 10)))  # an upgrade, blocked by A
    await settle()
    stack.notify(Event.CLIENT_DISCONNECT, None, "c1")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # the withdrawn range is unlocked (B's client is going away); the rest of B's read lock stays
    assert held(stack, gfid) == [(b"B".hex(), "RDLCK", 10, 90)]
    await stack.release(fd)
    assert held(stack, gfid) == []


class _Model:
    """Reference semantics for one owner's POSIX locks over a small file: one slot per byte."""

    def __init__(self, size: int) -> None:
        self.slots: list[int | None] = [None] * size

    def apply(self, type_: int, start: int, end: int) -> None:
        for i in range(start, end):
            self.slots[i] = None if type_ == UN else type_


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([RD, WR, UN]), st.integers(0, 63), st.integers(1, 32)), max_size=25)
)
def test_posix_apply_matches_a_byte_model(ops: list[tuple[int, int, int]]) -> None:
    owner = ("c", b"o")
    queue = PosixQueue()
    model = _Model(96)
    for type_, start, length in ops:
        queue.apply(RangeLock(owner, type_, start, start + length))
        model.apply(type_, start, start + length)
    seen: list[int | None] = [None] * 96
    for a, b in zip(queue.granted, queue.granted[1:], strict=False):
        assert a.end <= b.start  # disjoint and sorted
        assert not (a.end == b.start and a.type == b.type)  # touching locks of one type are merged
    for lock in queue.granted:
        assert lock.end < OFFSET_INF
        for i in range(lock.start, lock.end):
            seen[i] = lock.type
    assert seen == model.slots


def test_registered() -> None:
    assert translator_class("features/locks") is LocksTranslator
