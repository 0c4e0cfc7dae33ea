"""Self-heal algorithms: diff copies only changed blocks, full keeps holes, a full crawl merges what
no marker records, heal info lists what is pending, an interrupted write (dirty only) converges,
and a writer holding the eager lock gives it up to a waiting client."""

from __future__ import annotations

import asyncio
import os
import random
import shutil

from mortar.core.fops import FALLOC_FL_KEEP_SIZE, Loc
from mortar.core.gfid import ROOT_GFID
from mortar.xlators.cluster.afr.changelog import DIRTY_KEY, encode
from mortar.xlators.cluster.afr.heal import heal_full, heal_gfid, heal_index, heal_info, pending_from_index
from mortar.xlators.cluster.afr.heal_inode import BLOCK

from .conftest import Cluster, MakeCluster, add_client, mkdir, open_file, read_file, tree, write_file

MiB = 1 << 20


async def _stale_copy(cl: Cluster, name: str, changes: list[tuple[int, bytes]], down: int = 2) -> bytes:
    """Write `changes` to file `name` while child `down` is down; returns the expected content."""
    cl.down(down)
    fd = await open_file(cl.afr, name)
    for off, data in changes:
        await cl.afr.writev(fd, data, off, 0)
    await cl.afr.release(fd)
    cl.up(down)
    return await read_file(cl.afr, name)


async def test_diff_heal_copies_only_the_changed_blocks(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal_algorithm="diff", data_self_heal="off")
    base = os.urandom(2 * MiB)
    await write_file(cl.afr, "img", base)
    expected = await _stale_copy(cl, "img", [(5 * BLOCK + 10, b"x" * 100), (12 * BLOCK, b"y" * BLOCK)])
    sink_gen = cl.clients[0].gens[2]
    before = sink_gen.bytes_written
    stats = await heal_index(cl.afr)
    assert stats.healed == 1
    assert sink_gen.bytes_written - before == 2 * BLOCK  # two blocks differ, out of sixteen
    assert stats.bytes == 2 * BLOCK
    assert cl.copies("img") == [expected] * 3
    assert cl.clean("img")


async def test_full_heal_keeps_holes(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal_algorithm="full", data_self_heal="off")
    cl.down(1)
    await write_file(cl.afr, "sparse", b"")
    f = await open_file(cl.afr, "sparse")
    await cl.afr.writev(f, b"head", 0, 0)
    await cl.afr.writev(f, b"tail", 64 * MiB, 0)
    await cl.afr.release(f)
    cl.up(1)
    stats = await heal_index(cl.afr)
    assert stats.failed == 0
    sink = cl.bricks[1].path("sparse")
    assert sink.stat().st_size == 64 * MiB + 4
    assert sink.stat().st_blocks * 512 < 4 * MiB  # the hole was not written
    assert cl.clients[0].gens[1].bytes_written < MiB
    with open(sink, "rb") as fh:
        assert fh.read(4) == b"head"
        fh.seek(64 * MiB)
        assert fh.read() == b"tail"
    assert cl.clean("sparse")


async def test_auto_uses_diff_on_a_non_empty_sink_and_truncates(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal="off")
    await write_file(cl.afr, "f", os.urandom(3 * BLOCK))
    cl.down(0)
    fd = await open_file(cl.afr, "f")
    await cl.afr.ftruncate(fd, BLOCK + 7)
    await cl.afr.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, BLOCK)
    await cl.afr.release(fd)
    cl.up(0)
    before = cl.clients[0].gens[0].bytes_written
    await heal_index(cl.afr)
    assert cl.clients[0].gens[0].bytes_written == before  # the kept blocks were identical
    copies = cl.copies("f")
    assert len(copies[0]) == BLOCK + 7 and copies[0] == copies[1] == copies[2]
    assert cl.clean("f")


async def test_heal_info_lists_pending_and_index_empties(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal="off", entry_self_heal="off", metadata_self_heal="off")
    await write_file(cl.afr, "a", b"1")
    cl.down(2)
    gfid_b = await write_file(cl.afr, "b", b"2")
    fd = await open_file(cl.afr, "a")
    await cl.afr.writev(fd, b"9", 0, 0)
    await cl.afr.release(fd)
    info = await heal_info(cl.afr)
    listed = {h.gfid for h in info}
    rep = await cl.afr.lookup(Loc("/a", pargfid=ROOT_GFID, name="a"))
    assert listed == {ROOT_GFID, rep.iatt.gfid, gfid_b}  # the root: an entry was added
    assert all(h.children == [0, 1] and not h.split_brain for h in info)
    assert set(await pending_from_index(cl.afr, 0)) == listed
    cl.up(2)
    await heal_index(cl.afr)
    assert await heal_info(cl.afr) == []
    assert cl.copies("a") == [b"9"] * 3 and cl.copies("b") == [b"2"] * 3


async def test_full_crawl_restores_copies_lost_without_markers(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal="off", entry_self_heal="off", metadata_self_heal="off")
    data = os.urandom(100_000)
    await write_file(cl.afr, "victim", data)
    d = await mkdir(cl.afr, "dir")
    sub = await mkdir(cl.afr, "sub", d)
    await write_file(cl.afr, "deep", b"deep data", sub)
    # an administrator removed things on one brick behind the volume's back: nothing records it
    os.unlink(cl.bricks[2].path("victim"))
    shutil.rmtree(cl.bricks[2].path("dir"))
    await cl.afr.txn.entries.settle(list(cl.afr.txn.entries.batches))  # this client's batches end
    assert (await heal_index(cl.afr)).scanned == 0  # the index knows nothing
    assert not cl.bricks[2].path("victim").exists()
    stats = await heal_full(cl.afr)
    assert stats.failed == 0 and stats.split_brain == 0
    assert cl.copies("victim") == [data] * 3
    assert cl.copies("dir/sub/deep") == [b"deep data"] * 3
    trees = [tree(b.directory) for b in cl.bricks]
    assert trees[0] == trees[1] == trees[2]
    assert cl.clean("victim") and cl.clean("dir/sub/deep") and cl.clean("dir")


async def test_random_write_failures_on_a_replica_lose_no_acknowledged_write(
    make_cluster: MakeCluster,
) -> None:
    cl = await make_cluster(3, data_self_heal="off")
    gen = cl.clients[0].gens[1]
    gen.reconfigure(
        {"failure": "30", "random-failure": "on", "random-seed": "11", "enable": "writev,ftruncate"}
    )
    model = bytearray()
    await write_file(cl.afr, "f", b"")
    f = await open_file(cl.afr, "f")
    rng = random.Random(5)
    for i in range(60):
        off = rng.randrange(0, 200_000)
        chunk = bytes([i]) * rng.randrange(1, 20_000)
        await cl.afr.writev(f, chunk, off, 0)  # never fails: two copies always take it
        if len(model) < off:
            model.extend(bytes(off - len(model)))
        model[off : off + len(chunk)] = chunk
        if i % 20 == 19:
            cut = rng.randrange(0, len(model))
            await cl.afr.ftruncate(f, cut)
            del model[cut:]
    await cl.afr.release(f)
    assert gen.injected["writev"] > 0
    assert await read_file(cl.afr, "f") == bytes(model)
    assert cl.bricks[1].read("f") != bytes(model)
    gen.reconfigure({})
    stats = await heal_index(cl.afr)
    assert stats.failed == 0
    assert cl.copies("f") == [bytes(model)] * 3
    assert cl.clean("f")


async def test_interrupted_write_with_dirty_only_converges(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal="off")
    gfid = await write_file(cl.afr, "f", b"A" * 1000)
    # a client died between its fop and its post-op: copies differ, only `dirty` says so
    for i, b in enumerate(cl.bricks[:2]):
        p = b.path("f")
        p.write_bytes(b"B" * 1000 + (b"+" if i == 0 else b""))
        os.setxattr(p, DIRTY_KEY, encode(1, 0, 0))
    res = await heal_gfid(cl.afr, gfid)
    assert "data" in res.healed
    copies = cl.copies("f")
    assert copies[0] == copies[1] == copies[2] == b"B" * 1000 + b"+"  # the bigger dirty copy wins
    assert all(not b.pending("f") for b in cl.bricks)


async def test_eager_lock_is_given_up_when_another_client_waits(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="30")
    other = await add_client(cl, "client-b", post_op_delay="30")
    a = cl.clients[0]
    with a.acting():
        await write_file(a.afr, "hot", bytes(8192))
    b_done = asyncio.Event()
    a_writes = 0

    async def a_writer() -> None:
        nonlocal a_writes
        with a.acting():
            fd = await open_file(a.afr, "hot")
            while not b_done.is_set() and a_writes < 5000:
                await a.afr.writev(fd, b"a" * 4096, 0, 0)
                a_writes += 1
                await asyncio.sleep(0.001)
            await a.afr.release(fd)

    async def b_writer() -> None:
        await asyncio.sleep(0.05)  # let A take the lock first
        with other.acting():
            fd = await open_file(other.afr, "hot")
            await other.afr.writev(fd, b"b" * 4096, 4096, 0)
            b_done.set()
            await other.afr.release(fd)

    await asyncio.wait_for(asyncio.gather(a_writer(), b_writer()), 30)
    assert b_done.is_set() and a_writes < 5000  # B got the lock while A was still writing
    copies = cl.copies("hot")
    assert copies[0] == copies[1] == copies[2] == b"a" * 4096 + b"b" * 4096
    assert cl.clean("hot")
