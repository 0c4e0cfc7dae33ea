"""storage/posix data path: reads and writes, open flags, space management, sparse files, full disks."""

from __future__ import annotations

import array
import errno
import hashlib
import os
import subprocess
import zlib
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import (
    FALLOC_FL_KEEP_SIZE,
    FOPS,
    AttrSet,
    Fd,
    SeekWhat,
    SetAttrValid,
)
from mortar.core.gfid import ROOT_GFID
from mortar.core.translator import Translator
from mortar.rpc import buffers
from mortar.xlators.storage import posix_io
from mortar.xlators.storage.posix import PosixTranslator
from mortar.xlators.storage.posix_handles import PosixFd

from .conftest import at, by_gfid, create, make_posix, mkdir, open_, req

MiB = 1 << 20


async def errno_of(aw: object) -> int:
    with pytest.raises(FopError) as exc:
        await aw  # type: ignore[misc]
    return exc.value.errno


async def test_read_write_buffers(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "f")
    assert reply.iatt.size == 0 and reply.iatt.is_reg
    change = await posix.writev(fd, b"hello ", 0, 0)
    assert change.pre is not None and change.pre.size == 0
    assert change.post is not None and change.post.size == 6
    await posix.writev(fd, bytearray(b"world"), 6, 0)
    await posix.writev(fd, memoryview(b"--!!")[2:], 11, 0)
    ints = array.array("i", [1, 2])  # a memoryview of 4-byte items is written as its raw bytes
    await posix.writev(fd, memoryview(ints), 13, 0)
    got = await posix.readv(fd, 100, 0, 0)
    assert isinstance(got.data, bytes)
    assert got.data == b"hello world!!" + ints.tobytes()
    assert got.iatt is not None and got.iatt.size == 21
    assert (await posix.readv(fd, 5, 6, 0)).data == b"world"
    assert (await posix.readv(fd, 10, 1000, 0)).data == b""  # past the end: empty, not an error
    assert (await posix.fstat(fd)).iatt.size == 21
    assert await errno_of(posix.readv(fd, -1, 0, 0)) == errno.EINVAL
    assert await errno_of(posix.writev(fd, b"x", -5, 0)) == errno.EINVAL
    assert await errno_of(posix.readv(fd, 1 << 40, 0, 0)) == errno.EINVAL
    await posix.flush(fd)
    assert (await posix.fsync(fd, 0)).post is not None
    assert (await posix.fsync(fd, 1)).post is not None
    await posix.release(fd)


async def test_open_flags(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "f", b"0123456789")
    await posix.release(fd)
    g = reply.iatt.gfid
    app = await open_(posix, g, os.O_WRONLY | os.O_APPEND)
    await posix.writev(app, b"tail", 0, 0)  # O_APPEND: the offset is ignored
    await posix.release(app)
    ro = await open_(posix, g, os.O_RDONLY)
    assert (await posix.readv(ro, 100, 0, 0)).data == b"0123456789tail"
    assert await errno_of(posix.writev(ro, b"x", 0, 0)) == errno.EBADF
    await posix.release(ro)
    trunc = await open_(posix, g, os.O_RDWR | os.O_TRUNC)
    assert (await posix.fstat(trunc)).iatt.size == 0
    await posix.release(trunc)
    d = await mkdir(posix, "d")
    assert await errno_of(open_(posix, d, os.O_WRONLY)) == errno.EISDIR
    assert await errno_of(open_(posix, d, os.O_RDWR)) == errno.EISDIR
    dfd = await open_(posix, d, os.O_RDONLY)
    assert await errno_of(posix.readv(dfd, 10, 0, 0)) == errno.EISDIR
    await posix.release(dfd)


async def test_unlink_while_open_keeps_data_reachable(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "doomed", b"still here")
    g = reply.iatt.gfid
    second = await open_(posix, g, os.O_RDONLY)
    await posix.unlink(at(ROOT_GFID, "doomed"), 0)
    parked = Path(posix.brick.unlinked_dir) / g.canonical
    assert parked.exists()  # the last link waits in .mortar/unlink until the last release
    assert (await posix.readv(fd, 100, 0, 0)).data == b"still here"
    await posix.writev(fd, b"!", 10, 0)
    assert (await posix.readv(second, 100, 0, 0)).data == b"still here!"
    assert (await posix.fstat(fd)).iatt.nlink == 0
    assert await errno_of(posix.stat(by_gfid(g))) == errno.ESTALE
    await posix.release(fd)
    assert parked.exists()
    await posix.release(second)
    assert not parked.exists()
    assert await errno_of(posix.lookup(at(ROOT_GFID, "doomed"))) == errno.ENOENT


async def test_truncate_and_setattr(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "f", b"abcdef")
    g = reply.iatt.gfid
    change = await posix.truncate(by_gfid(g), 2)
    assert change.pre is not None and change.pre.size == 6
    assert change.post is not None and change.post.size == 2
    grown = await posix.ftruncate(fd, 4096)
    assert grown.post is not None and grown.post.size == 4096
    attr = AttrSet(
        SetAttrValid.MODE | SetAttrValid.UID | SetAttrValid.GID | SetAttrValid.ATIME | SetAttrValid.MTIME,
        mode=0o4751,
        uid=1234,
        gid=5678,
        atime_ns=1_000_000_000_123,
        mtime_ns=2_000_000_000_456,
    )
    post = (await posix.setattr(by_gfid(g), attr)).post
    assert post is not None
    assert (post.mode & 0o7777, post.uid, post.gid) == (0o4751, 1234, 5678)
    assert (post.atime_ns, post.mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)
    # uid -1 leaves the owner alone; only mtime changes keep atime
    only = await posix.fsetattr(
        fd, AttrSet(SetAttrValid.UID | SetAttrValid.MTIME, uid=-1, mtime_ns=5 * 10**9)
    )
    assert only.post is not None and only.post.uid == 1234 and only.post.atime_ns == 1_000_000_000_123
    assert only.post.mtime_ns == 5 * 10**9
    assert await errno_of(posix.setattr(by_gfid(g), AttrSet(SetAttrValid.SIZE))) == errno.EINVAL
    d = await mkdir(posix, "d")
    dpost = (await posix.setattr(by_gfid(d), AttrSet(SetAttrValid.MODE, mode=0o700))).post
    assert dpost is not None and dpost.mode & 0o7777 == 0o700 and dpost.is_dir
    assert await errno_of(posix.truncate(by_gfid(d), 0)) == errno.EISDIR
    await posix.access(by_gfid(g), os.R_OK | os.W_OK)
    assert await errno_of(posix.access(by_gfid(g), 0o10)) == errno.EINVAL
    await posix.release(fd)


async def test_create_honours_client_umask(posix: PosixTranslator) -> None:
    fd = Fd(ROOT_GFID)
    reply = await posix.create(at(ROOT_GFID, "open"), os.O_RDWR, 0o666, 0, fd, req())
    assert reply.iatt.mode & 0o777 == 0o666  # the brick process's own umask does not apply
    await posix.release(fd)
    made = await posix.mkdir(at(ROOT_GFID, "shared"), 0o777, 0o002, req())
    assert made.iatt.mode & 0o777 == 0o775


async def test_fallocate_discard_zerofill(posix: PosixTranslator) -> None:
    _, fd = await create(posix, "img", b"\xab" * (3 * MiB))
    keep = await posix.fallocate(fd, FALLOC_FL_KEEP_SIZE, 3 * MiB, MiB)
    assert keep.post is not None and keep.post.size == 3 * MiB and keep.pre is not None
    assert keep.post.blocks > keep.pre.blocks
    extend = await posix.fallocate(fd, 0, 0, 4 * MiB)
    assert extend.post is not None and extend.post.size == 4 * MiB
    hole = await posix.discard(fd, MiB, MiB)
    assert hole.post is not None and hole.post.size == 4 * MiB and hole.pre is not None
    assert hole.post.blocks < hole.pre.blocks
    assert (await posix.readv(fd, MiB, MiB, 0)).data == bytes(MiB)
    assert (await posix.readv(fd, 4, MiB - 4, 0)).data == b"\xab" * 4
    zeroed = await posix.zerofill(fd, 2 * MiB + 100, 1000)
    assert zeroed.post is not None and zeroed.post.size == 4 * MiB
    assert (await posix.readv(fd, 1002, 2 * MiB + 99, 0)).data == b"\xab" + bytes(1000) + b"\xab"
    beyond = await posix.zerofill(fd, 5 * MiB, 4096)
    assert beyond.post is not None and beyond.post.size == 5 * MiB + 4096
    assert await errno_of(posix.discard(fd, -1, 10)) == errno.EINVAL
    await posix.release(fd)


async def test_seek_data_and_holes(posix: PosixTranslator) -> None:
    _, fd = await create(posix, "sparse")
    await posix.ftruncate(fd, 8 * MiB)
    await posix.writev(fd, b"x" * 4096, 2 * MiB, 0)
    assert (await posix.seek(fd, 0, SeekWhat.DATA)).offset == 2 * MiB
    assert (await posix.seek(fd, 0, SeekWhat.HOLE)).offset == 0
    assert (await posix.seek(fd, 2 * MiB, SeekWhat.HOLE)).offset == 2 * MiB + 4096
    assert (await posix.seek(fd, 3 * MiB, SeekWhat.HOLE)).offset == 3 * MiB
    assert await errno_of(posix.seek(fd, 3 * MiB, SeekWhat.DATA)) == errno.ENXIO  # no data after
    assert await errno_of(posix.seek(fd, 9 * MiB, SeekWhat.HOLE)) == errno.ENXIO  # past the end
    assert await errno_of(posix.seek(fd, 0, 0)) == errno.EINVAL
    await posix.release(fd)


async def test_copy_file_range_and_rchecksum(posix: PosixTranslator) -> None:
    payload = os.urandom(300_000)
    _, src = await create(posix, "src", payload)
    _, dst = await create(posix, "dst")
    copied = await posix.copy_file_range(src, 1000, dst, 4096, 200_000, 0)
    assert copied.length == 200_000 and copied.post is not None and copied.post.size == 204_096
    assert (await posix.readv(dst, 200_000, 4096, 0)).data == payload[1000:201_000]
    short = await posix.copy_file_range(src, 299_000, dst, 0, 10_000, 0)
    assert short.length == 1000  # stops at the source's end
    assert await errno_of(posix.copy_file_range(src, 0, dst, 0, 10, 1)) == errno.EINVAL
    ck = await posix.rchecksum(src, 5000, 131072)
    chunk = payload[5000 : 5000 + 131072]
    assert ck.weak == zlib.adler32(chunk)
    assert ck.strong == hashlib.blake2b(chunk).digest()
    tail = await posix.rchecksum(src, 290_000, 131072)
    assert tail.weak == zlib.adler32(payload[290_000:])
    await posix.release(src)
    await posix.release(dst)


async def test_o_direct_option(tmp_path: Path) -> None:
    for enabled in (True, False):
        xl = make_posix(tmp_path / f"b{enabled}", **{"o-direct": "on" if enabled else "off"})
        await xl.init()
        try:
            _, fd = await create(xl, "img", flags=os.O_RDWR | os.O_DIRECT)
            pfd = fd.ctx[xl]
            assert isinstance(pfd, PosixFd) and pfd.direct is enabled
            block = os.urandom(8192)
            await xl.writev(fd, memoryview(block), 4096, 0)
            assert (await xl.readv(fd, 8192, 4096, 0)).data == block
            assert (await xl.readv(fd, 4096, 12288, 0)).data == b""
            await xl.release(fd)
        finally:
            await xl.fini()


async def test_enospc_on_a_full_filesystem_changes_nothing(tiny_fs: Path) -> None:
    xl = make_posix(tiny_fs / "brick", reserve="0")
    await xl.init()
    try:
        _, fd = await create(xl, "filler")
        with pytest.raises(FopError) as exc:
            await xl.writev(fd, bytes(8 * MiB), 0, 0)  # more than the whole filesystem
        assert exc.value.errno == errno.ENOSPC
        assert (await xl.fstat(fd)).iatt.size == 0  # the partial write was taken back
        # fill it up piece by piece, then one more write fails cleanly
        written = 0
        with pytest.raises(FopError) as exc:
            for _ in range(64):
                await xl.writev(fd, bytes(256 << 10), written, 0)
                written += 256 << 10
        assert exc.value.errno == errno.ENOSPC
        assert (await xl.fstat(fd)).iatt.size == written
        assert await errno_of(xl.fallocate(fd, 0, written, 4 * MiB)) == errno.ENOSPC
        assert (await xl.fstat(fd)).iatt.size == written
        # space comes back once the filler goes
        await xl.release(fd)
        await xl.unlink(at(ROOT_GFID, "filler"), 0)
        _, again = await create(xl, "again", b"y" * MiB)
        await xl.release(again)
    finally:
        await xl.fini()


async def test_reserve_refuses_writes_before_the_disk_is_full(tiny_fs: Path) -> None:
    xl = make_posix(tiny_fs / "brick", reserve="50")
    await xl.init()
    try:
        _, fd = await create(xl, "f", b"small")
        with pytest.raises(FopError) as exc:
            await xl.writev(fd, bytes(2 * MiB), 0, 0)
        assert exc.value.errno == errno.ENOSPC and "reserve" in exc.value.message
        assert (await xl.readv(fd, 10, 0, 0)).data == b"small"
        await xl.release(fd)
    finally:
        await xl.fini()


async def test_zerofill_without_zero_range(tmp_path: Path) -> None:
    """tmpfs has no FALLOC_FL_ZERO_RANGE: zerofill punches a hole and allocates it instead."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], timeout=30).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        xl = make_posix(mnt / "brick")
        await xl.init()
        try:
            _, fd = await create(xl, "img", b"\xff" * 65536)
            zeroed = await xl.zerofill(fd, 4096, 8192)
            assert zeroed.post is not None and zeroed.post.size == 65536
            assert (await xl.readv(fd, 8194, 4095, 0)).data == b"\xff" + bytes(8192) + b"\xff"
            await xl.release(fd)
        finally:
            await xl.fini()
    finally:
        subprocess.run(["umount", str(mnt)], check=False, timeout=30)


def test_write_zeros_fallback(tmp_path: Path) -> None:
    """The last resort of zerofill (a filesystem with no fallocate at all) writes zeros in pieces."""
    path = tmp_path / "f"
    path.write_bytes(b"\x01" * (3 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        posix_io._write_zeros(fd, 100, 2 * MiB + 7)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:100] == b"\x01" * 100 and data[100 : 100 + 2 * MiB + 7] == bytes(2 * MiB + 7)
    assert data[100 + 2 * MiB + 7 :] == b"\x01" * (MiB - 107)


def test_every_fop_is_served() -> None:
    """The brick has no child to pass anything to: it implements the whole fop table."""
    missing = [name for name in FOPS if getattr(PosixTranslator, name) is getattr(Translator, name)]
    assert missing == []


def _fd_has_o_direct(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}") as info:
        flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
    return bool(flags & os.O_DIRECT)


async def test_o_direct_buffers_aligned_or_not(tmp_path: Path) -> None:
    """O_DIRECT I/O from every kind of buffer: an aligned one (as the wire delivers writev data) is
    written as it is, anything else through the thread's scratch buffer; reads come back in an
    aligned buffer, short at the end of the file. Opens without O_DIRECT keep the page cache."""
    xl = make_posix(tmp_path / "b", **{"o-direct": "on"})
    await xl.init()
    try:
        _, fd = await create(xl, "img", flags=os.O_RDWR | os.O_DIRECT)
        gfid = fd.gfid
        pfd = fd.ctx[xl]
        assert isinstance(pfd, PosixFd) and pfd.direct and _fd_has_o_direct(pfd.fd)
        data = os.urandom(3 * MiB)
        aligned = buffers.aligned(MiB)
        aligned[:] = data[:MiB]
        unaligned = memoryview(bytearray(MiB + 1))[1:]
        unaligned[:] = data[MiB : 2 * MiB]
        await xl.writev(fd, aligned, 0, 0)
        await xl.writev(fd, unaligned, MiB, 0)
        await xl.writev(fd, data[2 * MiB :], 2 * MiB, 0)  # bytes: read-only, so copied
        got = (await xl.readv(fd, 3 * MiB, 0, 0)).data
        assert isinstance(got, memoryview) and buffers.is_aligned(got) and got == data
        tail = await xl.readv(fd, MiB, 3 * MiB - 4096, 0)
        assert tail.data == data[-4096:] and tail.iatt is not None and tail.iatt.size == 3 * MiB
        await xl.release(fd)
        # the same file opened without O_DIRECT: buffered, and small cached reads skip the pool
        buffered = await open_(xl, gfid, os.O_RDWR)
        bpfd = buffered.ctx[xl]
        assert isinstance(bpfd, PosixFd) and not bpfd.direct and not _fd_has_o_direct(bpfd.fd)
        await xl.readv(buffered, 4096, 8192, 0)  # now in the page cache
        fast = posix_io.readv_cached(xl.brick, bpfd, 4096, 8192)
        assert fast is None or fast.data == data[8192 : 8192 + 4096]
        await xl.release(buffered)
    finally:
        await xl.fini()
