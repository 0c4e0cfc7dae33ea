"""What only the SQLite store has: a file that outlives the daemon, one daemon per file, bounded history."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from mortar.mgmt.store import (
    LOCK_PREFIX,
    Compare,
    Put,
    SqliteStore,
    StoreCompacted,
    StoreError,
    copy_all,
)

pytestmark = pytest.mark.timeout(60)


async def test_state_and_history_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    store = await SqliteStore.open(path)
    await store.put("/peers/a", b"uuid-a")
    await store.put("/volumes/v/info", b"{}")
    mid = await store.revision()
    await store.txn([Compare.absent("/volumes/w/info")], [Put("/volumes/w/info", b"{}")])
    kv = await store.get_with_revision("/volumes/w/info")
    rev = await store.revision()
    await store.close()

    store = await SqliteStore.open(path)
    try:
        assert await store.revision() == rev
        assert await store.get_with_revision("/volumes/w/info") == kv
        assert await store.get_prefix("/") == {
            "/peers/a": b"uuid-a",
            "/volumes/v/info": b"{}",
            "/volumes/w/info": b"{}",
        }
        async with store.watch("/volumes/", after=mid) as watch, asyncio.timeout(5):
            event = await anext(watch)
        assert (event.key, event.revision) == ("/volumes/w/info", rev)
        await store.put("/peers/b", b"uuid-b")
        assert await store.revision() == rev + 1
    finally:
        await store.close()


async def test_one_daemon_per_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    first = await SqliteStore.open(path)
    try:
        with pytest.raises(StoreError, match="open by another daemon"):
            await SqliteStore.open(path)
    finally:
        await first.close()
    second = await SqliteStore.open(path)
    await second.close()


async def test_closed_store_refuses_and_ends_watches(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "pool.db")
    watch = store.watch("/")
    await watch.start()
    waiter = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        async with asyncio.timeout(5):
            await waiter
    with pytest.raises(StoreError):
        await store.get("/x")
    await store.close()  # idempotent


async def test_history_is_bounded_and_old_watches_are_told(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "pool.db", history=20)
    try:
        for i in range(110):
            await store.put(f"/k/{i % 7}", b"%d" % i)
        rev = await store.revision()
        with pytest.raises(StoreCompacted) as info:
            async with store.watch("/k/", after=1):
                pass
        assert 1 < info.value.compact_revision <= rev - 20
        async with store.watch("/k/", after=rev - 5) as watch, asyncio.timeout(5):
            events = [await anext(watch) for _ in range(5)]
        assert [e.revision for e in events] == list(range(rev - 4, rev + 1))
    finally:
        await store.close()


_HOLDER = """
import asyncio, sys
from mortar.mgmt.store import SqliteStore

async def main() -> None:
    store = await SqliteStore.open(sys.argv[1])
    async with store.lock("pool", ttl=5):
        print("held", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_lock_of_a_dead_daemon_is_released_on_open(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    with subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 30)
            assert line.strip() == b"held"
        finally:
            holder.kill()  # the daemon dies without closing its store
            holder.wait(10)
    store = await SqliteStore.open(path)
    try:
        assert await store.get_prefix(LOCK_PREFIX) == {}
        async with store.lock("pool", ttl=5, timeout=5) as held:
            assert list(await store.get_prefix(LOCK_PREFIX)) == [held.key]
    finally:
        await store.close()


async def test_cancelled_lock_waiter_does_not_wedge_the_lock(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "pool.db")
    try:
        async with store.lock("v"):
            waiter = asyncio.ensure_future(store.lock("v").__aenter__())
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with store.lock("v", timeout=5):
            pass
    finally:
        await store.close()


async def test_copy_all_between_sqlite_files_skips_locks(tmp_path: Path) -> None:
    src = await SqliteStore.open(tmp_path / "a.db")
    dst = await SqliteStore.open(tmp_path / "b.db")
    try:
        for i in range(250):
            await src.put(f"/volumes/v{i:03d}/info", b"%d" % i)
        await src.put("/volfiles/big", b"x" * (1 << 20))
        rev = await dst.revision()
        async with src.lock("busy"):
            assert await copy_all(src, dst) == 251
        assert await dst.get_prefix("") == await src.get_prefix("")
        assert await dst.get_prefix(LOCK_PREFIX) == {}
        assert await dst.revision() == rev + 4, "the 1 MiB value alone, then 100 + 100 + 50"
    finally:
        await src.close()
        await dst.close()


async def test_watch_after_a_future_revision_skips_until_then(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "pool.db")
    try:
        future = await store.revision() + 2
        async with store.watch("/f/", after=future) as watch:
            for i in range(4):
                await store.put("/f/k", b"%d" % i)
            async with asyncio.timeout(5):
                event = await anext(watch)
        assert event.revision == future + 1 and event.value == b"2"
    finally:
        await store.close()
