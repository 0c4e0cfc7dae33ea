"""Eager entry locks: consecutive namespace changes in one directory share one directory lock and one
dirty marking; contention, a dead client and a lost brick must leave the namespace consistent (or
marked for heal), never silently diverged. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import Loc
from mortar.core.gfid import Gfid
from mortar.core.translator import Event
from mortar.xlators.cluster.afr.changelog import DIRTY_KEY
from mortar.xlators.cluster.afr.heal import heal_index
from mortar.xlators.debug.error_gen import ErrorGenTranslator
from mortar.xlators.performance.nl_cache import NlCacheTranslator
from tests.waiting import until

from .conftest import Client, Cluster, MakeCluster, add_client, entry, mkdir, tree, write_file

BOUND = 20.0


def entrylks(cl: Cluster, gfid: Gfid, brick: int) -> dict[str, Any]:
    queue: dict[str, Any] = (
        cl.bricks[brick].locks.dump(gfid)["entrylk"].get(cl.afr.domain, {"granted": [], "blocked": []})
    )
    return queue


def same_trees(cl: Cluster) -> bool:
    trees = [tree(b.directory) for b in cl.bricks]
    return all(t == trees[0] for t in trees)


async def create_files(client: Client, parent: Gfid, names: list[str]) -> None:
    with client.acting():
        for name in names:
            await write_file(client.afr, name, name.encode(), parent)


async def test_a_create_loop_takes_the_directory_lock_once(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="0.5")
    client = cl.clients[0]
    with client.acting():
        d = await mkdir(cl.afr, "d")
    before = client.gens[0].counts["entrylk"]
    await create_files(client, d, [f"f{i}" for i in range(20)])
    assert d in cl.afr.txn.entries.batches  # the batch is open: the directory is marked dirty
    assert all(b.counters("d", DIRTY_KEY)[2] == 1 for b in cl.bricks)
    # one plain transaction (lock + unlock) then one directory lock for the other 19 creates
    assert client.gens[0].counts["entrylk"] - before == 3
    with client.acting():
        for i in range(20):
            await cl.afr.unlink(Loc(f"/d/f{i}", pargfid=d, name=f"f{i}"), 0)
    assert client.gens[0].counts["entrylk"] - before == 3
    await until(lambda: not cl.afr.txn.entries.batches, "the idle batch ended")
    assert cl.clean("d") and same_trees(cl)
    assert not any(entrylks(cl, d, i)["granted"] for i in range(3))


async def test_a_lone_change_leaves_nothing_marked(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="5")
    with cl.clients[0].acting():
        await mkdir(cl.afr, "d")
    assert not cl.afr.txn.entries.batches and cl.clean("d")


async def test_two_clients_creating_in_one_directory(make_cluster: MakeCluster) -> None:
    """Each client's batch yields to the other's waiting lock: both loops finish, every brick holds
    the same names with the same gfids, and nothing stays marked or locked."""
    cl = await make_cluster(3, post_op_delay="5")
    other = await add_client(cl, "client-b", post_op_delay="5")
    with cl.clients[0].acting():
        d = await mkdir(cl.afr, "d")
    names_a = [f"a{i}" for i in range(30)]
    names_b = [f"b{i}" for i in range(30)]
    await asyncio.wait_for(
        asyncio.gather(create_files(cl.clients[0], d, names_a), create_files(other, d, names_b)), BOUND
    )
    for c in cl.clients:
        await c.afr.txn.entries.settle(list(c.afr.txn.entries.batches))
    assert same_trees(cl) and cl.clean("d")
    assert set(os.listdir(cl.bricks[0].path("d"))) == set(names_a + names_b)
    assert not any(entrylks(cl, d, i)["granted"] or entrylks(cl, d, i)["blocked"] for i in range(3))


async def test_same_name_from_one_client_stays_one_file(make_cluster: MakeCluster) -> None:
    """Two changes of one name from one client run one after the other even inside a batch (the
    directory lock no longer keeps them apart), so the replicas agree on which gfid won."""
    cl = await make_cluster(3, post_op_delay="5")
    with cl.clients[0].acting():
        d = await mkdir(cl.afr, "d")
        await write_file(cl.afr, "warm", b"", d)
        await write_file(cl.afr, "warm2", b"", d)  # the batch is open from here on
        results = await asyncio.gather(*(mkdir(cl.afr, "same", d) for _ in range(4)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    await cl.afr.txn.entries.settle([d])
    assert same_trees(cl) and cl.clean("d")


async def test_client_killed_holding_the_batch_leaves_the_directory_marked(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="30")
    victim = cl.clients[0]
    with victim.acting():
        d = await mkdir(cl.afr, "d")
    await create_files(victim, d, ["x0", "x1", "x2"])
    assert d in victim.afr.txn.entries.batches
    # the client dies: its connections drop (the bricks release its locks), it never says goodbye
    for g in victim.gens:
        g.set_down(True)
    for b in cl.bricks:
        b.locks.release_client("client-a")
    assert all(b.counters("d", DIRTY_KEY)[2] == 1 for b in cl.bricks)  # heal will look at it
    assert all(str(d) in b.listed("dirty") or str(d) in b.listed() for b in cl.bricks)
    survivor = await add_client(cl, "client-b")
    await asyncio.wait_for(create_files(survivor, d, ["y0", "y1"]), BOUND)  # not wedged
    await survivor.afr.txn.entries.settle(list(survivor.afr.txn.entries.batches))
    with survivor.acting():
        await heal_index(survivor.afr)
    assert same_trees(cl) and cl.clean("d")
    assert set(os.listdir(cl.bricks[0].path("d"))) == {"x0", "x1", "x2", "y0", "y1"}


async def test_brick_lost_mid_batch_is_blamed_and_healed(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="30")
    client = cl.clients[0]
    with client.acting():
        d = await mkdir(cl.afr, "d")
    await create_files(client, d, ["before0", "before1"])
    cl.down(2)
    await create_files(client, d, ["during0", "during1"])
    with client.acting():
        await cl.afr.unlink(Loc("/d/before0", pargfid=d, name="before0"), 0)
    # acknowledged changes that brick 2 missed are already recorded against it on 0 and 1
    key2 = cl.afr.keys[2]
    assert all(cl.bricks[i].counters("d", key2)[2] >= 1 for i in (0, 1))
    cl.up(2)  # the batch ends so that the next one locks and marks brick 2 too
    await until(lambda: not client.afr.txn.entries.batches, "the batch ended when the brick came back")
    with client.acting():
        await heal_index(cl.afr)
        assert (await cl.afr.lookup(entry("during1", d))).iatt.gfid
    assert same_trees(cl) and cl.clean("d")
    assert set(os.listdir(cl.bricks[2].path("d"))) == {"before1", "during0", "during1"}


async def test_an_eager_entry_batch_keeps_the_knowledge_alive(make_cluster: MakeCluster) -> None:
    """Over replicate, consecutive creates in one eager entry batch prove that nobody else changed
    the directory, so the absent names stay known past the timeout while the loop runs."""
    cl = await make_cluster(3, post_op_delay="5")
    gen = ErrorGenTranslator("gen", {}, [cl.afr])
    nl = NlCacheTranslator("nl", {"timeout": "0.2"}, [gen])
    with cl.clients[0].acting():
        d = await mkdir(nl, "d")
        start = asyncio.get_running_loop().time()
        i = 0
        while asyncio.get_running_loop().time() - start < 0.5:
            with pytest.raises(FopError):
                await nl.lookup(entry(f"f{i}", d))
            await write_file(nl, f"f{i}", b"", d)
            i += 1
        assert gen.counts["lookup"] == 0
        assert set(os.listdir(cl.bricks[0].path("d"))) == {f"f{n}" for n in range(i)}
        await cl.afr.txn.entries.settle([d])


async def test_graph_going_down_ends_the_batches_before_the_children_hear_it(
    make_cluster: MakeCluster,
) -> None:
    """PARENT_DOWN makes protocol/client close its connection: the open batches must have lowered
    their dirty marks and unlocked by then, or a clean unmount would leave directories to heal."""
    cl = await make_cluster(3, post_op_delay="30")
    client = cl.clients[0]
    with client.acting():
        d = await mkdir(cl.afr, "d")
    await create_files(client, d, ["a", "b", "c"])
    assert d in cl.afr.txn.entries.batches
    heard: list[tuple[Event, bool]] = []
    forward = client.gens[0].notify

    def spy(event: Event, source: Any, data: Any = None) -> None:
        heard.append((event, bool(cl.afr.txn.entries.batches)))
        forward(event, source, data)

    client.gens[0].notify = spy  # type: ignore[method-assign]
    cl.afr.notify(Event.PARENT_DOWN, None)
    await until(lambda: heard, "the children told")
    assert heard[0] == (Event.PARENT_DOWN, False)
    assert cl.clean("d")
