"""Operations of `storage/bd` on open fds: data I/O, space management, listing, sync.

A write past the end grows the volume first (so the image behaves as a file for `cp`, `dd` or
`qemu-img convert`), and shrinks it back if the write then fails (ENOSPC changes nothing).
Durability: a completed write is in the pool's data device; `fsync` commits the pool (data
fsynced, then the mapping metadata) and the attribute store, so everything written before it
survives a crash or power loss. Preallocation (fallocate mode 0 or KEEP_SIZE alone) is refused
with EOPNOTSUPP: a thin volume allocates on write, and promising space ahead would be a lie.
"""

from __future__ import annotations

import errno
import hashlib
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from mortar.core.errors import FopError
from mortar.core.fops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    AttrReply,
    Buffer,
    ChangeReply,
    ChecksumReply,
    CopyReply,
    DirEntry,
    DirReply,
    ReadReply,
    SeekReply,
    SeekWhat,
)
from mortar.xlators.storage.bd_brick import BdBrick, BdFd, Entry, now_ns

MAX_IO = 64 << 20  # refuse absurd request sizes instead of allocating them
_COPY_CHUNK = 8 << 20
_SUM_CHUNK = 1 << 20
_READDIR_DEFAULT = 128 << 10
_ENTRY_COST = 160  # approximate wire size of one entry's attributes, for readdirp's byte budget


def _file(bfd: BdFd) -> Entry:
    if bfd.entry is None:
        raise FopError(errno.EISDIR, "the pool directory has no data")
    return bfd.entry


def _writable(bfd: BdFd) -> Entry:
    entry = _file(bfd)
    if bfd.flags & os.O_ACCMODE == os.O_RDONLY:
        raise FopError(errno.EBADF, "the image is open read-only")
    return entry


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise FopError(errno.EINVAL, f"negative offset or length ({offset}, {length})")


def _modified(entry: Entry) -> None:
    t = now_ns()
    entry.meta.mtime_ns = entry.meta.ctime_ns = t
    entry.meta.times_dirty = True


def fstat(b: BdBrick, bfd: BdFd) -> AttrReply:
    return AttrReply(b.iatt(bfd.entry))


def readv(b: BdBrick, bfd: BdFd, size: int, offset: int) -> ReadReply:
    entry = _file(bfd)
    _check_range(offset, size)
    if size > MAX_IO:
        raise FopError(errno.EINVAL, f"read of {size} bytes exceeds {MAX_IO}")
    return ReadReply(entry.vol.read(offset, size), b.iatt(entry, fresh=False))


@contextmanager
def _extended(entry: Entry, end: int, block_size: int) -> Iterator[None]:
    """Make the image at least `end` bytes long for the body, and take the growth back if the body
    fails (ENOSPC changes nothing). The caller holds `entry.grow_lock`.

    Shrinking back zeroes the old size's partial last block past the old end, which needs a block
    of its own when that block is shared with a snapshot; so it is made the image's own first, by
    rewriting its last byte (a failure there has changed nothing either)."""
    vol = entry.vol
    old = vol.size
    if end <= old:
        yield
        return
    if old % block_size and vol.seek_hole(old - 1) != old - 1:
        vol.write(vol.read(old - 1, 1), old - 1)
    vol.resize(end)
    entry.blocks_at = 0.0  # a growing image is being filled: report its allocation afresh
    try:
        yield
    except BaseException:
        if vol.size == end:
            try:
                vol.resize(old)
            except FopError as exc:
                raise FopError(errno.EIO, f"the image could not shrink back after a failure: {exc}") from exc
        raise


def writev(b: BdBrick, bfd: BdFd, data: Buffer, offset: int) -> ChangeReply:
    entry = _writable(bfd)
    n = memoryview(data).nbytes
    _check_range(offset, n)
    if n > MAX_IO:
        raise FopError(errno.EINVAL, f"write of {n} bytes exceeds {MAX_IO}")
    pre = b.iatt(entry, fresh=False)
    append = bool(bfd.flags & os.O_APPEND)
    if append or offset + n > entry.vol.size:
        with entry.grow_lock:  # sizes and appends stay exact under concurrent extending writes
            if append:
                offset = entry.vol.size
            with _extended(entry, offset + n, b.blksize):
                entry.vol.write(data, offset)
    else:
        entry.vol.write(data, offset)
    _modified(entry)
    return ChangeReply(pre, b.iatt(entry, fresh=False))


def ftruncate(b: BdBrick, bfd: BdFd, offset: int) -> ChangeReply:
    entry = _writable(bfd)
    pre = b.iatt(entry)
    b.resize(entry, offset)
    return ChangeReply(pre, b.iatt(entry))


def flush(b: BdBrick, bfd: BdFd) -> None:
    b.save_times(bfd.entry)


def fsync(b: BdBrick, bfd: BdFd) -> ChangeReply:
    entry = bfd.entry
    pre = b.iatt(entry)
    if entry is not None:
        entry.vol.flush()
    else:
        b.pool.commit()
    b.save_times(entry)
    b.store.sync()
    return ChangeReply(pre, b.iatt(entry))


def readdirp(b: BdBrick, bfd: BdFd, size: int, offset: int) -> DirReply:
    """Entries after cookie `offset` (an index into a snapshot of the names taken at offset 0)."""
    if not bfd.is_dir:
        raise FopError(errno.ENOTDIR, "readdirp on an image")
    if offset < 0:
        raise FopError(errno.EINVAL, f"readdirp offset {offset}")
    if offset == 0 or bfd.listing is None:
        bfd.listing = b.names()
    names = bfd.listing
    budget = size if size > 0 else _READDIR_DEFAULT
    entries: list[DirEntry] = []
    used, index = 0, offset
    while index < len(names) and (not entries or used < budget):
        name = names[index]
        index += 1
        entry = b.by_name.get(name)
        if entry is None:
            continue  # removed since the snapshot
        entries.append(DirEntry(name, index, b.iatt(entry, fresh=False)))
        used += len(name) + _ENTRY_COST
    return DirReply(entries)


def fallocate(b: BdBrick, bfd: BdFd, mode: int, offset: int, length: int) -> ChangeReply:
    entry = _writable(bfd)
    _check_range(offset, length)
    pre = b.iatt(entry)
    vol = entry.vol
    if mode & FALLOC_FL_PUNCH_HOLE:
        if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            raise FopError(errno.EINVAL, "PUNCH_HOLE goes with KEEP_SIZE and nothing else")
        vol.discard(offset, length)
    elif mode & FALLOC_FL_ZERO_RANGE:
        if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
            raise FopError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
        end = 0 if mode & FALLOC_FL_KEEP_SIZE else offset + length
        with entry.grow_lock, _extended(entry, end, b.blksize):
            vol.write_zeroes(offset, length, unmap=False)
    else:
        raise FopError(
            errno.EOPNOTSUPP,
            "a thin volume allocates on write: preallocation (fallocate mode 0/KEEP_SIZE) is refused",
        )
    _modified(entry)
    return ChangeReply(pre, b.iatt(entry))


def discard(b: BdBrick, bfd: BdFd, offset: int, length: int) -> ChangeReply:
    """Unmap the range (whole blocks go back to the pool; partial ones are zeroed)."""
    entry = _writable(bfd)
    _check_range(offset, length)
    pre = b.iatt(entry)
    entry.vol.discard(offset, length)
    _modified(entry)
    return ChangeReply(pre, b.iatt(entry))


def zerofill(b: BdBrick, bfd: BdFd, offset: int, length: int) -> ChangeReply:
    """Zeros over the range, allocated (as on posix); extends the image when it reaches past the end."""
    entry = _writable(bfd)
    _check_range(offset, length)
    pre = b.iatt(entry)
    with entry.grow_lock, _extended(entry, offset + length, b.blksize):
        entry.vol.write_zeroes(offset, length, unmap=False)
    _modified(entry)
    return ChangeReply(pre, b.iatt(entry))


def seek(b: BdBrick, bfd: BdFd, offset: int, what: int) -> SeekReply:
    """SEEK_DATA / SEEK_HOLE from the pool's mapping (a hole is an unmapped block)."""
    entry = _file(bfd)
    if what == SeekWhat.DATA:
        return SeekReply(entry.vol.seek_data(offset))
    if what == SeekWhat.HOLE:
        return SeekReply(entry.vol.seek_hole(offset))
    raise FopError(errno.EINVAL, f"seek what={what}")


def copy_file_range(
    b: BdBrick, src_fd: BdFd, off_in: int, dst_fd: BdFd, off_out: int, length: int, flags: int
) -> CopyReply:
    """Copy inside the pool, mapped ranges only: holes of the source stay holes in the copy."""
    if flags:
        raise FopError(errno.EINVAL, f"copy_file_range flags {flags:#x}")
    src, dst = _file(src_fd), _writable(dst_fd)
    _check_range(off_in, length)
    _check_range(off_out, 0)
    n = max(0, min(length, src.vol.size - off_in))
    if src is dst and off_in < off_out + n and off_out < off_in + n:
        raise FopError(errno.EINVAL, "overlapping ranges in one image")
    if not n:
        return CopyReply(0, b.iatt(dst))
    with dst.grow_lock, _extended(dst, off_out + n, b.blksize):
        _copy_mapped(src, off_in, dst, off_out, n)
    _modified(dst)
    return CopyReply(n, b.iatt(dst))


def _copy_mapped(src: Entry, off_in: int, dst: Entry, off_out: int, n: int) -> None:
    """Copy the mapped runs of src's range; its holes become holes (discards) in dst."""
    pos, end = off_in, off_in + n
    while pos < end:
        try:
            data_at = min(src.vol.seek_data(pos), end)
        except FopError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data_at = end
        if data_at > pos:
            dst.vol.discard(off_out + pos - off_in, data_at - pos)
        if data_at >= end:
            break
        hole_at = min(src.vol.seek_hole(data_at), end)
        for at in range(data_at, hole_at, _COPY_CHUNK):
            chunk = src.vol.read(at, min(_COPY_CHUNK, hole_at - at))
            dst.vol.write(chunk, off_out + at - off_in)
        pos = hole_at


def rchecksum(b: BdBrick, bfd: BdFd, offset: int, length: int) -> ChecksumReply:
    """Weak: zlib adler32 (rolling); strong: BLAKE2b, as storage/posix computes them."""
    entry = _file(bfd)
    _check_range(offset, length)
    if length > MAX_IO:
        raise FopError(errno.EINVAL, f"checksum of {length} bytes exceeds {MAX_IO}")
    weak = 1
    strong = hashlib.blake2b()
    done = 0
    while done < length:
        chunk = entry.vol.read(offset + done, min(_SUM_CHUNK, length - done))
        if not chunk:
            break
        weak = zlib.adler32(chunk, weak)
        strong.update(chunk)
        done += len(chunk)
    return ChecksumReply(weak, strong.digest())
