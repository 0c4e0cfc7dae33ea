"""The data device: a backing file or raw block device addressed by byte offset.

All data I/O of the pool goes through here so that the rules live in one place: vectored
`preadv`/`pwritev` with short-transfer loops (no per-byte Python), `copy_file_range` inside the
device where the kernel supports it (regular files) with a plain read/write fallback (block
devices answer EINVAL), and an exclusive `flock` so two processes never open one pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Sequence

from mortar.core.errors import FopError
from mortar.core.fops import Buffer

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_COPY_CHUNK = 8 << 20
_NO_COPY_RANGE = {errno.EINVAL, errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


class DataDevice:
    """An open data device; thread-safe because every call is a positional syscall."""

    def __init__(self, path: str, *, create_size: int | None = None, read_only: bool = False) -> None:
        self.path = path
        self.is_block = is_block_device(path)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create_size is not None and not self.is_block:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise FopError.from_oserror(exc) from exc
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            raise FopError(errno.EBUSY, f"{path} is in use by another process") from exc
        if create_size is not None and not self.is_block and os.fstat(self.fd).st_size < create_size:
            os.ftruncate(self.fd, create_size)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._copy_range_ok = not self.is_block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def write(self, bufs: Sequence[Buffer], offset: int) -> None:
        """Write `bufs` back to back at `offset`, all of it (loops on short writes and IOV_MAX)."""
        views = [memoryview(b).cast("B") for b in bufs]
        views = [v for v in views if len(v)]
        while views:
            batch = views[:IOV_MAX]
            done = os.pwritev(self.fd, batch, offset)
            if done <= 0:
                raise FopError(errno.EIO, "short write on data device")
            offset += done
            while done:
                if done >= len(views[0]):
                    done -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][done:]
                    done = 0

    def pwrite(self, buf: memoryview, offset: int) -> None:
        """One buffer: the common case is exactly one syscall."""
        if os.pwrite(self.fd, buf, offset) != len(buf):
            self.write([buf], offset)  # rare short write: redo the whole range with the loop

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from `offset`; a short read (device smaller than the pool says) is EIO."""
        while len(buf):
            got = os.preadv(self.fd, [buf], offset)
            if got <= 0:
                raise FopError(errno.EIO, f"short read on data device at {offset}")
            buf = buf[got:]
            offset += got

    def read(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy a range inside the device without passing it through Python where possible."""
        if self._copy_range_ok:
            try:
                while length:
                    done = os.copy_file_range(self.fd, self.fd, length, src, dst)
                    if done <= 0:
                        raise OSError(errno.EINVAL, "copy_file_range made no progress")
                    src += done
                    dst += done
                    length -= done
                return
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                self._copy_range_ok = False
        buf = bytearray(min(length, _COPY_CHUNK))
        view = memoryview(buf)
        while length:
            n = min(length, len(buf))
            self.readinto(view[:n], src)
            self.write([view[:n]], dst)
            src += n
            dst += n
            length -= n
