"""performance/md-cache: attributes cached on the client (GlusterFS's stat-prefetch).

A stat, fstat or revalidating lookup right after a lookup, a readdirp or a change this client made
is answered from the attributes those replies carried (modifying fops return the post-operation
iatt), instead of a round trip. An entry is good for `md-cache-timeout` seconds (1 s by default, as
in GlusterFS without upcall invalidation: another client's change is seen at most that late).

This client's own changes keep the cache right: a fop that changes an object drops its entry before
it is sent and stores the attributes it returns. Replies race: a lookup sent before a write and
answered after it carries the old size, so a reply is stored only if no change of that object
started since the call was sent (a sequence number per invalidation). Extended attributes are not
cached; a lookup that asks for any (xdata keys other than gfid-req) goes down.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from mortar.core.fops import (
    GFID_REQ,
    AttrReply,
    AttrSet,
    Buffer,
    ChangeReply,
    CopyReply,
    DirReply,
    EntryReply,
    Fd,
    Loc,
    ReadReply,
    RenameReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.core.options import Option
from mortar.core.translator import Translator

_T = TypeVar("_T")


class MdCacheTranslator(Translator):
    """Caches iatts by gfid and (parent, name) -> gfid, for `md-cache-timeout` seconds."""

    type_name = "performance/md-cache"
    options: ClassVar[dict[str, Option]] = {
        "md-cache-timeout": Option(
            "time", 1.0, "seconds cached attributes are used before asking the bricks again", min=0, max=600
        ),
        "limit": Option(
            "int", 100_000, "objects whose attributes are kept (least recently used go)", 1, 10**8
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._iatts: OrderedDict[Gfid, tuple[Iatt, float]] = OrderedDict()
        self._names: OrderedDict[tuple[Gfid, str], tuple[Gfid, float]] = OrderedDict()
        self._seq = 0
        #: gfid -> sequence number of its latest invalidation (kept while calls are in flight)
        self._changed: dict[Gfid, int] = {}
        self._inflight: Counter[int] = Counter()
        self.hits = 0
        self.misses = 0

    # ---- the table -------------------------------------------------------------------------------

    def _get(self, gfid: Gfid | None) -> Iatt | None:
        if gfid is None:
            return None
        found = self._iatts.get(gfid)
        if found is None:
            return None
        if found[1] < time.monotonic():
            del self._iatts[gfid]
            return None
        self._iatts.move_to_end(gfid)
        return dataclasses.replace(found[0])

    def _gfid_of(self, loc: Loc) -> Gfid | None:
        if loc.gfid is not None:
            return loc.gfid
        if loc.pargfid is None or not loc.name:
            return None
        found = self._names.get((loc.pargfid, loc.name))
        if found is None or found[1] < time.monotonic():
            return None
        return found[0]

    def _put(self, iatt: Iatt | None, since: int, name: tuple[Gfid, str] | None = None) -> None:
        """Remember `iatt` if no change of its object started after sequence number `since`."""
        if iatt is None or self._changed.get(iatt.gfid, -1) > since or not self.opts["md-cache-timeout"]:
            return
        until = time.monotonic() + self.opts["md-cache-timeout"]
        self._iatts[iatt.gfid] = (dataclasses.replace(iatt), until)
        self._iatts.move_to_end(iatt.gfid)
        if name is not None:
            self._names[name] = (iatt.gfid, until)
            self._names.move_to_end(name)
        limit = self.opts["limit"]
        while len(self._iatts) > limit:
            self._iatts.popitem(last=False)
        while len(self._names) > limit:
            self._names.popitem(last=False)

    def invalidate(self, *gfids: Gfid | None) -> int:
        """Drop the objects' attributes; returns the sequence number a reply must be newer than."""
        self._seq += 1
        for gfid in gfids:
            if gfid is not None:
                self._iatts.pop(gfid, None)
                self._changed[gfid] = self._seq
        return self._seq

    def _unname(self, loc: Loc) -> Gfid | None:
        gfid = self._gfid_of(loc)
        if loc.pargfid is not None and loc.name:
            self._names.pop((loc.pargfid, loc.name), None)
        return gfid

    async def _tracked(self, since: int, call: Awaitable[_T], store: Callable[[_T], None]) -> _T:
        """Run a call and `store` what its reply says, keeping meanwhile the invalidations the
        reply must be compared with."""
        self._inflight[since] += 1
        try:
            reply = await call
            store(reply)
            return reply
        finally:
            self._inflight[since] -= 1
            if not self._inflight[since]:
                del self._inflight[since]
            if not self._inflight:
                self._changed.clear()
            elif len(self._changed) > 4 * self.opts["limit"]:
                oldest = min(self._inflight)
                self._changed = {g: s for g, s in self._changed.items() if s > oldest}

    @staticmethod
    def _plain(xdata: Xdata) -> bool:
        return not xdata or set(xdata) <= {GFID_REQ}

    # ---- reads of attributes ---------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        plain = self._plain(xdata)
        if plain:
            iatt = self._get(self._gfid_of(loc))
            if iatt is not None:
                self.hits += 1
                return EntryReply(iatt)
        self.misses += 1
        since = self._seq
        named = (loc.pargfid, loc.name) if loc.pargfid is not None and loc.name else None
        return await self._tracked(
            since, self.children[0].lookup(loc, xdata), lambda r: self._put(r.iatt, since, named)
        )

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        return await self._attrs(self._gfid_of(loc), xdata, lambda: self.children[0].stat(loc, xdata))

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return await self._attrs(fd.gfid, xdata, lambda: self.children[0].fstat(fd, xdata))

    async def _attrs(
        self, gfid: Gfid | None, xdata: Xdata, ask: Callable[[], Awaitable[AttrReply]]
    ) -> AttrReply:
        """The cached attributes of `gfid`, else the child's answer (`ask`), kept if no change raced it."""
        if self._plain(xdata):
            iatt = self._get(gfid)
            if iatt is not None:
                self.hits += 1
                return AttrReply(iatt)
        self.misses += 1
        since = self._seq
        return await self._tracked(since, ask(), lambda r: self._put(r.iatt, since))

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        since = self._seq

        def store(reply: DirReply) -> None:
            for e in reply.entries:
                if e.iatt is not None and e.name not in (".", ".."):
                    self._put(e.iatt, since, (fd.gfid, e.name))

        return await self._tracked(since, self.children[0].readdirp(fd, size, offset, xdata), store)

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        since = self._seq

        def store(reply: ReadReply) -> None:
            if reply.iatt is not None and reply.iatt.gfid == fd.gfid:
                self._put(reply.iatt, since)

        return await self._tracked(since, self.children[0].readv(fd, size, offset, flags, xdata), store)

    # ---- changes to one object -------------------------------------------------------------------

    async def _change(self, gfid: Gfid | None, call: Awaitable[ChangeReply]) -> ChangeReply:
        since = self.invalidate(gfid)

        def store(reply: ChangeReply) -> None:
            if reply.post is not None and reply.post.gfid == gfid:
                self._put(reply.post, since)

        return await self._tracked(since, call, store)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].writev(fd, data, offset, flags, xdata))

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].ftruncate(fd, offset, xdata))

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._change(self._gfid_of(loc), self.children[0].truncate(loc, offset, xdata))

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self._change(self._gfid_of(loc), self.children[0].setattr(loc, attr, xdata))

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].fsetattr(fd, attr, xdata))

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].fsync(fd, datasync, xdata))

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].fallocate(fd, mode, offset, length, xdata))

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].discard(fd, offset, length, xdata))

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._change(fd.gfid, self.children[0].zerofill(fd, offset, length, xdata))

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        since = self.invalidate(fd_out.gfid)

        def store(reply: CopyReply) -> None:
            if reply.post is not None and reply.post.gfid == fd_out.gfid:
                self._put(reply.post, since)

        call = self.children[0].copy_file_range(fd_in, off_in, fd_out, off_out, length, flags, xdata)
        return await self._tracked(since, call, store)

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        if flags & os.O_TRUNC:
            self.invalidate(fd.gfid, loc.gfid)
        return await self.children[0].open(loc, flags, fd, xdata)

    # xattr changes move ctime: the attributes go (the xattrs themselves are not cached)

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        self.invalidate(self._gfid_of(loc))
        return await self.children[0].setxattr(loc, xattrs, flags, xdata)

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        self.invalidate(fd.gfid)
        return await self.children[0].fsetxattr(fd, xattrs, flags, xdata)

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        self.invalidate(self._gfid_of(loc))
        return await self.children[0].removexattr(loc, name, xdata)

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        self.invalidate(fd.gfid)
        return await self.children[0].fremovexattr(fd, name, xdata)

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        self.invalidate(self._gfid_of(loc))
        return await self.children[0].xattrop(loc, optype, xattrs, xdata)

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        self.invalidate(fd.gfid)
        return await self.children[0].fxattrop(fd, optype, xattrs, xdata)

    # ---- names -----------------------------------------------------------------------------------

    async def _made(self, loc: Loc, call: Awaitable[EntryReply], *also: Gfid | None) -> EntryReply:
        self._unname(loc)
        since = self.invalidate(loc.pargfid, *also)
        named = (loc.pargfid, loc.name) if loc.pargfid is not None and loc.name else None

        def store(reply: EntryReply) -> None:
            self._put(reply.iatt, since, named)
            if reply.parent_post is not None and reply.parent_post.gfid == loc.pargfid:
                self._put(reply.parent_post, since)

        return await self._tracked(since, call, store)

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        return await self._made(loc, self.children[0].create(loc, flags, mode, umask, fd, xdata))

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self._made(loc, self.children[0].mknod(loc, mode, rdev, umask, xdata))

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self._made(loc, self.children[0].mkdir(loc, mode, umask, xdata))

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self._made(loc, self.children[0].symlink(target, loc, umask, xdata))

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self._made(newloc, self.children[0].link(oldloc, newloc, xdata), self._gfid_of(oldloc))

    async def _removed(self, loc: Loc, call: Awaitable[ChangeReply]) -> ChangeReply:
        gfid = self._unname(loc)
        since = self.invalidate(loc.pargfid, gfid)

        def store(reply: ChangeReply) -> None:
            if reply.post is not None and reply.post.gfid == loc.pargfid:
                self._put(reply.post, since)

        return await self._tracked(since, call, store)

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self._removed(loc, self.children[0].unlink(loc, flags, xdata))

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self._removed(loc, self.children[0].rmdir(loc, flags, xdata))

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        moved = self._unname(oldloc)
        replaced = self._unname(newloc)
        since = self.invalidate(moved, replaced, oldloc.pargfid, newloc.pargfid)

        def store(reply: RenameReply) -> None:
            if newloc.pargfid is not None and newloc.name:
                self._put(reply.iatt, since, (newloc.pargfid, newloc.name))
            if oldloc.pargfid != newloc.pargfid:
                for post, parent in (
                    (reply.oldparent_post, oldloc.pargfid),
                    (reply.newparent_post, newloc.pargfid),
                ):
                    if post is not None and post.gfid == parent:
                        self._put(post, since)

        return await self._tracked(since, self.children[0].rename(oldloc, newloc, xdata), store)
