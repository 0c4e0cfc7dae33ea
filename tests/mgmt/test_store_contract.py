"""The store contract, run against SQLite and a real etcd member so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mortar.mgmt.etcd import EtcdMember, EtcdStore
from mortar.mgmt.store import (
    LOCK_PREFIX,
    Compare,
    Delete,
    DeletePrefix,
    Op,
    Put,
    SqliteStore,
    Store,
    WatchEvent,
)

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def etcd_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """One etcd member for the whole module (each test wipes the keyspace); stopped even on failure."""
    base = tmp_path_factory.mktemp("etcd")
    member = EtcdMember(
        "contract",
        base / "data",
        f"http://127.0.0.1:{_free_port()}",
        f"http://127.0.0.1:{_free_port()}",
    )
    try:
        asyncio.run(member.start_new_cluster(timeout=30))
        yield member
    finally:
        asyncio.run(member.stop())


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request: pytest.FixtureRequest) -> EtcdMember | None:
    """None for SQLite; the etcd member is started only if an etcd case runs (outside any event loop)."""
    member: EtcdMember | None = request.getfixturevalue("etcd_member") if request.param == "etcd" else None
    return member


@pytest.fixture
async def store(backend: EtcdMember | None, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if backend is None:
        s = await SqliteStore.open(tmp_path / "store.db")
    else:
        s = await EtcdStore.open([backend.client_url])
        await s.delete_prefix("")
    try:
        yield s
    finally:
        await s.close()


async def _take(watch: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    async with asyncio.timeout(10):
        return [await anext(watch) for _ in range(n)]


async def test_get_put_and_revisions(store: Store) -> None:
    assert await store.get("/v/a") is None
    assert await store.get_with_revision("/v/a") is None
    before = await store.revision()
    await store.put("/v/a", b"one")
    kv = await store.get_with_revision("/v/a")
    assert kv is not None and kv.value == b"one" and kv.version == 1
    assert kv.mod_revision == kv.create_revision == await store.revision() > before
    await store.put("/v/a", b"two")
    kv2 = await store.get_with_revision("/v/a")
    assert kv2 is not None and kv2.value == b"two" and kv2.version == 2
    assert kv2.create_revision == kv.create_revision and kv2.mod_revision > kv.mod_revision
    # reads do not move the revision; empty and binary values round-trip
    assert await store.revision() == kv2.mod_revision
    await store.put("/v/empty", b"")
    await store.put("/v/bin", bytes(range(256)))
    assert await store.get("/v/empty") == b""
    assert await store.get("/v/bin") == bytes(range(256))


async def test_prefix_ranges_are_sorted_and_exact(store: Store) -> None:
    for key in ["/vol/b/info", "/vol/a/info", "/vol/a/bricks/1", "/vol0", "/vola/x", "/other/é"]:
        await store.put(key, key.encode())
    got = await store.get_prefix("/vol/")
    assert list(got) == ["/vol/a/bricks/1", "/vol/a/info", "/vol/b/info"]
    assert got["/vol/a/info"] == b"/vol/a/info"
    assert list(await store.get_prefix("/vol/a/")) == ["/vol/a/bricks/1", "/vol/a/info"]
    everything, rev = await store.snapshot("")
    assert len(everything) == 6 and list(everything) == sorted(everything, key=str.encode)
    assert rev == await store.revision()
    assert await store.get_prefix("/nothing/") == {}


async def test_delete_and_delete_prefix(store: Store) -> None:
    await store.put("/d/x", b"1")
    await store.put("/d/y/1", b"2")
    await store.put("/d/y/2", b"3")
    await store.put("/dz", b"4")
    assert await store.delete("/d/x") is True
    rev = await store.revision()
    assert await store.delete("/d/x") is False
    assert await store.revision() == rev, "deleting nothing must not create a revision"
    assert await store.delete_prefix("/d/") == 2
    assert await store.delete_prefix("/d/") == 0
    assert await store.get_prefix("") == {"/dz": b"4"}


async def test_txn_create_if_absent(store: Store) -> None:
    create = [Put("/volumes/data/info", b"v1")]
    assert await store.txn([Compare.absent("/volumes/data/info")], create) is True
    assert (
        await store.txn([Compare.absent("/volumes/data/info")], [Put("/volumes/data/info", b"v2")]) is False
    )
    assert await store.get("/volumes/data/info") == b"v1"
    assert await store.txn([Compare.exists("/volumes/data/info")], [Put("/volumes/data/x", b"")]) is True
    assert await store.txn([Compare.exists("/volumes/none")], [Put("/volumes/data/y", b"")]) is False


async def test_txn_failure_branch_and_value_compare(store: Store) -> None:
    await store.put("/k", b"a")
    ok = await store.txn([Compare.value("/k", b"zzz")], [Put("/k", b"b")], [Put("/k-failed", b"1")])
    assert ok is False
    assert await store.get("/k") == b"a" and await store.get("/k-failed") == b"1"
    assert await store.txn([Compare.value("/k", b"a")], [Put("/k", b"b")], [Put("/k-failed", b"2")])
    assert await store.get("/k") == b"b" and await store.get("/k-failed") == b"1"
    # comparing the value of an absent key fails, whatever the value
    assert await store.txn([Compare.value("/absent", b"")], [Put("/absent", b"x")]) is False
    assert await store.get("/absent") is None


async def test_txn_mod_revision_prevents_lost_updates(store: Store) -> None:
    """Two daemons read-modify-write the same volume; the second one's stale write is refused."""
    await store.put("/volumes/v/info", b"0")
    a = await store.get_with_revision("/volumes/v/info")
    b = await store.get_with_revision("/volumes/v/info")
    assert a is not None and b is not None
    assert await store.txn([Compare.mod_revision(a.key, a.mod_revision)], [Put(a.key, b"from-a")])
    assert not await store.txn([Compare.mod_revision(b.key, b.mod_revision)], [Put(b.key, b"from-b")])
    assert await store.get("/volumes/v/info") == b"from-a"
    # mod_revision 0 means "absent"
    assert await store.txn([Compare.mod_revision("/new", 0)], [Put("/new", b"1")])
    assert not await store.txn([Compare.mod_revision("/new", 0)], [Put("/new", b"2")])


async def test_txn_is_atomic_with_one_revision(store: Store) -> None:
    await store.put("/t/old/1", b"")
    await store.put("/t/old/2", b"")
    rev = await store.revision()
    ops: list[Op] = [
        Put("/t/new/1", b"a"),
        Put("/t/new/2", b"b"),
        DeletePrefix("/t/old/"),
        Delete("/t/missing"),
    ]
    assert await store.txn([], ops)
    assert await store.revision() == rev + 1
    assert await store.get_prefix("/t/") == {"/t/new/1": b"a", "/t/new/2": b"b"}
    kv1, kv2 = await store.get_with_revision("/t/new/1"), await store.get_with_revision("/t/new/2")
    assert kv1 is not None and kv2 is not None and kv1.mod_revision == kv2.mod_revision == rev + 1
    # a txn whose guards fail and has no failure ops changes nothing
    assert not await store.txn([Compare.absent("/t/new/1")], [Put("/t/x", b"")])
    assert await store.revision() == rev + 1


async def test_watch_from_now_sees_puts_and_deletes_in_order(store: Store) -> None:
    async with store.watch("/w/") as watch:
        await store.put("/w/a", b"1")
        await store.put("/elsewhere", b"ignored")
        await store.put("/w/a", b"2")
        await store.delete("/w/a")
        await store.txn([], [Put("/w/b", b"3"), Put("/w/c", b"4")])
        events = await _take(watch, 5)
    kinds = [(e.kind, e.key, e.value) for e in events]
    assert kinds == [
        ("put", "/w/a", b"1"),
        ("put", "/w/a", b"2"),
        ("delete", "/w/a", None),
        ("put", "/w/b", b"3"),
        ("put", "/w/c", b"4"),
    ]
    revs = [e.revision for e in events]
    assert revs[0] < revs[1] < revs[2] < revs[3] == revs[4] == await store.revision()


async def test_watch_catches_up_from_a_revision(store: Store) -> None:
    """A daemon that was down reads the state, then watches after that revision: nothing is missed."""
    await store.put("/vol/a", b"1")
    state, rev = await store.snapshot("/vol/")
    assert state == {"/vol/a": b"1"}
    await store.put("/vol/b", b"2")  # written while the daemon was "down"
    await store.delete("/vol/a")
    watch = store.watch("/vol/", after=rev)
    try:
        missed = await _take(watch, 2)
        await store.put("/vol/c", b"3")
        live = await _take(watch, 1)
    finally:
        await watch.aclose()
    assert [(e.kind, e.key) for e in missed] == [("put", "/vol/b"), ("delete", "/vol/a")]
    assert live[0].key == "/vol/c" and live[0].revision == await store.revision()
    with pytest.raises(StopAsyncIteration):
        await anext(watch)


async def test_two_watchers_and_replay_from_zero(store: Store) -> None:
    await store.put("/r/1", b"a")
    await store.put("/r/2", b"b")
    async with store.watch("/r/", after=0) as w1, store.watch("/r/2") as w2:
        await store.put("/r/2", b"c")
        replay = await _take(w1, 3)
        only = await _take(w2, 1)
    assert [(e.key, e.value) for e in replay] == [("/r/1", b"a"), ("/r/2", b"b"), ("/r/2", b"c")]
    assert only[0].value == b"c"


async def test_lock_excludes_between_tasks(store: Store) -> None:
    inside = 0
    peak = 0
    order: list[int] = []

    async def worker(i: int) -> None:
        nonlocal inside, peak
        async with store.lock("volume/data", ttl=5) as held:
            inside += 1
            peak = max(peak, inside)
            assert await store.get(held.key) is not None, "the lock key exists while held"
            await asyncio.sleep(0.02)
            order.append(i)
            inside -= 1

    async with asyncio.timeout(30):
        await asyncio.gather(*(worker(i) for i in range(4)))
    assert peak == 1 and sorted(order) == [0, 1, 2, 3]
    assert await store.get_prefix(LOCK_PREFIX) == {}


async def test_lock_timeout_and_fencing(store: Store) -> None:
    async with store.lock("pool", ttl=5) as held:
        assert held.key.startswith(LOCK_PREFIX + "pool/")
        with pytest.raises(TimeoutError):
            async with store.lock("pool", ttl=5, timeout=0.3):
                pytest.fail("acquired a held lock")
        async with store.lock("other", ttl=5):  # a different name does not wait
            pass
        assert await store.txn([Compare.exists(held.key)], [Put("/fenced", b"1")])
        key = held.key
    assert not await store.txn([Compare.exists(key)], [Put("/fenced", b"2")])
    assert await store.get("/fenced") == b"1"
    async with store.lock("pool", ttl=5, timeout=5):  # free again, also after the timed-out waiter
        pass


async def test_random_operations_match_a_model(store: Store) -> None:
    """Seeded random puts, deletes and txns against a dict model; the store must always agree."""
    rng = random.Random(1234)
    model: dict[str, bytes] = {}
    keys = [f"/m/{a}/{b}" for a in "xyz" for b in range(4)]
    for step in range(120):
        key = rng.choice(keys)
        roll = rng.random()
        if roll < 0.5:
            value = rng.randbytes(rng.randrange(0, 16))
            await store.put(key, value)
            model[key] = value
        elif roll < 0.7:
            assert await store.delete(key) == (model.pop(key, None) is not None)
        elif roll < 0.8:
            prefix = key.rsplit("/", 1)[0] + "/"
            gone = [k for k in model if k.startswith(prefix)]
            assert await store.delete_prefix(prefix) == len(gone)
            for k in gone:
                del model[k]
        else:
            expect = model.get(key)
            guess = expect if rng.random() < 0.5 and expect is not None else b"nope"
            value = b"step%d" % step
            ok = await store.txn([Compare.value(key, guess)], [Put(key, value)], [Delete(key)])
            assert ok == (expect is not None and expect == guess)
            if ok:
                model[key] = value
            else:
                model.pop(key, None)
        if step % 10 == 0:
            assert await store.get_prefix("/m/") == dict(sorted(model.items()))
    assert await store.get_prefix("/m/") == dict(sorted(model.items()))


async def test_keys_must_be_absolute(store: Store) -> None:
    for bad in ["relative", "", "/nul\x00"]:
        with pytest.raises(ValueError):
            await store.put(bad, b"")
    with pytest.raises(ValueError):
        await store.get_prefix("no-slash")
