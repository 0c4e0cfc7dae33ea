"""storage/bd in process, on a thin pool in a temporary file: every fop, its refusals, and restarts."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    AttrSet,
    Fd,
    Flock,
    LockType,
    SeekWhat,
    SetAttrValid,
    XattropFlag,
)
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.thinpool.bdpool import ALLOCATED_XATTR, ORIGIN_XATTR, SHARED_XATTR
from mortar.xlators.storage.bd import BdError, BdTranslator
from mortar.xlators.storage.bd_store import AttrStore
from tests.xlators.storage.conftest import NOBODY, as_user, at, by_gfid, req

MIB = 1 << 20
BS = 64 << 10
ROOT = by_gfid(ROOT_GFID)


def make_bd(pool: Path, volume_id: str, **options: str) -> BdTranslator:
    opts = {
        "pool": str(pool),
        "volume-id": volume_id,
        "pool-create": "on",
        "pool-size": "64MiB",
        "block-size": str(BS),
        "commit-interval": "0",
        **options,
    }
    return BdTranslator("bd", opts)


@pytest.fixture
def volume_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
async def bd(tmp_path: Path, volume_id: str) -> AsyncIterator[BdTranslator]:
    xl = make_bd(tmp_path / "pool", volume_id)
    await xl.init()
    yield xl
    await xl.fini()


async def create(xl: BdTranslator, name: str, data: bytes = b"", flags: int = os.O_RDWR) -> tuple[Gfid, Fd]:
    gfid = Gfid.random()
    fd = Fd(gfid)
    await xl.create(at(ROOT_GFID, name), flags, 0o644, 0o022, fd, req(gfid))
    if data:
        await xl.writev(fd, data, 0, 0)
    return gfid, fd


async def open_(xl: BdTranslator, gfid: Gfid, flags: int = os.O_RDWR) -> Fd:
    fd = Fd(gfid, flags)
    await xl.open(by_gfid(gfid), flags, fd)
    return fd


async def read_all(xl: BdTranslator, name: str) -> bytes:
    gfid = (await xl.lookup(at(ROOT_GFID, name))).iatt.gfid
    fd = await open_(xl, gfid, os.O_RDONLY)
    try:
        size = (await xl.fstat(fd)).iatt.size
        return bytes((await xl.readv(fd, size, 0, 0)).data)
    finally:
        await xl.release(fd)


async def names(xl: BdTranslator) -> list[str]:
    fd = Fd(ROOT_GFID)
    await xl.opendir(ROOT, fd)
    try:
        found, offset = [], 0
        while entries := (await xl.readdirp(fd, 0, offset)).entries:
            found += [e.name for e in entries]
            offset = entries[-1].offset
        return found
    finally:
        await xl.releasedir(fd)


async def free_blocks(xl: BdTranslator) -> int:
    return (await xl.statfs(ROOT)).statvfs.bfree


async def symlink(xl: BdTranslator, target: str, name: str) -> Gfid:
    gfid = Gfid.random()
    await xl.symlink(target, at(ROOT_GFID, name), 0o022, req(gfid))
    return gfid


def errno_of(exc: pytest.ExceptionInfo[FopError]) -> int:
    return exc.value.errno


# ---- namespace -------------------------------------------------------------------------------


async def test_create_lookup_stat_and_listing(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "vm1.img", b"hello")
    reply = await bd.lookup(at(ROOT_GFID, "vm1.img"))
    assert reply.iatt.gfid == gfid and stat.S_ISREG(reply.iatt.mode) and reply.iatt.mode & 0o777 == 0o644
    assert reply.iatt.size == 5 and reply.iatt.nlink == 1 and reply.iatt.blocks == BS // 512
    assert reply.parent_post is not None and reply.parent_post.gfid == ROOT_GFID
    assert (await bd.stat(by_gfid(gfid))).iatt.size == 5
    assert (await bd.lookup(by_gfid(gfid))).iatt.gfid == gfid
    root = (await bd.lookup(ROOT)).iatt
    assert root.is_dir and root.gfid == ROOT_GFID
    await create(bd, "vm2.img")
    assert await names(bd) == ["vm1.img", "vm2.img"]
    with pytest.raises(FopError) as exc:
        await bd.lookup(at(ROOT_GFID, "nope"))
    assert errno_of(exc) == errno.ENOENT
    with pytest.raises(FopError) as exc:
        await bd.stat(by_gfid(Gfid.random()))
    assert errno_of(exc) == errno.ESTALE
    with pytest.raises(FopError) as exc:
        await bd.lookup(at(gfid, "x"))
    assert errno_of(exc) == errno.ENOTDIR
    with pytest.raises(FopError) as exc:
        await create(bd, "vm1.img", flags=os.O_RDWR | os.O_EXCL)
    assert errno_of(exc) == errno.EEXIST
    await bd.release(fd)


async def test_create_without_excl_opens_and_o_trunc_empties(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "a", b"x" * 1000)
    await bd.release(fd)
    again = Fd(gfid)
    reply = await bd.create(at(ROOT_GFID, "a"), os.O_RDWR | os.O_TRUNC, 0o600, 0, again, req())
    assert reply.iatt.gfid == gfid and reply.iatt.size == 0
    await bd.release(again)


async def test_refusals(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "disk")
    cases: list[tuple[Any, int]] = [
        (bd.mkdir(at(ROOT_GFID, "d"), 0o755, 0, req()), errno.EPERM),
        (bd.mknod(at(ROOT_GFID, "fifo"), stat.S_IFIFO | 0o644, 0, 0, req()), errno.EPERM),
        (bd.mknod(at(ROOT_GFID, "dev"), stat.S_IFBLK | 0o644, 0x0801, 0, req()), errno.EPERM),
        (bd.symlink("missing", at(ROOT_GFID, "s"), 0, req()), errno.ENOENT),
        (bd.symlink("../disk", at(ROOT_GFID, "s"), 0, req()), errno.EINVAL),
        (bd.symlink("..", at(ROOT_GFID, "s"), 0, req()), errno.EINVAL),
        (bd.symlink("/pool/disk", at(ROOT_GFID, "s"), 0, req()), errno.EINVAL),
        (bd.symlink("", at(ROOT_GFID, "s"), 0, req()), errno.EINVAL),
        (bd.create(at(ROOT_GFID, ".mortar-x"), os.O_RDWR, 0o644, 0, Fd(Gfid.random()), req()), errno.EPERM),
        (bd.create(at(ROOT_GFID, "../x"), os.O_RDWR, 0o644, 0, Fd(Gfid.random()), req()), errno.EINVAL),
        (bd.create(at(ROOT_GFID, "y"), os.O_RDWR, 0o644, 0, Fd(Gfid.random()), None), errno.EINVAL),
        (bd.create(at(ROOT_GFID, "z"), os.O_RDWR, 0o644, 0, Fd(gfid), req(gfid)), errno.EEXIST),
        (bd.rmdir(at(ROOT_GFID, "disk"), 0), errno.ENOTDIR),
        (bd.link(ROOT, at(ROOT_GFID, "rootclone")), errno.EPERM),
        (bd.readlink(by_gfid(gfid)), errno.EINVAL),
        (bd.inodelk("d", by_gfid(gfid), 6, Flock(LockType.WRLCK)), errno.ENOSYS),
        (bd.lk(fd, 6, Flock(LockType.WRLCK)), errno.ENOSYS),
        (bd.open(ROOT, os.O_RDWR, Fd(ROOT_GFID)), errno.EISDIR),
        (bd.fallocate(fd, 0, 0, MIB), errno.EOPNOTSUPP),
        (bd.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, MIB), errno.EOPNOTSUPP),
        (bd.readv(fd, 128 * MIB, 0, 0), errno.EINVAL),
    ]
    for call, expected in cases:
        with pytest.raises(FopError) as exc:
            await call
        assert exc.value.errno == expected, (exc.value, expected)
    assert await names(bd) == ["disk"]
    await bd.release(fd)


async def test_mknod_of_a_regular_file_makes_an_empty_image(bd: BdTranslator) -> None:
    gfid = Gfid.random()
    reply = await bd.mknod(at(ROOT_GFID, "plain"), stat.S_IFREG | 0o640, 0, 0o022, req(gfid))
    assert reply.iatt.gfid == gfid and reply.iatt.size == 0 and reply.iatt.mode == stat.S_IFREG | 0o640


async def test_link_is_an_independent_full_clone(bd: BdTranslator) -> None:
    data = os.urandom(3 * BS + 100)
    gfid, fd = await create(bd, "base", data)
    before = await free_blocks(bd)
    reply = await bd.link(by_gfid(gfid), at(ROOT_GFID, "copy"))
    assert reply.iatt.gfid != gfid and reply.iatt.size == len(data) and stat.S_ISREG(reply.iatt.mode)
    # without gfid-req every replica derives the same gfid from the source and the name
    assert reply.iatt.gfid == Gfid(uuid.uuid5(uuid.UUID(bytes=gfid), "copy").bytes)
    assert before - await free_blocks(bd) == 4  # a full copy: blocks of its own
    clone_fd = await open_(bd, reply.iatt.gfid)
    await bd.writev(clone_fd, b"C" * 10, 0, 0)
    assert await read_all(bd, "base") == data
    await bd.writev(fd, b"O" * 10, BS, 0)
    assert await read_all(bd, "copy") == b"C" * 10 + data[10:]
    assert await read_all(bd, "base") == data[:BS] + b"O" * 10 + data[BS + 10 :]
    with pytest.raises(FopError) as exc:
        await bd.getxattr(by_gfid(reply.iatt.gfid), ORIGIN_XATTR)
    assert errno_of(exc) == errno.ENODATA
    wanted = Gfid.random()
    assert (await bd.link(by_gfid(gfid), at(ROOT_GFID, "copy2"), req(wanted))).iatt.gfid == wanted
    with pytest.raises(FopError) as exc:
        await bd.link(by_gfid(gfid), at(ROOT_GFID, "copy"))
    assert errno_of(exc) == errno.EEXIST
    await bd.release(fd)
    await bd.release(clone_fd)


async def test_symlink_is_a_writable_snapshot(bd: BdTranslator) -> None:
    data = os.urandom(4 * BS)
    _, fd = await create(bd, "origin", data)
    before = await free_blocks(bd)
    snap = await symlink(bd, "origin", "snap")
    assert before == await free_blocks(bd)  # O(1): every block shared
    attrs = (await bd.stat(by_gfid(snap))).iatt
    assert stat.S_ISREG(attrs.mode) and attrs.size == len(data) and attrs.gfid == snap
    assert (await bd.getxattr(by_gfid(snap), ORIGIN_XATTR)).xattrs == {ORIGIN_XATTR: b"origin"}
    assert (await bd.readlink(by_gfid(snap))).target == "origin"
    shared = (await bd.getxattr(by_gfid(snap), SHARED_XATTR)).xattrs[SHARED_XATTR]
    assert int(shared) == len(data)
    snap_fd = await open_(bd, snap)
    await bd.writev(snap_fd, b"S" * 100, 0, 0)  # copy on write into the snapshot
    assert await read_all(bd, "origin") == data
    await bd.writev(fd, b"O" * 100, 2 * BS, 0)  # and the origin written after
    assert await read_all(bd, "snap") == b"S" * 100 + data[100:]
    assert before - await free_blocks(bd) == 2
    # the origin may go away; the snapshot stays whole
    await bd.release(fd)
    await bd.unlink(at(ROOT_GFID, "origin"), 0)
    assert await read_all(bd, "snap") == b"S" * 100 + data[100:]
    with pytest.raises(FopError) as exc:
        await bd.readlink(by_gfid(snap))
    assert errno_of(exc) == errno.EINVAL
    await bd.release(snap_fd)


async def test_unlink_frees_blocks_and_waits_for_last_close(bd: BdTranslator) -> None:
    empty = await free_blocks(bd)
    gfid, fd = await create(bd, "big", os.urandom(8 * BS))
    assert empty - await free_blocks(bd) == 8
    await bd.unlink(at(ROOT_GFID, "big"), 0)
    assert await names(bd) == []
    with pytest.raises(FopError) as exc:
        await bd.lookup(at(ROOT_GFID, "big"))
    assert errno_of(exc) == errno.ENOENT
    assert len((await bd.readv(fd, 2 * BS, 0, 0)).data) == 2 * BS  # still readable while open
    assert empty - await free_blocks(bd) == 8
    await bd.release(fd)
    assert await free_blocks(bd) == empty
    with pytest.raises(FopError) as exc:
        await bd.stat(by_gfid(gfid))
    assert errno_of(exc) == errno.ESTALE
    with pytest.raises(FopError) as exc:
        await bd.unlink(at(ROOT_GFID, "big"), 0)
    assert errno_of(exc) == errno.ENOENT


async def test_origin_unlinked_while_open_is_no_origin_any_more(bd: BdTranslator) -> None:
    _, fd = await create(bd, "base", b"b" * 100)
    snap = await symlink(bd, "base", "snap")
    await bd.unlink(at(ROOT_GFID, "base"), 0)
    with pytest.raises(FopError) as exc:
        await bd.getxattr(by_gfid(snap), ORIGIN_XATTR)  # not the hidden name the pool keeps meanwhile
    assert errno_of(exc) == errno.ENODATA
    assert ORIGIN_XATTR not in (await bd.getxattr(by_gfid(snap), None)).xattrs
    await bd.release(fd)
    assert await names(bd) == ["snap"] and await read_all(bd, "snap") == b"b" * 100


async def test_rename_moves_and_replaces(bd: BdTranslator) -> None:
    a, fa = await create(bd, "a", b"AAAA")
    b, fb = await create(bd, "b", b"BBBB")
    await bd.release(fb)
    free = await free_blocks(bd)
    reply = await bd.rename(at(ROOT_GFID, "a"), at(ROOT_GFID, "b"))
    assert reply.iatt.gfid == a
    assert await names(bd) == ["b"]
    assert await read_all(bd, "b") == b"AAAA"
    assert await free_blocks(bd) == free + 1  # the replaced image is gone
    await bd.rename(at(ROOT_GFID, "b"), at(ROOT_GFID, "c"))
    assert (await bd.lookup(at(ROOT_GFID, "c"))).iatt.gfid == a
    assert (await bd.fstat(fa)).iatt.gfid == a  # open fds follow the image
    with pytest.raises(FopError) as exc:
        await bd.stat(by_gfid(b))
    assert errno_of(exc) == errno.ESTALE
    await bd.release(fa)


async def test_truncate_resizes_both_ways(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "t", os.urandom(4 * BS))
    free = await free_blocks(bd)
    reply = await bd.truncate(by_gfid(gfid), BS + 10)
    assert reply.pre is not None and reply.post is not None
    assert reply.pre.size == 4 * BS and reply.post.size == BS + 10
    assert await free_blocks(bd) == free + 2  # whole blocks past the end are freed
    await bd.ftruncate(fd, 3 * BS)
    data = await read_all(bd, "t")
    assert len(data) == 3 * BS and data[BS + 10 :] == bytes(3 * BS - BS - 10)  # growth reads zeros
    await bd.truncate(by_gfid(gfid), 0)
    assert (await bd.fstat(fd)).iatt.blocks == 0
    await bd.release(fd)


async def test_writes_past_the_end_grow_and_append(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "grow")
    await bd.writev(fd, b"abc", 10, 0)
    assert await read_all(bd, "grow") == bytes(10) + b"abc"
    afd = await open_(bd, gfid, os.O_WRONLY | os.O_APPEND)
    reply = await bd.writev(afd, b"xyz", 0, 0)
    assert reply.post is not None and reply.post.size == 16 and reply.post.blocks == BS // 512
    assert await read_all(bd, "grow") == bytes(10) + b"abcxyz"
    rfd = await open_(bd, gfid, os.O_RDONLY)
    with pytest.raises(FopError) as exc:
        await bd.writev(rfd, b"no", 0, 0)
    assert errno_of(exc) == errno.EBADF
    for f in (fd, afd, rfd):
        await bd.release(f)


async def test_full_pool_enospc_changes_nothing(tmp_path: Path, volume_id: str) -> None:
    xl = make_bd(tmp_path / "small", volume_id, **{"pool-size": "1MiB"})
    await xl.init()
    try:
        free = await free_blocks(xl)
        _, fd = await create(xl, "fill", os.urandom(free * BS - 10))
        with pytest.raises(FopError) as exc:
            await xl.writev(fd, b"x" * (2 * BS), free * BS, 0)
        assert errno_of(exc) == errno.ENOSPC
        assert (await xl.fstat(fd)).iatt.size == free * BS - 10  # the growth was taken back
        await xl.writev(fd, b"tail", free * BS - 10, 0)  # within the last block: fits
        await xl.release(fd)
    finally:
        await xl.fini()


async def test_seek_data_and_hole(bd: BdTranslator) -> None:
    _, fd = await create(bd, "sparse")
    await bd.ftruncate(fd, 10 * BS)
    await bd.writev(fd, b"d" * 10, 3 * BS + 5, 0)
    await bd.writev(fd, b"d" * BS, 7 * BS, 0)
    assert (await bd.seek(fd, 0, SeekWhat.DATA)).offset == 3 * BS
    assert (await bd.seek(fd, 3 * BS + 7, SeekWhat.HOLE)).offset == 4 * BS
    assert (await bd.seek(fd, 4 * BS, SeekWhat.DATA)).offset == 7 * BS
    assert (await bd.seek(fd, 0, SeekWhat.HOLE)).offset == 0
    assert (await bd.seek(fd, 7 * BS, SeekWhat.HOLE)).offset == 8 * BS
    with pytest.raises(FopError) as exc:
        await bd.seek(fd, 8 * BS, SeekWhat.DATA)
    assert errno_of(exc) == errno.ENXIO
    await bd.release(fd)


async def test_fallocate_discard_and_zerofill(bd: BdTranslator) -> None:
    data = os.urandom(6 * BS)
    _, fd = await create(bd, "f", data)
    free = await free_blocks(bd)
    await bd.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BS, 2 * BS)
    assert await free_blocks(bd) == free + 2
    await bd.discard(fd, 4 * BS + 10, BS)  # partial blocks are zeroed, not freed
    expect = data[:BS] + bytes(2 * BS) + data[3 * BS : 4 * BS + 10] + bytes(BS) + data[5 * BS + 10 :]
    assert await read_all(bd, "f") == expect
    await bd.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 10)
    await bd.fallocate(fd, FALLOC_FL_ZERO_RANGE, 6 * BS, BS)  # grows, allocated zeros
    await bd.zerofill(fd, 7 * BS, BS)
    st = (await bd.fstat(fd)).iatt
    assert st.size == 8 * BS
    assert await read_all(bd, "f") == bytes(10) + expect[10:] + bytes(2 * BS)
    with pytest.raises(FopError) as exc:
        await bd.fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, BS)
    assert errno_of(exc) == errno.EINVAL
    await bd.release(fd)


async def test_copy_file_range_keeps_holes_and_rchecksum(bd: BdTranslator) -> None:
    gfid, src = await create(bd, "src")
    await bd.ftruncate(src, 8 * BS)
    await bd.writev(src, b"a" * BS, BS, 0)
    await bd.writev(src, b"b" * 100, 5 * BS, 0)
    _, dst = await create(bd, "dst", b"z" * (8 * BS))
    reply = await bd.copy_file_range(src, 0, dst, 0, 10 * BS, 0)
    assert reply.length == 8 * BS
    assert await read_all(bd, "dst") == await read_all(bd, "src")
    dst_gfid = (await bd.fstat(dst)).iatt.gfid
    for image in (gfid, dst_gfid):
        allocated = (await bd.getxattr(by_gfid(image), ALLOCATED_XATTR)).xattrs[ALLOCATED_XATTR]
        assert allocated == str(2 * BS).encode()
    content = await read_all(bd, "src")
    summed = await bd.rchecksum(src, 0, len(content))
    assert summed.weak == zlib.adler32(content) and summed.strong == hashlib.blake2b(content).digest()
    with pytest.raises(FopError) as exc:
        await bd.copy_file_range(src, 0, src, BS, 2 * BS, 0)
    assert errno_of(exc) == errno.EINVAL
    await bd.release(src)
    await bd.release(dst)


# ---- attributes and xattrs -------------------------------------------------------------------


async def test_xattrs_user_trusted_virtual_and_flags(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "x")
    loc = by_gfid(gfid)
    await bd.setxattr(loc, {"user.note": b"hello", "trusted.afr.v-client-0": bytes(12)}, 0)
    got = (await bd.getxattr(loc, None)).xattrs
    assert got["user.note"] == b"hello" and "trusted.afr.v-client-0" in got and ALLOCATED_XATTR in got
    assert ORIGIN_XATTR not in got  # not a snapshot
    assert (await bd.fgetxattr(fd, "user.note")).xattrs == {"user.note": b"hello"}
    nobody_sees = (await as_user(NOBODY, bd.getxattr(ROOT, None))).xattrs
    assert not any(k.startswith("trusted.") for k in nobody_sees)
    with pytest.raises(FopError) as exc:
        await bd.setxattr(loc, {"user.note": b"again"}, os.XATTR_CREATE)
    assert errno_of(exc) == errno.EEXIST
    with pytest.raises(FopError) as exc:
        await bd.setxattr(loc, {"user.other": b"x"}, os.XATTR_REPLACE)
    assert errno_of(exc) == errno.ENODATA
    with pytest.raises(FopError) as exc:
        await bd.setxattr(loc, {ALLOCATED_XATTR: b"0"}, 0)
    assert errno_of(exc) == errno.EPERM
    with pytest.raises(FopError) as exc:
        await bd.removexattr(loc, ORIGIN_XATTR)
    assert errno_of(exc) == errno.EPERM
    await bd.fremovexattr(fd, "user.note")
    with pytest.raises(FopError) as exc:
        await bd.getxattr(loc, "user.note")
    assert errno_of(exc) == errno.ENODATA
    # lookup returns the xattrs asked for in xdata, as replication asks for its changelog
    reply = await bd.lookup(at(ROOT_GFID, "x"), {"xattrs": ["trusted.afr.v-client-0", "user.none"]})
    assert reply.xdata == {"xattrs": {"trusted.afr.v-client-0": bytes(12)}}
    await bd.release(fd)


async def test_xattrop_counts_and_survives_restart(tmp_path: Path, volume_id: str) -> None:
    xl = make_bd(tmp_path / "p", volume_id)
    await xl.init()
    gfid, fd = await create(xl, "img")
    one = (1).to_bytes(4, "big") + bytes(8)
    await xl.xattrop(by_gfid(gfid), XattropFlag.ADD_ARRAY, {"trusted.afr.v-client-1": one})
    reply = await xl.fxattrop(fd, XattropFlag.ADD_ARRAY, {"trusted.afr.v-client-1": one})
    assert reply.xattrs["trusted.afr.v-client-1"] == (2).to_bytes(4, "big") + bytes(8)
    await xl.xattrop(ROOT, XattropFlag.ADD_ARRAY, {"trusted.afr.dirty": one})
    with pytest.raises(FopError) as exc:
        await xl.xattrop(by_gfid(gfid), XattropFlag.ADD_ARRAY, {SHARED_XATTR: one})
    assert errno_of(exc) == errno.EPERM
    await xl.release(fd)
    await xl.fini()
    xl = make_bd(tmp_path / "p", volume_id)
    await xl.init()
    try:
        assert (await xl.getxattr(by_gfid(gfid), "trusted.afr.v-client-1")).xattrs == {
            "trusted.afr.v-client-1": (2).to_bytes(4, "big") + bytes(8)
        }
        assert (await xl.getxattr(ROOT, "trusted.afr.dirty")).xattrs["trusted.afr.dirty"] == one
    finally:
        await xl.fini()


async def test_setattr_and_permissions(bd: BdTranslator) -> None:
    gfid, fd = await create(bd, "owned")
    loc = by_gfid(gfid)
    await bd.setattr(loc, AttrSet(SetAttrValid.MODE, mode=0o600))
    await bd.setattr(loc, AttrSet(SetAttrValid.UID | SetAttrValid.GID, uid=1000, gid=1000))
    times = AttrSet(SetAttrValid.ATIME | SetAttrValid.MTIME, atime_ns=10**18, mtime_ns=2 * 10**18)
    await bd.fsetattr(fd, times)
    st = (await bd.stat(loc)).iatt
    assert (st.mode & 0o7777, st.uid, st.gid) == (0o600, 1000, 1000)
    assert (st.atime_ns, st.mtime_ns) == (10**18, 2 * 10**18)
    owner = CallContext(uid=1000, gid=1000, groups=(1000,))
    await as_user(owner, bd.access(loc, os.R_OK | os.W_OK))
    with pytest.raises(FopError) as exc:
        await as_user(NOBODY, bd.access(loc, os.R_OK))
    assert errno_of(exc) == errno.EACCES
    with pytest.raises(FopError) as exc:
        await as_user(NOBODY, bd.open(loc, os.O_RDONLY, Fd(gfid)))
    assert errno_of(exc) == errno.EACCES
    with pytest.raises(FopError) as exc:
        await as_user(NOBODY, bd.setattr(loc, AttrSet(SetAttrValid.MODE, mode=0o777)))
    assert errno_of(exc) == errno.EPERM
    with pytest.raises(FopError) as exc:
        await as_user(owner, bd.setattr(loc, AttrSet(SetAttrValid.UID, uid=0)))
    assert errno_of(exc) == errno.EPERM
    with pytest.raises(FopError) as exc:
        await as_user(NOBODY, create(bd, "by-nobody"))  # the pool directory is 0755 root
    assert errno_of(exc) == errno.EACCES
    with pytest.raises(FopError) as exc:
        await bd.setattr(loc, AttrSet(SetAttrValid.SIZE))
    assert errno_of(exc) == errno.EINVAL
    await bd.setattr(ROOT, AttrSet(SetAttrValid.MODE, mode=0o777))
    assert (await bd.stat(ROOT)).iatt.mode == stat.S_IFDIR | 0o777
    own_fd = await as_user(owner, open_(bd, gfid))
    await as_user(owner, bd.writev(own_fd, b"mine", 0, 0))
    created = (await as_user(owner, bd.symlink("owned", at(ROOT_GFID, "snap-of-owned"), 0o022, req()))).iatt
    assert created.uid == 1000 and created.mode & 0o777 == 0o600
    await bd.release(own_fd)
    await bd.release(fd)


# ---- restart, markers, recovery --------------------------------------------------------------


async def test_everything_survives_a_restart(tmp_path: Path, volume_id: str) -> None:
    pool = tmp_path / "pool"
    xl = make_bd(pool, volume_id)
    await xl.init()
    data = os.urandom(2 * BS + 7)
    gfid, fd = await create(xl, "keep", data)
    await xl.fsetattr(fd, AttrSet(SetAttrValid.MODE | SetAttrValid.MTIME, mode=0o640, mtime_ns=123))
    await xl.fsync(fd, 0)
    snap = await symlink(xl, "keep", "keep-snap")
    await xl.release(fd)
    await xl.fini()
    assert {"data", "data.meta", "data.meta.bd"} <= {p.name for p in pool.iterdir()}
    xl = make_bd(pool, volume_id, **{"pool-create": "off"})
    await xl.init()
    try:
        st = (await xl.lookup(at(ROOT_GFID, "keep"))).iatt
        assert (st.gfid, st.size, st.mode & 0o777, st.mtime_ns) == (gfid, len(data), 0o640, 123)
        assert await read_all(xl, "keep") == data
        assert (await xl.lookup(at(ROOT_GFID, "keep-snap"))).iatt.gfid == snap
        assert (await xl.getxattr(by_gfid(snap), ORIGIN_XATTR)).xattrs[ORIGIN_XATTR] == b"keep"
    finally:
        await xl.fini()


async def test_markers_refuse_the_wrong_pool(tmp_path: Path, volume_id: str) -> None:
    pool = tmp_path / "pool"
    xl = make_bd(pool, volume_id)
    await xl.init()
    await create(xl, "img")
    await xl.fini()
    with pytest.raises(BdError, match="brick of volume"):
        await make_bd(pool, str(uuid.uuid4())).init()
    with pytest.raises(BdError, match="does not exist"):
        await make_bd(tmp_path / "absent", volume_id, **{"pool-create": "off"}).init()
    # a pool with images but no attribute store is never taken over
    os.unlink(pool / "data.meta.bd")
    for suffix in ("-wal", "-shm"):
        (pool / f"data.meta.bd{suffix}").unlink(missing_ok=True)
    with pytest.raises(BdError, match="no volume-id marker"):
        await make_bd(pool, volume_id).init()
    with pytest.raises(BdError, match="option 'volume-id'"):
        await BdTranslator("bd", {"pool": str(pool)}).init()


async def test_recovery_adopts_and_drops(tmp_path: Path, volume_id: str) -> None:
    """What a crash between the pool's commit and the attribute store's leaves behind is repaired."""
    pool = tmp_path / "pool"
    xl = make_bd(pool, volume_id)
    await xl.init()
    g1, f1 = await create(xl, "one", b"1")
    g2, f2 = await create(xl, "two", b"2")
    await xl.release(f1)
    await xl.release(f2)
    await xl.fini()
    store = AttrStore(str(pool / "data.meta.bd"))
    _, metas = store.load()
    by_gfid_key = {m.gfid: k for k, m in metas.items()}
    store.delete([by_gfid_key[g1]])  # "one" lost its record
    store.put(type(metas[by_gfid_key[g2]])("999", Gfid.random(), 0o644, 0, 0, 1, 1, 1))  # an orphan record
    store.close()
    xl = make_bd(pool, volume_id)
    await xl.init()
    try:
        adopted = (await xl.lookup(at(ROOT_GFID, "one"))).iatt
        assert adopted.gfid != g1 and adopted.mode & 0o777 == 0o600 and adopted.size == 1
        assert (await xl.lookup(at(ROOT_GFID, "two"))).iatt.gfid == g2
        assert await names(xl) == ["one", "two"]
    finally:
        await xl.fini()
    _, metas = AttrStore(str(pool / "data.meta.bd")).load()
    assert "999" not in metas


async def test_unlinked_while_open_is_deleted_at_next_start(tmp_path: Path, volume_id: str) -> None:
    pool = tmp_path / "pool"
    xl = make_bd(pool, volume_id)
    await xl.init()
    await create(xl, "doomed", os.urandom(4 * BS))
    empty = await free_blocks(xl) + 4
    await xl.unlink(at(ROOT_GFID, "doomed"), 0)
    brick = xl.brick
    brick.fds.clear()  # as if the process died with the file open: nothing released
    brick.close()
    xl._brick = None
    xl = make_bd(pool, volume_id)
    await xl.init()
    try:
        assert await names(xl) == [] and await free_blocks(xl) == empty
    finally:
        await xl.fini()
