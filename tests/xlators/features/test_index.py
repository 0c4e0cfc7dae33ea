"""features/index over a real brick: pending-heal entries follow the AFR counters, on disk."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import Fd, Flock, Loc, LockCmd, LockType, XattropFlag
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.options import OptionError
from mortar.core.translator import Translator
from mortar.graph.builder import from_text
from mortar.graph.registry import translator_class
from mortar.xlators.features.index import (
    COUNT_KEY,
    DIRTY_COUNT_KEY,
    INDEX_DIRTY_GFID,
    INDEX_XATTROP_GFID,
    LINK_BASE,
    IndexTranslator,
)

from .conftest import make_brick, new_file

ADD = XattropFlag.ADD_ARRAY
C0, C1, DIRTY = "trusted.afr.vol-client-0", "trusted.afr.vol-client-1", "trusted.afr.dirty"


def counters(data: int = 0, metadata: int = 0, entry: int = 0) -> bytes:
    return struct.pack(">3i", data, metadata, entry)


async def start(brick_dir: Path, **options: str) -> tuple[IndexTranslator, Translator]:
    posix = make_brick(brick_dir)
    index = IndexTranslator(
        "index", {"index-base": str(brick_dir / ".mortar" / "indices"), **options}, [posix]
    )
    await posix.init()
    await index.init()
    return index, posix


async def stop(index: IndexTranslator, posix: Translator) -> None:
    await index.fini()
    await posix.fini()


@pytest.fixture
async def brick(brick_dir: Path) -> Any:
    index, posix = await start(brick_dir)
    yield index
    await stop(index, posix)


def on_disk(brick_dir: Path, kind: str) -> set[str]:
    return set(os.listdir(brick_dir / ".mortar" / "indices" / kind))


async def listing(index: IndexTranslator, virtual: Gfid, size: int = 4096) -> list[str]:
    """Read a virtual index directory the way the heal daemon does: opendir, readdirp until empty."""
    assert (await index.lookup(Loc("<index>", gfid=virtual))).iatt.is_dir
    fd = Fd(virtual, is_dir=True)
    await index.opendir(Loc("<index>", gfid=virtual), fd)
    names: list[str] = []
    offset = 0
    while entries := (await index.readdirp(fd, size, offset)).entries:
        names += [e.name for e in entries]
        offset = entries[-1].offset
    await index.releasedir(fd)
    return names


async def count(index: IndexTranslator, key: str = COUNT_KEY) -> int:
    return int((await index.getxattr(Loc("/", gfid=ROOT_GFID), key)).xattrs[key])


async def test_pending_counter_adds_and_clears(brick: IndexTranslator, brick_dir: Path) -> None:
    gfid, fd = await new_file(brick, "img")
    loc = Loc("/img", gfid=gfid)
    reply = await brick.xattrop(loc, ADD, {C0: counters(), C1: counters(1)})
    assert reply.xattrs[C1] == counters(1)
    assert on_disk(brick_dir, "xattrop") == {gfid.canonical}
    assert await listing(brick, INDEX_XATTROP_GFID) == [gfid.canonical]
    assert await count(brick) == 1
    await brick.fxattrop(fd, ADD, {C0: counters(), C1: counters(0, 1)})  # still pending (metadata too)
    assert on_disk(brick_dir, "xattrop") == {gfid.canonical}
    await brick.xattrop(loc, ADD, {C0: counters(), C1: counters(-1, -1)})
    assert on_disk(brick_dir, "xattrop") == set()
    assert await listing(brick, INDEX_XATTROP_GFID) == []
    assert await count(brick) == 0
    await brick.release(fd)


async def test_entries_are_links_to_one_base_file(brick: IndexTranslator, brick_dir: Path) -> None:
    """An entry is a hard link (no inode of its own); a base file removed behind the brick's back is
    made again."""
    indices = brick_dir / ".mortar" / "indices"
    made = []
    for name in ("a", "b"):
        gfid, fd = await new_file(brick, name)
        await brick.fxattrop(fd, ADD, {DIRTY: counters(1)})
        made.append((gfid, fd))
    base = os.stat(indices / LINK_BASE)
    assert {os.stat(indices / "dirty" / g.canonical).st_ino for g, _ in made} == {base.st_ino}
    assert base.st_nlink == 3
    os.unlink(indices / LINK_BASE)
    gfid, fd = await new_file(brick, "c")
    await brick.fxattrop(fd, ADD, {DIRTY: counters(1)})
    made.append((gfid, fd))
    assert on_disk(brick_dir, "dirty") == {g.canonical for g, _ in made}
    for _, f in made:
        await brick.fxattrop(f, ADD, {DIRTY: counters(-1)})
        await brick.release(f)
    assert on_disk(brick_dir, "dirty") == set()
    assert os.stat(indices / LINK_BASE).st_nlink == 1


async def test_dirty_goes_to_its_own_index(brick: IndexTranslator, brick_dir: Path) -> None:
    gfid, fd = await new_file(brick, "f")
    await brick.fxattrop(fd, ADD, {DIRTY: counters(1)})  # AFR pre-op
    assert on_disk(brick_dir, "dirty") == {gfid.canonical} and on_disk(brick_dir, "xattrop") == set()
    assert await listing(brick, INDEX_DIRTY_GFID) == [gfid.canonical]
    assert await count(brick, DIRTY_COUNT_KEY) == 1
    # post-op where brick 1 missed the write: dirty cleared, brick 1 blamed
    await brick.fxattrop(fd, ADD, {DIRTY: counters(-1), C0: counters(), C1: counters(1)})
    assert on_disk(brick_dir, "dirty") == set() and on_disk(brick_dir, "xattrop") == {gfid.canonical}
    await brick.release(fd)


async def test_counters_not_in_the_xattrop_are_respected(brick: IndexTranslator, brick_dir: Path) -> None:
    gfid, fd = await new_file(brick, "f")
    loc = Loc("/f", gfid=gfid)
    await brick.xattrop(loc, ADD, {C0: counters(0, 0, 2)})
    await brick.xattrop(loc, ADD, {C1: counters(1)})
    await brick.xattrop(loc, ADD, {C1: counters(-1)})  # C1 clean, but C0 still blames: keep
    assert on_disk(brick_dir, "xattrop") == {gfid.canonical}
    await brick.xattrop(loc, ADD, {C0: counters(0, 0, -2)})
    assert on_disk(brick_dir, "xattrop") == set()
    await brick.release(fd)


async def test_other_xattrs_and_ops_pass_by(brick: IndexTranslator, brick_dir: Path) -> None:
    _, fd = await new_file(brick, "f")
    await brick.fxattrop(fd, ADD, {"trusted.ec.version": struct.pack(">2i", 1, 1)})
    await brick.fxattrop(fd, XattropFlag.ADD_ARRAY64, {"trusted.afr.x": struct.pack(">q", 1)})
    assert on_disk(brick_dir, "xattrop") == set() and on_disk(brick_dir, "dirty") == set()
    await brick.release(fd)


async def test_entries_survive_a_restart(brick_dir: Path) -> None:
    index, posix = await start(brick_dir)
    gfids = []
    for i in range(5):
        gfid, fd = await new_file(index, f"f{i}")
        await index.fxattrop(fd, ADD, {C1: counters(1)})
        await index.release(fd)
        gfids.append(gfid.canonical)
    await stop(index, posix)
    index, posix = await start(brick_dir)
    try:
        assert await count(index) == 5
        # small readdirp sizes page through the listing without loss or repetition
        assert await listing(index, INDEX_XATTROP_GFID, size=1) == sorted(gfids)
        assert await listing(index, INDEX_XATTROP_GFID, size=150) == sorted(gfids)
    finally:
        await stop(index, posix)


async def test_heal_daemon_purges_a_stale_entry(brick: IndexTranslator, brick_dir: Path) -> None:
    gfid, fd = await new_file(brick, "f")
    await brick.fxattrop(fd, ADD, {C1: counters(1)})
    await brick.unlink(Loc("<stale>", pargfid=INDEX_XATTROP_GFID, name=gfid.canonical), 0)
    assert on_disk(brick_dir, "xattrop") == set() and await count(brick) == 0
    for name in (gfid.canonical, "not-a-gfid"):
        with pytest.raises(FopError) as exc:
            await brick.unlink(Loc("<stale>", pargfid=INDEX_XATTROP_GFID, name=name), 0)
        assert exc.value.errno == errno.ENOENT
    await brick.release(fd)


async def test_foreign_files_in_the_index_are_ignored(brick_dir: Path) -> None:
    base = brick_dir / ".mortar" / "indices" / "xattrop"
    base.mkdir(parents=True)
    (base / "xattrop-base-file").touch()
    good = Gfid.random()
    (base / good.canonical).touch()
    index, posix = await start(brick_dir)
    try:
        assert await listing(index, INDEX_XATTROP_GFID) == [good.canonical]
    finally:
        await stop(index, posix)


async def test_watched_prefix_option(brick_dir: Path) -> None:
    index, posix = await start(brick_dir, **{"watched-prefix": "trusted.rep."})
    try:
        gfid, fd = await new_file(index, "f")
        await index.fxattrop(fd, ADD, {C1: counters(1)})
        assert on_disk(brick_dir, "xattrop") == set()
        await index.fxattrop(fd, ADD, {"trusted.rep.dirty": counters(1)})
        assert on_disk(brick_dir, "dirty") == {gfid.canonical}
        await index.release(fd)
    finally:
        await stop(index, posix)


def test_options_and_registry() -> None:
    assert translator_class("features/index") is IndexTranslator
    with pytest.raises(OptionError):
        IndexTranslator("index", {"index-base": "relative/path"})


async def test_brick_graph_from_a_volfile(brick_dir: Path) -> None:
    """posix <- locks <- index as volgen writes them; index-base defaults to the brick's .mortar/indices."""
    graph = from_text(
        f"""
volume b-posix
    type storage/posix
    option directory {brick_dir}
    option volume-id 5f1c3a52-2f0e-4a43-9d7c-2b8e1f0c9a11
    option brick-create on
    option health-check-interval 0
end-volume

volume b-locks
    type features/locks
    subvolumes b-posix
end-volume

volume b-index
    type features/index
    subvolumes b-locks
end-volume
"""
    )
    await graph.start()
    try:
        top = graph.top
        gfid, fd = await new_file(top, "vm.img")
        await top.finodelk("b-replicate-0", fd, LockCmd.SETLK, Flock(LockType.WRLCK))
        await top.fxattrop(fd, ADD, {DIRTY: counters(1)})
        assert on_disk(brick_dir, "dirty") == {gfid.canonical}
        # the private directory stays out of the volume's namespace
        root = Fd(ROOT_GFID, is_dir=True)
        await top.opendir(Loc("/", gfid=ROOT_GFID), root)
        assert [
            e.name for e in (await top.readdirp(root, 65536, 0)).entries if e.name not in (".", "..")
        ] == ["vm.img"]
        await top.releasedir(root)
        await top.release(fd)
    finally:
        await graph.stop()
