"""cluster/replicate over three real bricks: writes reach every copy, a down replica is recorded and
healed from the index, quorum refuses what would diverge, reads fail over, eager locking batches."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Loc, SetAttrValid
from mortar.core.options import OptionError
from mortar.core.translator import Event, Translator
from mortar.graph.builder import from_text
from mortar.xlators.cluster.afr import ReplicateTranslator
from mortar.xlators.cluster.afr.heal import heal_index

from .conftest import (
    ROOT,
    VOLUME_ID,
    MakeCluster,
    add_client,
    create,
    entry,
    mkdir,
    open_file,
    read_file,
    tree,
    write_file,
)

PENDING_2 = "trusted.afr.vol-client-2"


async def test_write_read_stat_on_three_copies(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    data = os.urandom(300_000)
    gfid = await write_file(cl.afr, "f", data)
    assert cl.copies("f") == [data] * 3
    assert await read_file(cl.afr, "f") == data
    st = await cl.afr.stat(Loc("/f", gfid=gfid))
    assert st.iatt.size == len(data) and st.iatt.gfid == gfid
    assert cl.clean("f")
    gfids = {os.getxattr(b.path("f"), "trusted.mortar.gfid") for b in cl.bricks}
    assert gfids == {bytes(gfid)}


@pytest.mark.parametrize("eager", ["on", "off"])
async def test_write_with_a_replica_down_is_recorded_then_healed(
    make_cluster: MakeCluster, eager: str
) -> None:
    cl = await make_cluster(3, eager_lock=eager)
    old = os.urandom(200_000)
    gfid = await write_file(cl.afr, "f", old)
    cl.down(2)
    fd = await open_file(cl.afr, "f")
    new = os.urandom(50_000)
    await cl.afr.writev(fd, new, 100_000, 0)  # the application sees no error
    await cl.afr.release(fd)
    for b in cl.bricks[:2]:
        assert b.counters("f", PENDING_2)[0] >= 1
        assert gfid.canonical in b.listed()
    assert cl.bricks[2].read("f") == old
    assert not cl.bricks[2].pending("f")
    expected = old[:100_000] + new + old[150_000:]
    assert await read_file(cl.afr, "f") == expected

    cl.up(2)
    stats = await heal_index(cl.afr)
    assert stats.healed == 1 and stats.failed == 0 and stats.split_brain == 0
    assert cl.copies("f") == [expected] * 3
    assert cl.clean("f")


async def test_metadata_change_while_down_is_healed(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    gfid = await write_file(cl.afr, "f", b"x")
    await cl.afr.setxattr(Loc("/f", gfid=gfid), {"user.color": b"blue", "user.gone": b"1"}, 0)
    cl.down(1)
    await cl.afr.setattr(
        Loc("/f", gfid=gfid), AttrSet(SetAttrValid.MODE | SetAttrValid.UID, mode=0o600, uid=4242)
    )
    await cl.afr.setxattr(Loc("/f", gfid=gfid), {"user.color": b"red"}, 0)
    await cl.afr.removexattr(Loc("/f", gfid=gfid), "user.gone")
    assert cl.bricks[0].counters("f", "trusted.afr.vol-client-1")[1] >= 1
    assert stat.S_IMODE(os.stat(cl.bricks[1].path("f")).st_mode) == 0o644
    cl.up(1)
    stats = await heal_index(cl.afr)
    assert stats.healed == 1
    for b in cl.bricks:
        st = os.stat(b.path("f"))
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 4242
        assert os.getxattr(b.path("f"), "user.color") == b"red"
        assert "user.gone" not in os.listxattr(b.path("f"))
    assert cl.clean("f")


async def test_entry_changes_while_down_are_healed(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, entry_self_heal="off", data_self_heal="off", metadata_self_heal="off")
    afr = cl.afr
    await write_file(afr, "keep", b"kept")
    await write_file(afr, "doomed", b"bye")
    await write_file(afr, "moving", b"on the move")
    sub = await mkdir(afr, "olddir")
    await write_file(afr, "inside", b"in old dir", sub)
    cl.down(2)
    await write_file(afr, "new", os.urandom(70_000))
    await afr.unlink(entry("doomed"), 0)
    d = await mkdir(afr, "d")
    await write_file(afr, "nested", b"nested data", d)
    await mkdir(afr, "deeper", d)
    await afr.rename(entry("moving"), entry("moved"))
    await afr.rename(entry("olddir"), entry("newdir"))
    await afr.symlink("new", entry("link"), 0, {"gfid-req": os.urandom(16)})
    assert sorted(os.listdir(cl.bricks[2].directory)) != sorted(os.listdir(cl.bricks[0].directory))
    cl.up(2)
    stats = await heal_index(afr)
    assert stats.failed == 0 and stats.split_brain == 0
    trees = [tree(b.directory) for b in cl.bricks]
    assert trees[0] == trees[1] == trees[2]
    assert set(trees[0]) >= {"keep", "new", "d", "d/nested", "d/deeper", "moved", "newdir/inside", "link"}
    assert "doomed" not in trees[2] and "moving" not in trees[2] and "olddir" not in trees[2]
    assert all(cl.clean(rel) for rel in ("keep", "new", "d", "d/nested", "moved", "newdir"))
    assert all(not b.pending(".") for b in cl.bricks)


async def test_quorum_lost_refuses_writes_and_changes_nothing(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    data = b"precious" * 1000
    gfid = await write_file(cl.afr, "f", data)
    fd = await open_file(cl.afr, "f")
    cl.down(1)
    cl.down(2)
    with pytest.raises(FopError) as exc:
        await cl.afr.writev(fd, b"lost?", 0, 0)
    assert exc.value.errno == errno.ENOTCONN and "quorum" in exc.value.message
    with pytest.raises(FopError) as exc:
        await create(cl.afr, "nope")
    assert exc.value.errno == errno.ENOTCONN
    with pytest.raises(FopError):
        await cl.afr.setattr(Loc("/f", gfid=gfid), AttrSet(SetAttrValid.MODE, mode=0o600))
    assert cl.bricks[0].read("f") == data
    assert not cl.bricks[0].pending("f") and not cl.bricks[0].pending(".")
    assert not cl.bricks[0].path("nope").exists()
    assert stat.S_IMODE(os.stat(cl.bricks[0].path("f")).st_mode) == 0o644
    assert bytes((await cl.afr.readv(fd, 100, 0, 0)).data) == data[:100]  # reads still work
    await cl.afr.release(fd)


async def test_reads_fail_over_to_the_next_copy(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, read_hash_mode="0")
    gfid = await write_file(cl.afr, "f", b"abc" * 100)
    fd = await open_file(cl.afr, "f", os.O_RDONLY)
    before = cl.clients[0].gens[0].counts["readv"]
    assert bytes((await cl.afr.readv(fd, 3, 0, 0)).data) == b"abc"
    assert cl.clients[0].gens[0].counts["readv"] == before + 1  # mode 0: the first child
    # the first child dies without its parent hearing of it yet: the read moves on
    cl.clients[0].gens[0].down = True
    assert bytes((await cl.afr.readv(fd, 3, 3, 0)).data) == b"abc"
    assert cl.clients[0].gens[1].counts["readv"] == 1
    cl.clients[0].gens[0].down = False
    await cl.afr.release(fd)
    assert (await cl.afr.stat(Loc("/f", gfid=gfid))).iatt.size == 300


async def test_fd_is_reopened_on_a_child_that_comes_back(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    await write_file(cl.afr, "f", b"0" * 10)
    fd = await open_file(cl.afr, "f")
    cl.down(2)
    cl.up(2)  # the fd opened before is stale there now (EBADF), as after a reconnect
    await cl.afr.writev(fd, b"1" * 10, 0, 0)
    await cl.afr.release(fd)
    assert cl.copies("f") == [b"1" * 10] * 3
    assert cl.clean("f")


async def test_eager_lock_batches_a_sequential_writer(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="5")
    fd = await create(cl.afr, "seq")
    gen = cl.clients[0].gens[1]
    base = dict(gen.counts)
    for i in range(100):
        await cl.afr.writev(fd, bytes([i]) * 4096, i * 4096, 0)
    await cl.afr.release(fd)
    locks = gen.counts["inodelk"] - base.get("inodelk", 0)
    xattrops = gen.counts["xattrop"] - base.get("xattrop", 0)
    assert locks <= 4 and xattrops <= 4, (locks, xattrops)
    assert cl.copies("seq") == [b"".join(bytes([i]) * 4096 for i in range(100))] * 3
    assert cl.clean("seq")


async def test_without_eager_lock_every_write_is_a_transaction(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, eager_lock="off")
    fd = await create(cl.afr, "seq")
    gen = cl.clients[0].gens[0]
    base = dict(gen.counts)
    for i in range(20):
        await cl.afr.writev(fd, b"x" * 100, i * 100, 0)
    await cl.afr.release(fd)
    assert gen.counts["inodelk"] - base.get("inodelk", 0) == 40  # lock and unlock per write
    assert gen.counts["xattrop"] - base.get("xattrop", 0) == 40  # pre-op and post-op per write
    assert cl.clean("seq")


async def test_two_clients_writing_one_file_stay_consistent(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, post_op_delay="0.05")
    other = await add_client(cl, "client-b", post_op_delay="0.05")
    a, b = cl.clients
    with a.acting():
        await write_file(a.afr, "shared", bytes(64 * 1024))

    async def writer(client: object, byte: int) -> None:
        c = a if client == "a" else other
        with c.acting():
            fd = await open_file(c.afr, "shared")
            for i in range(30):
                off = ((i * 7 + byte) % 16) * 4096  # overlapping regions, different order
                await c.afr.writev(fd, bytes([byte]) * 8192, off, 0)
                if i % 10 == 9:
                    await c.afr.fsync(fd, 0)
            await c.afr.release(fd)

    await asyncio.wait_for(asyncio.gather(writer("a", 1), writer("b", 2)), 60)
    copies = cl.copies("shared")
    assert copies[0] == copies[1] == copies[2]
    # which writer wins each region depends on timing; what may never happen is copies that differ
    assert set(copies[0]) <= {0, 1, 2} and set(copies[0]) & {1, 2}
    assert cl.clean("shared")
    assert b is other


async def test_child_events_reach_the_parent(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    seen: list[Event] = []

    class Listener:
        def notify(self, event: Event, source: object, data: object = None) -> None:
            seen.append(event)

    cl.afr.parents.append(Listener())
    for i in range(3):
        cl.down(i)
    assert seen == [Event.CHILD_DOWN]
    cl.up(1)
    assert seen == [Event.CHILD_DOWN, Event.CHILD_UP]
    cl.up(0)
    cl.up(2)
    assert seen == [Event.CHILD_DOWN, Event.CHILD_UP]


async def test_name_heal_at_lookup(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, data_self_heal="off", metadata_self_heal="off", entry_self_heal="off")
    cl.down(0)
    gfid = await write_file(cl.afr, "late", b"data")
    cl.up(0)
    assert not cl.bricks[0].path("late").exists()
    rep = await cl.afr.lookup(entry("late"))
    assert rep.iatt.gfid == gfid
    assert os.getxattr(cl.bricks[0].path("late"), "trusted.mortar.gfid") == bytes(gfid)
    assert await read_file(cl.afr, "late") == b"data"  # from a good copy, not the new empty one


async def test_heal_on_access_in_the_background(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)
    gfid = await write_file(cl.afr, "f", b"a" * 1000)
    cl.down(1)
    fd = await open_file(cl.afr, "f")
    await cl.afr.writev(fd, b"b" * 1000, 0, 0)
    await cl.afr.release(fd)
    cl.up(1)
    await cl.afr.lookup(Loc("/f", gfid=gfid))
    await asyncio.wait_for(cl.afr.healer.idle(), 10)
    assert cl.copies("f") == [b"b" * 1000] * 3
    assert cl.clean("f")


async def test_statfs_is_the_smallest_child(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(2)
    rep = await cl.afr.statfs(Loc("/", gfid=ROOT))
    assert rep.statvfs.bavail > 0


async def test_reads_spread_by_gfid_hash(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3)  # read-hash-mode 1 (default)
    for i in range(30):
        await write_file(cl.afr, f"f{i}", b"z")
    before = [g.counts["readv"] for g in cl.clients[0].gens]
    for i in range(30):
        assert await read_file(cl.afr, f"f{i}") == b"z"
    used = [g.counts["readv"] - b for g, b in zip(cl.clients[0].gens, before, strict=True)]
    assert sum(used) >= 30 and sum(1 for u in used if u) >= 2


async def test_built_from_a_volfile(tmp_path: Path) -> None:
    bricks = "\n".join(
        f"""
volume b{i}-posix
    type storage/posix
    option directory {tmp_path / f"b{i}"}
    option volume-id {VOLUME_ID}
    option brick-create on
    option health-check-interval 0
end-volume
volume b{i}-locks
    type features/locks
    subvolumes b{i}-posix
end-volume
volume b{i}-index
    type features/index
    subvolumes b{i}-locks
end-volume
volume vol-client-{i}
    type debug/error-gen
    subvolumes b{i}-index
end-volume"""
        for i in range(3)
    )
    graph = from_text(
        bricks
        + """
volume vol-replicate-0
    type cluster/replicate
    option afr-pending-xattr vol-client-0,vol-client-1,vol-client-2
    option data-self-heal-algorithm diff
    option child-up-timeout 0.1
    subvolumes vol-client-0 vol-client-1 vol-client-2
end-volume
"""
    )
    await graph.start()
    try:
        afr = graph.top
        assert isinstance(afr, ReplicateTranslator) and afr.quorum_type == "auto"
        await write_file(afr, "v", b"volfile")
        assert [(tmp_path / f"b{i}" / "v").read_bytes() for i in range(3)] == [b"volfile"] * 3
        assert (tmp_path / "b0" / "v").exists()
    finally:
        await graph.stop()
    with pytest.raises(OptionError):
        ReplicateTranslator(
            "r", {"afr-pending-xattr": "a,b"}, [Translator("x"), Translator("y"), Translator("z")]
        )


async def test_fixed_quorum(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, quorum_type="fixed", quorum_count="3")
    await write_file(cl.afr, "f", b"1")
    cl.down(0)
    with pytest.raises(FopError) as exc:
        await write_file(cl.afr, "g", b"2")
    assert exc.value.errno == errno.ENOTCONN and "quorum-type fixed" in exc.value.message
    cl.up(0)
    cl.afr.reconfigure({"quorum-type": "fixed", "quorum-count": "2", "post-op-delay": "0.05"})
    cl.down(0)
    await write_file(cl.afr, "g", b"2")
    assert cl.bricks[1].read("g") == b"2"


async def test_directory_moved_to_another_parent_while_down(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, entry_self_heal="off", data_self_heal="off", metadata_self_heal="off")
    afr = cl.afr
    a = await mkdir(afr, "a")
    b = await mkdir(afr, "b")
    x = await mkdir(afr, "x", a)
    await write_file(afr, "payload", b"inside x", x)
    cl.down(1)
    await afr.rename(entry("x", a), entry("x", b))
    await write_file(afr, "more", b"added later", x)
    cl.up(1)
    stats = await heal_index(afr)
    assert stats.failed == 0 and stats.split_brain == 0
    trees = [tree(br.directory) for br in cl.bricks]
    assert trees[0] == trees[1] == trees[2]
    assert trees[1]["b/x/payload"][1] == b"inside x" and "a/x" not in trees[1]
    assert all(cl.clean(rel) for rel in ("a", "b", "b/x", "b/x/payload", "b/x/more"))
