"""cluster/distribute (DHT): spreads the files of every directory over the subvolumes by name hash.

Every directory exists on every subvolume and carries, on each, the hash range that subvolume owns
(`trusted.mortar.dht`). A file lives on the subvolume whose range holds the hash of its name (its
hashed subvolume), or, after a rename or when that subvolume was full, on another one (its cached
subvolume) with a link file on the hashed one pointing there. Nothing is central: each client
reads layouts at lookup, heals them when they have holes or overlaps, and finds misplaced files by
looking everywhere (`lookup-unhashed`), leaving link files so the next lookup is direct.

Rebalance moves files to their hashed subvolume while they are in use: the file fops here follow
the client's half of that protocol (`dht_migrate.MigrationClient`): a change that comes back with
the migration bit is repeated on the destination or, once the file has moved, where it is now.

This module holds the fops; state, layouts, link files and lookup are in `dht_base`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrReply,
    AttrSet,
    Buffer,
    ChangeReply,
    ChecksumReply,
    CopyReply,
    DirEntry,
    DirReply,
    EntryReply,
    Fd,
    Flock,
    LkReply,
    Loc,
    LockCmd,
    LockType,
    ReadlinkReply,
    ReadReply,
    RenameReply,
    SeekReply,
    SetAttrValid,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht_common import (
    MIGRATE_DOMAIN,
    MIGRATING_XATTR,
    STALE,
    DhtCtx,
    DirFd,
    FileFd,
    as_root,
    first_ok,
    gather_fops,
    hide_migration,
    is_linkfile,
    migration_bit,
)
from mortar.xlators.cluster.dht_layout import COMMIT_FRESH, LINKTO_XATTR
from mortar.xlators.cluster.dht_migrate import FULL, FdReplay, MigrationClient

_T = TypeVar("_T")
_COOKIE_LIMIT = 1 << 63
_COPY_CHUNK = 1 << 20
_HIDDEN = (LINKTO_XATTR, MIGRATING_XATTR)
XattrCall = Callable[[Translator], Awaitable[XdataReply]]


def _regular_mode(mode: int) -> int:
    """DHT keeps the sticky bit of regular files for migration: applications cannot set it."""
    return mode & ~stat.S_ISVTX if stat.S_ISREG(mode) or not stat.S_IFMT(mode) else mode


class DistributeTranslator(MigrationClient):
    """Distribute: each file on one subvolume chosen by name hash; directories on all of them."""

    type_name: ClassVar[str] = "cluster/distribute"

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        mode = _regular_mode(mode)
        keep = flags & ~(os.O_CREAT | os.O_EXCL)
        try:
            rep, target = await self._place(
                loc, xdata, lambda c: c.create(loc, flags | os.O_EXCL, mode, umask, fd, xdata)
            )
        except FopError as exc:
            if exc.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            # the name exists (its data perhaps on another subvolume): open it instead
            rep = await self.lookup(Loc(loc.path, None, loc.pargfid, loc.name, loc.inode, loc.parent))
            if rep.iatt.is_dir:
                raise FopError(errno.EISDIR, f"{loc.path} is a directory") from None
            opened: list[Translator] = []

            async def open_on(child: Translator) -> None:  # again where it is if it just moved
                await child.open(Loc(loc.path, rep.iatt.gfid), keep, fd, xdata)
                opened.append(child)

            await self._route(Loc(loc.path, rep.iatt.gfid, inode=loc.inode), open_on)
            target = opened[-1]
            fd.ctx[self] = FileFd(target, keep)
            if flags & os.O_TRUNC:
                target = await self._after_trunc_open(fd, target)
                iatt = hide_migration((await target.fstat(fd)).iatt)
                rep = EntryReply(iatt, rep.parent_pre, rep.parent_post, rep.xdata)
            return rep
        fd.ctx[self] = FileFd(target, keep)
        return rep

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        mode = _regular_mode(mode)
        return (await self._place(loc, xdata, lambda c: c.mknod(loc, mode, rdev, umask, xdata)))[0]

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        return (await self._place(loc, xdata, lambda c: c.symlink(target, loc, umask, xdata), spill=False))[0]

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        ctx, _ = await self._resolve(oldloc)
        if ctx.is_dir:
            raise FopError(errno.EPERM, f"{oldloc.path}: cannot hard-link a directory")
        _, hashed = await self._parent(newloc)
        assert ctx.cached is not None
        rep = await ctx.cached.link(oldloc, newloc, xdata)
        if hashed is not ctx.cached:
            await self.make_linkfile(hashed, newloc, ctx.gfid, ctx.cached)
        return rep

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        """On the hashed subvolume first (it decides EEXIST/EACCES), then on all others with the same
        gfid, then the new layout on each."""
        gfid = self._gfid_req(loc, xdata)
        _, hashed = await self._parent(loc)
        rep = await hashed.mkdir(loc, mode, umask, xdata)
        others = [c for c in self.up_children() if c is not hashed]
        res = await gather_fops(c.mkdir(loc, mode, umask, dict(xdata or {})) for c in others)
        made = {id(hashed)}
        for child, r in zip(others, res, strict=True):
            if isinstance(r, FopError) and r.errno != errno.EEXIST:
                self.log.warning("%s: mkdir on %s failed (lookup will heal it): %s", loc.path, child.name, r)
            else:
                made.add(id(child))
        children = [c for c in self.children if id(c) in made]
        layout = await self._new_layout(gfid, children, COMMIT_FRESH)
        await self._write_layout(gfid, loc.path, layout)
        self._remember(rep.iatt, loc.inode, layout=layout)
        return rep

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        _, hashed = await self._parent(loc)
        ctx, _ = await self._resolve(loc)
        if ctx.is_dir:
            raise FopError(errno.EISDIR, f"{loc.path} is a directory")
        assert ctx.cached is not None
        try:
            rep = await ctx.cached.unlink(loc, flags, xdata)
        except FopError as exc:
            if exc.errno not in STALE:  # stale cache, or a migration moved the file meanwhile
                raise
            ctx, _ = await self._resolve(Loc(loc.path, None, loc.pargfid, loc.name), refresh=True)
            assert ctx.cached is not None
            rep = await ctx.cached.unlink(loc, flags, xdata)
        if hashed is not ctx.cached:  # a migration may have made this name the data meanwhile
            await self._unlink_linkfile(hashed, loc, ctx.gfid, data_too=True)
        self._forget(ctx.gfid, loc.inode)
        return rep

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        """Refused (ENOTEMPTY) if any subvolume has a real entry; link files (stale by definition:
        their data would be a real entry elsewhere) are removed; the hashed copy goes last."""
        _, hashed = await self._parent(loc)
        ctx, _ = await self._resolve(loc)
        if not ctx.is_dir:
            raise FopError(errno.ENOTDIR, f"{loc.path} is not a directory")
        children = self.up_children()
        if len(children) < len(self.children):
            raise FopError(errno.ENOTCONN, f"{loc.path}: cannot check emptiness while a subvolume is down")
        await self._clear_linkfiles(ctx.gfid, loc.path, children)
        others = [c for c in children if c is not hashed]
        res = await gather_fops(c.rmdir(loc, flags, xdata) for c in others)
        for child, r in zip(others, res, strict=True):
            if isinstance(r, FopError) and r.errno != errno.ENOENT:
                self.log.warning("%s: rmdir on %s failed: %s", loc.path, child.name, r)
                raise r
        try:
            rep = await hashed.rmdir(loc, flags, xdata)
        except FopError as exc:
            oks = [r for r in res if isinstance(r, ChangeReply)]
            if exc.errno != errno.ENOENT or not oks:
                raise
            rep = oks[0]
        self._forget(ctx.gfid, loc.inode)
        return rep

    async def _clear_linkfiles(self, gfid: Gfid, path: str, children: Sequence[Translator]) -> None:
        """ENOTEMPTY if the directory holds anything but link files on any subvolume; else remove them."""
        scans = await asyncio.gather(*(self._scan(c, gfid, path) for c in children))
        if any(real for real, _ in scans):
            raise FopError(errno.ENOTEMPTY, f"{path}: directory not empty")
        with as_root():
            for child, (_, links) in zip(children, scans, strict=True):
                for name in links:
                    await child.unlink(Loc(posixpath.join(path, name), pargfid=gfid, name=name), 0)

    async def _scan(self, child: Translator, gfid: Gfid, path: str) -> tuple[bool, list[str]]:
        """(has a real entry, names of link files) of one subvolume's copy of a directory."""
        fd = Fd(gfid, is_dir=True)
        with as_root():
            try:
                await child.opendir(Loc(path, gfid), fd)
            except FopError as exc:
                if exc.errno in STALE:
                    return False, []
                raise
            links: list[str] = []
            try:
                offset = 0
                while entries := (await child.readdirp(fd, 65536, offset)).entries:
                    offset = entries[-1].offset
                    for e in entries:
                        if e.iatt is None or not await self._entry_is_linkfile(child, e.iatt):
                            return True, links
                        links.append(e.name)
            finally:
                await child.releasedir(fd)
        return False, links

    async def _entry_is_linkfile(self, child: Translator, iatt: Iatt) -> bool:
        """A listing gives only the mode; a file that looks like a link file is confirmed by its xattr."""
        if not is_linkfile(iatt):
            return False
        with as_root():
            try:
                rep = await child.getxattr(Loc("", iatt.gfid), LINKTO_XATTR)
            except FopError:
                return False
        return bool(rep.xattrs.get(LINKTO_XATTR))

    # ---- rename --------------------------------------------------------------------------------

    async def _lookup_maybe(self, loc: Loc) -> DhtCtx | None:
        try:
            rep = await self.lookup(Loc(loc.path, None, loc.pargfid, loc.name))
        except FopError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return None
        return self._ctx(rep.iatt.gfid, None)

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        """A file is renamed where its data is; no data moves. If the new name hashes elsewhere, a link
        file there points to the data (made first, so the new name is never unreachable); link files
        left under the old name, and the replaced file's data, are removed afterwards. The file's
        migration lock is held throughout: a rename waits for a migration of the file to end."""
        src, _ = await self._resolve(Loc(oldloc.path, None, oldloc.pargfid, oldloc.name), refresh=True)
        if src.is_dir:
            return await self._rename_dir(oldloc, newloc, src, xdata)
        owner = os.urandom(8)
        src, held = await self._hold_migration_lock(oldloc, src, owner)
        try:
            return await self._rename_file(oldloc, newloc, src, xdata)
        finally:
            if held is not None:
                with as_root(lk_owner=owner):
                    await held.inodelk(
                        MIGRATE_DOMAIN, Loc(oldloc.path, src.gfid), LockCmd.SETLK, Flock(LockType.UNLCK)
                    )

    async def _hold_migration_lock(
        self, loc: Loc, src: DhtCtx, owner: bytes
    ) -> tuple[DhtCtx, Translator | None]:
        """Take the file's migration lock where its data is, then check it is still there."""
        for _ in range(4):
            cached = src.cached
            assert cached is not None
            lock = Loc(loc.path, src.gfid)
            try:
                with as_root(lk_owner=owner):
                    await cached.inodelk(MIGRATE_DOMAIN, lock, LockCmd.SETLKW, Flock(LockType.WRLCK))
            except FopError as exc:
                if exc.errno == errno.ENOSYS:
                    return src, None
                raise
            fresh, _ = await self._resolve(Loc(loc.path, None, loc.pargfid, loc.name), refresh=True)
            if fresh.gfid == src.gfid and fresh.cached is cached:
                return fresh, cached
            with as_root(lk_owner=owner):
                await cached.inodelk(MIGRATE_DOMAIN, lock, LockCmd.SETLK, Flock(LockType.UNLCK))
            src = fresh
            if src.is_dir:
                raise FopError(errno.EAGAIN, f"{loc.path} changed while being renamed")
        raise FopError(errno.EAGAIN, f"{loc.path} keeps moving between subvolumes")

    async def _rename_file(self, oldloc: Loc, newloc: Loc, src: DhtCtx, xdata: Xdata) -> RenameReply:
        _, src_hashed = await self._parent(oldloc)
        _, dst_hashed = await self._parent(newloc)
        cached = src.cached
        assert cached is not None
        dst = await self._lookup_maybe(newloc)
        if dst is not None and dst.is_dir:
            raise FopError(errno.EISDIR, f"{newloc.path} is a directory")
        if dst is not None and dst.gfid == src.gfid:  # two names of one file: POSIX says do nothing
            return await cached.rename(oldloc, newloc, xdata)
        early = dst is None and dst_hashed is not cached
        if early:
            await self.make_linkfile(dst_hashed, newloc, src.gfid, cached)
        try:
            rep = await cached.rename(oldloc, newloc, xdata)
        except BaseException:
            if early:
                await self._unlink_linkfile(dst_hashed, newloc, src.gfid)
            raise
        if dst is not None:
            if dst.cached is not None and dst.cached is not cached:
                await self._unlink_entry(dst.cached, newloc, dst.gfid)
            self._forget(dst.gfid)
        if dst_hashed is not cached and not early:
            await self.make_linkfile(dst_hashed, newloc, src.gfid, cached)
        if src_hashed is not cached:
            await self._unlink_linkfile(src_hashed, oldloc, src.gfid)
        return rep

    async def _unlink_entry(self, child: Translator, loc: Loc, gfid: Gfid) -> None:
        """Remove the replaced file's data from another subvolume, if the name still names it there."""
        name_loc = Loc(loc.path, pargfid=loc.pargfid, name=loc.name)
        with as_root():
            try:
                cur = await child.lookup(name_loc)
                if cur.iatt.gfid == gfid:
                    await child.unlink(name_loc, 0)
            except FopError as exc:
                if exc.errno not in STALE:
                    self.log.warning(
                        "%s: removing the replaced file on %s failed: %s", loc.path, child.name, exc
                    )

    async def _rename_dir(self, oldloc: Loc, newloc: Loc, src: DhtCtx, xdata: Xdata) -> RenameReply:
        """On every subvolume, the hashed one first; undone where it succeeded if another fails."""
        _, hashed = await self._parent(oldloc)
        await self._parent(newloc)
        dst = await self._lookup_maybe(newloc)
        if dst is not None and not dst.is_dir:
            raise FopError(errno.ENOTDIR, f"{newloc.path} is not a directory")
        if dst is not None and dst.gfid != src.gfid:
            await self._clear_linkfiles(dst.gfid, newloc.path, self.up_children())
        rep = await hashed.rename(oldloc, newloc, xdata)
        others = [c for c in self.up_children() if c is not hashed]
        res = await gather_fops(c.rename(oldloc, newloc, xdata) for c in others)
        failed = [r for r in res if isinstance(r, FopError) and r.errno != errno.ENOENT]
        if failed:
            done = [hashed] + [c for c, r in zip(others, res, strict=True) if not isinstance(r, FopError)]
            self.log.error("%s: directory rename failed on a subvolume (%s), undoing", oldloc.path, failed[0])
            back_old = Loc(newloc.path, None, newloc.pargfid, newloc.name)
            back_new = Loc(oldloc.path, None, oldloc.pargfid, oldloc.name)
            with as_root():
                await gather_fops(c.rename(back_old, back_new) for c in done)
            raise failed[0]
        if dst is not None:
            self._forget(dst.gfid)
        return rep

    # ---- directories ---------------------------------------------------------------------------

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        ctx, _ = await self._resolve(loc)
        if not ctx.is_dir:
            raise FopError(errno.ENOTDIR, f"{loc.path} is not a directory")
        children = self.up_children()
        res = await gather_fops(c.opendir(loc, fd, xdata) for c in children)
        opened = [
            self._index[id(c)] for c, r in zip(children, res, strict=True) if not isinstance(r, FopError)
        ]
        rep = first_ok(res)
        fd.ctx[self] = DirFd(opened)
        return rep

    def _dirfd(self, fd: Fd) -> DirFd:
        dfd = fd.ctx.get(self)
        if not isinstance(dfd, DirFd):
            raise FopError(errno.EBADF, f"{fd} was not opened as a directory through {self.name}")
        return dfd

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        """Subvolume after subvolume; the cookie is (that subvolume's offset) * n + its index.
        Directories come from the first subvolume only and link files are skipped, so each name
        appears once."""
        dfd = self._dirfd(fd)
        n = len(self.children)
        idx, sub_off = (offset % n, offset // n) if offset else (dfd.opened[0], 0)
        lister = dfd.opened[0]
        while True:
            if idx not in dfd.opened:
                nxt = [i for i in dfd.opened if i > idx]
                if not nxt:
                    return DirReply([])
                idx, sub_off = nxt[0], 0
            child = self.children[idx]
            rep = await child.readdirp(fd, size, sub_off, xdata)
            if not rep.entries:
                idx, sub_off = idx + 1, 0
                if idx >= n:
                    return DirReply([], rep.xdata)
                continue
            out = []
            for e in rep.entries:
                if not 0 < e.offset < _COOKIE_LIMIT // n:
                    raise FopError(
                        errno.EIO, f"{child.name} returned directory offset {e.offset}, too large to merge"
                    )
                if e.iatt is not None:
                    if e.iatt.is_dir and idx != lister:
                        continue
                    if is_linkfile(e.iatt) and await self._entry_is_linkfile(child, e.iatt):
                        continue
                    if not e.iatt.is_dir:
                        self._note_cached(e.iatt.gfid, child)
                out.append(DirEntry(e.name, e.offset * n + idx, e.iatt and hide_migration(e.iatt)))
            if out:
                return DirReply(out, rep.xdata)
            sub_off = rep.entries[-1].offset

    def listed_on(self, entry: DirEntry) -> Translator:
        """The subvolume a readdirp entry of this translator came from (for a file: where its data is)."""
        return self.children[entry.offset % len(self.children)]

    def _note_cached(self, gfid: Gfid, child: Translator) -> None:
        """A listing shows where a file's data is: remember it unless something better is known."""
        if self._ctx(gfid, None) is None:
            self._remember(Iatt(gfid, 0o100000), None, cached=child)

    async def fsyncdir(self, fd: Fd, datasync: int, xdata: Xdata = None) -> XdataReply:
        dfd = self._dirfd(fd)
        return first_ok(await gather_fops(self.children[i].fsyncdir(fd, datasync, xdata) for i in dfd.opened))

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        dfd = fd.ctx.pop(self, None)
        if not isinstance(dfd, DirFd):
            return XdataReply()
        res = await gather_fops(self.children[i].releasedir(fd, xdata) for i in dfd.opened)
        return first_ok(res) if res else XdataReply()

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        """The sum of the subvolumes, in blocks of the largest fragment size among them."""
        res = await gather_fops(c.statfs(loc, xdata) for c in self.up_children())
        oks = [r for r in res if isinstance(r, StatfsReply)]
        if not oks:
            first_ok(res)
        frsize = max(r.statvfs.frsize for r in oks)

        def scaled(field: str) -> int:
            return sum(getattr(r.statvfs, field) * r.statvfs.frsize // frsize for r in oks)

        first = oks[0].statvfs
        total = StatVfs(
            bsize=max(r.statvfs.bsize for r in oks),
            frsize=frsize,
            blocks=scaled("blocks"),
            bfree=scaled("bfree"),
            bavail=scaled("bavail"),
            files=sum(r.statvfs.files for r in oks),
            ffree=sum(r.statvfs.ffree for r in oks),
            favail=sum(r.statvfs.favail for r in oks),
            fsid=first.fsid,
            flag=first.flag,
            namemax=min(r.statvfs.namemax for r in oks),
        )
        return StatfsReply(total, oks[0].xdata)

    # ---- metadata: a file where its data is; a directory on one or on all subvolumes ----------

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        rep = await self._route(loc, lambda c: c.stat(loc, xdata))
        return AttrReply(hide_migration(rep.iatt), rep.xdata)

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        if attr.valid & SetAttrValid.MODE and not (await self._resolve(loc))[0].is_dir:
            return await self._chmod(loc, None, attr, lambda c, a: c.setattr(loc, a, xdata))
        return await self._loc_change(loc, lambda c: c.setattr(loc, attr, xdata), dirs_all=True)

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        return await self._route(loc, lambda c: c.access(loc, mask, xdata))

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        return await self._route(loc, lambda c: c.readlink(loc, xdata))

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._loc_change(
            loc, lambda c: c.truncate(loc, offset, xdata), lambda c, where: c.truncate(where, offset)
        )

    @staticmethod
    def _visible(rep: XattrReply, name: str | None) -> XattrReply:
        """A listing without DHT's per-file markers."""
        if name is None and any(k in rep.xattrs for k in _HIDDEN):
            return XattrReply({k: v for k, v in rep.xattrs.items() if k not in _HIDDEN}, rep.xdata)
        return rep

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        return self._visible(await self._route(loc, lambda c: c.getxattr(loc, name, xdata)), name)

    async def _loc_xattr(self, loc: Loc, call: XattrCall, again: XattrCall) -> XdataReply:
        rep, ctx, sub = await self._route_on(loc, call, dirs_all=True)
        if sub is not None and await self._meta_moved(sub, ctx.gfid, None, loc.path):
            self._forget(ctx.gfid, loc.inode)
            rep = await self._route(loc, again)
        return rep

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._loc_xattr(
            loc, lambda c: c.setxattr(loc, xattrs, flags, xdata), lambda c: c.setxattr(loc, xattrs, 0, xdata)
        )

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        return await self._loc_xattr(
            loc,
            lambda c: c.removexattr(loc, name, xdata),
            lambda c: _tolerant(c.removexattr(loc, name, xdata)),
        )

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await self._route(loc, lambda c: c.xattrop(loc, optype, xattrs, xdata))

    async def inodelk(self, domain: str, loc: Loc, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        return await self._route(loc, lambda c: c.inodelk(domain, loc, cmd, flock, xdata))

    async def entrylk(
        self, domain: str, loc: Loc, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        """A name's lock lives on the subvolume the name hashes to, a whole directory's on the first."""
        child = self._first_up()
        if basename:
            child = self.hashed_for(await self.layout_for(loc), basename) or child
        return await child.entrylk(domain, loc, basename, cmd, lktype, xdata)

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        used: list[Translator] = []

        async def call(child: Translator) -> XdataReply:
            rep = await child.open(loc, flags, fd, xdata)
            used.append(child)
            return rep

        rep = await self._route(loc, call)
        fd.ctx[self] = FileFd(used[-1], flags & ~(os.O_CREAT | os.O_EXCL))
        if flags & os.O_TRUNC:
            await self._after_trunc_open(fd, used[-1])
        return rep

    async def _after_trunc_open(self, fd: Fd, sub: Translator) -> Translator:
        """open(O_TRUNC) emptied the source of a migration (empty the destination too), or a file
        that has moved (empty it where it is now); returns where `fd` is open."""
        if not migration_bit((await sub.fstat(fd)).iatt):
            return sub

        async def empty(c: Translator, f: Fd) -> None:
            await c.ftruncate(f, 0)

        if await self._cooperate(sub, fd.gfid, fd, FULL, self._fd_apply(fd, sub, empty)):
            sub = await self._reopen(fd, sub)
            await sub.ftruncate(fd, 0)
        return sub

    # ---- fd fops: where the file was opened (and reopened, if a migration moved it) ----------

    async def _fd_route(self, fd: Fd, call: Callable[[Translator], Awaitable[_T]]) -> _T:
        """A file fd's subvolume; for a directory fd, every subvolume it is open on."""
        sub = fd.ctx.get(self)
        if isinstance(sub, DirFd):
            return first_ok(await gather_fops(call(self.children[i]) for i in sub.opened))
        return await call(await self._fd_target(fd))

    async def _fd_xattr(self, fd: Fd, call: XattrCall, again: XattrCall) -> XdataReply:
        if isinstance(fd.ctx.get(self), DirFd):
            return await self._fd_route(fd, call)
        rep, sub = await self._on_fd(fd, await self._fd_target(fd), call)
        if await self._meta_moved(sub, fd.gfid, fd, ""):
            rep = await again(await self._reopen(fd, sub))
        return rep

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        ffd = fd.ctx.get(self)
        sub = ffd.subvol if isinstance(ffd, FileFd) else await self._fd_target(fd)
        rep, sub = await self._on_fd(fd, sub, lambda c: c.readv(fd, size, offset, flags, xdata))
        if not migration_bit(rep.iatt):
            return rep
        new = await self._reread(fd, sub, rep.iatt)
        if new is not None:
            rep = await new.readv(fd, size, offset, flags, xdata)
        return ReadReply(rep.data, rep.iatt and hide_migration(rep.iatt), rep.xdata)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        ffd = fd.ctx.get(self)
        append = isinstance(ffd, FileFd) and bool(ffd.flags & os.O_APPEND)
        size = memoryview(data).nbytes

        def plan(rep: ChangeReply) -> tuple[tuple[int, int], FdReplay]:
            at = rep.post.size - size if append and rep.post is not None else offset  # where it landed

            async def again(c: Translator, f: Fd) -> None:
                await c.writev(f, data, at, 0)

            return (at, max(size, 1)), again

        return await self._fd_change(fd, lambda c: c.writev(fd, data, offset, flags, xdata), plan)

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        rep, sub = await self._on_fd(fd, await self._fd_target(fd), lambda c: c.fstat(fd, xdata))
        new = await self._reread(fd, sub, rep.iatt) if migration_bit(rep.iatt) else None
        if new is not None:
            rep = await new.fstat(fd, xdata)
        return AttrReply(hide_migration(rep.iatt), rep.xdata)

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        if isinstance(fd.ctx.get(self), DirFd):
            return await self._fd_route(fd, lambda c: c.fsetattr(fd, attr, xdata))
        if attr.valid & SetAttrValid.MODE:
            return await self._chmod(Loc("", fd.gfid), fd, attr, lambda c, a: c.fsetattr(fd, a, xdata))
        return await self._fd_change(fd, lambda c: c.fsetattr(fd, attr, xdata))

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._fd_change(
            fd,
            lambda c: c.ftruncate(fd, offset, xdata),
            lambda _: (FULL, lambda c, f: c.ftruncate(f, offset)),
        )

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await (await self._fd_target(fd)).flush(fd, xdata)

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        return await self._fd_change(
            fd, lambda c: c.fsync(fd, datasync, xdata), lambda _: (FULL, lambda c, f: c.fsync(f, datasync))
        )

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        return self._visible(await (await self._fd_target(fd)).fgetxattr(fd, name, xdata), name)

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._fd_xattr(
            fd, lambda c: c.fsetxattr(fd, xattrs, flags, xdata), lambda c: c.fsetxattr(fd, xattrs, 0, xdata)
        )

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        return await self._fd_xattr(
            fd,
            lambda c: c.fremovexattr(fd, name, xdata),
            lambda c: _tolerant(c.fremovexattr(fd, name, xdata)),
        )

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await (await self._fd_target(fd)).fxattrop(fd, optype, xattrs, xdata)

    async def finodelk(self, domain: str, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        return await (await self._fd_target(fd)).finodelk(domain, fd, cmd, flock, xdata)

    async def fentrylk(
        self, domain: str, fd: Fd, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        child = await self._fd_target(fd)
        if basename and isinstance(fd.ctx.get(self), DirFd):
            layout = await self.layout_for(Loc("", fd.gfid, inode=fd.inode))
            child = self.hashed_for(layout, basename) or child
        return await child.fentrylk(domain, fd, basename, cmd, lktype, xdata)

    async def lk(self, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> LkReply:
        return await (await self._fd_target(fd)).lk(fd, cmd, flock, xdata)

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        return await self._fd_change(
            fd,
            lambda c: c.fallocate(fd, mode, offset, length, xdata),
            lambda _: ((offset, length), lambda c, f: c.fallocate(f, mode, offset, length)),
        )

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._fd_change(
            fd,
            lambda c: c.discard(fd, offset, length, xdata),
            lambda _: ((offset, length), lambda c, f: c.discard(f, offset, length)),
        )

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._fd_change(
            fd,
            lambda c: c.zerofill(fd, offset, length, xdata),
            lambda _: ((offset, length), lambda c, f: c.zerofill(f, offset, length)),
        )

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        """The source of a finished migration is truncated: any seek there says ENXIO, the cue to
        check whether the file moved."""
        sub = await self._fd_target(fd)
        try:
            return await sub.seek(fd, offset, what, xdata)
        except FopError as exc:
            if exc.errno != errno.ENXIO or isinstance(fd.ctx.get(self), DirFd):
                raise
            new = await self._reread(fd, sub, (await sub.fstat(fd)).iatt)
            if new is None:
                raise
        return await new.seek(fd, offset, what, xdata)

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        return await (await self._fd_target(fd)).rchecksum(fd, offset, length, xdata)

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        """Offloaded when both files are on one subvolume (and the target is not being migrated);
        otherwise copied here in 1 MiB pieces through this translator's readv and writev."""
        src, dst = await asyncio.gather(self._fd_target(fd_in), self._fd_target(fd_out))
        if src is dst:
            rep = await src.copy_file_range(fd_in, off_in, fd_out, off_out, length, flags, xdata)
            if not migration_bit(rep.post):
                return rep
        done = 0
        post: Iatt | None = None
        while done < length:
            data = (await self.readv(fd_in, min(_COPY_CHUNK, length - done), off_in + done, 0)).data
            if not data:
                break
            post = (await self.writev(fd_out, data, off_out + done, 0)).post
            done += len(data)
        return CopyReply(done, post)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        ffd = fd.ctx.get(self)
        if isinstance(ffd, FileFd):
            await self._drop_replay(ffd)
            target = ffd.subvol
        else:
            target = await self._fd_target(fd)
        fd.ctx.pop(self, None)
        return await target.release(fd, xdata)


async def _tolerant(call: Awaitable[XdataReply]) -> XdataReply:
    """Removing an xattr again where a migration already left it out is not an error."""
    try:
        return await call
    except FopError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return XdataReply()
