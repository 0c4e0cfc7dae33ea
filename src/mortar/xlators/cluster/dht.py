"""cluster/distribute (DHT): spreads the files of every directory over the subvolumes by name hash.

Every directory exists on every subvolume and carries, on each, the hash range that subvolume owns
(`trusted.mortar.dht`). A file lives on the subvolume whose range holds the hash of its name (its
hashed subvolume), or, after a rename or when that subvolume was full, on another one (its cached
subvolume) with a link file on the hashed one pointing there. Nothing is central: each client
reads layouts at lookup, heals them when they have holes or overlaps, and finds misplaced files by
looking everywhere (`lookup-unhashed`), leaving link files so the next lookup is direct.

This module holds the fops; state, layouts, link files and lookup are in `dht_base`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
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
    ReadlinkReply,
    ReadReply,
    RenameReply,
    SeekReply,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht_base import DhtBase
from mortar.xlators.cluster.dht_common import (
    STALE,
    DhtCtx,
    DirFd,
    as_root,
    first_ok,
    gather_fops,
    is_linkfile,
)
from mortar.xlators.cluster.dht_layout import COMMIT_FRESH, LINKTO_XATTR

_T = TypeVar("_T")
_COOKIE_LIMIT = 1 << 63
_COPY_CHUNK = 1 << 20


class DistributeTranslator(DhtBase):
    """Distribute: each file on one subvolume chosen by name hash; directories on all of them."""

    type_name: ClassVar[str] = "cluster/distribute"

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
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
            ctx, _ = await self._resolve(Loc(loc.path, rep.iatt.gfid, inode=loc.inode))
            target = ctx.cached or self.children[0]
            await target.open(Loc(loc.path, rep.iatt.gfid), flags & ~(os.O_CREAT | os.O_EXCL), fd, xdata)
            if flags & os.O_TRUNC:
                rep = EntryReply((await target.fstat(fd)).iatt, rep.parent_pre, rep.parent_post, rep.xdata)
        fd.ctx[self] = target
        return rep

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
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
        ctx, from_cache = await self._resolve(loc)
        if ctx.is_dir:
            raise FopError(errno.EISDIR, f"{loc.path} is a directory")
        assert ctx.cached is not None
        try:
            rep = await ctx.cached.unlink(loc, flags, xdata)
        except FopError as exc:
            if not from_cache or exc.errno not in STALE:
                raise
            ctx, _ = await self._resolve(Loc(loc.path, None, loc.pargfid, loc.name), refresh=True)
            assert ctx.cached is not None
            rep = await ctx.cached.unlink(loc, flags, xdata)
        if hashed is not ctx.cached:
            await self._unlink_linkfile(hashed, loc, ctx.gfid)
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
        left under the old name, and the replaced file's data, are removed afterwards."""
        src, _ = await self._resolve(Loc(oldloc.path, None, oldloc.pargfid, oldloc.name), refresh=True)
        if src.is_dir:
            return await self._rename_dir(oldloc, newloc, src, xdata)
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
                out.append(DirEntry(e.name, e.offset * n + idx, e.iatt))
            if out:
                return DirReply(out, rep.xdata)
            sub_off = rep.entries[-1].offset

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

    def _first_up(self) -> Translator:
        up = self.up_children()
        if not up:
            raise FopError(errno.ENOTCONN, f"{self.name}: no subvolume is up")
        return up[0]

    async def _route(
        self, loc: Loc, call: Callable[[Translator], Awaitable[_T]], dirs_all: bool = False
    ) -> _T:
        """Run `call` on the subvolume holding a file (re-resolving once if that went stale), or for
        a directory on the first subvolume (`dirs_all`: on every one, answering with the first)."""
        ctx, from_cache = await self._resolve(loc)
        if ctx.is_dir:
            if dirs_all:
                return first_ok(await gather_fops(call(c) for c in self.up_children()))
            return await call(self._first_up())
        assert ctx.cached is not None
        try:
            return await call(ctx.cached)
        except FopError as exc:
            if not from_cache or exc.errno not in STALE:
                raise
        self._forget(ctx.gfid, loc.inode)
        ctx, _ = await self._resolve(loc, refresh=True)
        return await call(ctx.cached if ctx.cached is not None else self._first_up())

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        return await self._route(loc, lambda c: c.stat(loc, xdata))

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self._route(loc, lambda c: c.setattr(loc, attr, xdata), dirs_all=True)

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        return await self._route(loc, lambda c: c.access(loc, mask, xdata))

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        return await self._route(loc, lambda c: c.readlink(loc, xdata))

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._route(loc, lambda c: c.truncate(loc, offset, xdata))

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        return await self._route(loc, lambda c: c.getxattr(loc, name, xdata))

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._route(loc, lambda c: c.setxattr(loc, xattrs, flags, xdata), dirs_all=True)

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        return await self._route(loc, lambda c: c.removexattr(loc, name, xdata), dirs_all=True)

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
        fd.ctx[self] = used[-1]
        return rep

    # ---- fd fops: where the file was opened ----------------------------------------------------

    async def _fd_target(self, fd: Fd) -> Translator:
        sub = fd.ctx.get(self)
        if isinstance(sub, Translator):
            return sub
        if isinstance(sub, DirFd):
            return self.children[sub.opened[0]]
        ctx, _ = await self._resolve(Loc("", fd.gfid, inode=fd.inode))  # an fd opened below DHT
        return ctx.cached if ctx.cached is not None else self._first_up()

    async def _fd_route(self, fd: Fd, call: Callable[[Translator], Awaitable[_T]]) -> _T:
        """A file fd's subvolume; for a directory fd, every subvolume it is open on."""
        sub = fd.ctx.get(self)
        if isinstance(sub, DirFd):
            return first_ok(await gather_fops(call(self.children[i]) for i in sub.opened))
        return await call(sub if isinstance(sub, Translator) else await self._fd_target(fd))

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        sub = fd.ctx.get(self)
        if not isinstance(sub, Translator):
            sub = await self._fd_target(fd)
        return await sub.readv(fd, size, offset, flags, xdata)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        sub = fd.ctx.get(self)
        if not isinstance(sub, Translator):
            sub = await self._fd_target(fd)
        return await sub.writev(fd, data, offset, flags, xdata)

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return await (await self._fd_target(fd)).fstat(fd, xdata)

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self._fd_route(fd, lambda c: c.fsetattr(fd, attr, xdata))

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await (await self._fd_target(fd)).ftruncate(fd, offset, xdata)

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await (await self._fd_target(fd)).flush(fd, xdata)

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        return await (await self._fd_target(fd)).fsync(fd, datasync, xdata)

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        return await (await self._fd_target(fd)).fgetxattr(fd, name, xdata)

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._fd_route(fd, lambda c: c.fsetxattr(fd, xattrs, flags, xdata))

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        return await self._fd_route(fd, lambda c: c.fremovexattr(fd, name, xdata))

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
        return await (await self._fd_target(fd)).fallocate(fd, mode, offset, length, xdata)

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await (await self._fd_target(fd)).discard(fd, offset, length, xdata)

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await (await self._fd_target(fd)).zerofill(fd, offset, length, xdata)

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        return await (await self._fd_target(fd)).seek(fd, offset, what, xdata)

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        return await (await self._fd_target(fd)).rchecksum(fd, offset, length, xdata)

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        """Offloaded when both files are on one subvolume; otherwise copied here in 1 MiB pieces."""
        src, dst = await asyncio.gather(self._fd_target(fd_in), self._fd_target(fd_out))
        if src is dst:
            return await src.copy_file_range(fd_in, off_in, fd_out, off_out, length, flags, xdata)
        done = 0
        post: Iatt | None = None
        while done < length:
            data = (await src.readv(fd_in, min(_COPY_CHUNK, length - done), off_in + done, 0)).data
            if not data:
                break
            post = (await dst.writev(fd_out, data, off_out + done, 0)).post
            done += len(data)
        return CopyReply(done, post)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        sub = fd.ctx.get(self)
        target = sub if isinstance(sub, Translator) else await self._fd_target(fd)
        fd.ctx.pop(self, None)
        return await target.release(fd, xdata)
