"""storage/posix: the brick translator, serving fops from a local directory.

Every fop is one call into a worker thread (`offload`) that does its whole syscall sequence there;
the modules beside this one hold those sequences: `posix_handles` (GFID handle index, resolution,
confinement), `posix_entry` (namespace), `posix_inode` (objects by Loc), `posix_io` (open fds),
`posix_xattr` (xattr policy, xattrop), `posix_sys` (per-thread caller identity, fallocate).

A directory becomes a brick only if it carries the volume's id (`trusted.mortar.volume-id`), so a
disk that failed to mount is never mistaken for an empty brick; `brick-create` stamps a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from mortar.core.context import call_context
from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrReply,
    AttrSet,
    Buffer,
    ChangeReply,
    ChecksumReply,
    CopyReply,
    DirReply,
    EntryReply,
    Fd,
    Loc,
    ReadlinkReply,
    ReadReply,
    RenameReply,
    SeekReply,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import ROOT_GFID
from mortar.core.options import Option
from mortar.core.translator import Event, Translator
from mortar.xlators.storage import posix_entry as entry
from mortar.xlators.storage import posix_inode as inode
from mortar.xlators.storage import posix_io as io
from mortar.xlators.storage.nolocks import NoLockTable
from mortar.xlators.storage.posix_handles import GFID_XATTR, PRIVATE_DIR, VOLUME_ID_XATTR, Brick, PosixFd

_T = TypeVar("_T")

HEALTH_CHECK_TIMEOUT = 20.0
#: entries a fresh filesystem may hold that do not make a directory "in use" for brick-create
_IGNORABLE = {PRIVATE_DIR, "lost+found"}


class BrickError(RuntimeError):
    """The directory cannot be served as this volume's brick."""


def prepare_brick(root: str, volume_id: bytes, create: bool) -> None:
    """Check (or, with `create`, make) the brick root marker; raise BrickError naming the directory."""
    try:
        if not os.path.isdir(root):
            if os.path.lexists(root):
                raise BrickError(f"brick path {root} is not a directory")
            if not create:
                raise BrickError(f"brick directory {root} does not exist (is its disk mounted?)")
            os.makedirs(root, mode=0o755)
        try:
            marker: bytes | None = os.getxattr(root, VOLUME_ID_XATTR)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise BrickError(f"{root}: the filesystem has no extended attributes") from None
            if exc.errno != errno.ENODATA:
                raise
            marker = None
        if marker is None:
            if not create:
                raise BrickError(
                    f"{root} has no {VOLUME_ID_XATTR} marker: refusing to serve it as a brick "
                    "(is its disk mounted?)"
                )
            if set(os.listdir(root)) - _IGNORABLE:
                raise BrickError(f"{root} is not empty and has no volume-id marker: refusing to take it over")
            os.setxattr(root, GFID_XATTR, ROOT_GFID)
            os.setxattr(root, VOLUME_ID_XATTR, volume_id)
        elif marker != volume_id:
            other = uuid.UUID(bytes=marker) if len(marker) == 16 else marker.hex()
            raise BrickError(f"{root} is a brick of volume {other}, not of {uuid.UUID(bytes=volume_id)}")
        try:
            root_gfid = os.getxattr(root, GFID_XATTR)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
            os.setxattr(root, GFID_XATTR, ROOT_GFID)
            root_gfid = ROOT_GFID
        if root_gfid != ROOT_GFID:
            raise BrickError(f"{root} carries gfid {root_gfid.hex()}, not the root's")
    except OSError as exc:
        raise BrickError(f"brick {root}: {exc}") from exc


class PosixTranslator(NoLockTable):
    """A brick on a local directory. It has no children and no lock table (features/locks goes above)."""

    type_name: ClassVar[str] = "storage/posix"
    options: ClassVar[Mapping[str, Option]] = {
        "directory": Option("path", "", "the brick directory"),
        "volume-id": Option("str", "", "UUID of the volume; the brick root must carry it"),
        "brick-create": Option(
            "bool", False, "create the directory and stamp the volume-id when absent or empty (volume create)"
        ),
        "reserve": Option("percent", 1.0, "share of the filesystem kept free: writes fail with ENOSPC"),
        "o-direct": Option("bool", False, "honour O_DIRECT from clients when the filesystem supports it"),
        "health-check-interval": Option(
            "time", 30.0, "seconds between brick health checks (0 disables)", min=0
        ),
    }

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        self.brick = Brick(self.opts["directory"] or "/", self.opts["reserve"], self.opts["o-direct"])
        self._health: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def init(self) -> None:
        if self.children:
            raise BrickError(f"storage/posix {self.name} takes no subvolumes")
        directory = self.opts["directory"]
        if not directory:
            raise BrickError(f"storage/posix {self.name}: option 'directory' is required")
        raw_id = self.opts["volume-id"]
        if not raw_id:
            raise BrickError(f"storage/posix {self.name}: option 'volume-id' is required")
        try:
            volume_id = uuid.UUID(raw_id).bytes
        except ValueError:
            raise BrickError(f"storage/posix {self.name}: volume-id {raw_id!r} is not a UUID") from None
        self.brick = Brick(directory, self.opts["reserve"], self.opts["o-direct"])
        await self.offload(prepare_brick, self.brick.root, volume_id, self.opts["brick-create"])
        await self.offload(self.brick.open_root)
        self.log.info("serving brick %s", self.brick.root)
        self._start_health()

    async def fini(self) -> None:
        await self._stop_health()
        for pfd in list(self.brick.fds):
            io.release(self.brick, pfd)
        self.brick.close()

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        old_interval = self.opts["health-check-interval"]
        old_place = (self.opts["directory"], self.opts["volume-id"])
        super().reconfigure(options)
        if (self.opts["directory"], self.opts["volume-id"]) != old_place:
            self.log.warning("a new directory or volume-id takes effect only when the brick restarts")
        self.brick.reserve_pct = self.opts["reserve"]
        self.brick.o_direct = self.opts["o-direct"]
        if self.opts["health-check-interval"] != old_interval and self.brick.root_fd >= 0:
            if self._health is not None:
                self._health.cancel()
                self._health = None
            self._start_health()

    # ---- health check ------------------------------------------------------------------------

    def _start_health(self) -> None:
        if self.opts["health-check-interval"] > 0:
            self._health = asyncio.get_running_loop().create_task(
                self._health_loop(), name=f"{self.name}-health-check"
            )

    async def _stop_health(self) -> None:
        task, self._health = self._health, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _health_probe(self) -> None:
        path = os.path.join(self.brick.private, "health_check")
        stamp = f"{time.time():.9f}\n".encode()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, stamp, 0)
            os.fdatasync(fd)
            if os.pread(fd, len(stamp) + 1, 0) != stamp:
                raise OSError(errno.EIO, "health check read back something else")
        finally:
            os.close(fd)

    async def _health_loop(self) -> None:
        """Write and read back a timestamp; on failure the brick reports itself down, as GlusterFS does."""
        while True:
            await asyncio.sleep(self.opts["health-check-interval"])
            try:
                await asyncio.wait_for(self.offload(self._health_probe), HEALTH_CHECK_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                self.log.error("health-check failed, going down: %s", exc or "timed out")
                for parent in self.parents:
                    parent.notify(Event.CHILD_DOWN, self, "health-check failed")
                return

    # ---- helpers -----------------------------------------------------------------------------

    async def offload(self, fn: Callable[..., _T], *args: Any) -> _T:
        """As Translator.offload, with results handed back in batches when io-threads' pool can."""
        run = getattr(self.executor, "run_batched", None)
        if run is None:
            return await super().offload(fn, *args)
        result: _T = await run(fn, *args)
        return result

    def _pfd(self, fd: Fd) -> PosixFd:
        pfd = fd.ctx.get(self)
        if not isinstance(pfd, PosixFd):
            raise FopError(errno.EBADF, f"{fd!r} is not open on brick {self.name}")
        return pfd

    def _keep(self, fd: Fd, pfd: PosixFd) -> None:
        fd.ctx[self] = pfd
        fd.gfid = pfd.gfid

    # ---- namespace ---------------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self.offload(entry.lookup, self.brick, call_context.get(), loc, xdata)

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self.offload(entry.mknod, self.brick, call_context.get(), loc, mode, rdev, umask, xdata)

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self.offload(entry.mkdir, self.brick, call_context.get(), loc, mode, umask, xdata)

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self.offload(entry.symlink, self.brick, call_context.get(), target, loc, umask, xdata)

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        reply, pfd = await self.offload(
            entry.create, self.brick, call_context.get(), loc, flags, mode, umask, xdata
        )
        self._keep(fd, pfd)
        return reply

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self.offload(entry.link, self.brick, call_context.get(), oldloc, newloc, xdata)

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(entry.unlink, self.brick, call_context.get(), loc, xdata)

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(entry.rmdir, self.brick, call_context.get(), loc, xdata)

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        return await self.offload(entry.rename, self.brick, call_context.get(), oldloc, newloc, xdata)

    # ---- objects by Loc ----------------------------------------------------------------------

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        return await self.offload(inode.stat_, self.brick, loc)

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(inode.setattr_, self.brick, call_context.get(), loc, attr)

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        await self.offload(inode.access, self.brick, call_context.get(), loc, mask)
        return XdataReply()

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        return await self.offload(inode.readlink, self.brick, loc)

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(inode.truncate, self.brick, call_context.get(), loc, offset)

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self._keep(fd, await self.offload(inode.open_, self.brick, call_context.get(), loc, flags))
        return XdataReply()

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self._keep(fd, await self.offload(inode.opendir, self.brick, call_context.get(), loc))
        return XdataReply()

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        return await self.offload(inode.statfs, self.brick)

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        return await self.offload(inode.getxattr, self.brick, call_context.get(), loc, name)

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        await self.offload(inode.setxattr, self.brick, call_context.get(), loc, xattrs, flags)
        return XdataReply()

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        await self.offload(inode.removexattr, self.brick, call_context.get(), loc, name)
        return XdataReply()

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await self.offload(inode.xattrop, self.brick, loc, optype, xattrs)

    # ---- open files --------------------------------------------------------------------------

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return await self.offload(io.fstat, self.brick, self._pfd(fd))

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(io.fsetattr, self.brick, call_context.get(), self._pfd(fd), attr)

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(io.ftruncate, self.brick, self._pfd(fd), offset)

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        pfd = self._pfd(fd)
        reply = io.readv_cached(self.brick, pfd, size, offset)  # page-cache hit: no thread hop
        if reply is not None:
            return reply
        return await self.offload(io.readv, self.brick, pfd, size, offset)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(io.writev, self.brick, self._pfd(fd), data, offset)

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self._pfd(fd)  # nothing is buffered here; locks held through this fd belong to features/locks
        return XdataReply()

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(io.fsync, self.brick, self._pfd(fd), datasync)

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        return await self.offload(io.readdirp, self.brick, self._pfd(fd), size, offset)

    async def fsyncdir(self, fd: Fd, datasync: int, xdata: Xdata = None) -> XdataReply:
        await self.offload(io.fsyncdir, self.brick, self._pfd(fd), datasync)
        return XdataReply()

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        return await self.offload(io.fgetxattr, self.brick, call_context.get(), self._pfd(fd), name)

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        await self.offload(io.fsetxattr, self.brick, call_context.get(), self._pfd(fd), xattrs, flags)
        return XdataReply()

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        await self.offload(io.fremovexattr, self.brick, call_context.get(), self._pfd(fd), name)
        return XdataReply()

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await self.offload(io.fxattrop, self.brick, self._pfd(fd), optype, xattrs)

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        return await self.offload(io.fallocate, self.brick, self._pfd(fd), mode, offset, length)

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(io.discard, self.brick, self._pfd(fd), offset, length)

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self.offload(io.zerofill, self.brick, self._pfd(fd), offset, length)

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        return await self.offload(io.seek, self.brick, self._pfd(fd), offset, what)

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        src, dst = self._pfd(fd_in), self._pfd(fd_out)
        return await self.offload(io.copy_file_range, self.brick, src, off_in, dst, off_out, length, flags)

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        return await self.offload(io.rchecksum, self.brick, self._pfd(fd), offset, length)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        pfd = self._pfd(fd)
        del fd.ctx[self]
        await self.offload(io.release, self.brick, pfd)
        return XdataReply()

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.release(fd, xdata)
