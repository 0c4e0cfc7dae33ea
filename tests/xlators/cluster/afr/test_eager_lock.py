"""The eager lock is one per inode and client, shared by every fd of the inode: closing one fd while
others write, cancelled writers and shutdown must never leave it held by an owner nobody remembers
(the next lock would then wait forever behind it). Every wait is bounded, so a regression fails
instead of hanging."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import Fd
from mortar.core.gfid import Gfid
from tests.waiting import until

from .conftest import Client, Cluster, MakeCluster, add_client, create, open_file

BLOCK = 4096
#: bound on every wait in these tests: far above what the work needs, far below a test timeout
BOUND = 20.0


def inodelks(cl: Cluster, gfid: Gfid, brick: int) -> dict[str, Any]:
    """The brick's data-domain inodelk queue of `gfid` (granted and blocked)."""
    dump = cl.bricks[brick].locks.dump(gfid)
    queue: dict[str, Any] = dump["inodelk"].get(cl.afr.domain, {"granted": [], "blocked": []})
    return queue


async def hold_file_lock(cl: Cluster, gfid: Gfid) -> tuple[Client, CallContext]:
    """Another client takes the file's full data lock on every brick."""
    other = await add_client(cl, "client-b")
    who = CallContext(client="client-b", lk_owner=b"holder00", pid=os.getpid())
    with other.acting():
        assert await other.afr.inodelk_all(range(3), other.afr.domain, gfid, 0, 0, who) == [0, 1, 2]
    return other, who


async def drop_file_lock(other: Client, who: CallContext, gfid: Gfid) -> None:
    with other.acting():
        await other.afr.inodelk_release(range(3), other.afr.domain, gfid, 0, 0, who)


async def no_locks_left(cl: Cluster, gfid: Gfid) -> None:
    def free() -> bool:
        return all(not any(inodelks(cl, gfid, i).values()) for i in range(3))

    await until(free, "every lock given back")


async def test_closing_one_fd_while_the_shared_lock_is_being_taken(make_cluster: MakeCluster) -> None:
    """The reported hang: writes from two fds wait for the inode's eager lock (another client
    holds the file), a third fd of the same file closes meanwhile. The close must not give back
    the lock before it is held (that unlocked nothing and forgot the owner that then got it)."""
    cl = await make_cluster(3, post_op_delay="5")
    fds = [await create(cl.afr, "f")] + [await open_file(cl.afr, "f") for _ in range(2)]
    gfid = fds[0].gfid
    other, who = await hold_file_lock(cl, gfid)

    writes = [
        asyncio.ensure_future(cl.afr.writev(fd, bytes([n]) * BLOCK, n * BLOCK, 0))
        for n, fd in enumerate(fds[1:], 1)
    ]
    await until(lambda: inodelks(cl, gfid, 0)["blocked"], "client-a waiting for the brick")
    await asyncio.wait_for(cl.afr.release(fds[0]), BOUND)  # flush + release of one fd, mid-acquisition
    await drop_file_lock(other, who, gfid)
    await asyncio.wait_for(asyncio.gather(*writes), BOUND)

    # the batch goes on for the fds still open, then settles at their close
    more = [cl.afr.writev(fd, bytes([n + 10]) * BLOCK, (n + 4) * BLOCK, 0) for n, fd in enumerate(fds[1:], 1)]
    await asyncio.wait_for(asyncio.gather(*more), BOUND)
    for fd in fds[1:]:
        await asyncio.wait_for(cl.afr.release(fd), BOUND)
    expected = bytes(BLOCK) + b"".join(bytes([n]) * BLOCK for n in (1, 2)) + bytes(BLOCK * 2)
    expected += b"".join(bytes([n + 10]) * BLOCK for n in (1, 2))
    assert cl.copies("f") == [expected] * 3
    assert cl.clean("f")
    await no_locks_left(cl, gfid)


@pytest.mark.parametrize("post_op_delay", ["0.05", "5"])
async def test_fds_writing_concurrently_close_one_by_one(
    make_cluster: MakeCluster, post_op_delay: str
) -> None:
    """The NBD multi-conn pattern: four fds of one file, 16 writes in flight each, each fd closing
    when its share is written (at different times), repeated."""
    cl = await make_cluster(3, post_op_delay=post_op_delay)
    first = await create(cl.afr, "img")
    await cl.afr.ftruncate(first, 4 << 20)
    await cl.afr.release(first)
    expected = bytearray(4 << 20)

    async def writer(j: int, rounds: int, stamp: int) -> None:
        fd = await open_file(cl.afr, "img")
        base = j << 20

        async def one(i: int) -> None:
            data = bytes([stamp, j, i % 256]) * (BLOCK // 3) + bytes(BLOCK % 3)
            off = base + (i % 64) * BLOCK
            expected[off : off + BLOCK] = data
            await cl.afr.writev(fd, data, off, 0)

        for k in range(0, 16 * rounds, 16):
            await asyncio.gather(*(one(i) for i in range(k, k + 16)))
        await cl.afr.release(fd)

    for it in range(3):
        await asyncio.wait_for(asyncio.gather(*(writer(j, j + 1, it) for j in range(4))), BOUND)
        assert not cl.afr.txn.eager or all(lock.ready.is_set() for lock in cl.afr.txn.eager.values())
    copies = cl.copies("img")
    assert copies[0] == copies[1] == copies[2] == bytes(expected)
    await until(lambda: cl.clean("img"), "the last batch settled")
    await no_locks_left(cl, first.gfid)


async def test_a_cancelled_writer_leaves_no_lock_behind(make_cluster: MakeCluster) -> None:
    """A write cancelled while the eager lock is being taken (half the bricks granted) must not
    strand the part already taken: the next writer of this client would wait for it forever."""
    cl = await make_cluster(3, post_op_delay="0.05")
    fd = await create(cl.afr, "f")
    gfid = fd.gfid
    other = await add_client(cl, "client-b")
    who = CallContext(client="client-b", lk_owner=b"holder01", pid=os.getpid())
    with other.acting():  # only brick 1: client-a gets brick 0 and waits at brick 1
        assert await other.afr.inodelk_all([1], other.afr.domain, gfid, 0, 0, who) == [1]
    task = asyncio.ensure_future(cl.afr.writev(fd, b"a" * BLOCK, 0, 0))
    await until(lambda: inodelks(cl, gfid, 1)["blocked"], "client-a waiting at brick 1")
    assert inodelks(cl, gfid, 0)["granted"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with other.acting():
        await other.afr.inodelk_release([1], other.afr.domain, gfid, 0, 0, who)
    await no_locks_left(cl, gfid)  # taken in the end for nobody, then given back when idle
    await asyncio.wait_for(cl.afr.writev(fd, b"b" * BLOCK, 0, 0), BOUND)
    await asyncio.wait_for(cl.afr.release(fd), BOUND)
    assert cl.copies("f") == [b"b" * BLOCK] * 3
    assert cl.clean("f")
    await no_locks_left(cl, gfid)


async def test_shutdown_while_the_lock_is_being_taken(make_cluster: MakeCluster) -> None:
    """fini during an acquisition abandons it (the waiting writes fail with ENOTCONN) and leaves no
    lock and no waiter of this client on any brick."""
    cl = await make_cluster(3)
    fd: Fd = await create(cl.afr, "f")
    gfid = fd.gfid
    other, who = await hold_file_lock(cl, gfid)
    writes = [asyncio.ensure_future(cl.afr.writev(fd, b"x" * BLOCK, n * BLOCK, 0)) for n in range(3)]
    await until(lambda: inodelks(cl, gfid, 0)["blocked"], "client-a waiting for the brick")
    await asyncio.wait_for(cl.afr.fini(), BOUND)
    results = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), BOUND)
    assert all(isinstance(r, FopError) and r.errno == errno.ENOTCONN for r in results), results
    assert not inodelks(cl, gfid, 0)["blocked"]
    await drop_file_lock(other, who, gfid)
    await no_locks_left(cl, gfid)
