"""storage/bd: a brick whose directory is a thin pool and whose files are thin volumes.

The seed's block device translator, without the limits that got GlusterFS's removed (one brick
only, shrink as a no-op, ENOSYS for most fops, LVs named by gfid): any number of bd bricks, in
distribute or replicate volumes (xattrop works, so AFR keeps its changelog here); truncate resizes
both ways; every data fop is served; files keep the names clients gave them.

  create -> new thin volume        truncate -> resize          unlink -> delete
  link   -> full clone             symlink  -> snapshot (a regular file; see `bd_brick`)

The pool is mortar's user-space thin pool (`backend thin`, the default) or an LVM2 thin pool
(`backend lvm`, where the kernel has device-mapper). Where things live is `thinpool.bdpool`'s
business; per-file attributes are in `bd_store`; the fop semantics in `bd_brick` and `bd_io`.
Every pool call blocks, so each fop is one `offload` to the executor io-threads installs.

A pool becomes a brick only if it carries the volume's id (kept in its attribute store), so a
pool that belongs to another volume, or a missing disk, is never served by mistake; `pool-create`
makes the pool when absent and stamps an empty, unmarked one. Lock fops answer ENOSYS, as on
storage/posix: features/locks goes above.
"""

from __future__ import annotations

import errno
import os
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
from mortar.core.options import Option
from mortar.core.translator import Translator
from mortar.thinpool.backend import Pool
from mortar.thinpool.bdpool import (
    HIDDEN_PREFIX,
    Location,
    attributes_path,
    create_pool,
    open_pool,
    pool_exists,
)
from mortar.xlators.storage import bd_io as io
from mortar.xlators.storage.bd_brick import BdBrick, BdFd
from mortar.xlators.storage.bd_store import AttrStore
from mortar.xlators.storage.nolocks import NoLockTable

_T = TypeVar("_T")


class BdError(RuntimeError):
    """The pool cannot be served as this volume's brick."""


def _guard(fn: Callable[..., _T], *args: Any) -> _T:
    """Run a brick operation; every failure leaves as FopError (the worker-thread side of a fop)."""
    try:
        return fn(*args)
    except FopError:
        raise
    except OSError as exc:
        raise FopError.from_oserror(exc) from None
    except (ValueError, UnicodeError, OverflowError) as exc:
        raise FopError(errno.EINVAL, str(exc)) from None


def _claim_store(pool: Pool, path: str, volume_id: str, create: bool) -> AttrStore:
    """Open the attribute store and check (or, with `create`, stamp) the volume-id marker."""
    visible = [v.name for v in pool.volumes() if not v.name.startswith(HIDDEN_PREFIX)]
    if not os.path.exists(path):
        if not create:
            raise BdError(f"pool has no attribute store {path} (no volume-id marker): refusing to serve it")
        if visible:
            raise BdError(
                f"pool holds {len(visible)} volumes but no volume-id marker: refusing to take it over"
            )
        store = AttrStore(path, create=True)
        store.set_kv("pool-uuid", str(pool.uuid))
        store.set_kv("volume-id", volume_id)
        return store
    store = AttrStore(path)
    try:
        kv, _ = store.load()
        if kv.get("pool-uuid") != str(pool.uuid):
            raise BdError(f"attribute store {path} belongs to pool {kv.get('pool-uuid')}, not {pool.uuid}")
        marker = kv.get("volume-id")
        if marker is None:
            if not create:
                raise BdError(f"pool {path} has no volume-id marker: refusing to serve it")
            if visible:
                raise BdError("pool holds volumes but no volume-id marker: refusing to take it over")
            store.set_kv("volume-id", volume_id)
        elif marker != volume_id:
            raise BdError(f"pool is a brick of volume {marker}, not of {volume_id}")
    except BaseException:
        store.close()
        raise
    return store


def open_brick(loc: Location, volume_id: str, opts: Mapping[str, Any], log: Any) -> BdBrick:
    """Open (or create) the pool, claim it for `volume_id` and load the brick's state."""
    create = bool(opts["pool-create"])
    try:
        exists = pool_exists(loc)
        if not exists and not create:
            raise BdError(f"pool {loc.path} does not exist (is its disk attached?); pool-create makes one")
        if exists:
            pool = open_pool(loc, commit_interval=opts["commit-interval"])
        else:
            if loc.backend == "thin" and not opts["pool-size"] and not os.path.exists(loc.data):
                raise BdError(f"pool-create of {loc.path} needs option pool-size")
            pool = create_pool(
                loc,
                size=opts["pool-size"] or None,
                block_size=opts["block-size"],
                commit_interval=opts["commit-interval"],
            )
            log.info("created pool %s (%s)", loc.path, loc.backend)
    except FopError as exc:
        raise BdError(f"pool {loc.path}: {exc}") from exc
    try:
        store = _claim_store(pool, attributes_path(loc, pool), volume_id, create)
        try:
            brick = BdBrick(pool, store, log)
            _, metas = store.load()
            brick.load(metas)
            return brick
        except BaseException:
            store.close()
            raise
    except BaseException:
        pool.close()
        raise


class BdTranslator(NoLockTable):
    """A brick on a thin pool; no children and no lock table (features/locks goes above)."""

    type_name: ClassVar[str] = "storage/bd"
    options: ClassVar[Mapping[str, Option]] = {
        "pool": Option(
            "path", "", "the pool: a pool directory (data, data.meta, attributes) or a data file/device"
        ),
        "backend": Option(
            "enum", "thin", "thin: mortar's user-space pool; lvm: an LVM2 thin pool", choices=("thin", "lvm")
        ),
        "volume-id": Option("str", "", "UUID of the volume; the pool must carry it"),
        "pool-create": Option(
            "bool", False, "create the pool when absent and stamp the volume-id on an empty unmarked one"
        ),
        "pool-size": Option(
            "size", 0, "size of the pool pool-create makes (thin: data file; lvm: thin pool)"
        ),
        "block-size": Option(
            "size", 64 << 10, "data block (chunk) size of the pool pool-create makes", min=4096, max=8 << 20
        ),
        "metadata": Option("str", "", "thin metadata path when not beside the data (block devices)"),
        "commit-interval": Option(
            "time", 1.0, "seconds between background commits of the thin pool's metadata", min=0
        ),
        "vg": Option("str", "", "lvm backend: the volume group"),
        "thinpool": Option("str", "", "lvm backend: the thin pool LV in that volume group"),
    }

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        self._brick: BdBrick | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def location(self) -> Location:
        o = self.opts
        return Location(o["pool"], o["backend"], o["metadata"], o["vg"], o["thinpool"])

    async def init(self) -> None:
        if self.children:
            raise BdError(f"storage/bd {self.name} takes no subvolumes")
        if not self.opts["pool"]:
            raise BdError(f"storage/bd {self.name}: option 'pool' is required")
        raw_id = self.opts["volume-id"]
        if not raw_id:
            raise BdError(f"storage/bd {self.name}: option 'volume-id' is required")
        try:
            volume_id = str(uuid.UUID(raw_id))
        except ValueError:
            raise BdError(f"storage/bd {self.name}: volume-id {raw_id!r} is not a UUID") from None
        self._brick = await self.offload(open_brick, self.location(), volume_id, self.opts, self.log)
        self.log.info("serving pool %s (%s backend)", self.opts["pool"], self.opts["backend"])

    async def fini(self) -> None:
        brick, self._brick = self._brick, None
        if brick is not None:
            await self.offload(brick.close)

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        old = self.location(), self.opts["volume-id"]
        super().reconfigure(options)
        if (self.location(), self.opts["volume-id"]) != old:
            self.log.warning("a new pool or volume-id takes effect only when the brick restarts")

    # ---- helpers -----------------------------------------------------------------------------

    @property
    def brick(self) -> BdBrick:
        if self._brick is None:
            raise FopError(errno.ENOTCONN, f"storage/bd {self.name} is not started")
        return self._brick

    async def _do(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self.offload(_guard, fn, *args)

    def _bfd(self, fd: Fd) -> BdFd:
        bfd = fd.ctx.get(self)
        if not isinstance(bfd, BdFd):
            raise FopError(errno.EBADF, f"{fd!r} is not open on brick {self.name}")
        return bfd

    def _keep(self, fd: Fd, bfd: BdFd) -> None:
        fd.ctx[self] = bfd
        fd.gfid = bfd.entry.meta.gfid if bfd.entry is not None else self.brick.root.gfid

    # ---- namespace ---------------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self._do(self.brick.lookup, call_context.get(), loc, xdata)

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self._do(self.brick.mknod, call_context.get(), loc, mode, umask, xdata)

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return self.brick.mkdir()

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self._do(self.brick.symlink, call_context.get(), target, loc, umask, xdata)

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        reply, bfd = await self._do(self.brick.create, call_context.get(), loc, flags, mode, umask, xdata)
        self._keep(fd, bfd)
        return reply

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self._do(self.brick.link, call_context.get(), oldloc, newloc, xdata)

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(self.brick.unlink, call_context.get(), loc)

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(self.brick.rmdir, loc)

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        return await self._do(self.brick.rename, call_context.get(), oldloc, newloc)

    # ---- objects by Loc ----------------------------------------------------------------------

    def _stat(self, loc: Loc) -> AttrReply:
        b = self.brick
        return AttrReply(b.iatt(b.resolve(loc)))

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        return await self._do(self._stat, loc)

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        who = call_context.get()
        b = self.brick
        return await self._do(lambda: b.setattr(who, b.resolve(loc), attr))

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        who = call_context.get()
        b = self.brick
        await self._do(lambda: b.access(who, b.resolve(loc), mask))
        return XdataReply()

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        b = self.brick
        target, iatt = await self._do(lambda: b.readlink(b.resolve(loc)))
        return ReadlinkReply(target, iatt)

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        who = call_context.get()
        b = self.brick
        return await self._do(lambda: b.truncate(who, b.resolve(loc), offset))

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self._keep(fd, await self._do(self.brick.open, call_context.get(), loc, flags))
        return XdataReply()

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self._keep(fd, await self._do(self.brick.opendir, call_context.get(), loc))
        return XdataReply()

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        return await self._do(self.brick.statfs)

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        who = call_context.get()
        b = self.brick
        return XattrReply(await self._do(lambda: b.getxattr(who, b.resolve(loc), name)))

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        who = call_context.get()
        b = self.brick
        await self._do(lambda: b.setxattr(who, b.resolve(loc), xattrs, flags))
        return XdataReply()

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        who = call_context.get()
        b = self.brick
        await self._do(lambda: b.removexattr(who, b.resolve(loc), name))
        return XdataReply()

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        b = self.brick
        return XattrReply(await self._do(lambda: b.xattrop(b.resolve(loc), optype, xattrs)))

    # ---- open files --------------------------------------------------------------------------

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return await self._do(io.fstat, self.brick, self._bfd(fd))

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self._do(self.brick.setattr, call_context.get(), self._bfd(fd).entry, attr)

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(io.ftruncate, self.brick, self._bfd(fd), offset)

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        return await self._do(io.readv, self.brick, self._bfd(fd), size, offset)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(io.writev, self.brick, self._bfd(fd), data, offset)

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        await self._do(io.flush, self.brick, self._bfd(fd))
        return XdataReply()

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(io.fsync, self.brick, self._bfd(fd))

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        return await self._do(io.readdirp, self.brick, self._bfd(fd), size, offset)

    async def fsyncdir(self, fd: Fd, datasync: int, xdata: Xdata = None) -> XdataReply:
        await self._do(io.fsync, self.brick, self._bfd(fd))
        return XdataReply()

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        entry = self._bfd(fd).entry
        return XattrReply(await self._do(self.brick.getxattr, call_context.get(), entry, name))

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        await self._do(self.brick.setxattr, call_context.get(), self._bfd(fd).entry, xattrs, flags)
        return XdataReply()

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        await self._do(self.brick.removexattr, call_context.get(), self._bfd(fd).entry, name)
        return XdataReply()

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return XattrReply(await self._do(self.brick.xattrop, self._bfd(fd).entry, optype, xattrs))

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        return await self._do(io.fallocate, self.brick, self._bfd(fd), mode, offset, length)

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(io.discard, self.brick, self._bfd(fd), offset, length)

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._do(io.zerofill, self.brick, self._bfd(fd), offset, length)

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        return await self._do(io.seek, self.brick, self._bfd(fd), offset, what)

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        src, dst = self._bfd(fd_in), self._bfd(fd_out)
        return await self._do(io.copy_file_range, self.brick, src, off_in, dst, off_out, length, flags)

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        return await self._do(io.rchecksum, self.brick, self._bfd(fd), offset, length)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        bfd = self._bfd(fd)
        del fd.ctx[self]
        await self._do(self.brick.release, bfd)
        return XdataReply()

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.release(fd, xdata)
