"""cluster/replicate (AFR): every change goes to all replicas as a transaction; reads come from one
good copy; missed changes are recorded and healed. This module holds the modifying fops and the
lock fops; reads are in read.py, the transaction engine in transaction.py, heal in heal*.py."""

from __future__ import annotations

import asyncio
import errno
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrSet,
    Buffer,
    ChangeReply,
    CopyReply,
    EntrylkCmd,
    EntryReply,
    Fd,
    Flock,
    LkReply,
    Loc,
    LockCmd,
    LockType,
    RenameReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.translator import Translator
from mortar.xlators.cluster.afr.base import TRANSPORT_ERRNOS, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, ENTRY, METADATA
from mortar.xlators.cluster.afr.heal import resolve_split_brain
from mortar.xlators.cluster.afr.read import ReplicateReads
from mortar.xlators.cluster.afr.state import OFFSET_MAX, AfrFd, InodeState, gather_map, pick_error
from mortar.xlators.cluster.afr.transaction import Outcome

_T = TypeVar("_T")
#: setxattr of this key with a child's name heals the object's split-brain from that child
SPLIT_BRAIN_FINALIZE_KEY = "replica.split-brain-heal-finalize"
_COPY_CHUNK = 1 << 20


class ReplicateTranslator(ReplicateReads):
    """Replication over the children: quorum, transactions, reads from good copies, self-heal."""

    # ---- helpers ----------------------------------------------------------------------------------

    def _entry_reply(self, outcome: Outcome[_T]) -> _T:
        return outcome.replies[self.preferred(outcome.replies)]

    @staticmethod
    def _disagreeing(outcome: Outcome[EntryReply]) -> set[int]:
        """Children whose new object has another gfid than most (a name created concurrently)."""
        votes = Counter(r.iatt.gfid for r in outcome.replies.values())
        if len(votes) < 2:
            return set()
        winner = votes.most_common(1)[0][0]
        return {i for i, r in outcome.replies.items() if r.iatt.gfid != winner}

    def _learn_new(self, reply: EntryReply, succeeded: set[int]) -> None:
        here = frozenset(succeeded)
        data = here - {self.arbiter} if self.arbiter is not None else here
        readable = {DATA: data if reply.iatt.is_reg else here, METADATA: here, ENTRY: here}
        self.remember(InodeState(reply.iatt.gfid, reply.iatt.type_bits, self.generation, here, readable))

    @staticmethod
    def _target(loc: Loc, what: str) -> tuple[Gfid, str]:
        if loc.pargfid is None or not loc.name:
            raise FopError(errno.EINVAL, f"{what} needs a parent gfid and a name ({loc.path!r})")
        return loc.pargfid, loc.name

    async def _entry_create(
        self, what: str, loc: Loc, call: Callable[[Translator], Awaitable[EntryReply]]
    ) -> tuple[EntryReply, Outcome[EntryReply]]:
        outcome = await self.txn.entry(
            what, [self._target(loc, what)], lambda i: call(self.children[i]), validate=self._disagreeing
        )
        reply = self._entry_reply(outcome)
        self._learn_new(reply, outcome.succeeded)
        return reply, outcome

    # ---- entries ----------------------------------------------------------------------------------

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        reply, _ = await self._entry_create("mknod", loc, lambda c: c.mknod(loc, mode, rdev, umask, xdata))
        return reply

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        reply, _ = await self._entry_create("mkdir", loc, lambda c: c.mkdir(loc, mode, umask, xdata))
        return reply

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        reply, _ = await self._entry_create("symlink", loc, lambda c: c.symlink(target, loc, umask, xdata))
        return reply

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        child_flags = flags & ~(os.O_TRUNC | os.O_APPEND)
        reply, outcome = await self._entry_create(
            "create", loc, lambda c: c.create(loc, child_flags, mode, umask, fd, xdata)
        )
        for i in outcome.errors:
            if i not in outcome.replies and fd.ctx.get(self.children[i]) is not None:
                await gather_map({i: self.children[i].release(fd)})
        fd.gfid = reply.iatt.gfid
        fd.ctx[self] = AfrFd(flags, False, set(outcome.replies), append=bool(flags & os.O_APPEND))
        if flags & os.O_TRUNC and reply.iatt.size:
            await self.ftruncate(fd, 0)
        return reply

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        reply, _ = await self._entry_create("link", newloc, lambda c: c.link(oldloc, newloc, xdata))
        return reply

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        outcome = await self.txn.entry(
            "unlink", [self._target(loc, "unlink")], lambda i: self.children[i].unlink(loc, flags, xdata)
        )
        return self._entry_reply(outcome)

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        outcome = await self.txn.entry(
            "rmdir", [self._target(loc, "rmdir")], lambda i: self.children[i].rmdir(loc, flags, xdata)
        )
        return self._entry_reply(outcome)

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        targets = [self._target(oldloc, "rename"), self._target(newloc, "rename")]
        outcome = await self.txn.entry(
            "rename", targets, lambda i: self.children[i].rename(oldloc, newloc, xdata)
        )
        return self._entry_reply(outcome)

    # ---- data -------------------------------------------------------------------------------------

    async def _data_fd(
        self, fd: Fd, what: str, start: int, end: int, fop: Callable[[Translator], Awaitable[_T]]
    ) -> _T:
        outcome = await self.txn.data(fd.gfid, what, start, end, lambda i: self.on_fd(fd, i, fop))
        return self._entry_reply(outcome)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        length = memoryview(data).nbytes
        afd = self.fd_ctx(fd)
        if afd is None or not afd.append:
            return await self._data_fd(
                fd, "writev", offset, offset + length, lambda c: c.writev(fd, data, offset, flags, xdata)
            )
        end_of_file: asyncio.Task[int] | None = None

        async def size_now() -> int:
            return (await self.fstat(fd)).iatt.size

        async def append(i: int) -> ChangeReply:
            nonlocal end_of_file
            if end_of_file is None:  # one size for every child, read once under the lock
                end_of_file = asyncio.ensure_future(size_now())
            at = await asyncio.shield(end_of_file)
            return await self.on_fd(fd, i, lambda c: c.writev(fd, data, at, flags, xdata))

        outcome = await self.txn.data(fd.gfid, "writev (append)", 0, OFFSET_MAX, append)
        return self._entry_reply(outcome)

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        gfid = await self.gfid_of(loc)
        target = gfid_loc(gfid, loc.path)
        outcome = await self.txn.data(
            gfid, "truncate", 0, OFFSET_MAX, lambda i: self.children[i].truncate(target, offset, xdata)
        )
        return self._entry_reply(outcome)

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self._data_fd(fd, "ftruncate", 0, OFFSET_MAX, lambda c: c.ftruncate(fd, offset, xdata))

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        # only overlapping byte ranges need one order on every copy: sizes only grow here, so
        # any order ends at the same size
        return await self._data_fd(
            fd, "fallocate", offset, offset + length, lambda c: c.fallocate(fd, mode, offset, length, xdata)
        )

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._data_fd(
            fd, "discard", offset, offset + length, lambda c: c.discard(fd, offset, length, xdata)
        )

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self._data_fd(
            fd, "zerofill", offset, offset + length, lambda c: c.zerofill(fd, offset, length, xdata)
        )

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        """Inside each child when every data child's copy of the source is good (reflinks stay
        possible); otherwise read from a good copy and write through a transaction."""
        st = await self.readable_state(fd_in.gfid, DATA, "copy_file_range")
        data_up = {i for i in self.up_indices() if i != self.arbiter}
        if data_up <= st.readable.get(DATA, frozenset()):

            def inner(c: Translator) -> Awaitable[CopyReply]:
                i = self.children.index(c)
                return self.on_fd(
                    fd_in,
                    i,
                    lambda c2: c2.copy_file_range(fd_in, off_in, fd_out, off_out, length, flags, xdata),
                )

            return await self._data_fd(fd_out, "copy_file_range", off_out, off_out + length, inner)
        done = 0
        post = None
        while done < length:
            chunk = bytes((await self.readv(fd_in, min(_COPY_CHUNK, length - done), off_in + done, 0)).data)
            if not chunk:
                break
            post = (await self.writev(fd_out, chunk, off_out + done, 0)).post
            done += len(chunk)
        return CopyReply(done, post)

    # ---- syncing ----------------------------------------------------------------------------------

    async def _to_opened(self, fd: Fd, fop: str, call: Callable[[Translator], Awaitable[_T]]) -> _T:
        afd = self.fd_ctx(fd)
        where = [i for i in (sorted(afd.opened) if afd else self.up_indices()) if self.is_up(i)]
        ok, bad = await gather_map({i: call(self.children[i]) for i in where})
        for i, exc in bad.items():
            self.log.warning("%s of %s failed on %s: %s", fop, fd.gfid, self.children[i].name, exc)
        if not ok:
            raise pick_error(bad.values(), f"{self.name}: {fop}: no child is up")
        return ok[self.preferred(ok)]

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        await self.txn.flush(fd.gfid)
        return await self._to_opened(fd, "flush", lambda c: c.flush(fd, xdata))

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        """Settle the changelog, then make every child's copy stable."""
        await self.txn.flush(fd.gfid)
        return await self._to_opened(fd, "fsync", lambda c: c.fsync(fd, datasync, xdata))

    async def fsyncdir(self, fd: Fd, datasync: int, xdata: Xdata = None) -> XdataReply:
        return await self._to_opened(fd, "fsyncdir", lambda c: c.fsyncdir(fd, datasync, xdata))

    # ---- metadata ---------------------------------------------------------------------------------

    async def _meta(self, gfid: Gfid, what: str, call: Callable[[int], Awaitable[_T]]) -> _T:
        outcome = await self.txn.inode(METADATA, gfid, what, call)
        return self._entry_reply(outcome)

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        gfid = await self.gfid_of(loc)
        target = gfid_loc(gfid, loc.path)
        return await self._meta(gfid, "setattr", lambda i: self.children[i].setattr(target, attr, xdata))

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self._meta(
            fd.gfid, "fsetattr", lambda i: self.on_fd(fd, i, lambda c: c.fsetattr(fd, attr, xdata))
        )

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        gfid = await self.gfid_of(loc)
        if SPLIT_BRAIN_FINALIZE_KEY in xattrs:
            choice = bytes(xattrs[SPLIT_BRAIN_FINALIZE_KEY]).decode(errors="replace").strip("\0 \n")
            await resolve_split_brain(self, gfid, "source-brick", choice)
            return XdataReply()
        target = gfid_loc(gfid, loc.path)
        return await self._meta(
            gfid, "setxattr", lambda i: self.children[i].setxattr(target, xattrs, flags, xdata)
        )

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._meta(
            fd.gfid, "fsetxattr", lambda i: self.on_fd(fd, i, lambda c: c.fsetxattr(fd, xattrs, flags, xdata))
        )

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        gfid = await self.gfid_of(loc)
        target = gfid_loc(gfid, loc.path)
        return await self._meta(
            gfid, "removexattr", lambda i: self.children[i].removexattr(target, name, xdata)
        )

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        return await self._meta(
            fd.gfid, "fremovexattr", lambda i: self.on_fd(fd, i, lambda c: c.fremovexattr(fd, name, xdata))
        )

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        gfid = await self.gfid_of(loc)
        target = gfid_loc(gfid, loc.path)
        return await self._meta(
            gfid, "xattrop", lambda i: self.children[i].xattrop(target, optype, xattrs, xdata)
        )

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await self._meta(
            fd.gfid, "fxattrop", lambda i: self.on_fd(fd, i, lambda c: c.fxattrop(fd, optype, xattrs, xdata))
        )

    # ---- locks from above ---------------------------------------------------------------------

    async def _lock_everywhere(
        self,
        what: str,
        lock: Callable[[Translator], Awaitable[_T]],
        unlock: Callable[[Translator], Awaitable[object]],
        releasing: bool,
    ) -> _T:
        """Take a lock child by child in index order (no deadlock between clients); a failure other
        than a lost child gives back what was taken. Unlocks go to every child at once."""
        up = self.up_indices()
        if releasing:
            ok, bad = await gather_map({i: lock(self.children[i]) for i in up})
            if not ok:
                raise pick_error(bad.values(), f"{self.name}: {what}: no child is up")
            return ok[self.preferred(ok)]
        taken: dict[int, _T] = {}
        for i in up:
            try:
                taken[i] = await lock(self.children[i])
            except FopError as exc:
                if exc.errno in TRANSPORT_ERRNOS:
                    continue
                await gather_map({j: unlock(self.children[j]) for j in taken})
                raise
        if not taken:
            raise FopError(errno.ENOTCONN, f"{self.name}: {what}: no child is up")
        return taken[self.preferred(taken)]

    async def inodelk(self, domain: str, loc: Loc, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        undo = Flock(LockType.UNLCK, flock.start, flock.length, flock.pid, flock.owner)
        return await self._lock_everywhere(
            "inodelk",
            lambda c: c.inodelk(domain, loc, cmd, flock, xdata),
            lambda c: c.inodelk(domain, loc, LockCmd.SETLK, undo, xdata),
            flock.type == LockType.UNLCK,
        )

    async def finodelk(self, domain: str, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        undo = Flock(LockType.UNLCK, flock.start, flock.length, flock.pid, flock.owner)
        return await self._lock_everywhere(
            "finodelk",
            lambda c: self.on_fd(
                fd, self.children.index(c), lambda c2: c2.finodelk(domain, fd, cmd, flock, xdata)
            ),
            lambda c: c.finodelk(domain, fd, LockCmd.SETLK, undo, xdata),
            flock.type == LockType.UNLCK,
        )

    async def entrylk(
        self, domain: str, loc: Loc, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._lock_everywhere(
            "entrylk",
            lambda c: c.entrylk(domain, loc, basename, cmd, lktype, xdata),
            lambda c: c.entrylk(domain, loc, basename, EntrylkCmd.UNLOCK, lktype, xdata),
            cmd == EntrylkCmd.UNLOCK,
        )

    async def fentrylk(
        self, domain: str, fd: Fd, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._lock_everywhere(
            "fentrylk",
            lambda c: self.on_fd(
                fd, self.children.index(c), lambda c2: c2.fentrylk(domain, fd, basename, cmd, lktype, xdata)
            ),
            lambda c: c.fentrylk(domain, fd, basename, EntrylkCmd.UNLOCK, lktype, xdata),
            cmd == EntrylkCmd.UNLOCK,
        )

    async def lk(self, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> LkReply:
        """POSIX locks: held on every child so that any copy can take over; GETLK asks one."""
        if cmd == LockCmd.GETLK:
            return await self.read_fd(fd, METADATA, "lk", lambda c: c.lk(fd, cmd, flock, xdata))
        undo = Flock(LockType.UNLCK, flock.start, flock.length, flock.pid, flock.owner)
        return await self._lock_everywhere(
            "lk",
            lambda c: self.on_fd(fd, self.children.index(c), lambda c2: c2.lk(fd, cmd, flock, xdata)),
            lambda c: c.lk(fd, LockCmd.SETLK, undo, xdata),
            flock.type == LockType.UNLCK,
        )
