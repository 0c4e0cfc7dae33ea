"""A 3-member etcd cluster on loopback, built the way mortard builds it (start one, join two).

The cluster is shared by the module; before each test, members a test killed or removed are brought
back (restarted from their data dir, or joined afresh), which exercises the repair path too.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mortar.mgmt.etcd import EtcdMember, EtcdStore
from mortar.mgmt.store import StoreUnavailable, WatchEvent

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _new_member(base: Path, name: str) -> EtcdMember:
    return EtcdMember(
        name, base / name, f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EtcdMember]]:
    base = tmp_path_factory.mktemp("cluster")
    members = [_new_member(base, f"node{i}") for i in range(3)]

    async def build() -> None:
        await members[0].start_new_cluster(timeout=30)
        await members[1].join([members[0].client_url], timeout=60)
        await members[2].join([members[0].client_url, members[1].client_url], timeout=60)

    try:
        asyncio.run(build())
        yield members
    finally:

        async def stop_all() -> None:
            for m in members:  # one at a time: a leader stopping hands over to a live member at once
                await m.stop()

        asyncio.run(stop_all())


@pytest.fixture
async def members(cluster: list[EtcdMember]) -> AsyncIterator[list[EtcdMember]]:
    """The cluster with all three members up and healthy."""
    for m in cluster:
        if not m.running and m.initialized:
            await m.start(timeout=30)
    for m in cluster:
        if not m.running:  # removed by a test: join it again with an empty data dir
            await m.join([o.client_url for o in cluster if o.running], timeout=60)
    for m in cluster:
        await m.wait_healthy(timeout=30)
    yield cluster


async def _store(members: list[EtcdMember], timeout: float = 5.0) -> EtcdStore:
    return await EtcdStore.open([m.client_url for m in members], timeout=timeout)


async def test_cluster_membership(members: list[EtcdMember]) -> None:
    async with await _store(members[:1]) as store:
        listed = await store.member_list()
        assert sorted(m.name for m in listed) == ["node0", "node1", "node2"]
        assert {m.id for m in listed} == {m.member_id for m in members}
        assert sorted(await store.sync_endpoints()) == sorted(m.client_url for m in members)


async def test_writes_through_any_member_are_visible_on_all(members: list[EtcdMember]) -> None:
    stores = [await _store([m]) for m in members]
    try:
        for i, s in enumerate(stores):
            await s.put(f"/any/{i}", b"from-%d" % i)
        expected = {f"/any/{i}": b"from-%d" % i for i in range(3)}
        revisions = set()
        for s in stores:
            assert await s.get_prefix("/any/") == expected
            revisions.add(await s.revision())
        assert len(revisions) == 1, "members agree on the store revision"
    finally:
        for s in stores:
            await s.close()


async def test_majority_serves_and_restarted_member_catches_up(members: list[EtcdMember]) -> None:
    victim = members[2]
    async with await _store([victim, *members[:2]]) as store:  # the dead member is tried first
        await store.put("/catchup/before", b"0")
        await victim.kill()
        for i in range(20):
            await store.put(f"/catchup/{i:02d}", b"%d" % i)
        await store.delete("/catchup/before")
        assert len(await store.get_prefix("/catchup/")) == 20
        latest = await store.revision()

        await victim.start(timeout=30)
        async with await _store([victim]) as only_victim:
            got = await only_victim.get_prefix("/catchup/")
            assert got == {f"/catchup/{i:02d}": b"%d" % i for i in range(20)}
            assert await only_victim.revision() >= latest


async def test_watch_resumes_on_another_member(members: list[EtcdMember]) -> None:
    store = await _store(members)
    async with store, await _store(members[1:2]) as writer, store.watch("/w/") as watch:
        await writer.put("/w/1", b"a")
        async with asyncio.timeout(10):
            first = await anext(watch)
        await members[0].kill()  # the member the watch is attached to
        await writer.put("/w/2", b"b")
        await writer.delete("/w/1")
        async with asyncio.timeout(20):
            rest: list[WatchEvent] = [await anext(watch), await anext(watch)]
    assert (first.key, first.value) == ("/w/1", b"a")
    assert [(e.kind, e.key) for e in rest] == [("put", "/w/2"), ("delete", "/w/1")]
    assert rest[0].revision > first.revision


async def test_quorum_loss_is_reported_within_the_bound(members: list[EtcdMember]) -> None:
    store = await _store(members, timeout=1.0)
    async with store, store.watch("/q/") as watch:
        await store.put("/q/x", b"1")
        await members[1].kill()
        await members[2].kill()
        async with asyncio.timeout(30):  # a generous guard: the store must not hang
            with pytest.raises(StoreUnavailable):  # the established watch ends too, once etcd drops it
                async for event in watch:
                    assert event.key == "/q/x"
            with pytest.raises(StoreUnavailable):
                await store.put("/q/x", b"2")
            with pytest.raises(StoreUnavailable):
                await store.get("/q/x")
            with pytest.raises(StoreUnavailable):
                await store.txn([], [])
            with pytest.raises(StoreUnavailable):
                async with store.watch("/q/"):
                    pass
            with pytest.raises(StoreUnavailable):
                async with store.lock("q", ttl=2):
                    pass
        await members[1].start(timeout=30)  # quorum is back with two of three
        await members[0].wait_healthy(timeout=30)
        await store.put("/q/x", b"3")
        assert await store.get("/q/x") == b"3"


async def test_lock_is_pool_wide(members: list[EtcdMember]) -> None:
    async with await _store(members[:1]) as s0, await _store(members[1:2]) as s1:
        async with s0.lock("volume/data", ttl=5):
            with pytest.raises(TimeoutError):
                async with s1.lock("volume/data", ttl=5, timeout=0.5):
                    pytest.fail("two holders across members")
        async with s1.lock("volume/data", ttl=5, timeout=10) as held:
            assert await s0.get(held.key) == b""


async def test_member_remove_then_join_again(members: list[EtcdMember]) -> None:
    leaving = members[2]
    async with await _store(members[:2]) as store:
        await store.put("/rm/kept", b"1")
        await leaving.remove(via=[m.client_url for m in members[:2]], timeout=60)
        assert not leaving.running and not leaving.initialized and leaving.member_id is None
        assert sorted(m.name for m in await store.member_list()) == ["node0", "node1"]
        await store.put("/rm/after", b"2")

        await leaving.join([m.client_url for m in members[:2]], timeout=60)  # peer probe again
        assert len(await store.member_list()) == 3
        async with await _store([leaving]) as rejoined:
            assert await rejoined.get_prefix("/rm/") == {"/rm/after": b"2", "/rm/kept": b"1"}
