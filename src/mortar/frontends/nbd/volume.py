"""NBD exports of mortar volumes: export `VOLUME/path/to/image` is that file, reached through the
native client (`AsyncVolume`) running in the server's own event loop, so QEMU, qemu-img, nbdcopy
and fio use images on a volume with no FUSE mount and no extra process in the path.

Every connection opens its own handle on the file, but all connections to one volume share one
client graph: a FLUSH (fsync) on any of them reaches every brick holding the file and covers the
writes acknowledged on all of them, which is what NBD's multi-conn promises. The export size is the
file size when the connection opened, so an image resized under a connection shows its new size
when the client reconnects (as with any NBD server).

Durability: WRITE returns once every brick acknowledged it (in the brick's page cache, or on the
disk with cache mode `none` on a brick with `storage.o-direct on`); FUA and FLUSH return once it is
on stable storage on every brick that acknowledged (fdatasync).

Cache mode (qemu-nbd's words and default): `writeback` goes through the bricks' page caches;
`none` opens images with O_DIRECT, so a brick that honours it (`storage.o-direct on`, as VM
volumes have) reads and writes them without its page cache, as QEMU's cache=none or fio's
direct=1 ask of a local image (an NBD client cannot say so itself). Either way a WRITE is durable
at FLUSH or FUA, as NBD promises. Measured on one o-direct brick (fio nbd engine, medians of 3
interleaved runs): with `none` sequential 1 MiB reads ran ~1.9x as fast (cold buffered reads are
slow here), sequential writes ~0.75x and 4 KiB random writes ~0.65x.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from mortar.client import IO_CHUNK, AsyncScandir, AsyncVolume, FileHandle
from mortar.client.uri import parse_uri
from mortar.core.errors import FopError
from mortar.core.fops import Buffer
from mortar.core.gfid import Gfid
from mortar.frontends.nbd.protocol import STATE_HOLE, STATE_ZERO

log = logging.LoggerAdapter(logging.getLogger(__name__), {"xlator": "nbd"})

_T = TypeVar("_T")

#: errnos that mean "this brick or file system cannot do that" rather than "that failed"
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV})
LIST_LIMIT = 10_000  # exports a LIST answers with at most (per server, all volumes together)
SCAN_LIMIT = 100_000  # directory entries a LIST looks at before it gives up looking further
MAX_EXTENTS = 256  # block status extents per reply: each costs two seeks (network round trips)
CACHE_LIMIT = 32 * 1024 * 1024  # bytes a CACHE hint prefetches at most
_ZEROS = bytes(8 * IO_CHUNK)  # zeros written when neither discard nor zerofill can do it
HOLE = STATE_HOLE | STATE_ZERO
#: cache modes: the open flags each adds (see the module docstring)
CACHE_MODES = {"none": os.O_DIRECT, "writeback": 0}
DEFAULT_CACHE = "writeback"
#: O_DIRECT on a brick needs offsets and lengths in whole blocks: other requests of a cache=none
#: export go through a second, buffered handle (the brick's kernel keeps the two coherent)
DIRECT_ALIGN = 4096


def split_export_name(name: str) -> tuple[str, str]:
    """`VOLUME/path/to/image` -> (`VOLUME`, `/path/to/image`); ValueError for anything else.

    Empty, `.` and `..` components are refused so that one name means one file and a name can
    never be made to look like a different export.
    """
    volume, sep, rest = name.partition("/")
    parts = rest.split("/")
    if not volume or not sep or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"export name {name!r} is not VOLUME/path/to/image")
    return volume, "/" + rest


class VolumeExport:
    """One open image (one NBD connection) on a mortar volume."""

    can_multi_conn = True

    def __init__(
        self,
        volume: AsyncVolume,
        handle: FileHandle,
        gfid: Gfid,
        size: int,
        read_only: bool,
        description: str = "",
    ) -> None:
        self.volume = volume
        self.path = handle.path
        self.size = size
        self.read_only = read_only
        self.description = description
        self._handle = handle
        self._direct = bool(handle.flags & os.O_DIRECT)
        self._plain: FileHandle | None = None  # buffered twin for unaligned requests (see _slot)
        self._gfid = gfid
        self._reopening: asyncio.Lock = asyncio.Lock()
        self._closed = False
        self._can_discard = True
        self._can_zerofill = True
        self._can_seek = True

    @classmethod
    async def open(
        cls,
        volume: AsyncVolume,
        path: str,
        read_only: bool,
        description: str = "",
        cache: str = DEFAULT_CACHE,
    ) -> VolumeExport:
        """Open `path` on `volume`; KeyError when it is missing or not a regular file."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | CACHE_MODES[cache]
        try:
            handle = await volume.open_fd(path, flags)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyError(path) from None
        try:
            st = await volume.fstat(handle)
            if not stat.S_ISREG(st.st_mode):
                raise KeyError(path)
        except BaseException:
            await volume.close(handle)
            raise
        return cls(volume, handle, st.gfid, st.st_size, read_only, description)

    # ---- the handles, reopened after the brick connection they lived on was lost -------------

    def _slot(self, offset: int, length: int) -> str:
        """Which handle serves a request: the main one, or for an O_DIRECT export a request that is
        not in whole blocks the buffered twin (an O_DIRECT brick would answer it EINVAL)."""
        if self._direct and (offset | length) % DIRECT_ALIGN:
            return "_plain"
        return "_handle"

    async def _io(self, call: Callable[[FileHandle], Awaitable[_T]], offset: int = 0, length: int = 0) -> _T:
        """Run `call` on the handle for this range; once more on a fresh handle if the brick forgot it.

        A brick that restarted (or a connection that was re-established) no longer knows the fds
        opened on the old connection and answers EBADF, as GlusterFS's protocol/client does until
        it reopens them. The file is opened again by path and must be the same file (gfid), so a
        rename or replacement meanwhile fails the request with ESTALE instead of writing elsewhere.
        A request that failed with EBADF never reached the file, so running it again is safe.
        """
        slot = self._slot(offset, length)
        handle: FileHandle | None = getattr(self, slot)
        if handle is None:
            handle = await self._open_plain()
        try:
            return await call(handle)
        except OSError as exc:
            if exc.errno != errno.EBADF or self._closed:
                raise
        await self._reopen(handle, slot)
        return await call(getattr(self, slot))

    async def _fresh(self, flags: int) -> FileHandle:
        """The exported file opened again by path; ESTALE if the path now names another file."""
        fresh = await self.volume.open_fd(self.path, flags)
        try:
            gfid = (await self.volume.fstat(fresh)).gfid
        except BaseException:
            await self.volume.close(fresh)
            raise
        if gfid != self._gfid:
            await self.volume.close(fresh)
            raise OSError(errno.ESTALE, f"{self.path} was replaced while it was exported", self.path)
        return fresh

    async def _open_plain(self) -> FileHandle:
        async with self._reopening:
            if self._closed:
                raise OSError(errno.EBADF, "the export is closed", self.path)
            if self._plain is None:
                self._plain = await self._fresh(self._handle.flags & ~os.O_DIRECT)
            return self._plain

    async def _reopen(self, stale: FileHandle, slot: str) -> None:
        async with self._reopening:
            if getattr(self, slot) is not stale or self._closed:
                return  # another request already reopened it
            setattr(self, slot, await self._fresh(stale.flags))
            log.info("%s: reopened after its brick connection was lost", self.path)
        with contextlib.suppress(OSError):
            await self.volume.close(stale)  # forgets it; the brick already released it

    # ---- ExportBackend ---------------------------------------------------------------------

    async def pread(self, length: int, offset: int) -> Buffer:
        # the stack's own buffer (a 1 MiB read is received into a buffer of its own), not a copy
        data = await self._io(lambda h: self.volume.pread_buffer(h, length, offset), offset, length)
        got = memoryview(data).nbytes
        if got < length:  # past the end of a file that is now shorter than the export
            return bytes(data) + bytes(length - got)
        return data

    async def pwrite(self, data: Buffer, offset: int, fua: bool) -> None:
        await self._io(lambda h: self.volume.pwrite(h, data, offset), offset, memoryview(data).nbytes)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await self._io(lambda h: self.volume.fsync(h, datasync=True))

    async def trim(self, length: int, offset: int) -> None:
        """Punch a hole; a brick that cannot punch holes ignores the hint (TRIM is advisory)."""
        if not self._can_discard:
            return
        try:
            await self._io(lambda h: self.volume.discard(h, offset, length))
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._can_discard = False

    async def zero(self, length: int, offset: int, may_trim: bool, fast: bool) -> None:
        """A hole when the client allows one (it reads as zeros), else zerofill, which keeps the
        range allocated as NO_HOLE asks (a guest relying on it will not hit ENOSPC there later);
        writing zeros is the last resort, refused when the client asked for a fast zero."""
        if may_trim and self._can_discard:
            try:
                await self._io(lambda h: self.volume.discard(h, offset, length))
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._can_discard = False
        if self._can_zerofill:
            try:
                await self._io(lambda h: self.volume.zerofill(h, offset, length))
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._can_zerofill = False
        if fast:
            raise FopError(errno.ENOTSUP, "zeroing this range would mean writing zeros")
        end = offset + length
        while offset < end:
            zeros = memoryview(_ZEROS)[: min(end - offset, len(_ZEROS))]
            await self._write_at(zeros, offset)
            offset += len(zeros)

    async def _write_at(self, data: memoryview, offset: int) -> None:
        await self._io(lambda h: self.volume.pwrite(h, data, offset), offset, len(data))

    async def cache(self, length: int, offset: int) -> None:
        """Read the range and drop it: the bricks' page caches (unless O_DIRECT bypasses them) and
        any caching translator of the client graph then hold it. Bounded, as it is only a hint."""
        length = min(length, CACHE_LIMIT, max(0, self.size - offset))
        if length:
            await self._io(lambda h: self.volume.pread_buffer(h, length, offset), offset, length)

    async def block_status(self, length: int, offset: int) -> list[tuple[int, int]]:
        """Data and holes from SEEK_DATA/SEEK_HOLE on the file; past its end, holes (zeros).

        A stack that cannot seek says "data" for everything, which is always correct.
        """
        end = min(offset + length, self.size)
        if not self._can_seek:
            return [(end - offset, 0)]
        extents: list[tuple[int, int]] = []
        pos = offset
        try:
            while pos < end and len(extents) < MAX_EXTENTS:
                data = await self._seek(pos, self.volume.seek_data, end)
                if data > pos:
                    extents.append((data - pos, HOLE))
                    pos = data
                    continue
                hole = await self._seek(pos, self.volume.seek_hole, end)
                if hole <= pos:  # the file changed under us: report the rest as data
                    hole = end
                extents.append((hole - pos, 0))
                pos = hole
        except OSError as exc:
            if exc.errno not in (*_UNSUPPORTED, errno.EINVAL):
                raise
            self._can_seek = False
            return [(end - offset, 0)]
        return extents

    async def _seek(self, pos: int, how: Callable[[FileHandle, int], Awaitable[int]], end: int) -> int:
        """Where the seek lands, clipped to `end`; ENXIO (nothing more of that kind) means `end`."""
        try:
            return min(await self._io(lambda h: how(h, pos)), end)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return end
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._reopening:
            handles = [h for h in (self._handle, self._plain) if h is not None and not h.closed]
        failure: OSError | None = None
        for handle in handles:
            try:
                await self.volume.close(handle)
            except OSError as exc:
                if exc.errno != errno.EBADF:  # else the brick already forgot it (it restarted)
                    failure = failure or exc
        if failure is not None:
            raise failure


class VolumeExportProvider:
    """The regular files of one or more volumes, as exports named `VOLUME/path/to/image`.

    The provider does not own the volumes: whoever opened them closes them, after the server.
    """

    def __init__(
        self,
        volumes: Mapping[str, AsyncVolume] | None = None,
        *,
        default: str | None = None,
        list_limit: int = LIST_LIMIT,
        cache: str = DEFAULT_CACHE,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
        self.cache = cache
        self._volumes: dict[str, AsyncVolume] = {}
        for name, volume in (volumes or {}).items():
            self.add_volume(name, volume)
        #: the export served to clients asking for the empty name (`nbd://host/`)
        self.default = default
        self.list_limit = list_limit

    @property
    def volumes(self) -> dict[str, AsyncVolume]:
        return dict(self._volumes)

    def add_volume(self, name: str, volume: AsyncVolume) -> None:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"volume name {name!r} cannot start an export name")
        if name in self._volumes:
            raise ValueError(f"volume {name!r} is already exported")
        self._volumes[name] = volume

    def remove_volume(self, name: str) -> AsyncVolume:
        """Stop offering the volume's images (open connections keep theirs)."""
        return self._volumes.pop(name)

    def resolve(self, name: str) -> tuple[AsyncVolume, str]:
        """The volume and path behind an export name; KeyError when there is no such volume."""
        if name == "" and self.default is not None:
            name = self.default
        try:
            volume_name, path = split_export_name(name)
        except ValueError:
            raise KeyError(name) from None
        volume = self._volumes.get(volume_name)
        if volume is None:
            raise KeyError(name)
        return volume, path

    async def open_export(self, name: str, read_only: bool) -> VolumeExport:
        volume, path = self.resolve(name)
        try:
            return await VolumeExport.open(volume, path, read_only, f"{name} on mortar volume", self.cache)
        except KeyError:
            raise KeyError(name) from None

    async def list_exports(self) -> list[tuple[str, str]]:
        """Regular files of every volume, breadth first, hidden names (`.x`) skipped; at most
        `list_limit` exports and SCAN_LIMIT entries looked at, so a huge volume cannot stall a
        client or the server on a LIST."""
        out: list[tuple[str, str]] = []
        budget = [SCAN_LIMIT]
        for name in sorted(self._volumes):
            await self._list_volume(name, self._volumes[name], out, budget)
            if len(out) > self.list_limit or budget[0] <= 0:
                shown = min(len(out), self.list_limit)
                log.warning(
                    "export list cut at %d exports (%d entries looked at)", shown, SCAN_LIMIT - budget[0]
                )
                break
        return out[: self.list_limit]

    async def _list_volume(
        self, name: str, volume: AsyncVolume, out: list[tuple[str, str]], budget: list[int]
    ) -> None:
        pending = deque(["/"])
        while pending and len(out) <= self.list_limit and budget[0] > 0:
            directory = pending.popleft()
            files: list[tuple[str, str]] = []
            subdirs: list[str] = []
            try:
                async with AsyncScandir(volume, directory, resolve_links=False) as entries:
                    async for entry in entries:
                        budget[0] -= 1
                        if entry.name.startswith("."):
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            files.append((f"{name}{entry.path}", f"{entry.iatt.size} bytes"))
                        if budget[0] <= 0:
                            break
            except OSError as exc:  # removed meanwhile, or not readable: list the rest
                log.debug("listing %s:%s: %s", name, directory, exc)
                continue
            out.extend(sorted(files))
            pending.extend(sorted(subdirs))


# ---- opening volumes by volfile or by mortar:// URI ------------------------------------------


async def open_volume(source: str, *, timeout: float = 30) -> tuple[str, AsyncVolume]:
    """Open a volume from a client volfile or a `mortar://HOST[:PORT]/VOLUME` URI.

    Returns the volume's name with it: the URI's, or the volfile's top translator (volgen names it
    after the volume). A volume opened by URI follows its volfile's changes (live graph switch).
    """
    if source.startswith("mortar://"):
        name = parse_uri(source).volume
        return name, await AsyncVolume.connect(source, timeout=timeout)
    volume = await AsyncVolume.from_volfile(source, timeout=timeout)
    return volume.top.name, volume
