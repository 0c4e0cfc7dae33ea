"""Small reads served from the page cache on the event loop, with the pool as the fallback."""

from __future__ import annotations

import os
from pathlib import Path

from mortar.xlators.storage import posix_io as io
from mortar.xlators.storage.posix import PosixTranslator
from mortar.xlators.storage.posix_handles import PosixFd

from .conftest import create, make_posix


def _pfd(xl: PosixTranslator, fd: object) -> PosixFd:
    pfd = fd.ctx[xl]  # type: ignore[attr-defined]
    assert isinstance(pfd, PosixFd)
    return pfd


async def test_cached_read_matches_the_pool_read(posix: PosixTranslator) -> None:
    data = os.urandom(3 * 4096 + 100)
    _, fd = await create(posix, "f", data)
    pfd = _pfd(posix, fd)
    cached = io.readv_cached(posix.brick, pfd, 4096, 4096)
    if cached is None:  # a kernel without RWF_NOWAIT for buffered reads: the pool serves it all
        assert io._RWF_NOWAIT is None
    else:
        assert isinstance(cached.data, bytes) and cached.data == data[4096:8192]
        pooled = io.readv(posix.brick, pfd, 4096, 4096)
        assert cached.iatt == pooled.iatt
        tail = io.readv_cached(posix.brick, pfd, 4096, 3 * 4096)  # short at the end of the file
        assert tail is not None and tail.data == data[3 * 4096 :]
        past = io.readv_cached(posix.brick, pfd, 4096, len(data) + 10)
        assert past is not None and past.data == b""
    # outside its range the fast path declines and the fop still answers through the pool
    assert io.readv_cached(posix.brick, pfd, 0, 0) is None
    assert io.readv_cached(posix.brick, pfd, io.CACHED_READ_MAX + 1, 0) is None
    assert io.readv_cached(posix.brick, pfd, 10, -1) is None
    big = (await posix.readv(fd, io.CACHED_READ_MAX + 1, 0, 0)).data
    assert big == data
    assert (await posix.readv(fd, 4096, 8192, 0)).data == data[8192 : 8192 + 4096]
    await posix.release(fd)


async def test_uncached_read_falls_back_to_the_pool(posix: PosixTranslator) -> None:
    data = os.urandom(64 << 10)
    _, fd = await create(posix, "cold", data)
    pfd = _pfd(posix, fd)
    os.fsync(pfd.fd)
    os.posix_fadvise(pfd.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
    cold = io.readv_cached(posix.brick, pfd, 4096, 8192)
    assert cold is None or cold.data == data[8192 : 8192 + 4096]  # another reader may have cached it
    reply = await posix.readv(fd, len(data), 0, 0)
    assert reply.data == data and reply.iatt is not None and reply.iatt.size == len(data)
    await posix.release(fd)


async def test_o_direct_reads_skip_the_fast_path(tmp_path: Path) -> None:
    xl = make_posix(tmp_path / "b", **{"o-direct": "on"})
    await xl.init()
    try:
        _, fd = await create(xl, "img", flags=os.O_RDWR | os.O_DIRECT)
        block = os.urandom(8192)
        await xl.writev(fd, memoryview(block), 0, 0)
        assert io.readv_cached(xl.brick, _pfd(xl, fd), 4096, 0) is None
        assert (await xl.readv(fd, 4096, 4096, 0)).data == block[4096:]
        await xl.release(fd)
    finally:
        await xl.fini()
