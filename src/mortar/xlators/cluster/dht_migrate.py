"""Migration of one file between subvolumes while it stays readable and writable: the protocol, and
every client's half of it (`MigrationClient`, the base of cluster/distribute's file fops); the
migrator's half (`FileMigration`, run by rebalance) is in `dht_migrator`.

The migrator (GlusterFS's protocol, with its races closed):
1. takes `dht.file.migrate` on the source (write, non-blocking): one migrator per file; rename
   takes it too, so a file is never renamed under a migration;
2. makes the destination on the hashed subvolume a link file (same gfid) pointing back to the
   source, so lookups keep finding the data on the source;
3. phase 1: under a full write lock in `dht.file.data`, sets the marker xattr (naming the
   destination) and the sticky bit on the source, then drains writes already in flight (a write
   lock in the subvolume's own name, the domain a replica set's data transactions hold);
4. copies the data in 1 MiB chunks, two in flight, skipping holes (seek data/hole), each chunk
   under a write lock on its range;
5. switches under a full write lock: checks the names, copies xattrs, owner, fsyncs, then makes
   the destination the file (its mode: the commit point) with its times; the source gets a
   linkto, a link file's mode (`---------T`), is truncated and, once the writes of every client
   are settled (a replica set's changelog work addresses the inode by gfid, which a brick resolves
   only while the file has a name), loses its name.
A failure before the commit point undoes phase 1 (the source is the file, the destination an
empty link file again); a crash leaves markers that the next run finishes or restarts from.

Clients (`MigrationClient`): every modifying fop returns the file's attributes, and the sticky bit
there means "phase 1 or 2". The client then takes a read lock on the range it changed and reads
the markers. In phase 1 it repeats the change on the destination: whether the chunk copy of that
range ran before (the repetition comes after it, serialised by the lock) or runs later (it reads
the source after the write landed), the destination ends with the write. In phase 2 it reopens
its fd where the file now is and repeats the fop there (writes, truncates, fallocate... are
idempotent). A write that came back without the bit landed before the marker and the drain, hence
before any copy. Metadata changed in phase 1 is copied by the switch (one that raced the switch
sees phase 2 and is repeated); chmod takes the read lock first so a migrating file keeps its
sticky bit. Reads and fstat that see a link file's mode (an fd left on the truncated source)
reopen and read again; so does any fop that finds the inode gone (ESTALE: a replica set cannot
address a source that lost its name) when the file did move. A change made again where the file
went may meet that place's own migration, and cooperates with it the same way. Lookups take a link
file whose linkto is not written yet (mknod and setxattr are two steps) for a link file, not for an
empty file. A repetition that fails (the destination is full) removes the marker: the
migrator abandons the file at its switch and the write stands on the source.
So a file written during its own migration ends with what was written, and no fd goes stale.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrSet,
    ChangeReply,
    Fd,
    Flock,
    Loc,
    LockCmd,
    LockType,
)
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht_base import DhtBase
from mortar.xlators.cluster.dht_common import (
    COPYING,
    DATA_DOMAIN,
    IDLE,
    MIGRATING_XATTR,
    MOVED,
    STALE,
    DhtCtx,
    DirFd,
    FileFd,
    ReplayFd,
    as_root,
    first_ok,
    gather_fops,
    hide_migration,
    is_linkfile,
    marker_target,
    migration_bit,
)
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR

_T = TypeVar("_T")
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC
FULL = (0, 0)  # a lock range: the whole file
_HOPS = 4  # moves one change follows (each a migration that finished while the change was made)

#: repeats a change on the destination (subvolume, fd opened there for this fd's migration)
FdReplay = Callable[[Translator, Fd], Awaitable[object]]
#: the same, given the destination subvolume and the migration's marker
Apply = Callable[[Translator, bytes], Awaitable[object]]
#: how an fd change is repeated on a migration's destination: the range it touched, the repetition
Plan = Callable[[ChangeReply], tuple[tuple[int, int], FdReplay | None]]


def no_replay(rep: ChangeReply) -> tuple[tuple[int, int], FdReplay | None]:
    """Metadata: the switch copies it; only a change that raced the switch is made again."""
    return FULL, None


def hide_change(rep: ChangeReply) -> ChangeReply:
    pre, post = rep.pre, rep.post
    return ChangeReply(pre and hide_migration(pre), post and hide_migration(post), rep.xdata)


# ---- the client's half ------------------------------------------------------------------------


class MigrationClient(DhtBase):
    """What a client does when its fop finds the file being migrated or moved away."""

    def _file_fd(self, fd: Fd, sub: Translator) -> FileFd:
        ffd = fd.ctx.get(self)
        if not isinstance(ffd, FileFd):  # opened below this translator: adopt it
            ffd = fd.ctx[self] = FileFd(sub, fd.flags)
        return ffd

    async def probe(self, sub: Translator, gfid: Gfid, fd: Fd | None = None) -> tuple[int, bytes]:
        """The migration state of the file as `sub` holds it: (IDLE | COPYING | MOVED, marker)."""
        try:
            with as_root():
                if fd is not None:
                    rep = await sub.fgetxattr(fd, None)
                else:
                    rep = await sub.getxattr(Loc("", gfid), None)
        except FopError as exc:
            if exc.errno in STALE:
                return MOVED, b""
            raise
        marker = rep.xattrs.get(MIGRATING_XATTR)
        if marker:
            return COPYING, bytes(marker)
        return (MOVED if rep.xattrs.get(LINKTO_XATTR) else IDLE), b""

    async def _data_lock(
        self, sub: Translator, gfid: Gfid, fd: Fd | None, owner: bytes, kind: int, rng: tuple[int, int]
    ) -> bool:
        """Take (or, `kind` UNLCK, release) a lock in the data domain; False if `sub` has no locks."""
        unlock = kind == LockType.UNLCK
        flock = Flock(kind, rng[0], rng[1])
        cmd = LockCmd.SETLK if unlock else LockCmd.SETLKW
        try:
            with as_root(lk_owner=owner):
                if fd is not None:
                    await sub.finodelk(DATA_DOMAIN, fd, cmd, flock)
                else:
                    await sub.inodelk(DATA_DOMAIN, Loc("", gfid), cmd, flock)
        except FopError as exc:
            if exc.errno == errno.ENOSYS:
                return False
            if not unlock:
                raise
            self.log.warning("releasing the migration lock of %s on %s: %s", gfid, sub.name, exc)
        return True

    async def _cooperate(
        self, sub: Translator, gfid: Gfid, fd: Fd | None, rng: tuple[int, int], apply: Apply | None
    ) -> bool:
        """A change came back with the migration bit: under a read lock on `rng`, repeat it on the
        destination if the file is being copied. True if it has moved: the caller repeats its fop
        where the file is now."""
        owner = os.urandom(8)
        locked = await self._data_lock(sub, gfid, fd, owner, LockType.RDLCK, rng)
        try:
            phase, marker = await self.probe(sub, gfid, fd)
            if phase == COPYING and apply is not None:
                target = self._by_name.get(marker_target(marker))
                try:
                    if target is None:
                        raise FopError(errno.EIO, f"unknown subvolume {marker_target(marker)!r}")
                    with as_root():
                        await apply(target, marker)
                    self.log.debug("%s: change repeated on %s (migration in progress)", gfid, target.name)
                except FopError as exc:
                    self.log.warning(
                        "%s: cannot repeat a change on the migration destination, "
                        "cancelling the migration: %s",
                        gfid,
                        exc,
                    )
                    await self._cancel_migration(sub, gfid, fd)
        finally:
            if locked:
                await self._data_lock(sub, gfid, fd, owner, LockType.UNLCK, rng)
        return phase == MOVED

    async def _cancel_migration(self, sub: Translator, gfid: Gfid, fd: Fd | None) -> None:
        """Remove the marker: the migrator sees it gone at its switch and abandons the file."""
        try:
            with as_root():
                if fd is not None:
                    await sub.fremovexattr(fd, MIGRATING_XATTR)
                else:
                    await sub.removexattr(Loc("", gfid), MIGRATING_XATTR)
        except FopError as exc:
            if exc.errno != errno.ENODATA:
                raise

    def _fd_apply(self, fd: Fd, sub: Translator, op: FdReplay) -> Apply:
        async def apply(target: Translator, marker: bytes) -> None:
            await op(target, await self._replay_fd(fd, sub, target, marker))

        return apply

    @staticmethod
    def _loc_apply(loc: Loc, op: Callable[[Translator, Loc], Awaitable[object]]) -> Apply:
        async def apply(target: Translator, marker: bytes) -> None:
            await op(target, loc)

        return apply

    async def _replay_fd(self, fd: Fd, sub: Translator, target: Translator, marker: bytes) -> Fd:
        """This fd's handle on the destination of the migration `marker` names (opened once)."""
        ffd = self._file_fd(fd, sub)
        if ffd.replay is not None and ffd.replay.marker == marker:
            return ffd.replay.fd
        rfd = Fd(fd.gfid, os.O_RDWR, inode=fd.inode)
        with as_root():
            await target.open(Loc("", fd.gfid), os.O_RDWR, rfd)
        if ffd.replay is not None and ffd.replay.marker == marker:  # another call opened one meanwhile
            await self._release_quietly(target, rfd)
            return ffd.replay.fd
        old, ffd.replay = ffd.replay, ReplayFd(marker, target, rfd)
        if old is not None:
            await self._release_quietly(old.subvol, old.fd)
        return rfd

    async def _drop_replay(self, ffd: FileFd) -> None:
        old, ffd.replay = ffd.replay, None
        if old is not None:
            await self._release_quietly(old.subvol, old.fd)

    async def _release_quietly(self, sub: Translator, fd: Fd) -> None:
        try:
            await sub.release(fd)
        except FopError as exc:
            self.log.debug("release of %s on %s: %s", fd.gfid, sub.name, exc)

    async def _reopen(self, fd: Fd, old: Translator) -> Translator:
        """The file left `old`: open `fd` where it is now (with its flags, as the caller)."""
        ffd = self._file_fd(fd, old)
        if ffd.reopening is None:
            ffd.reopening = asyncio.Lock()
        async with ffd.reopening:
            if ffd.subvol is not old:  # a concurrent fop on this fd did it
                return ffd.subvol
            self._forget(fd.gfid, fd.inode)
            ctx, _ = await self._resolve(Loc("", fd.gfid, inode=fd.inode), refresh=True)
            new = ctx.cached
            if new is None or new is old:
                raise FopError(errno.ESTALE, f"{fd.gfid} left {old.name} and is nowhere else")
            await new.open(Loc("", fd.gfid), ffd.flags & ~_OPEN_ONLY, fd)
            ffd.subvol = new
            self.log.info("%s moved from %s to %s: reopened there", fd.gfid, old.name, new.name)
            await self._release_quietly(old, fd)
            await self._drop_replay(ffd)
        return new

    async def _moved(self, sub: Translator, fd: Fd) -> bool:
        return (await self.probe(sub, fd.gfid, fd))[0] == MOVED

    async def _on_fd(
        self, fd: Fd, sub: Translator, call: Callable[[Translator], Awaitable[_T]]
    ) -> tuple[_T, Translator]:
        """`call` on the subvolume `fd` is open on; if that says the inode is gone there (a replica set
        cannot address a file that lost its last name: the source of a finished migration), and the
        file did move, reopen `fd` where it is now and call again. Returns the reply and where."""
        try:
            return await call(sub), sub
        except FopError as exc:
            if exc.errno not in STALE or isinstance(fd.ctx.get(self), DirFd):
                raise
            if not await self._moved(sub, fd):
                raise
        new = await self._reopen(fd, sub)
        return await call(new), new

    # ---- routing of file fops, and the changes that met a migration ---------------------------

    def _first_up(self) -> Translator:
        up = self.up_children()
        if not up:
            raise FopError(errno.ENOTCONN, f"{self.name}: no subvolume is up")
        return up[0]

    async def _route_on(
        self, loc: Loc, call: Callable[[Translator], Awaitable[_T]], dirs_all: bool = False
    ) -> tuple[_T, DhtCtx, Translator | None]:
        """Run `call` on the subvolume holding a file (re-resolving once if that went stale: a cache,
        or a migration that just moved it), or for a directory on the first subvolume (`dirs_all`:
        on every one, answering with the first). Also returns what was resolved and, for a file,
        the subvolume that answered."""
        ctx, _ = await self._resolve(loc)
        if ctx.is_dir:
            if dirs_all:
                return first_ok(await gather_fops(call(c) for c in self.up_children())), ctx, None
            return await call(self._first_up()), ctx, None
        assert ctx.cached is not None
        try:
            return await call(ctx.cached), ctx, ctx.cached
        except FopError as exc:
            if exc.errno not in STALE:
                raise
        self._forget(ctx.gfid, loc.inode)
        ctx, _ = await self._resolve(loc, refresh=True)
        sub = ctx.cached if ctx.cached is not None else self._first_up()
        return await call(sub), ctx, sub

    async def _route(
        self, loc: Loc, call: Callable[[Translator], Awaitable[_T]], dirs_all: bool = False
    ) -> _T:
        return (await self._route_on(loc, call, dirs_all))[0]

    async def _loc_change(
        self,
        loc: Loc,
        call: Callable[[Translator], Awaitable[ChangeReply]],
        op: Callable[[Translator, Loc], Awaitable[object]] | None = None,
        dirs_all: bool = False,
    ) -> ChangeReply:
        """A change by name; if it met a migration, repeat it on the destination (`op`, data) or,
        the file having moved, where it is now."""
        rep, ctx, sub = await self._route_on(loc, call, dirs_all)
        if sub is not None and migration_bit(rep.post):
            apply = self._loc_apply(Loc(loc.path, ctx.gfid), op) if op is not None else None
            if await self._cooperate(sub, ctx.gfid, None, FULL, apply):
                self._forget(ctx.gfid, loc.inode)
                rep = await self._route(loc, call)
        return hide_change(rep)

    async def _meta_moved(self, sub: Translator, gfid: Gfid, fd: Fd | None, path: str) -> bool:
        """After an xattr change on a file (its reply carries no attributes): did it land on a file
        that has moved, so that it must be made again where the file is now?"""
        try:
            iatt = (await sub.fstat(fd)).iatt if fd is not None else (await sub.stat(Loc(path, gfid))).iatt
        except FopError as exc:
            if exc.errno in STALE:
                return True
            raise
        return migration_bit(iatt) and await self._cooperate(sub, gfid, fd, FULL, None)

    async def _chmod(
        self,
        loc: Loc,
        fd: Fd | None,
        attr: AttrSet,
        call: Callable[[Translator, AttrSet], Awaitable[ChangeReply]],
    ) -> ChangeReply:
        """A mode change of a file, under the migration read lock: a file being migrated keeps its
        sticky bit (writers see the migration by it)."""
        if fd is not None:
            sub, gfid = await self._fd_target(fd), fd.gfid
        else:
            ctx, _ = await self._resolve(loc)
            assert ctx.cached is not None
            sub, gfid = ctx.cached, ctx.gfid
        plain = replace(attr, mode=attr.mode & ~stat.S_ISVTX)
        owner = os.urandom(8)
        locked = await self._data_lock(sub, gfid, fd, owner, LockType.RDLCK, FULL)
        try:
            phase, _ = await self.probe(sub, gfid, fd)
            if phase != MOVED:
                mode = plain.mode | (stat.S_ISVTX if phase == COPYING else 0)
                return hide_change(await call(sub, replace(attr, mode=mode)))
        finally:
            if locked:
                await self._data_lock(sub, gfid, fd, owner, LockType.UNLCK, FULL)
        if fd is not None:
            return hide_change(await call(await self._reopen(fd, sub), plain))
        self._forget(gfid, loc.inode)
        return hide_change(await self._route(loc, lambda c: call(c, plain)))

    async def _fd_target(self, fd: Fd) -> Translator:
        sub = fd.ctx.get(self)
        if isinstance(sub, FileFd):
            return sub.subvol
        if isinstance(sub, DirFd):
            return self.children[sub.opened[0]]
        ctx, _ = await self._resolve(Loc("", fd.gfid, inode=fd.inode))  # an fd opened below DHT
        return ctx.cached if ctx.cached is not None else self._first_up()

    async def _fd_change(
        self, fd: Fd, call: Callable[[Translator], Awaitable[ChangeReply]], plan: Plan = no_replay
    ) -> ChangeReply:
        """A change through an fd; if it met a migration, repeat it on the destination or, the file
        having moved, reopen the fd where it is now and make the change there (where it may meet the
        next migration: the fd was left on a link file, or the file moves on)."""
        rep, sub = await self._on_fd(fd, await self._fd_target(fd), call)
        if not migration_bit(rep.post):
            return rep
        for _ in range(_HOPS):
            rng, op = plan(rep)
            apply = self._fd_apply(fd, sub, op) if op is not None else None
            if not await self._cooperate(sub, fd.gfid, fd, rng, apply):
                break
            sub = await self._reopen(fd, sub)
            rep = await call(sub)
            if not migration_bit(rep.post):
                break
        return hide_change(rep)

    async def _reread(self, fd: Fd, sub: Translator, iatt: Iatt | None) -> Translator | None:
        """A read came back with a link file's mode: the source of a finished migration, truncated.
        Returns where the file is now (the fd reopened there), or None if nothing moved."""
        if iatt is None or not is_linkfile(iatt) or not await self._moved(sub, fd):
            return None
        return await self._reopen(fd, sub)


__all__ = ["COPYING", "FULL", "IDLE", "MOVED", "FdReplay", "MigrationClient", "hide_change"]
