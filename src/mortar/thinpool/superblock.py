"""Pool superblock: the first 4 KiB of the data device say what the device holds.

It lives on the data device (not only in the metadata) because a raw block device has nothing
"beside" it: `ThinPool.open("/dev/sdb")` reads the metadata path from here, and the UUID, which
the metadata store repeats, refuses a data device paired with another pool's metadata. It is
written once at creation and never changes, so it needs no transaction of its own; a CRC tells a
torn or foreign header from a pool.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
import zlib
from dataclasses import dataclass

from mortar.core.errors import FopError

MAGIC = b"MORTARTP"
VERSION = 1
SUPERBLOCK_SIZE = 4096
MIN_BLOCK = 4 << 10
MAX_BLOCK = 8 << 20

# magic, version, block size, data start, data blocks, uuid, metadata path length
_HEAD = struct.Struct("<8sIIQQ16sH")
_CRC = struct.Struct("<I")
_MAX_PATH = SUPERBLOCK_SIZE - _HEAD.size - _CRC.size


@dataclass(frozen=True, slots=True)
class Superblock:
    uuid: uuid.UUID
    block_size: int
    data_start: int
    nblocks: int
    metadata_path: str
    version: int = VERSION

    def pack(self) -> bytes:
        path = self.metadata_path.encode()
        if len(path) > _MAX_PATH:
            raise FopError(errno.ENAMETOOLONG, "metadata path too long for the superblock")
        head = _HEAD.pack(
            MAGIC, self.version, self.block_size, self.data_start, self.nblocks, self.uuid.bytes, len(path)
        )
        body = (head + path).ljust(SUPERBLOCK_SIZE - _CRC.size, b"\0")
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock:
        if len(raw) < SUPERBLOCK_SIZE or raw[:8] != MAGIC:
            raise FopError(errno.EINVAL, "not a mortar thin pool (no superblock)")
        body = raw[: SUPERBLOCK_SIZE - _CRC.size]
        (crc,) = _CRC.unpack_from(raw, SUPERBLOCK_SIZE - _CRC.size)
        if zlib.crc32(body) != crc:
            raise FopError(errno.EUCLEAN, "thin pool superblock checksum mismatch")
        _, version, bs, start, nblocks, ubytes, plen = _HEAD.unpack_from(raw)
        if version != VERSION:
            raise FopError(errno.EINVAL, f"unsupported thin pool version {version}")
        path = raw[_HEAD.size : _HEAD.size + plen].decode()
        return cls(uuid.UUID(bytes=ubytes), bs, start, nblocks, path, version)


def layout(device_size: int, block_size: int) -> tuple[int, int]:
    """(data start, block count): data starts at a block-size (at most 1 MiB) boundary after the header."""
    if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
        raise FopError(errno.EINVAL, f"block size must be a power of two in 4KiB..8MiB, not {block_size}")
    start = max(SUPERBLOCK_SIZE, min(block_size, 1 << 20))
    nblocks = (device_size - start) // block_size if device_size > start else 0
    if nblocks < 1:
        raise FopError(errno.ENOSPC, f"data device of {device_size} bytes holds no {block_size}-byte block")
    return start, nblocks


def read_superblock(fd: int) -> Superblock:
    return Superblock.unpack(os.pread(fd, SUPERBLOCK_SIZE, 0))


def write_superblock(fd: int, sb: Superblock) -> None:
    os.pwrite(fd, sb.pack(), 0)
    os.fsync(fd)
