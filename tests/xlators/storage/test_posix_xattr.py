"""storage/posix extended attributes: the protected brick xattrs, flags, and atomic xattrop."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mortar.core.errors import FopError
from mortar.core.fops import Fd, XattropFlag
from mortar.core.gfid import ROOT_GFID
from mortar.xlators.storage.posix import PosixTranslator
from mortar.xlators.storage.posix_handles import GFID_XATTR, VOLUME_ID_XATTR
from mortar.xlators.storage.posix_xattr import xattrop_apply

from .conftest import at, by_gfid, create, mkdir

AFR = "trusted.afr.vol-client-0"


async def errno_of(aw: object) -> int:
    with pytest.raises(FopError) as exc:
        await aw  # type: ignore[misc]
    return exc.value.errno


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


async def test_set_get_list_remove(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "f")
    loc = by_gfid(reply.iatt.gfid)
    await posix.setxattr(loc, {"user.a": b"1", "trusted.mortar.dht": b"layout"}, 0)
    await posix.fsetxattr(fd, {"user.b": b"2"}, 0)
    assert (await posix.getxattr(loc, "user.a")).xattrs == {"user.a": b"1"}
    everything = (await posix.getxattr(loc, None)).xattrs
    assert everything == {"user.a": b"1", "user.b": b"2", "trusted.mortar.dht": b"layout"}
    assert (await posix.fgetxattr(fd, None)).xattrs == everything  # the brick's own xattrs stay hidden
    assert await errno_of(posix.getxattr(loc, "user.none")) == errno.ENODATA
    # XATTR_CREATE / XATTR_REPLACE
    assert await errno_of(posix.setxattr(loc, {"user.a": b"x"}, os.XATTR_CREATE)) == errno.EEXIST
    assert await errno_of(posix.setxattr(loc, {"user.new": b"x"}, os.XATTR_REPLACE)) == errno.ENODATA
    await posix.setxattr(loc, {"user.a": b"3"}, os.XATTR_REPLACE)
    assert (await posix.fgetxattr(fd, "user.a")).xattrs == {"user.a": b"3"}
    assert await errno_of(posix.setxattr(loc, {"user.a": b"3"}, 8)) == errno.EINVAL
    await posix.removexattr(loc, "user.a")
    await posix.fremovexattr(fd, "user.b")
    assert await errno_of(posix.removexattr(loc, "user.a")) == errno.ENODATA
    assert (await posix.getxattr(loc, None)).xattrs == {"trusted.mortar.dht": b"layout"}
    assert await errno_of(posix.setxattr(loc, {"nonamespace": b"x"}, 0)) == errno.EOPNOTSUPP
    # directories, by gfid and by name
    d = await mkdir(posix, "d")
    await posix.setxattr(by_gfid(d), {"user.dir": b"yes"}, 0)
    assert (await posix.getxattr(at(ROOT_GFID, "d"), "user.dir")).xattrs == {"user.dir": b"yes"}
    await posix.release(fd)


@pytest.mark.parametrize("name", [GFID_XATTR, VOLUME_ID_XATTR])
async def test_brick_xattrs_are_protected(posix: PosixTranslator, name: str) -> None:
    reply, fd = await create(posix, "f")
    g = reply.iatt.gfid
    for loc in (by_gfid(g), by_gfid(ROOT_GFID)):
        assert await errno_of(posix.setxattr(loc, {name: b"\0" * 16}, 0)) == errno.EPERM
        assert await errno_of(posix.removexattr(loc, name)) == errno.EPERM
        assert (
            await errno_of(posix.xattrop(loc, XattropFlag.ADD_ARRAY, {name: i32(1, 1, 1, 1)})) == errno.EPERM
        )
        assert name not in (await posix.getxattr(loc, None)).xattrs
    assert await errno_of(posix.fsetxattr(fd, {name: b"x"}, 0)) == errno.EPERM
    assert await errno_of(posix.fremovexattr(fd, name)) == errno.EPERM
    assert os.getxattr(os.path.join(posix.brick.root, "f"), GFID_XATTR) == g
    # reading one by name is allowed (it is how a gfid is checked on disk)
    assert (await posix.getxattr(by_gfid(g), GFID_XATTR)).xattrs == {GFID_XATTR: bytes(g)}
    await posix.release(fd)


async def test_xattrop_arithmetic(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "f")
    loc = by_gfid(reply.iatt.gfid)
    # a missing xattr counts as zeros; the reply carries the new value
    got = await posix.xattrop(loc, XattropFlag.ADD_ARRAY, {AFR: i32(1, 0, 2)})
    assert got.xattrs == {AFR: i32(1, 0, 2)}
    got = await posix.fxattrop(fd, XattropFlag.ADD_ARRAY, {AFR: i32(-1, 5, 2)})
    assert got.xattrs == {AFR: i32(0, 5, 4)}
    assert (await posix.getxattr(loc, AFR)).xattrs == {AFR: i32(0, 5, 4)}
    wrap = await posix.xattrop(loc, XattropFlag.ADD_ARRAY, {"trusted.w": i32(2**31 - 1)})
    assert wrap.xattrs["trusted.w"] == i32(2**31 - 1)
    wrap = await posix.xattrop(loc, XattropFlag.ADD_ARRAY, {"trusted.w": i32(1)})
    assert wrap.xattrs["trusted.w"] == i32(-(2**31))  # wraps like the C int it imitates
    big = await posix.xattrop(loc, XattropFlag.ADD_ARRAY64, {"trusted.s": struct.pack(">q", 2**40)})
    assert big.xattrs["trusted.s"] == struct.pack(">q", 2**40)
    await posix.xattrop(loc, XattropFlag.OR_ARRAY, {"trusted.bits": i32(0b0101)})
    ored = await posix.xattrop(loc, XattropFlag.OR_ARRAY, {"trusted.bits": i32(0b0011)})
    assert ored.xattrs["trusted.bits"] == i32(0b0111)
    anded = await posix.xattrop(loc, XattropFlag.AND_ARRAY, {"trusted.bits": i32(0b0110)})
    assert anded.xattrs["trusted.bits"] == i32(0b0110)
    swapped = await posix.xattrop(loc, XattropFlag.GET_AND_SET, {"trusted.bits": i32(9)})
    assert swapped.xattrs["trusted.bits"] == i32(0b0110)  # the old value comes back
    assert (await posix.getxattr(loc, "trusted.bits")).xattrs["trusted.bits"] == i32(9)
    fresh = await posix.xattrop(loc, XattropFlag.GET_AND_SET, {"trusted.fresh": i32(1)})
    assert fresh.xattrs["trusted.fresh"] == i32(0)
    seeded = await posix.xattrop(loc, XattropFlag.ADD_ARRAY_WITH_DEFAULT, {"trusted.v": i32(1, 1, 100, 200)})
    assert seeded.xattrs["trusted.v"] == i32(101, 201)  # zero elements take the default first
    seeded = await posix.xattrop(loc, XattropFlag.ADD_ARRAY_WITH_DEFAULT, {"trusted.v": i32(1, 0, 100, 200)})
    assert seeded.xattrs["trusted.v"] == i32(102, 201)
    assert await errno_of(posix.xattrop(loc, XattropFlag.ADD_ARRAY, {AFR: b"\0\0\0"})) == errno.EINVAL
    assert await errno_of(posix.xattrop(loc, 99, {AFR: i32(1)})) == errno.EINVAL
    await posix.release(fd)


async def test_concurrent_xattrops_sum_exactly(posix: PosixTranslator) -> None:
    posix.executor = pool = ThreadPoolExecutor(8, thread_name_prefix="xop")
    try:
        reply, fd = await create(posix, "f")
        loc = by_gfid(reply.iatt.gfid)
        calls = [
            posix.xattrop(loc, XattropFlag.ADD_ARRAY, {AFR: i32(1, i, -1)})
            if i % 2
            else posix.fxattrop(fd, XattropFlag.ADD_ARRAY, {AFR: i32(1, i, -1)})
            for i in range(400)
        ]
        replies = await asyncio.gather(*calls)
        assert (await posix.getxattr(loc, AFR)).xattrs[AFR] == i32(400, sum(range(400)), -400)
        # every reply saw a distinct intermediate state: no two read-modify-writes interleaved
        assert len({r.xattrs[AFR] for r in replies}) == 400
        await posix.release(fd)
    finally:
        posix.executor = None
        pool.shutdown()


@given(
    old=st.one_of(st.none(), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4)),
    delta=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=4),
)
def test_add_array_matches_c_arithmetic(old: list[int] | None, delta: list[int]) -> None:
    raw_old = None if old is None else struct.pack(f">{len(old)}i", *old)
    store, reply = xattrop_apply(XattropFlag.ADD_ARRAY, "k", raw_old, struct.pack(f">{len(delta)}i", *delta))
    assert store == reply
    base = (old or []) + [0] * max(0, len(delta) - len(old or []))
    incr = delta + [0] * max(0, len(base) - len(delta))
    expect = [((a + b + 2**31) % 2**32) - 2**31 for a, b in zip(base, incr, strict=True)]
    assert struct.unpack(f">{len(expect)}i", store) == tuple(expect)


async def test_unlinked_open_file_keeps_xattr_ops(posix: PosixTranslator) -> None:
    _, fd = await create(posix, "f")
    await posix.unlink(at(ROOT_GFID, "f"), 0)
    await posix.fsetxattr(fd, {"user.k": b"v"}, 0)
    assert (await posix.fgetxattr(fd, "user.k")).xattrs == {"user.k": b"v"}
    assert (await posix.fxattrop(fd, XattropFlag.ADD_ARRAY, {AFR: i32(1)})).xattrs == {AFR: i32(1)}
    await posix.release(fd)
    assert await errno_of(posix.fgetxattr(Fd(fd.gfid), None)) == errno.EBADF
