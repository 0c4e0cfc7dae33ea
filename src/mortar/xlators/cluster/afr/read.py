"""Replicate's lookups, reads and opens.

lookup asks every child that is up, with the changelog xattrs, and learns from the answers which
children hold a good copy of the object (per kind); a name some children lack is healed on the spot
(name heal), and an object found with pending changes is queued for a background heal while the
read is served from a good copy. Reads go to one readable child (`read-hash-mode`), the next one on
failure; never to the arbiter. Opens go to every child that is up; an fd is reopened on a child
that comes back when a fop needs it there.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrReply,
    ChecksumReply,
    DirEntry,
    DirReply,
    EntryReply,
    Fd,
    Loc,
    ReadlinkReply,
    ReadReply,
    SeekReply,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.translator import Event, Translator
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, ENTRY, KIND_NAMES, METADATA
from mortar.xlators.cluster.afr.heal import BackgroundHealer, heal_gfid, heal_name
from mortar.xlators.cluster.afr.state import (
    MISSING_ERRNOS,
    AfrFd,
    InodeState,
    Judged,
    gather_map,
    pick_error,
)
from mortar.xlators.cluster.afr.transaction import Transactions

_T = TypeVar("_T")
SPLIT_BRAIN_STATUS_KEY = "replica.split-brain-status"
_HEAL_OPTION = {DATA: "data-self-heal", METADATA: "metadata-self-heal", ENTRY: "entry-self-heal"}
_CHILD_OPEN_DROP = os.O_TRUNC | os.O_APPEND | os.O_CREAT | os.O_EXCL


class ReplicateReads(ReplicateBase):
    """Lookups, reads, listings and opens; the write side is in `ReplicateTranslator`."""

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        self.txn = Transactions(self)
        self.healer = BackgroundHealer(self)

    def child_changed(self, i: int, up: bool) -> None:
        self.txn.child_changed(i, up)

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        # open eager entry batches end (dirty lowered, lock given back) before the children hear
        # that the graph goes down and close their connections
        if event is Event.PARENT_DOWN and self.txn.entries.defer(
            lambda: ReplicateBase.notify(self, event, source, data)
        ):
            return
        super().notify(event, source, data)

    async def fini(self) -> None:
        await self.txn.close()
        await self.healer.close()
        await super().fini()

    # ---- lookup ---------------------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        asked = list((xdata or {}).get("xattrs") or [])
        sv = await self.survey(loc, xdata=xdata)
        expect: Gfid | None = loc.gfid
        if loc.name and loc.pargfid is not None and loc.gfid is None:
            lacking = [i for i, e in sv.errors.items() if e.errno == errno.ENOENT]
            gfids = sv.gfids()
            if len(gfids) > 1 or (gfids and lacking):
                verdict = await heal_name(self, loc.pargfid, loc.name)
                if verdict.split_brain:
                    raise FopError(
                        errno.EIO,
                        f"{self.name}: {loc.path or loc.name!r} has different gfids on the children "
                        "(gfid split-brain): resolve it with a split-brain policy",
                    )
                if verdict.gfid is None:
                    raise FopError(errno.ENOENT, f"{loc.path or loc.name}: removed (stale copies remain)")
                expect = verdict.gfid
                sv = await self.survey(loc, expect=expect, xdata=xdata)
            elif gfids:
                expect = next(iter(gfids))
        if not sv.present:
            raise pick_error(sv.errors.values(), f"{self.name}: {loc.path} is on no child that is up")
        gfid = expect or sv.replies[min(sv.present)].iatt.gfid
        judged = self.judge_survey(sv)
        st = self.state_from(gfid, judged)
        kind = DATA if stat.S_ISREG(st.type_bits) else METADATA
        order = (
            self.read_order(gfid, st.readable.get(kind, frozenset()))
            or self.read_order(gfid, st.present)
            or sorted(st.present)
        )
        if order == [self.arbiter] and stat.S_ISREG(st.type_bits):
            raise FopError(
                errno.ENOTCONN, f"{self.name}: {loc.path}: only the arbiter (which holds no data) is up"
            )
        self._maybe_heal(gfid, judged)
        return self.strip_afr(sv.replies[order[0]], asked)

    def _maybe_heal(self, gfid: Gfid, judged: Judged) -> None:
        """Queue a background heal of what this lookup found stale (and healable now)."""
        fix_split = self.opts["favorite-child-policy"] != "none"
        kinds = {
            kind
            for kind, v in judged.verdicts.items()
            if (v.sinks and (v.sources or fix_split)) and self.opts[_HEAL_OPTION[kind]]
        }
        if kinds:
            self.healer.schedule(gfid, kinds)

    # ---- reads ----------------------------------------------------------------------------------

    async def gfid_of(self, loc: Loc) -> Gfid:
        if loc.gfid is not None:
            return loc.gfid
        if loc.inode is not None:
            return loc.inode.gfid
        return (await self.lookup(loc)).iatt.gfid

    async def readable_state(self, gfid: Gfid, kind: int, what: str) -> InodeState:
        """The inode's state, refusing (EIO) an object in split-brain for `kind`; with a favorite-
        child policy the split-brain is healed first."""
        st = await self.inode_state(gfid)
        if kind in st.split and self.opts["favorite-child-policy"] != "none":
            await heal_gfid(self, gfid, {kind})
            st = await self.inode_state(gfid)
        if kind in st.split:
            raise FopError(
                errno.EIO,
                f"{self.name}: {what}: {gfid} is in {KIND_NAMES[kind]} split-brain "
                "(heal info split-brain lists it; resolve with bigger-file, latest-mtime or source-brick)",
            )
        return st

    async def read(self, gfid: Gfid, kind: int, what: str, call: Callable[[int], Awaitable[_T]]) -> _T:
        st = await self.readable_state(gfid, kind, what)
        order = self.read_order(gfid, st.readable.get(kind, frozenset()))
        if not order:
            raise FopError(errno.ENOTCONN, f"{self.name}: {what}: no child with a good copy of {gfid} is up")
        return await self.read_from(order, call, what)

    async def read_fd(self, fd: Fd, kind: int, what: str, fop: Callable[[Translator], Awaitable[_T]]) -> _T:
        return await self.read(fd.gfid, kind, what, lambda i: self.on_fd(fd, i, fop))

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        gfid = await self.gfid_of(loc)
        return await self.read(
            gfid, DATA, "stat", lambda i: self.children[i].stat(gfid_loc(gfid, loc.path), xdata)
        )

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return await self.read_fd(fd, DATA, "fstat", lambda c: c.fstat(fd, xdata))

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        gfid = await self.gfid_of(loc)
        return await self.read(
            gfid, METADATA, "access", lambda i: self.children[i].access(gfid_loc(gfid, loc.path), mask, xdata)
        )

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        gfid = await self.gfid_of(loc)
        return await self.read(
            gfid, METADATA, "readlink", lambda i: self.children[i].readlink(gfid_loc(gfid, loc.path), xdata)
        )

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        return await self.read_fd(fd, DATA, "readv", lambda c: c.readv(fd, size, offset, flags, xdata))

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        return await self.read_fd(fd, DATA, "seek", lambda c: c.seek(fd, offset, what, xdata))

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        return await self.read_fd(fd, DATA, "rchecksum", lambda c: c.rchecksum(fd, offset, length, xdata))

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        gfid = await self.gfid_of(loc)
        if name == SPLIT_BRAIN_STATUS_KEY:
            return XattrReply({name: await self._split_brain_status(gfid)})
        return await self.read(
            gfid,
            METADATA,
            "getxattr",
            lambda i: self.children[i].getxattr(gfid_loc(gfid, loc.path), name, xdata),
        )

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        if name == SPLIT_BRAIN_STATUS_KEY:
            return XattrReply({name: await self._split_brain_status(fd.gfid)})
        return await self.read_fd(fd, METADATA, "fgetxattr", lambda c: c.fgetxattr(fd, name, xdata))

    async def _split_brain_status(self, gfid: Gfid) -> bytes:
        """GlusterFS's `replica.split-brain-status` text for one object."""
        self.forget(gfid)
        st = await self.inode_state(gfid)
        if not st.split:
            return b"The file is not under data or metadata split-brain"
        parts = [f"{KIND_NAMES[k]}-split-brain:{'yes' if k in st.split else 'no'}" for k in (DATA, METADATA)]
        choices = ",".join(self.children[i].name for i in sorted(st.present) if i != self.arbiter)
        return ("    ".join(parts) + f"    Choices:{choices}").encode()

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        """The child with the least space available: what is sure to fit on every copy."""
        up = [i for i in self.up_indices() if i != self.arbiter] or self.up_indices()
        ok, bad = await gather_map({i: self.children[i].statfs(loc, xdata) for i in up})
        if not ok:
            raise pick_error(bad.values())
        return min(ok.values(), key=lambda r: r.statvfs.bavail * r.statvfs.frsize)

    # ---- directories --------------------------------------------------------------------------

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        """From one child whose entry list is good; cookies belong to that child, so a listing only
        moves to another child when it starts (offset 0)."""
        afd = self.fd_ctx(fd)
        if offset and afd is not None and afd.read_child is not None:
            i = afd.read_child
            reply = await self.on_fd(fd, i, lambda c: c.readdirp(fd, size, offset, xdata))
            return self._clean_listing(reply, i)
        st = await self.readable_state(fd.gfid, ENTRY, "readdirp")
        order = self.read_order(fd.gfid, st.readable.get(ENTRY, st.readable.get(METADATA, frozenset())))

        async def attempt(i: int) -> DirReply:
            reply = await self.on_fd(fd, i, lambda c: c.readdirp(fd, size, offset, xdata))
            if afd is not None:
                afd.read_child = i
            return self._clean_listing(reply, i)

        return await self.read_from(order, attempt, "readdirp")

    def _clean_listing(self, reply: DirReply, i: int) -> DirReply:
        """Drop attributes of entries whose copy on child i is known to be stale (the caller looks
        those up instead)."""
        entries = []
        for e in reply.entries:
            if e.iatt is not None:
                st = self.known(e.iatt.gfid)
                kind = DATA if e.iatt.is_reg else METADATA
                if st is not None and i not in st.readable.get(kind, frozenset()):
                    e = DirEntry(e.name, e.offset, None)
            entries.append(e)
        reply.entries = entries
        return reply

    # ---- opens ----------------------------------------------------------------------------------

    async def _open_everywhere(
        self, fd: Fd, flags: int, is_dir: bool, call: Callable[[int], Awaitable[XdataReply]], what: str
    ) -> XdataReply:
        ok, bad = await gather_map({i: call(i) for i in self.up_indices()})
        if not ok:
            raise pick_error(bad.values(), f"{self.name}: {what}: no child is up")
        for i, exc in bad.items():
            if exc.errno not in MISSING_ERRNOS:
                self.log.debug("%s of %r failed on %s: %s", what, fd, self.children[i].name, exc)
        fd.ctx[self] = AfrFd(flags, is_dir, set(ok), append=bool(flags & os.O_APPEND))
        return ok[self.preferred(ok)]

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        gfid = await self.gfid_of(loc)
        fd.gfid = gfid
        self.forget(gfid)  # close-to-open: what other clients changed is seen from here on
        child_flags = flags & ~_CHILD_OPEN_DROP
        target = gfid_loc(gfid, loc.path)
        reply = await self._open_everywhere(
            fd, flags, False, lambda i: self.children[i].open(target, child_flags, fd, xdata), "open"
        )
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            await self.ftruncate(fd, 0)
        return reply

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        gfid = await self.gfid_of(loc)
        fd.gfid = gfid
        target = gfid_loc(gfid, loc.path)
        return await self._open_everywhere(
            fd, os.O_RDONLY, True, lambda i: self.children[i].opendir(target, fd, xdata), "opendir"
        )

    async def _close(self, fd: Fd, fop: str) -> XdataReply:
        afd = fd.ctx.pop(self, None)
        if isinstance(afd, AfrFd) and not afd.is_dir:
            try:
                await self.txn.flush(fd.gfid)
            except FopError as exc:
                self.log.warning("settling the changelog of %s at close: %s", fd.gfid, exc)
        where = sorted(afd.opened) if isinstance(afd, AfrFd) else range(self.n)
        _, bad = await gather_map({i: getattr(self.children[i], fop)(fd) for i in where})
        for i, err in bad.items():
            self.log.debug("%s of %r on %s: %s", fop, fd, self.children[i].name, err)
        return XdataReply()

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self._close(fd, "release")

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self._close(fd, "releasedir")
