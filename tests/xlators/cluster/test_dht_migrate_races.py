"""Interleavings of a migration with another client's fops, forced by pausing the migrator at the
exact step: the destination's link file made but not yet named a link file, the fd of a client
left on the destination's link file across the switch."""

from __future__ import annotations

import asyncio

import pytest

from mortar.core.fops import Loc
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR
from mortar.xlators.cluster.dht_migrator import FileMigration, FileToMove
from mortar.xlators.cluster.dht_rebalance import migrate_file

from .conftest import ROOT
from .test_dht_rebalance import Volume, open_existing, read_fd, volume
from .test_dht_rebalance_migrate import misplaced_file

__all__ = ["volume"]  # fixture used here
pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


async def test_a_link_file_being_made_is_not_taken_for_the_file(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mknod makes the destination's link file, a setxattr names its target a moment later: a
    client looking the name up in between finds the data on the source, not an empty file."""
    dht, name, model = await misplaced_file(volume, MiB, seed=11)
    dst = volume.subvols[1]
    real_setxattr = dst.setxattr
    made, go = asyncio.Event(), asyncio.Event()

    async def slow_setxattr(loc, xattrs, flags, xdata=None):  # type: ignore[no-untyped-def]
        if LINKTO_XATTR in xattrs and not made.is_set():  # the migrator's
            made.set()
            await go.wait()
        return await real_setxattr(loc, xattrs, flags, xdata)

    monkeypatch.setattr(dst, "setxattr", slow_setxattr)
    mig = asyncio.create_task(migrate_file(dht, Loc("/", ROOT), name))
    await asyncio.wait_for(made.wait(), 10)
    cli = await volume.client()
    fd = await open_existing(cli, ROOT, name)
    assert (await cli.fstat(fd)).iatt.size == len(model)
    assert await read_fd(cli, fd) == bytes(model)
    go.set()
    await cli.writev(fd, b"x" * 10, 5, 0)
    model[5:15] = b"x" * 10
    assert (await mig).status == "moved"
    assert await read_fd(cli, fd) == bytes(model)
    fresh = await volume.client()
    fd2 = await open_existing(fresh, ROOT, name)
    assert await read_fd(fresh, fd2) == bytes(model)


async def test_a_write_through_an_fd_left_behind_follows_the_file_into_its_next_migration(
    volume: Volume,
) -> None:
    """An fd opened before a first move stays on the old source (a link file now); a write through
    it, while a second move copies the file on, is made where the file is and, that being a copy in
    progress, repeated on the second destination: the write is in the file after both moves."""
    _, name, model = await misplaced_file(volume, 2 * MiB, seed=12)
    await volume.add(1)
    dht3 = await volume.client()
    cli = await volume.client()
    fd = await open_existing(cli, ROOT, name)
    s0, s1, s2 = volume.subvols
    gfid = fd.gfid
    assert (await FileMigration(dht3, FileToMove(ROOT, "", name, gfid, s0, s1)).run()).status == "moved"

    async def hook(step: str, job: FileToMove, offset: int) -> None:
        if step == "chunk" and offset == 0:  # the first MiB is on s2 already
            await cli.writev(fd, b"w" * 100, 1000, 0)
            model[1000:1100] = b"w" * 100

    second = FileMigration(dht3, FileToMove(ROOT, "", name, gfid, s1, s2), hook=hook)
    assert (await second.run()).status == "moved"
    assert volume.placement(name)[s2.name] == "data"
    assert await read_fd(cli, fd) == bytes(model)
    fresh = await volume.client()
    assert await read_fd(fresh, await open_existing(fresh, ROOT, name)) == bytes(model)
