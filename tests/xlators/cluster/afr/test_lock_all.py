"""AFR's lock on every replica: one round trip of non-blocking requests when nobody else holds the
lock; when a brick is busy, everything taken is given back and the lock is taken brick by brick in
ascending order, blocking (two clients never deadlock). Every wait is bounded."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import Flock, LockCmd
from mortar.core.gfid import Gfid
from tests.waiting import until

from .conftest import Client, Cluster, MakeCluster, add_client, write_file


def holders(cl: Cluster, gfid: Gfid, brick: int, state: str = "granted") -> list[Any]:
    dump = cl.bricks[brick].locks.dump(gfid)
    queue: dict[str, list[Any]] = dump["inodelk"].get(cl.afr.domain, {"granted": [], "blocked": []})
    return queue[state]


def record_commands(client: Client) -> list[int]:
    """Note the command of every inodelk the client's replicate sends (the calls still go through)."""
    seen: list[int] = []
    for gen in client.gens:
        real = gen.inodelk

        async def spy(
            domain: str, loc: Any, cmd: int, flock: Flock, xdata: Any = None, _real: Any = real
        ) -> Any:
            seen.append(cmd)
            return await _real(domain, loc, cmd, flock, xdata)

        gen.inodelk = spy  # type: ignore[method-assign]
    return seen


async def hold_on(other: Client, who: CallContext, gfid: Gfid, brick: int) -> None:
    """Another client holds the file's lock on one brick only."""
    with other.acting():
        assert await other.afr.inodelk_all([brick], other.afr.domain, gfid, 0, 0, who) == [brick]


async def test_an_uncontended_lock_is_one_round_of_non_blocking_requests(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    gfid = await write_file(cl.afr, "f", b"x")
    me = CallContext(client="client-a", lk_owner=b"me000000", pid=os.getpid())
    seen = record_commands(cl.clients[0])
    assert await cl.afr.inodelk_all(range(3), cl.afr.domain, gfid, 0, 0, me) == [0, 1, 2]
    assert seen == [LockCmd.SETLK] * 3
    assert all(len(holders(cl, gfid, i)) == 1 for i in range(3))
    await cl.afr.inodelk_release(range(3), cl.afr.domain, gfid, 0, 0, me)
    assert not any(holders(cl, gfid, i) for i in range(3))


async def test_a_busy_brick_turns_the_lock_into_an_ordered_blocking_one(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    gfid = await write_file(cl.afr, "f", b"x")
    other = await add_client(cl, "client-b")
    them = CallContext(client="client-b", lk_owner=b"them0000", pid=os.getpid())
    await hold_on(other, them, gfid, 1)
    me = CallContext(client="client-a", lk_owner=b"me000000", pid=os.getpid())
    taking = asyncio.ensure_future(cl.afr.inodelk_all(range(3), cl.afr.domain, gfid, 0, 0, me))
    # brick 0 taken in order, brick 1 waited for, brick 2 not held while waiting (given back)
    await until(lambda: holders(cl, gfid, 1, "blocked"), "a blocked request on the busy brick")
    assert len(holders(cl, gfid, 0)) == 1
    assert not holders(cl, gfid, 2)
    assert not taking.done()
    with other.acting():
        await other.afr.inodelk_release([1], other.afr.domain, gfid, 0, 0, them)
    assert await asyncio.wait_for(taking, 20) == [0, 1, 2]
    await cl.afr.inodelk_release(range(3), cl.afr.domain, gfid, 0, 0, me)
    assert not any(holders(cl, gfid, i) for i in range(3))


async def test_non_blocking_on_a_busy_brick_fails_and_keeps_nothing(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    gfid = await write_file(cl.afr, "f", b"x")
    other = await add_client(cl, "client-b")
    them = CallContext(client="client-b", lk_owner=b"them0000", pid=os.getpid())
    await hold_on(other, them, gfid, 2)
    me = CallContext(client="client-a", lk_owner=b"me000000", pid=os.getpid())
    with pytest.raises(FopError) as err:
        await cl.afr.inodelk_all(range(3), cl.afr.domain, gfid, 0, 0, me, blocking=False)
    assert err.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    assert not holders(cl, gfid, 0) and not holders(cl, gfid, 1)
    assert len(holders(cl, gfid, 2)) == 1  # theirs


async def test_a_cancelled_attempt_gives_back_what_it_took(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    gfid = await write_file(cl.afr, "f", b"x")
    me = CallContext(client="client-a", lk_owner=b"me000000", pid=os.getpid())
    taking = asyncio.ensure_future(cl.afr.inodelk_all(range(3), cl.afr.domain, gfid, 0, 0, me))
    await asyncio.sleep(0)  # the requests are out
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    await until(lambda: not any(holders(cl, gfid, i) for i in range(3)), "every lock given back")
