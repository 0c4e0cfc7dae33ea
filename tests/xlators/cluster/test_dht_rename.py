"""Renames, link files, misplaced files (lookup-unhashed), a fifth subvolume and fix-layout, and
layout heal under the heal lock."""

from __future__ import annotations

import asyncio
import errno
import json
import os

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, Fd, Flock, Loc, LockCmd, LockType
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.dht_layout import LAYOUT_XATTR, Layout, LayoutRange, hashed_subvol
from mortar.xlators.features.locks import DUMP_KEY, LocksTranslator
from mortar.xlators.storage.posix import PosixTranslator

from .conftest import (
    ROOT,
    MakeBricks,
    MakeDht,
    brick_dir,
    create,
    disk_layout,
    listdir,
    loc,
    mkdir,
    read_all,
    where,
)


def layout_on_disk(bricks: list[PosixTranslator], rel: str) -> Layout:
    return Layout([LayoutRange(b.name, lay[1], lay[2]) for b in bricks if (lay := disk_layout(b, rel))])


def name_on(layout: Layout, subvol: str, prefix: str, avoid: set[str] | None = None) -> str:
    """The first name `prefix<i>` that hashes to `subvol`."""
    for i in range(10_000):
        name = f"{prefix}{i}"
        if hashed_subvol(layout, name) == subvol and name not in (avoid or set()):
            return name
    raise AssertionError("no such name")


async def test_rename_across_hash_ranges_keeps_the_data_in_place(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "vms")
    layout = layout_on_disk(bricks, "vms")
    s0, s1, s2, s3 = (b.name for b in bricks)
    src = name_on(layout, s0, "disk")
    await create(dht, d.gfid, src, b"guest data")
    ino = os.stat(brick_dir(bricks[0]) / "vms" / src).st_ino

    first = name_on(layout, s1, "renamed")
    await dht.rename(loc(d.gfid, src), loc(d.gfid, first))
    assert where(bricks, f"vms/{first}") == {s0: "data", s1: f"link->{s0}"}
    assert where(bricks, f"vms/{src}") == {}
    assert os.stat(brick_dir(bricks[0]) / "vms" / first).st_ino == ino  # renamed, not copied
    fresh = await make_dht(bricks)
    assert await read_all(fresh, d.gfid, first) == b"guest data"

    # again to a third range: the link moves, the data does not
    second = name_on(layout, s2, "again")
    await dht.rename(loc(d.gfid, first), loc(d.gfid, second))
    assert where(bricks, f"vms/{second}") == {s0: "data", s2: f"link->{s0}"}
    assert where(bricks, f"vms/{first}") == {}
    # both names hashing to the same subvolume, which already holds a link file for the inode
    third = name_on(layout, s2, "same", avoid={second})
    await dht.rename(loc(d.gfid, second), loc(d.gfid, third))
    assert where(bricks, f"vms/{third}") == {s0: "data", s2: f"link->{s0}"}
    assert where(bricks, f"vms/{second}") == {}
    # home again: no link file left anywhere
    home = name_on(layout, s0, "home")
    await dht.rename(loc(d.gfid, third), loc(d.gfid, home))
    assert where(bricks, f"vms/{home}") == {s0: "data"}
    assert sorted(n for b in bricks for n in os.listdir(brick_dir(b) / "vms")) == [home]
    assert await read_all(await make_dht(bricks), d.gfid, home) == b"guest data"
    assert s3  # four subvolumes, the fourth just never involved


async def test_rename_over_a_file_on_another_subvolume(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(3)
    dht = await make_dht(bricks)
    await dht.lookup(Loc("/", ROOT))  # the root gets its layout
    layout = layout_on_disk(bricks, "")
    s0, s1, _ = (b.name for b in bricks)
    src, dst = name_on(layout, s0, "src"), name_on(layout, s1, "dst")
    await create(dht, ROOT, src, b"new contents")
    old = await create(dht, ROOT, dst, b"old contents")
    await dht.rename(loc(ROOT, src), loc(ROOT, dst))
    assert where(bricks, dst) == {s0: "data", s1: f"link->{s0}"}
    assert await read_all(await make_dht(bricks), ROOT, dst) == b"new contents"
    with pytest.raises(FopError) as exc:  # the replaced file is gone from every brick
        await (await make_dht(bricks)).stat(Loc("", old.gfid))
    assert exc.value.errno in (errno.ENOENT, errno.ESTALE)


async def test_rsync_temporary_renames_leave_no_link_file(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(4)
    dht = await make_dht(bricks)
    for i in range(20):
        await create(dht, ROOT, f".img{i}.qcow2.Xy7Rq2", b"x")
        await dht.rename(loc(ROOT, f".img{i}.qcow2.Xy7Rq2"), loc(ROOT, f"img{i}.qcow2"))
        assert list(where(bricks, f"img{i}.qcow2").values()) == ["data"]


async def test_create_of_a_name_whose_data_is_elsewhere_opens_it(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    bricks = await make_bricks(2)
    dht = await make_dht(bricks)
    await dht.lookup(Loc("/", ROOT))  # the root gets its layout
    layout = layout_on_disk(bricks, "")
    a, b = name_on(layout, bricks[0].name, "a"), name_on(layout, bricks[1].name, "b")
    iatt = await create(dht, ROOT, a, b"kept")
    await dht.rename(loc(ROOT, a), loc(ROOT, b))
    fd = Fd(Gfid.random())
    rep = await dht.create(loc(ROOT, b), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(fd.gfid)})
    assert rep.iatt.gfid == iatt.gfid
    assert bytes((await dht.readv(fd, 100, 0, 0)).data) == b"kept"
    await dht.release(fd)
    with pytest.raises(FopError) as exc:
        await dht.create(
            loc(ROOT, b),
            os.O_RDWR | os.O_CREAT | os.O_EXCL,
            0o644,
            0,
            Fd(iatt.gfid),
            {GFID_REQ: bytes(Gfid.random())},
        )
    assert exc.value.errno == errno.EEXIST
    assert where(bricks, b) == {bricks[0].name: "data", bricks[1].name: f"link->{bricks[0].name}"}


async def test_directory_rename(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    bricks = await make_bricks(3)
    dht = await make_dht(bricks)
    d = await mkdir(dht, ROOT, "old")
    for i in range(12):
        await create(dht, d.gfid, f"f{i}", str(i).encode())
    await dht.rename(loc(ROOT, "old"), loc(ROOT, "new"))
    assert set(where(bricks, "new").values()) == {"dir"} and len(where(bricks, "new")) == 3
    assert where(bricks, "old") == {}
    fresh = await make_dht(bricks)
    nd = (await fresh.lookup(loc(ROOT, "new"))).iatt
    assert nd.gfid == d.gfid
    assert [await read_all(fresh, nd.gfid, f"f{i}") for i in range(12)] == [
        str(i).encode() for i in range(12)
    ]
    # onto a non-empty directory: refused; onto an empty one: replaced
    full = await mkdir(dht, ROOT, "full")
    await create(dht, full.gfid, "x")
    with pytest.raises(FopError) as exc:
        await dht.rename(loc(ROOT, "new"), loc(ROOT, "full"))
    assert exc.value.errno == errno.ENOTEMPTY
    await mkdir(dht, ROOT, "empty")
    await dht.rename(loc(ROOT, "new"), loc(ROOT, "empty"))
    assert sorted(await listdir(fresh, ROOT)) == ["empty", "full"]


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
async def test_lookup_unhashed(make_bricks: MakeBricks, make_dht: MakeDht, mode: str) -> None:
    """A file put on a subvolume its name does not hash to (as an old layout would have)."""
    bricks = await make_bricks(3)
    dht = await make_dht(bricks, lookup_unhashed=mode)
    d = await mkdir(dht, ROOT, "m")
    layout = layout_on_disk(bricks, "m")
    name = name_on(layout, bricks[0].name, "stray")
    await create(bricks[2], d.gfid, name, b"misplaced")  # straight onto the wrong brick
    if mode == "on":
        assert await read_all(dht, d.gfid, name) == b"misplaced"
        assert where(bricks, f"m/{name}") == {
            bricks[2].name: "data",
            bricks[0].name: f"link->{bricks[2].name}",
        }
    else:  # a fresh directory's files are all where they hash: no search
        with pytest.raises(FopError) as exc:
            await dht.lookup(loc(d.gfid, name))
        assert exc.value.errno == errno.ENOENT
    if mode == "auto":  # once the layout changed, auto searches too
        await dht.fix_layout(loc(ROOT, "m"))
        assert await read_all(dht, d.gfid, name) == b"misplaced"


async def test_fifth_subvolume_and_fix_layout(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    """After add-brick: lookup puts the directory on the new brick with an empty range; fix-layout
    spreads the range over five; old files are found (lookup-unhashed) and get link files."""
    bricks = await make_bricks(4)
    old = await make_dht(bricks)
    d = await mkdir(old, ROOT, "data")
    names = [f"file-{i}" for i in range(100)]
    for n in names:
        await create(old, d.gfid, n, n.encode())
    before = {n: where(bricks, f"data/{n}") for n in names}

    bricks += await make_bricks(1, first=4)
    new = await make_dht(bricks)
    await new.lookup(loc(ROOT, "data"))
    assert os.getxattr(brick_dir(bricks[4]) / "data", "trusted.mortar.gfid") == bytes(d.gfid)
    assert disk_layout(bricks[4], "data") == (0, 0, 0)  # present, but owns nothing yet
    layout = await new.fix_layout(loc(ROOT, "data"))
    assert {r.subvol for r in layout.owners} == {b.name for b in bricks}
    rewritten = [disk_layout(b, "data") for b in bricks]
    assert all(lay is not None and lay[0] != 0 for lay in rewritten)  # no longer "fresh"

    new_layout = layout_on_disk(bricks, "data")
    reader = await make_dht(bricks)
    moved = 0
    for n in names:
        assert await read_all(reader, d.gfid, n) == n.encode()
        home = next(iter(before[n]))
        hashed = hashed_subvol(new_layout, n)
        if hashed != home:
            moved += 1
            assert where(bricks, f"data/{n}") == {home: "data", hashed: f"link->{home}"}
        else:
            assert where(bricks, f"data/{n}") == {home: "data"}
    assert moved > 20
    assert sorted(await listdir(reader, d.gfid)) == sorted(names)
    # new files follow the new layout, the fifth brick included
    for i in range(50):
        await create(reader, d.gfid, f"new-{i}")
    assert any(n.startswith("new-") for n in os.listdir(brick_dir(bricks[4]) / "data"))


async def test_layout_heal_waits_for_the_heal_lock(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    """Heal takes the write lock on every subvolume in order: with the last one held by another
    client, it holds the first two and waits; released, it heals and drops all three."""
    posix = await make_bricks(3)
    locks = [LocksTranslator(f"vol-locks-{i}", None, [p]) for i, p in enumerate(posix)]
    dht = await make_dht(list(locks))
    d = await mkdir(dht, ROOT, "locked")
    os.removexattr(brick_dir(posix[1]) / "locked", LAYOUT_XATTR)
    other = CallContext(client="another-client", lk_owner=b"owner-2")

    async def as_other(flock: Flock) -> None:
        token = call_context.set(other)
        try:
            await locks[2].inodelk("dht.layout.heal", Loc("", d.gfid), LockCmd.SETLK, flock)
        finally:
            call_context.reset(token)

    async def heal_locks(lk: LocksTranslator) -> dict[str, list[dict[str, object]]]:
        dump = json.loads((await lk.getxattr(Loc("", d.gfid), DUMP_KEY)).xattrs[DUMP_KEY])
        queues: dict[str, dict[str, list[dict[str, object]]]] = dump["inodelk"]
        return queues.get("dht.layout.heal", {"granted": [], "blocked": []})

    await as_other(Flock(LockType.WRLCK))
    healer = asyncio.create_task((await make_dht(list(locks))).lookup(loc(ROOT, "locked")))
    for _ in range(200):
        if (await heal_locks(locks[2]))["blocked"]:
            break
        await asyncio.sleep(0.01)
    assert not healer.done()
    assert disk_layout(posix[1], "locked") is None
    for lk in locks[:2]:
        assert [h["client"] for h in (await heal_locks(lk))["granted"]] == [""]  # held by the healer
    assert [h["client"] for h in (await heal_locks(locks[2]))["blocked"]] == [""]

    await as_other(Flock(LockType.UNLCK))
    await asyncio.wait_for(healer, 10)
    assert disk_layout(posix[1], "locked") is not None
    for lk in locks:
        assert await heal_locks(lk) == {"granted": [], "blocked": []}


async def test_locks_on_a_file_go_where_its_data_is(make_bricks: MakeBricks, make_dht: MakeDht) -> None:
    posix = await make_bricks(3)
    locks = [LocksTranslator(f"vol-locks-{i}", None, [p]) for i, p in enumerate(posix)]
    dht = await make_dht(list(locks))
    await dht.lookup(Loc("/", ROOT))
    layout = Layout(
        [
            LayoutRange(lk.name, lay[1], lay[2])
            for lk, p in zip(locks, posix, strict=True)
            if (lay := disk_layout(p))
        ]
    )
    a, b = name_on(layout, locks[0].name, "a"), name_on(layout, locks[1].name, "b")
    iatt = await create(dht, ROOT, a)
    await dht.rename(loc(ROOT, a), loc(ROOT, b))  # data on subvolume 0, link file on 1
    await dht.inodelk("app", loc(ROOT, b), LockCmd.SETLK, Flock(LockType.WRLCK))
    held = [
        json.loads((await lk.getxattr(Loc("", iatt.gfid), DUMP_KEY)).xattrs[DUMP_KEY])["inodelk"]
        for lk in locks
    ]
    assert "app" in held[0] and held[1] == {} and held[2] == {}
    await dht.inodelk("app", loc(ROOT, b), LockCmd.SETLK, Flock(LockType.UNLCK))
