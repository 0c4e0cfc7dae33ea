"""One real etcd member: its life cycle, lease expiry when a lock holder dies, SQLite -> etcd migration."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mortar.mgmt.etcd import EtcdMember, EtcdStore
from mortar.mgmt.store import LOCK_PREFIX, SqliteStore, StoreCompacted, StoreError, StoreUnavailable, copy_all

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _member(base: Path, name: str = "solo") -> EtcdMember:
    return EtcdMember(
        name, base / name, f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    )


@pytest.fixture
async def member(tmp_path: Path) -> AsyncIterator[EtcdMember]:
    m = _member(tmp_path)
    try:
        await m.start_new_cluster(timeout=30)
        yield m
    finally:
        await m.stop()


async def test_life_cycle_keeps_data_across_restart(member: EtcdMember) -> None:
    assert member.running and member.initialized and member.member_id
    assert await member.healthy()
    async with await EtcdStore.open([member.client_url]) as store:
        await store.put("/peers/x", b"1")
        [info] = await store.member_list()
        assert info.id == member.member_id and info.name == "solo"
        assert info.client_urls == (member.client_url,) and info.peer_urls == (member.peer_url,)
    await member.stop()
    assert not member.running and not await member.healthy()
    assert "solo" in member.log_path.read_text()
    await member.start_new_cluster(timeout=30)  # an existing data dir is restarted, not re-bootstrapped
    async with await EtcdStore.open([member.client_url]) as store:
        assert await store.get("/peers/x") == b"1"


async def test_member_that_cannot_start_reports_why(member: EtcdMember, tmp_path: Path) -> None:
    clash = EtcdMember("clash", tmp_path / "clash", member.client_url, f"http://127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(StoreError, match=r"exited|another etcd answers"):
            await clash.start_new_cluster(timeout=20)
        assert not clash.running
        with pytest.raises(StoreError, match="no etcd member"):
            await EtcdMember("x", tmp_path / "empty", "http://127.0.0.1:1", "http://127.0.0.1:2").start()
    finally:
        await clash.stop()


async def test_unreachable_cluster_is_unavailable_within_the_bound() -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    async with asyncio.timeout(20):
        with pytest.raises(StoreUnavailable):
            await EtcdStore.open([dead], timeout=1.0)
        store = EtcdStore([dead], timeout=1.0)
        try:
            with pytest.raises(StoreUnavailable):
                await store.put("/x", b"")
            with pytest.raises(StoreUnavailable):
                async with store.watch("/"):
                    pass
        finally:
            await store.close()


_HOLDER = """
import asyncio, sys
from mortar.mgmt.etcd import EtcdStore

async def main() -> None:
    store = await EtcdStore.open([sys.argv[1]])
    async with store.lock("pool", ttl=2):
        print("held", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_lock_of_a_killed_holder_expires_with_its_lease(member: EtcdMember) -> None:
    argv = [sys.executable, "-c", _HOLDER, member.client_url]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 30)
            assert line.strip() == b"held"
            async with await EtcdStore.open([member.client_url]) as store:
                with pytest.raises(TimeoutError):
                    async with store.lock("pool", timeout=0.5):
                        pytest.fail("the holder is alive")
                holder.kill()
                holder.wait(10)
                async with store.lock("pool", ttl=2, timeout=20) as held:
                    assert list(await store.get_prefix(LOCK_PREFIX)) == [held.key]
                    assert not held.lost.is_set()
                assert await store.get_prefix(LOCK_PREFIX) == {}
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)


async def test_watch_of_compacted_history_is_told(member: EtcdMember) -> None:
    async with await EtcdStore.open([member.client_url]) as store:
        for i in range(5):
            await store.put("/c/k", b"%d" % i)
        rev = await store.revision()
        async with aiohttp.ClientSession() as http:
            await http.post(f"{member.client_url}/v3/kv/compaction", json={"revision": rev, "physical": True})
        with pytest.raises(StoreCompacted) as info:
            async with store.watch("/c/", after=1) as watch, asyncio.timeout(10):
                await anext(watch)
        assert info.value.compact_revision == rev


async def test_migration_from_sqlite_preserves_every_key(member: EtcdMember, tmp_path: Path) -> None:
    sqlite = await SqliteStore.open(tmp_path / "pool.db")
    try:
        expected: dict[str, bytes] = {}
        for i in range(300):  # more than one etcd txn's worth of operations
            key = f"/volumes/v{i % 30}/bricks/{i}" if i % 3 else f"/peers/p{i}"
            expected[key] = bytes([i % 256]) * (i % 50)
            await sqlite.put(key, expected[key])
        expected["/options/ünïcode"] = "välue".encode()
        await sqlite.put("/options/ünïcode", expected["/options/ünïcode"])
        async with await EtcdStore.open([member.client_url]) as etcd:
            async with sqlite.lock("migration"):  # the lock itself is not migrated
                assert await copy_all(sqlite, etcd) == len(expected)
            assert await etcd.get_prefix("") == dict(sorted(expected.items(), key=lambda kv: kv[0].encode()))
            kv = await etcd.get_with_revision("/peers/p0")
            assert kv is not None and kv.value == b""
    finally:
        await sqlite.close()
