"""What the NBD server serves: the export interface, and exports backed by image files in a directory.

The server knows nothing of mortar volumes: it serves any `ExportProvider`. The native client
provides one whose exports are `VOLUME/path/to/image`; `FileExportProvider` here serves a local
directory (tests, benchmarks against the local disk, manual use). Export names are opaque strings
in which `/` is allowed.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

from mortar.core.errors import FopError
from mortar.core.fops import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, Buffer
from mortar.frontends.nbd.protocol import STATE_HOLE, STATE_ZERO

_T = TypeVar("_T")


@runtime_checkable
class ExportBackend(Protocol):
    """One open export. Every method may raise FopError or OSError; the errno reaches the client.

    Durability: `pwrite(fua=True)` returns once the data is on stable storage; `flush` returns
    once every write acknowledged before it (on any connection, if `can_multi_conn`) is.
    """

    size: int
    read_only: bool
    can_multi_conn: bool  # flush on one connection covers writes acknowledged on all of them
    description: str

    async def pread(self, length: int, offset: int) -> Buffer:
        """Exactly `length` bytes at `offset` (within `size`)."""
        ...

    async def pwrite(self, data: Buffer, offset: int, fua: bool) -> None: ...

    async def flush(self) -> None: ...

    async def trim(self, length: int, offset: int) -> None:
        """Drop the range; it may read back as anything until written again."""
        ...

    async def zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        """Make the range read as zeros; with `fast`, raise ENOTSUP rather than writing zeros slowly."""
        ...

    async def cache(self, length: int, offset: int) -> None:
        """Prefetch the range (a hint)."""
        ...

    async def block_status(self, length: int, offset: int) -> list[tuple[int, int]]:
        """(length, STATE_HOLE|STATE_ZERO flags) extents from `offset`, covering at least a prefix."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ExportProvider(Protocol):
    """The set of exports a server offers."""

    async def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every export."""
        ...

    async def open_export(self, name: str, read_only: bool) -> ExportBackend:
        """Open `name`; raise KeyError or FopError(ENOENT) if there is no such export."""
        ...


# ---- fallocate(2): the os module has only posix_fallocate --------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (punch hole, zero range); raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _seek(fd: int, offset: int, whence: int, end: int) -> int:
    """lseek SEEK_DATA/SEEK_HOLE, treating ENXIO (nothing more of that kind) as the end."""
    try:
        return min(os.lseek(fd, offset, whence), end)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return end
        raise


_ZERO_CHUNK = bytes(1024 * 1024)
_NOWAIT_READ = 128 * 1024  # reads up to this size are first tried on the loop with RWF_NOWAIT


class FileExport:
    """An image file served with pread/pwrite in a thread pool, holes found with SEEK_DATA/SEEK_HOLE.

    Several FileExports of one file (one per connection) are safe for multi-conn: the page cache is
    per inode, so fsync on any descriptor makes every acknowledged write durable.
    """

    can_multi_conn = True

    def __init__(
        self, path: str, read_only: bool, executor: ThreadPoolExecutor | None, description: str = ""
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.description = description
        self._executor = executor
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            if stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self._fd, 0, os.SEEK_END)
            else:
                self.size = st.st_size
        except OSError:
            os.close(self._fd)
            raise
        self._can_punch = True
        self._can_zero_range = True
        self._nowait = True

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) < length:  # a short read: the file shrank or is still being read
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
                if not more:
                    parts.append(bytes(length - got))  # beyond the end of a truncated file
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    async def pread(self, length: int, offset: int) -> Buffer:
        if length <= _NOWAIT_READ and self._nowait:
            # Served from the page cache without a thread hop when possible; EAGAIN means "would block".
            buf = bytearray(length)
            try:
                if os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT) == length:
                    return buf
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # the file system cannot say "would block": always use threads
        return await self._run(self._pread, length, offset)

    def _pwrite(self, data: Buffer, offset: int, fua: bool) -> None:
        view = memoryview(data)
        flags = os.RWF_DSYNC if fua else 0
        while view:
            n = os.pwritev(self._fd, [view], offset, flags)
            view = view[n:]
            offset += n

    async def pwrite(self, data: Buffer, offset: int, fua: bool) -> None:
        await self._run(self._pwrite, data, offset, fua)

    async def flush(self) -> None:
        await self._run(os.fsync, self._fd)

    def _trim(self, length: int, offset: int) -> None:
        if not self._can_punch:
            return  # trim is advisory: nothing to do where holes cannot be punched
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                raise
            self._can_punch = False

    async def trim(self, length: int, offset: int) -> None:
        await self._run(self._trim, length, offset)

    def _zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        # A punched hole reads as zeros, so may_trim lets it do; otherwise keep the blocks allocated.
        modes = []
        if may_trim and self._can_punch:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        if self._can_zero_range:
            modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                    raise
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self._can_punch = False
                else:
                    self._can_zero_range = False
        if fast:
            raise FopError(errno.ENOTSUP, "zeroing this range would mean writing zeros")
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZERO_CHUNK))
            self._pwrite(memoryview(_ZERO_CHUNK)[:n], offset, False)
            offset += n

    async def zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        await self._run(self._zero, length, offset, may_trim, fast)

    async def cache(self, length: int, offset: int) -> None:
        await self._run(os.posix_fadvise, self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _block_status(self, length: int, offset: int) -> list[tuple[int, int]]:
        end = min(offset + length, self.size)
        extents: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(extents) < 1024:
            data = _seek(self._fd, pos, os.SEEK_DATA, end)
            if data > pos:
                extents.append((data - pos, STATE_HOLE | STATE_ZERO))
                pos = data
                continue
            hole = _seek(self._fd, pos, os.SEEK_HOLE, end)
            if hole <= pos:  # the file changed under us; report the rest as data
                hole = end
            extents.append((hole - pos, 0))
            pos = hole
        return extents

    async def block_status(self, length: int, offset: int) -> list[tuple[int, int]]:
        try:
            return await self._run(self._block_status, length, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # SEEK_DATA unsupported: say "data" for the whole range
                raise
            return [(length, 0)]

    async def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class FileExportProvider:
    """Every regular file (or block device) under `root` is an export named by its relative path."""

    def __init__(self, root: str, *, default: str | None = None, workers: int = 16) -> None:
        self.root = os.path.realpath(root)
        self.default = default
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")

    def resolve(self, name: str) -> str:
        """The file behind export `name`; KeyError for anything outside the root or not a file."""
        if name == "" and self.default is not None:
            name = self.default
        parts = name.split("/")
        if not name or "\0" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise KeyError(name)
        path = os.path.realpath(os.path.join(self.root, *parts))
        if os.path.commonpath([self.root, path]) != self.root:
            raise KeyError(name)
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise KeyError(name) from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise KeyError(name)
        return path

    def _list(self) -> list[tuple[str, str]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for fname in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, fname), self.root).replace(os.sep, "/")
                try:
                    size = os.stat(self.resolve(rel)).st_size
                except (KeyError, OSError):
                    continue  # outside the root (a symlink), not a file, or gone meanwhile
                out.append((rel, f"{size} bytes"))
        return out

    async def list_exports(self) -> list[tuple[str, str]]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._list)

    async def open_export(self, name: str, read_only: bool) -> FileExport:
        path = self.resolve(name)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, FileExport, path, read_only, self._executor)
        except OSError as exc:
            raise FopError.from_oserror(exc) from None

    def close(self) -> None:
        """Stop the I/O threads; exports must be closed first."""
        self._executor.shutdown(wait=True)
