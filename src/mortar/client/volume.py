"""`AsyncVolume`: the native API (gfapi's role) on asyncio, running a client graph in-process.

Paths come in, fops on gfids go down the graph (see `resolve.py`), and errors come back as the
`OSError` subclass `os` would raise, with the brick's errno. Each call runs as the caller's
identity (by default this process's uid/gid/groups/pid), so the brick checks permissions.
Large reads and writes are split into 1 MiB fops issued concurrently: one huge write never becomes
one huge frame, and the pieces travel in parallel through the graph.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mortar.client.file import AsyncFile, Opening, parse_mode
from mortar.client.resolve import Attempt, Resolved, Resolver, split_path
from mortar.client.results import StatResult, StatVfsResult, oserror
from mortar.client.scandir import AsyncScandir
from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, AttrSet, Buffer, Fd, SeekWhat, SetAttrValid
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.inode import InodeTable
from mortar.core.translator import Event, Translator
from mortar.graph.builder import Graph, load

if TYPE_CHECKING:
    from mortar.client.switch import CallGate

log = logging.getLogger(__name__)

T = TypeVar("T")
PathArg = str | os.PathLike[str]

IO_CHUNK = 1 << 20  # largest single readv/writev the client sends
IO_INFLIGHT = 16  # pieces of one large call in flight at once
READDIR_SIZE = 128 * 1024  # readdirp size per page (bytes of entries, GlusterFS's convention)
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW


class FileHandle:
    """An open file on the volume (gfapi's `glfs_fd`): pass it to pread/pwrite/fstat/close."""

    __slots__ = ("closed", "fd", "flags", "last_iatt", "path")

    def __init__(self, fd: Fd, path: str, flags: int, iatt: Iatt | None = None) -> None:
        self.fd = fd
        self.path = path
        self.flags = flags
        self.closed = False
        #: attributes from the latest modifying fop (an O_APPEND writer learns the new end here)
        self.last_iatt = iatt

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<FileHandle {self.path!r} {state} flags={self.flags:#o}>"


def _pieces(offset: int, size: int) -> list[tuple[int, int]]:
    return [(off, min(IO_CHUNK, offset + size - off)) for off in range(offset, offset + size, IO_CHUNK)]


async def _concurrently(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls with at most IO_INFLIGHT in flight; the first failure cancels the rest."""
    if len(calls) == 1:
        return [await calls[0]()]
    gate = asyncio.Semaphore(IO_INFLIGHT)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(call)) for call in calls]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [task.result() for task in tasks]


def _bytes(data: Buffer) -> bytes:
    return data if isinstance(data, bytes) else bytes(data)


class AsyncVolume:
    """A volume opened in this process. Use `await AsyncVolume.from_volfile(path)`."""

    def __init__(
        self,
        graph: Graph,
        *,
        identity: CallContext | None = None,
        umask: int = 0o022,
        entry_timeout: float | None = 1.0,
        readdir_size: int = READDIR_SIZE,
        owns_graph: bool = True,
        top: Translator | None = None,
    ) -> None:
        self.graph = graph
        #: where fops go: the graph's top, or the switch above it of a connected volume
        self.top = top if top is not None else graph.top
        self.table = InodeTable()
        self.resolver = Resolver(self.top, self.table, entry_timeout)
        #: who the calls run as; None means this process's uid, gid and pid at the time of each call
        self.identity = identity
        self._own_identity: tuple[tuple[int, int, int], CallContext] | None = None
        self.umask = umask
        self.readdir_size = readdir_size
        self._owns_graph = owns_graph
        self._handles: set[FileHandle] = set()
        self._closed = False
        self._unsubscribe = graph.subscribe(self._on_event)
        #: set by `connect()`: lets a live graph switch hold new calls until running ones finish
        self.gate: CallGate | None = None
        #: run at close, before the graph stops (a connected volume's volfile watch)
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def from_volfile(cls, path: str | Path, *, timeout: float = 30, **kwargs: Any) -> AsyncVolume:
        """Build the graph a client volfile describes, start it and wait until it can serve."""
        return await cls.from_graph(load(path), timeout=timeout, **kwargs)

    @classmethod
    async def connect(
        cls, uri: str, *, timeout: float = 30, watch: bool = True, **kwargs: Any
    ) -> AsyncVolume:
        """Open `mortar://HOST[:PORT][,HOST2...]/VOLUME`: fetch its volfile from the node daemon, run
        the graph here, and (with `watch`) follow volfile changes with live graph switches."""
        from mortar.client.uri import connect

        return await connect(cls, uri, timeout=timeout, watch=watch, **kwargs)

    @classmethod
    async def from_graph(cls, graph: Graph, *, timeout: float = 30, **kwargs: Any) -> AsyncVolume:
        """Serve from a built graph (the node daemon's `mortar://HOST/VOLUME` connect fetches a
        volfile and comes through here); starts it unless it already runs."""
        volume = cls(graph, **kwargs)
        await volume._start(timeout)
        return volume

    async def _start(self, timeout: float) -> None:
        try:
            if not self.graph.started:
                await self.graph.start(timeout)
            if not await self.graph.wait_up(timeout):
                raise TimeoutError(f"{self.graph.filename}: volume not up within {timeout:g}s")
            await self._guarded(lambda: self.resolver.revalidate(ROOT_GFID, "/"), "/")
        except BaseException:
            await self._shutdown()
            raise

    async def aclose(self) -> None:
        """Release every open file, then stop the graph (when this volume started it)."""
        if self._closed:
            return
        for handle in list(self._handles):
            try:
                await self.close(handle)
            except OSError as exc:
                log.warning("closing %s at volume close: %s", handle.path, exc)
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closed = True
        for hook in self.on_close:
            try:
                await hook()
            except Exception:
                log.exception("volume %s: close hook failed", self.top.name)
        self._unsubscribe()
        if self._owns_graph:
            await self.graph.stop()

    async def __aenter__(self) -> AsyncVolume:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def up(self) -> bool:
        return self.graph.up

    def subscribe(self, callback: Callable[[Event, Any], None]) -> Callable[[], None]:
        """Events the graph's top sends up (CHILD_UP, CHILD_DOWN, UPCALL...); returns an unsubscriber."""
        return self.graph.subscribe(callback)

    def _on_event(self, event: Event, data: Any) -> None:
        if event is Event.CHILD_DOWN:
            log.warning("volume %s went down: %s", self.top.name, data)
        elif event is Event.CHILD_UP:
            log.info("volume %s is up", self.top.name)

    # ---- plumbing ------------------------------------------------------------------------------

    def _identity(self) -> CallContext:
        if self.identity is not None:
            return self.identity
        # Building a frozen CallContext and calling getgroups per fop cost ~7% of a 4 KiB read:
        # reuse it while uid, gid and pid stay the same (a change of groups alone needs a new one
        # to be set as `identity`).
        key = (os.getuid(), os.getgid(), os.getpid())
        cached = self._own_identity
        if cached is None or cached[0] != key:
            cached = self._own_identity = (key, CallContext(key[0], key[1], tuple(os.getgroups()), key[2]))
        return cached[1]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on a closed volume")

    async def _guarded(
        self, call: Callable[[], Awaitable[T]], path: PathArg | None, path2: PathArg | None = None
    ) -> T:
        """Run `call` as the caller's identity; fop errors become OSError naming the path(s)."""
        self._check_open()
        if self.gate is not None:
            async with self.gate.call():
                return await self._as_caller(call, path, path2)
        return await self._as_caller(call, path, path2)

    async def _as_caller(
        self, call: Callable[[], Awaitable[T]], path: PathArg | None, path2: PathArg | None
    ) -> T:
        token = call_context.set(self._identity())
        try:
            return await call()
        except FopError as exc:
            raise oserror(
                exc, None if path is None else os.fspath(path), None if path2 is None else os.fspath(path2)
            ) from exc
        finally:
            call_context.reset(token)

    async def _path_op(
        self, op: Callable[[Attempt], Awaitable[T]], path: PathArg, path2: PathArg | None = None
    ) -> T:
        """A path operation, retried once with fresh lookups if cached dentries proved stale."""
        return await self._guarded(lambda: self.resolver.run(op), path, path2)

    async def _fd_op(self, handle: FileHandle, call: Callable[[], Awaitable[T]]) -> T:
        if handle.closed:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF), handle.path)
        return await self._guarded(call, handle.path)

    # ---- open files ----------------------------------------------------------------------------

    async def open_fd(self, path: PathArg, flags: int = os.O_RDONLY, mode: int = 0o666) -> FileHandle:
        """open(2): flags are `os.O_*`; with O_CREAT the file gets `mode` minus the umask."""

        async def op(attempt: Attempt) -> FileHandle:
            follow = not flags & (os.O_NOFOLLOW | (os.O_EXCL if flags & os.O_CREAT else 0))
            res = await self.resolver.resolve(
                path, attempt, follow=follow, missing_ok=bool(flags & os.O_CREAT)
            )
            if res.iatt is None:
                try:
                    return await self._create(res, flags, mode)
                except FopError as exc:
                    if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                        raise
                res = await self.resolver.resolve(path, attempt)  # lost a creation race: open the winner
            elif flags & os.O_CREAT and flags & os.O_EXCL:
                raise FopError(errno.EEXIST, f"{res.path} exists")
            return await self._open(res, flags)

        handle = await self._path_op(op, path)
        self._handles.add(handle)
        return handle

    async def create(
        self, path: PathArg, mode: int = 0o644, flags: int = os.O_RDWR | os.O_EXCL
    ) -> FileHandle:
        """creat(2)-like: O_CREAT is implied; by default fails with FileExistsError if `path` exists."""
        return await self.open_fd(path, flags | os.O_CREAT, mode)

    async def _create(self, res: Resolved, flags: int, mode: int) -> FileHandle:
        gfid = Gfid.random()
        fd = Fd(gfid, flags & ~_OPEN_ONLY)
        reply = await self.top.create(
            res.entry_loc(),
            flags | os.O_CREAT | os.O_EXCL,
            mode & 0o7777,
            self.umask,
            fd,
            {GFID_REQ: bytes(gfid)},
        )
        fd.inode = self.resolver.link(res.pargfid, res.name, reply.iatt)
        return FileHandle(fd, res.path, flags, reply.iatt)

    async def _open(self, res: Resolved, flags: int) -> FileHandle:
        iatt = res.attrs
        if iatt.is_lnk:
            raise FopError(errno.ELOOP, f"{res.path} is a symbolic link (O_NOFOLLOW)")
        fd = Fd(iatt.gfid, flags & ~_OPEN_ONLY, inode=res.inode)
        await self.top.open(res.loc(), fd.flags, fd)
        return FileHandle(fd, res.path, flags, iatt)

    def open(self, path: PathArg, mode: str = "rb") -> Opening[AsyncFile]:
        """A binary file object; `await vol.open(p, "wb")` or `async with vol.open(p) as f`."""
        flags, _, _, binary = parse_mode(mode)
        if not binary:
            raise ValueError("AsyncVolume.open is binary only: add 'b' to the mode")

        async def opening() -> AsyncFile:
            handle = await self.open_fd(path, flags)
            try:
                return await AsyncFile.create(self, handle, mode)
            except BaseException:
                await self.close(handle)
                raise

        return Opening(opening())

    async def close(self, handle: FileHandle) -> None:
        """flush (errors of delayed writes surface here), then release the brick's fd."""
        if handle.closed:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF), handle.path)
        handle.closed = True
        self._handles.discard(handle)

        async def flush_release() -> None:
            try:
                await self.top.flush(handle.fd)
            finally:
                await self.top.release(handle.fd)

        await self._guarded(flush_release, handle.path)

    async def pread(self, handle: FileHandle, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset` (short at end of file), as the stack returned them."""
        return _bytes(await self._fd_op(handle, lambda: self._read(handle, size, offset)))

    async def pread_buffer(self, handle: FileHandle, size: int, offset: int) -> Buffer:
        """`pread` without the copy into `bytes`: the buffer the stack returned (a reply's payload
        is received into a buffer of its own, so it is the caller's to keep). For callers that pass
        the data on, as the NBD server does: a 1 MiB copy per request is not free."""
        return await self._fd_op(handle, lambda: self._read(handle, size, offset))

    async def _read(self, handle: FileHandle, size: int, offset: int) -> Buffer:
        if size < 0 or offset < 0:
            raise FopError(errno.EINVAL, "negative size or offset")
        if size == 0:
            return b""
        fd = handle.fd
        if size <= IO_CHUNK:
            return (await self.top.readv(fd, size, offset, 0)).data
        pieces = _pieces(offset, size)

        def reader(off: int, n: int) -> Callable[[], Awaitable[Buffer]]:
            async def read() -> Buffer:
                return (await self.top.readv(fd, n, off, 0)).data

            return read

        parts = await _concurrently([reader(off, n) for off, n in pieces])
        out: list[Buffer] = []
        for (_, n), data in zip(pieces, parts, strict=True):
            out.append(data)
            if len(data) < n:  # end of file
                break
        return b"".join(out)

    async def preadinto(self, handle: FileHandle, buf: Buffer, offset: int) -> int:
        """Fill `buf` from `offset`; returns the bytes read (less than len(buf) at end of file)."""
        return await self._fd_op(handle, lambda: self._readinto(handle, buf, offset))

    async def _readinto(self, handle: FileHandle, buf: Buffer, offset: int) -> int:
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError("preadinto needs a writable buffer")
        if offset < 0:
            raise FopError(errno.EINVAL, "negative offset")
        fd = handle.fd
        pieces = _pieces(offset, len(view))

        def reader(off: int, n: int) -> Callable[[], Awaitable[int]]:
            async def read() -> int:
                data = (await self.top.readv(fd, n, off, 0)).data
                got = min(len(data), n)
                start = off - offset
                view[start : start + got] = data if got == len(data) else memoryview(data)[:got]
                return got

            return read

        counts = await _concurrently([reader(off, n) for off, n in pieces])
        total = 0
        for (_, n), got in zip(pieces, counts, strict=True):
            total += got
            if got < n:
                break
        return total

    async def pwrite(self, handle: FileHandle, data: Buffer, offset: int) -> int:
        """Write all of `data` at `offset` (at the end for O_APPEND handles); returns len(data)."""
        return await self._fd_op(handle, lambda: self._write(handle, data, offset))

    async def _write(self, handle: FileHandle, data: Buffer, offset: int) -> int:
        if offset < 0:
            raise FopError(errno.EINVAL, "negative offset")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
            data = view
        size = view.nbytes
        fd = handle.fd
        if size <= IO_CHUNK:
            reply = await self.top.writev(fd, data, offset, 0)
            handle.last_iatt = reply.post or handle.last_iatt
            return size
        pieces = _pieces(offset, size)
        if handle.append:  # appends land in order, so they cannot be issued side by side
            for off, n in pieces:
                reply = await self.top.writev(fd, view[off - offset : off - offset + n], off, 0)
                handle.last_iatt = reply.post or handle.last_iatt
            return size

        def writer(off: int, n: int) -> Callable[[], Awaitable[Iatt | None]]:
            async def write() -> Iatt | None:
                return (await self.top.writev(fd, view[off - offset : off - offset + n], off, 0)).post

            return write

        posts = [p for p in await _concurrently([writer(off, n) for off, n in pieces]) if p is not None]
        if posts:
            handle.last_iatt = max(posts, key=lambda iatt: (iatt.size, iatt.mtime_ns))
        return size

    async def fstat(self, handle: FileHandle) -> StatResult:
        reply = await self._fd_op(handle, lambda: self.top.fstat(handle.fd))
        handle.last_iatt = reply.iatt
        return StatResult.from_iatt(reply.iatt)

    async def fsync(self, handle: FileHandle, datasync: bool = False) -> None:
        """Stable storage on every brick that acknowledged (fdatasync when `datasync`)."""
        await self._fd_op(handle, lambda: self.top.fsync(handle.fd, int(datasync)))

    async def ftruncate(self, handle: FileHandle, size: int) -> None:
        reply = await self._fd_op(handle, lambda: self.top.ftruncate(handle.fd, size))
        handle.last_iatt = reply.post or handle.last_iatt

    async def fallocate(self, handle: FileHandle, mode: int, offset: int, length: int) -> None:
        """fallocate(2); `mode` takes FALLOC_FL_KEEP_SIZE / PUNCH_HOLE / ZERO_RANGE bits."""
        await self._fd_op(handle, lambda: self.top.fallocate(handle.fd, mode, offset, length))

    async def discard(self, handle: FileHandle, offset: int, length: int) -> None:
        """Deallocate a range (punch a hole, size unchanged); it then reads as zeros."""
        await self._fd_op(handle, lambda: self.top.discard(handle.fd, offset, length))

    async def zerofill(self, handle: FileHandle, offset: int, length: int) -> None:
        await self._fd_op(handle, lambda: self.top.zerofill(handle.fd, offset, length))

    async def seek_data(self, handle: FileHandle, offset: int) -> int:
        """The next offset >= `offset` holding data (ENXIO past the end)."""
        return (await self._fd_op(handle, lambda: self.top.seek(handle.fd, offset, SeekWhat.DATA))).offset

    async def seek_hole(self, handle: FileHandle, offset: int) -> int:
        """The next hole at or after `offset` (the end of the file counts as one)."""
        return (await self._fd_op(handle, lambda: self.top.seek(handle.fd, offset, SeekWhat.HOLE))).offset

    # ---- attributes ----------------------------------------------------------------------------

    async def stat(self, path: PathArg, *, follow_symlinks: bool = True) -> StatResult:
        async def op(attempt: Attempt) -> StatResult:
            res = await self.resolver.resolve(path, attempt, follow=follow_symlinks)
            return StatResult.from_iatt(res.attrs)

        return await self._path_op(op, path)

    async def lstat(self, path: PathArg) -> StatResult:
        return await self.stat(path, follow_symlinks=False)

    async def exists(self, path: PathArg) -> bool:
        """False for any error, as `os.path.exists`."""
        try:
            await self.stat(path)
        except OSError:
            return False
        return True

    async def access(self, path: PathArg, mode: int) -> bool:
        """access(2) as this volume's identity: `os.R_OK | os.W_OK | os.X_OK` or `os.F_OK`."""

        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve(path, attempt)
            await self.top.access(res.loc(), mode)

        try:
            await self._path_op(op, path)
        except OSError:
            return False
        return True

    async def _setattr(self, path: PathArg, attr: AttrSet, follow_symlinks: bool) -> None:
        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve(path, attempt, follow=follow_symlinks)
            await self.top.setattr(res.loc(), attr)

        await self._path_op(op, path)

    async def chmod(self, path: PathArg, mode: int, *, follow_symlinks: bool = True) -> None:
        await self._setattr(path, AttrSet(SetAttrValid.MODE, mode=mode & 0o7777), follow_symlinks)

    async def chown(self, path: PathArg, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """-1 leaves the uid or gid as it is."""
        valid = (SetAttrValid.UID if uid != -1 else 0) | (SetAttrValid.GID if gid != -1 else 0)
        if valid:
            await self._setattr(path, AttrSet(valid, uid=uid, gid=gid), follow_symlinks)

    async def utime(
        self,
        path: PathArg,
        times: tuple[float, float] | None = None,
        *,
        ns: tuple[int, int] | None = None,
        follow_symlinks: bool = True,
    ) -> None:
        """Set access and modification times (`times` in seconds or `ns`); neither means now."""
        if times is not None and ns is not None:
            raise ValueError("utime: give times or ns, not both")
        if times is not None:
            ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        if ns is None:
            now = time.time_ns()
            ns = (now, now)
        attr = AttrSet(SetAttrValid.ATIME | SetAttrValid.MTIME, atime_ns=ns[0], mtime_ns=ns[1])
        await self._setattr(path, attr, follow_symlinks)

    async def truncate(self, path: PathArg, size: int) -> None:
        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve(path, attempt)
            await self.top.truncate(res.loc(), size)

        await self._path_op(op, path)

    async def statvfs(self, path: PathArg = "/") -> StatVfsResult:
        async def op(attempt: Attempt) -> StatVfsResult:
            res = await self.resolver.resolve(path, attempt)
            return StatVfsResult.from_statvfs((await self.top.statfs(res.loc())).statvfs)

        return await self._path_op(op, path)

    # ---- extended attributes -----------------------------------------------------------------

    async def getxattr(self, path: PathArg, name: str, *, follow_symlinks: bool = True) -> bytes:
        async def op(attempt: Attempt) -> bytes:
            res = await self.resolver.resolve(path, attempt, follow=follow_symlinks)
            value = (await self.top.getxattr(res.loc(), name)).xattrs.get(name)
            if value is None:
                raise FopError(errno.ENODATA, f"no attribute {name}")
            return value

        return await self._path_op(op, path)

    async def setxattr(
        self, path: PathArg, name: str, value: Buffer, flags: int = 0, *, follow_symlinks: bool = True
    ) -> None:
        """`flags` is os.XATTR_CREATE or os.XATTR_REPLACE (or 0)."""

        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve(path, attempt, follow=follow_symlinks)
            await self.top.setxattr(res.loc(), {name: bytes(value)}, flags)

        await self._path_op(op, path)

    async def listxattr(self, path: PathArg = "/", *, follow_symlinks: bool = True) -> list[str]:
        async def op(attempt: Attempt) -> list[str]:
            res = await self.resolver.resolve(path, attempt, follow=follow_symlinks)
            return list((await self.top.getxattr(res.loc(), None)).xattrs)

        return await self._path_op(op, path)

    async def removexattr(self, path: PathArg, name: str, *, follow_symlinks: bool = True) -> None:
        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve(path, attempt, follow=follow_symlinks)
            await self.top.removexattr(res.loc(), name)

        await self._path_op(op, path)

    # ---- namespace -----------------------------------------------------------------------------

    async def mkdir(self, path: PathArg, mode: int = 0o777) -> None:
        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve_parent(path, attempt, errno.EEXIST)
            gfid = Gfid.random()
            reply = await self.top.mkdir(res.entry_loc(), mode & 0o7777, self.umask, {GFID_REQ: bytes(gfid)})
            self.resolver.link(res.pargfid, res.name, reply.iatt)

        await self._path_op(op, path)

    async def makedirs(self, path: PathArg, mode: int = 0o777, exist_ok: bool = False) -> None:
        """mkdir with every missing parent, like `os.makedirs`."""
        comps, _ = split_path(path)
        if not comps and not exist_ok:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
        prefix = ""
        for i, comp in enumerate(comps):
            prefix = f"{prefix}/{comp}"
            try:
                await self.mkdir(prefix, mode)
            except FileExistsError:
                last = i == len(comps) - 1
                if last and not (exist_ok and (await self.stat(prefix)).st_mode & 0o170000 == 0o040000):
                    raise

    async def rmdir(self, path: PathArg) -> None:
        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve_parent(path, attempt, errno.EBUSY)
            assert res.pargfid is not None
            cached = self.table.find(res.pargfid, res.name)
            await self.top.rmdir(res.entry_loc(), 0)
            self.table.unlink(res.pargfid, res.name)
            if cached is not None:
                self.table.forget(cached.gfid)

        await self._path_op(op, path)

    async def unlink(self, path: PathArg) -> None:
        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve_parent(path, attempt, errno.EISDIR)
            assert res.pargfid is not None
            await self.top.unlink(res.entry_loc(), 0)
            self.table.unlink(res.pargfid, res.name)

        await self._path_op(op, path)

    remove = unlink

    async def rename(self, src: PathArg, dst: PathArg) -> None:
        """rename(2): replaces `dst` per POSIX rules (a directory only by an empty directory)."""

        async def op(attempt: Attempt) -> None:
            old = await self.resolver.resolve_parent(src, attempt, errno.EBUSY)
            new = await self.resolver.resolve_parent(dst, attempt, errno.EBUSY)
            assert old.pargfid is not None and new.pargfid is not None
            replaced = self.table.find(new.pargfid, new.name)
            reply = await self.top.rename(old.entry_loc(), new.entry_loc())
            if replaced is not None and replaced.gfid == reply.iatt.gfid:
                return  # two links to one file: POSIX rename does nothing
            if replaced is not None:
                self.table.forget(replaced.gfid)  # with its dentries, and its children's if a directory
            if self.table.find(old.pargfid, old.name) is not None:
                self.table.rename(old.pargfid, old.name, new.pargfid, new.name)  # keeps the Inode object
            self.resolver.link(new.pargfid, new.name, reply.iatt)

        await self._path_op(op, src, dst)

    async def link(self, src: PathArg, dst: PathArg) -> None:
        """A hard link `dst` to the object `src` names (a symlink itself is linked, not followed)."""

        async def op(attempt: Attempt) -> None:
            old = await self.resolver.resolve(src, attempt, follow=False)
            new = await self.resolver.resolve_parent(dst, attempt, errno.EEXIST)
            reply = await self.top.link(old.loc(), new.entry_loc())
            self.resolver.link(new.pargfid, new.name, reply.iatt)

        await self._path_op(op, src, dst)

    async def symlink(self, target: str, path: PathArg) -> None:
        """Create `path` pointing at `target` (stored as given; resolved by readers)."""

        async def op(attempt: Attempt) -> None:
            res = await self.resolver.resolve_parent(path, attempt, errno.EEXIST)
            gfid = Gfid.random()
            reply = await self.top.symlink(target, res.entry_loc(), self.umask, {GFID_REQ: bytes(gfid)})
            self.resolver.link(res.pargfid, res.name, reply.iatt)

        await self._path_op(op, path)

    async def readlink(self, path: PathArg) -> str:
        async def op(attempt: Attempt) -> str:
            res = await self.resolver.resolve(path, attempt, follow=False)
            if not res.attrs.is_lnk:
                raise FopError(errno.EINVAL, f"{res.path} is not a symbolic link")
            return (await self.top.readlink(res.loc())).target

        return await self._path_op(op, path)

    # ---- directories ---------------------------------------------------------------------------

    def scandir(self, path: PathArg = "/") -> AsyncScandir:
        """`async for entry in vol.scandir(p)`: pages through readdirp, never one huge reply."""
        return AsyncScandir(self, path)

    async def listdir(self, path: PathArg = "/") -> list[str]:
        async with AsyncScandir(self, path, resolve_links=False) as entries:
            return [entry.name async for entry in entries]

    async def walk(
        self,
        top: PathArg = "/",
        topdown: bool = True,
        onerror: Callable[[OSError], None] | None = None,
        followlinks: bool = False,
    ) -> AsyncGenerator[tuple[str, list[str], list[str]], None]:
        """`os.walk` over the volume: (dirpath, dirnames, filenames) triples."""
        dirpath = os.fspath(top)
        dirs: list[str] = []
        files: list[str] = []
        links: set[str] = set()
        try:
            async with self.scandir(dirpath) as entries:
                async for entry in entries:
                    (dirs if entry.is_dir() else files).append(entry.name)
                    if entry.is_symlink():
                        links.add(entry.name)
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            return
        if topdown:
            yield dirpath, dirs, files
        for name in dirs:  # with topdown, the caller may have pruned `dirs`
            if followlinks or name not in links:
                async for triple in self.walk(posixpath.join(dirpath, name), topdown, onerror, followlinks):
                    yield triple
        if not topdown:
            yield dirpath, dirs, files
