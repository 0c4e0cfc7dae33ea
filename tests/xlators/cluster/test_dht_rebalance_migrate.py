"""One file's migration with clients using it: writes during its own copy (timed by the step
hook), fds opened before the move, rename and unlink meanwhile, interrupted migrations, and a
destination that fills up under a client's repeated write."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import stat

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Fd, Loc, SeekWhat, SetAttrValid
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_common import MIGRATE_DOMAIN, MIGRATING_XATTR
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR, decode_linkto
from mortar.xlators.cluster.dht_migrator import FileMigration, FileToMove
from mortar.xlators.cluster.dht_rebalance import Rebalance, migrate_file
from mortar.xlators.features.locks import DUMP_KEY

from .conftest import ROOT, brick_dir
from .test_dht_rebalance import (
    Mount,
    Volume,
    name_hashing_to,
    open_existing,
    read_fd,
    read_file,
    tmpfs,
    volume,
    write_file,
)

__all__ = ["tmpfs", "volume"]  # fixtures used here
pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


async def misplaced_file(
    vol: Volume, size: int, seed: int = 0
) -> tuple[DistributeTranslator, str, bytearray]:
    """One subvolume, then a second: a file written by an old client where the new layout no
    longer puts it. Returns the new client (layout fixed), the name and the content."""
    old = await vol.client(await vol.add(1))
    await old.lookup(Loc("/", ROOT))
    await vol.add(1)
    dht = await vol.client()
    await dht.fix_layout(Loc("/", ROOT))
    name = name_hashing_to(vol.layout(""), "vol-locks-1", "vm")
    data = bytearray(random.Random(seed).randbytes(size))
    await write_file(old, ROOT, name, [(0, bytes(data))], size)  # the old client still hashes to 0
    assert vol.placement(name) == {"vol-locks-0": "data"}
    return dht, name, data


def apply(model: bytearray, off: int, data: bytes) -> None:
    if off > len(model):
        model.extend(bytes(off - len(model)))
    model[off : off + len(data)] = data


async def test_writes_during_its_own_migration_all_land(volume: Volume) -> None:
    """Between chunk copies: writes behind and ahead of the copy, past the end, a punched hole, a
    zeroed range, an xattr and a chmod; before the switch: another write and a truncate. The moved
    file has all of it, with its holes, mode and xattr, and nothing of the migration shows."""
    dht, name, model = await misplaced_file(volume, 8 * MiB)
    cli = await volume.client()
    fd = await open_existing(cli, ROOT, name)
    loc = Loc(name, pargfid=ROOT, name=name)
    src_path = brick_dir(volume.posix[0]) / name
    dst_path = brick_dir(volume.posix[1]) / name
    rng = random.Random(9)
    steps: list[str] = []

    async def hook(step: str, job: FileToMove, offset: int) -> None:
        if step == "chunk" and offset == 0:
            steps.append("phase1")
            # phase 1 as the bricks show it
            assert os.stat(src_path).st_mode & stat.S_ISVTX
            assert os.getxattr(src_path, MIGRATING_XATTR).startswith(b"vol-locks-1\0")
            assert os.stat(dst_path).st_mode & 0o7777 == 0o1000
            assert decode_linkto(os.getxattr(dst_path, LINKTO_XATTR)) == "vol-locks-0"
            for off, data in [(100, rng.randbytes(4096)), (5 * MiB + 10, rng.randbytes(70_000))]:
                await cli.writev(fd, data, off, 0)  # behind, then ahead of the copy
                apply(model, off, data)
            tail = rng.randbytes(4096)
            await cli.writev(fd, tail, 9 * MiB, 0)  # past the end: a hole from 8 to 9 MiB
            apply(model, 9 * MiB, tail)
            await cli.discard(fd, 2 * MiB, 64 << 10)
            apply(model, 2 * MiB, bytes(64 << 10))
            await cli.zerofill(fd, 3 * MiB, 8192)
            apply(model, 3 * MiB, bytes(8192))
            await cli.setxattr(loc, {"user.note": b"hello"}, 0)
            rep = await cli.setattr(loc, AttrSet(SetAttrValid.MODE, mode=0o600))
            assert rep.post is not None and rep.post.mode == stat.S_IFREG | 0o600  # the bit is hidden
            assert os.stat(src_path).st_mode & 0o7777 == 0o1600  # and kept on the source
        elif step == "switch":
            steps.append("switch")
            late = rng.randbytes(1000)
            await cli.writev(fd, late, MiB, 0)
            apply(model, MiB, late)
            await cli.truncate(loc, 9 * MiB + 2048)
            del model[9 * MiB + 2048 :]

    outcome = await migrate_file(dht, Loc("/", ROOT), name, hook=hook)

    assert outcome.status == "moved" and steps == ["phase1", "switch"]
    assert volume.placement(name) == {"vol-locks-1": "data"}
    st = os.stat(dst_path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == len(model)
    assert st.st_blocks * 512 < st.st_size - MiB  # the holes stayed holes
    assert os.getxattr(dst_path, "user.note") == b"hello"
    assert not [x for x in os.listxattr(dst_path) if x.startswith("trusted.mortar.dht")]
    fresh = await volume.client()
    assert await read_file(fresh, ROOT, name) == bytes(model)
    assert await read_fd(cli, fd) == bytes(model)
    listed = (await fresh.getxattr(Loc(name, pargfid=ROOT, name=name), None)).xattrs
    assert "user.note" in listed and MIGRATING_XATTR not in listed and LINKTO_XATTR not in listed
    await cli.release(fd)


async def test_fds_opened_before_the_move_keep_working(volume: Volume) -> None:
    dht, name, model = await misplaced_file(volume, 3 * MiB, seed=1)
    cli = await volume.client()
    rw = await open_existing(cli, ROOT, name)
    ro = await open_existing(cli, ROOT, name, os.O_RDONLY)
    assert (await migrate_file(dht, Loc("/", ROOT), name)).status == "moved"

    st = (await cli.fstat(ro)).iatt
    assert st.size == len(model) and st.mode == stat.S_IFREG | 0o644
    assert await read_fd(cli, ro) == bytes(model)
    assert (await cli.seek(ro, 0, SeekWhat.DATA)).offset == 0
    await cli.writev(rw, b"written after the move", MiB, 0)
    apply(model, MiB, b"written after the move")
    await cli.ftruncate(rw, 2 * MiB)
    del model[2 * MiB :]
    await cli.fsetxattr(rw, {"user.after": b"1"}, 0)
    fresh = await volume.client()
    assert await read_file(fresh, ROOT, name) == bytes(model)
    assert (await fresh.getxattr(Loc(name, pargfid=ROOT, name=name), "user.after")).xattrs == {
        "user.after": b"1"
    }
    assert rw.ctx[cli].subvol.name == ro.ctx[cli].subvol.name == "vol-locks-1"
    # the source's data went with the last fd that held it
    assert not os.listdir(brick_dir(volume.posix[0]) / ".mortar" / "unlink")
    for fd in (rw, ro):
        await cli.release(fd)


async def test_rename_waits_for_the_migration(volume: Volume) -> None:
    dht, name, model = await misplaced_file(volume, 3 * MiB, seed=2)
    cli = await volume.client()
    renamed: list[asyncio.Task[object]] = []

    async def hook(step: str, job: FileToMove, offset: int) -> None:
        if renamed:
            return
        old, new = Loc(name, pargfid=ROOT, name=name), Loc("renamed", pargfid=ROOT, name="renamed")
        renamed.append(asyncio.create_task(cli.rename(old, new)))
        for _ in range(200):  # until the rename waits on the file's migration lock
            dump = json.loads((await job.src.getxattr(Loc("", job.gfid), DUMP_KEY)).xattrs[DUMP_KEY])
            if dump["inodelk"].get(MIGRATE_DOMAIN, {}).get("blocked"):
                break
            await asyncio.sleep(0.001)
        else:
            raise AssertionError("the rename did not wait for the migration")

    assert (await migrate_file(dht, Loc("/", ROOT), name, hook=hook)).status == "moved"
    await renamed[0]
    fresh = await volume.client()
    assert await read_file(fresh, ROOT, "renamed") == bytes(model)
    with pytest.raises(FopError) as exc:
        await fresh.lookup(Loc(name, pargfid=ROOT, name=name))
    assert exc.value.errno == errno.ENOENT


async def test_unlink_during_the_migration(volume: Volume) -> None:
    dht, name, _ = await misplaced_file(volume, 3 * MiB, seed=3)
    cli = await volume.client()

    async def hook(step: str, job: FileToMove, offset: int) -> None:
        if step == "chunk" and offset == 0:
            await cli.unlink(Loc(name, pargfid=ROOT, name=name), 0)

    assert (await migrate_file(dht, Loc("/", ROOT), name, hook=hook)).status == "gone"
    assert volume.placement(name) == {}
    for b in volume.posix:
        assert not os.listdir(brick_dir(b) / ".mortar" / "unlink")


async def test_a_migrator_that_died_in_phase_one_is_redone(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Markers left behind by a dead migrator: clients keep repeating their writes on the
    destination, and the next migration starts over and finishes."""
    dht, name, model = await misplaced_file(volume, 3 * MiB, seed=4)

    async def die(step: str, job: FileToMove, offset: int) -> None:
        if step == "switch":
            raise FopError(errno.ENOTCONN, "the migrator went away")

    async def no_cleanup(self: FileMigration) -> None:  # a killed process undoes nothing
        return None

    with monkeypatch.context() as m:
        m.setattr(FileMigration, "_abort", no_cleanup)
        assert (await migrate_file(dht, Loc("/", ROOT), name, hook=die)).status == "failed"
    src = brick_dir(volume.posix[0]) / name
    assert os.getxattr(src, MIGRATING_XATTR) and os.stat(src).st_mode & stat.S_ISVTX
    cli = await volume.client()
    fd = await open_existing(cli, ROOT, name)
    await cli.writev(fd, b"meanwhile", 123, 0)
    apply(model, 123, b"meanwhile")
    assert (await cli.fstat(fd)).iatt.mode == stat.S_IFREG | 0o644

    assert (await migrate_file(await volume.client(), Loc("/", ROOT), name)).status == "moved"
    assert volume.placement(name) == {"vol-locks-1": "data"}
    assert await read_file(await volume.client(), ROOT, name) == bytes(model)
    assert await read_fd(cli, fd) == bytes(model)
    await cli.release(fd)


async def test_a_switch_cut_short_after_its_commit_point_is_finished(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch fails after the commit point, before the source looks like a link file: the
    destination is the file for every client, and the next crawl drops the source."""
    dht, name, model = await misplaced_file(volume, 2 * MiB, seed=5)
    src_sub = volume.subvols[0]
    real_fsetattr = src_sub.fsetattr

    async def failing_link_mode(fd: Fd, attr: AttrSet, xdata: object = None) -> object:
        if attr.valid & SetAttrValid.MODE and attr.mode == stat.S_ISVTX:
            raise FopError(errno.EIO, "disk error")
        return await real_fsetattr(fd, attr)

    monkeypatch.setattr(src_sub, "fsetattr", failing_link_mode)
    outcome = await migrate_file(dht, Loc("/", ROOT), name)
    assert outcome.status == "failed" and outcome.reason == "EIO"
    assert volume.placement(name) == {"vol-locks-0": "data", "vol-locks-1": "data"}
    reader = await volume.client()
    assert await read_file(reader, ROOT, name) == bytes(model)  # the destination is the file now
    monkeypatch.setattr(src_sub, "fsetattr", real_fsetattr)

    # lookups find the destination, so only a crawl sees the source left behind: rebalance does
    status = await Rebalance(await volume.client()).run()
    assert status.state == "completed" and status.files_moved == 1 and status.files_scanned == 1
    assert volume.placement(name) == {"vol-locks-1": "data"}
    assert await read_file(await volume.client(), ROOT, name) == bytes(model)


async def test_the_source_becomes_a_link_file_before_it_loses_its_name(
    volume: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica set cannot change an inode that has no name left, so the source is made a link
    file (linkto, mode, empty) while it still has its name; an unlink that then fails leaves only a
    stale link file that lookups step over."""
    dht, name, model = await misplaced_file(volume, 2 * MiB, seed=7)
    src_sub = volume.subvols[0]
    src_path = brick_dir(volume.posix[0]) / name
    seen: list[tuple[int, int, bytes]] = []

    async def failing_unlink(*args: object, **kwargs: object) -> object:
        st = os.stat(src_path)
        seen.append((st.st_mode & 0o7777, st.st_size, os.getxattr(src_path, LINKTO_XATTR)))
        raise FopError(errno.EIO, "disk error")

    monkeypatch.setattr(src_sub, "unlink", failing_unlink)
    outcome = await migrate_file(dht, Loc("/", ROOT), name)
    assert outcome.status == "failed" and outcome.reason == "EIO"
    assert seen and seen[0][:2] == (stat.S_ISVTX, 0) and decode_linkto(seen[0][2]) == "vol-locks-1"
    assert MIGRATING_XATTR not in os.listxattr(src_path)
    assert volume.placement(name) == {"vol-locks-0": "link->vol-locks-1", "vol-locks-1": "data"}
    assert await read_file(await volume.client(), ROOT, name) == bytes(model)


async def test_a_write_the_destination_cannot_take_cancels_the_migration(
    volume: Volume, tmpfs: Mount
) -> None:
    """The destination fills up under a client's repeated write: the migration is abandoned at its
    switch, the write stands on the source and nothing is lost."""
    old = await volume.client(await volume.add(1))
    await old.lookup(Loc("/", ROOT))
    small = (await volume.add(1, under=[tmpfs(4)]))[0]
    dht = await volume.client()
    await dht.fix_layout(Loc("/", ROOT))
    name = name_hashing_to(volume.layout(""), small.name, "vm")
    model = bytearray(random.Random(6).randbytes(MiB))
    await write_file(old, ROOT, name, [(0, bytes(model))], MiB)
    cli = await volume.client()
    fd = await open_existing(cli, ROOT, name)

    async def hook(step: str, job: FileToMove, offset: int) -> None:
        if step == "chunk" and offset == 0:
            for i in range(5):  # 5 MiB more than the 4 MiB destination holds
                chunk = bytes([i + 1]) * MiB
                await cli.writev(fd, chunk, (i + 1) * MiB, 0)
                apply(model, (i + 1) * MiB, chunk)

    outcome = await migrate_file(dht, Loc("/", ROOT), name, force=True, hook=hook)
    assert (outcome.status, outcome.reason) == ("failed", "cancelled")
    assert volume.placement(name) == {"vol-locks-0": "data", small.name: "link->vol-locks-0"}
    src = brick_dir(volume.posix[0]) / name
    assert not os.stat(src).st_mode & stat.S_ISVTX and MIGRATING_XATTR not in os.listxattr(src)
    assert os.stat(brick_dir(volume.posix[1]) / name).st_size == 0
    assert await read_file(await volume.client(), ROOT, name) == bytes(model)
    assert await read_fd(cli, fd) == bytes(model)
    await cli.release(fd)
