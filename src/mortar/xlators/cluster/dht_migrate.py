"""Migration of one file between subvolumes while it stays readable and writable: both halves of
the protocol, the migrator's (`FileMigration`, run by rebalance) and every client's
(`MigrationClient`, the base of cluster/distribute's file fops).

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
   the destination the file (its mode: the commit point) with its times; the source loses its
   name, gets a linkto, a link file's mode (`---------T`) and is truncated.
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
reopen and read again. A repetition that fails (the destination is full) removes the marker: the
migrator abandons the file at its switch and the write stands on the source.
So a file written during its own migration ends with what was written, and no fd goes stale.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import (
    GFID_REQ,
    AttrSet,
    ChangeReply,
    Fd,
    Flock,
    Loc,
    LockCmd,
    LockType,
    SeekWhat,
    SetAttrValid,
)
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht_base import DhtBase
from mortar.xlators.cluster.dht_common import (
    COPYING,
    DATA_DOMAIN,
    IDLE,
    MIGRATE_DOMAIN,
    MIGRATING_XATTR,
    MOVED,
    STALE,
    DhtCtx,
    DirFd,
    FileFd,
    ReplayFd,
    as_root,
    copyable_xattr,
    encode_marker,
    first_ok,
    gather_fops,
    hide_migration,
    is_linkfile,
    linkto_of,
    marker_target,
    migration_bit,
    wanted_xattrs,
)
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR, encode_linkto

_T = TypeVar("_T")
CHUNK = 1 << 20
_OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC
FULL = (0, 0)  # a lock range: the whole file

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
        having moved, reopen the fd where it is now and make the change there."""
        sub = await self._fd_target(fd)
        rep = await call(sub)
        if migration_bit(rep.post):
            rng, op = plan(rep)
            apply = self._fd_apply(fd, sub, op) if op is not None else None
            if await self._cooperate(sub, fd.gfid, fd, rng, apply):
                rep = await call(await self._reopen(fd, sub))
        return hide_change(rep)

    async def _reread(self, fd: Fd, sub: Translator, iatt: Iatt | None) -> Translator | None:
        """A read came back with a link file's mode: the source of a finished migration, truncated.
        Returns where the file is now (the fd reopened there), or None if nothing moved."""
        if iatt is None or not is_linkfile(iatt) or not await self._moved(sub, fd):
            return None
        return await self._reopen(fd, sub)


# ---- the migrator's half ----------------------------------------------------------------------


@dataclass(slots=True)
class FileToMove:
    """One file to migrate: its name, and the subvolume it is on and the one it hashes to."""

    parent: Gfid
    dirpath: str
    name: str
    gfid: Gfid
    src: Translator
    dst: Translator

    @property
    def path(self) -> str:
        return posixpath.join(self.dirpath, self.name)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one file: "moved", "skipped" or "failed" (with a short `reason` key and a
    `detail` for people), "gone" (removed or renamed meanwhile) or "in-place"."""

    status: str
    reason: str = ""
    detail: str = ""
    bytes: int = 0


#: called at each step ("chunk" after each copied chunk with its offset, "switch" before the switch)
StepHook = Callable[[str, FileToMove, int], Awaitable[None]]


class _Abandon(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.detail or outcome.status)
        self.outcome = outcome


class FileMigration:
    """Moves one file from `job.src` to `job.dst` (see the module docstring for the protocol)."""

    def __init__(
        self,
        dht: DhtBase,
        job: FileToMove,
        *,
        force: bool = False,
        inflight: int = 2,
        hook: StepHook | None = None,
        reserved: dict[str, int] | None = None,
    ) -> None:
        self.dht = dht
        self.job = job
        self.force = force
        self.inflight = max(1, inflight)
        self.hook = hook
        #: bytes other migrations in flight are about to write, per destination (space checks)
        self.reserved = reserved if reserved is not None else {}
        self.owner = os.urandom(8)
        self.marker = encode_marker(job.dst.name, os.urandom(8))
        self.copied = 0
        self._sfd = Fd(job.gfid, os.O_RDWR)
        self._dfd = Fd(job.gfid, os.O_RDWR)
        self._opened: list[tuple[Translator, Fd]] = []
        self._marked = False
        self._committed = False
        self._leftover = False  # the source carries a marker from an earlier, interrupted migration

    @property
    def _gloc(self) -> Loc:
        return Loc(self.job.path, self.job.gfid)

    @property
    def _nloc(self) -> Loc:
        return Loc(self.job.path, pargfid=self.job.parent, name=self.job.name)

    async def run(self) -> Outcome:
        job = self.job
        with as_root(lk_owner=self.owner):
            try:
                await job.src.inodelk(MIGRATE_DOMAIN, self._gloc, LockCmd.SETLK, Flock(LockType.WRLCK))
            except FopError as exc:
                if exc.errno == errno.EAGAIN:
                    return Outcome("skipped", "busy", "another migration or a rename holds the file")
                if exc.errno == errno.ENOSYS:
                    return Outcome("skipped", "no-locks", f"{job.src.name} has no features/locks")
                if exc.errno in STALE:
                    return Outcome("gone")
                return Outcome("failed", errno.errorcode.get(exc.errno, "error"), str(exc))
            try:
                return await self._migrate()
            except _Abandon as ab:
                return ab.outcome
            except FopError as exc:
                self.dht.log.warning("%s: migration to %s failed: %s", job.path, job.dst.name, exc)
                return Outcome("failed", errno.errorcode.get(exc.errno, "error"), str(exc), self.copied)
            finally:
                for sub, fd in reversed(self._opened):
                    try:
                        await sub.release(fd)
                    except FopError as exc:
                        self.dht.log.debug("release on %s: %s", sub.name, exc)
                try:
                    await job.src.inodelk(MIGRATE_DOMAIN, self._gloc, LockCmd.SETLK, Flock(LockType.UNLCK))
                except FopError as exc:
                    self.dht.log.warning("%s: releasing the migration lock: %s", job.path, exc)

    async def _migrate(self) -> Outcome:
        job = self.job
        iatt = await self._check_source()
        if not iatt.is_reg:
            return await self._move_special(iatt)
        need = iatt.blocks * 512
        await self._check_space(need)
        self.reserved[job.dst.name] = self.reserved.get(job.dst.name, 0) + need
        try:
            await self._prepare_destination()
            try:
                await self._mark()
                size = (await job.src.fstat(self._sfd)).iatt.size
                await job.dst.ftruncate(self._dfd, size)
                await self._copy(size)
                if self.hook is not None:
                    await self.hook("switch", job, self.copied)
                await self._switch()
            except BaseException:
                if not self._committed:
                    await self._abort()
                raise
        finally:
            self.reserved[job.dst.name] -= need
        self.dht._forget(job.gfid)
        return Outcome("moved", bytes=self.copied)

    async def _check_source(self) -> Iatt:
        try:
            rep = await self.job.src.lookup(self._nloc, {"xattrs": [LINKTO_XATTR, MIGRATING_XATTR]})
        except FopError as exc:
            if exc.errno in STALE:
                raise _Abandon(Outcome("gone")) from None
            raise
        if rep.iatt.gfid != self.job.gfid or linkto_of(rep) is not None:
            raise _Abandon(Outcome("gone"))
        if rep.iatt.is_dir:
            raise _Abandon(Outcome("skipped", "directory", "a directory is not migrated"))
        if rep.iatt.nlink > 1:
            raise _Abandon(Outcome("skipped", "hardlinks", f"{rep.iatt.nlink} names on {self.job.src.name}"))
        self._leftover = MIGRATING_XATTR in wanted_xattrs(rep.xdata)
        return rep.iatt

    async def _check_space(self, need: int) -> None:
        dst = self.job.dst
        sv = (await dst.statfs(Loc("/", ROOT_GFID))).statvfs
        avail = sv.bavail * sv.frsize - self.reserved.get(dst.name, 0)
        total = sv.blocks * sv.frsize
        if need > avail:
            raise _Abandon(
                Outcome(
                    "skipped", "space", f"{dst.name} has {max(avail, 0)} bytes free, the file needs {need}"
                )
            )
        floor = self.dht.opts["min-free-disk"]
        if not self.force and total and (avail - need) * 100 < floor * total:
            raise _Abandon(
                Outcome("skipped", "space", f"{dst.name} would fall below min-free-disk ({floor:g}%)")
            )

    async def _open(self, sub: Translator, fd: Fd) -> None:
        await sub.open(self._gloc, os.O_RDWR, fd)
        self._opened.append((sub, fd))

    async def _prepare_destination(self) -> None:
        """The destination as a link file back to the source, both opened, the destination empty."""
        job = self.job
        try:
            cur = await job.dst.lookup(self._nloc, {"xattrs": [LINKTO_XATTR]})
        except FopError as exc:
            if exc.errno != errno.ENOENT:
                raise
        else:
            if cur.iatt.gfid != job.gfid and linkto_of(cur) is None:
                raise _Abandon(
                    Outcome("skipped", "conflict", f"{job.dst.name} holds another file of this name")
                )
            if cur.iatt.gfid == job.gfid and not is_linkfile(cur.iatt):
                if not self._leftover:  # not of our making: touch neither copy
                    raise _Abandon(Outcome("skipped", "conflict", f"its data is also on {job.dst.name}"))
                await self._finish_interrupted()
        await self.dht.make_linkfile(job.dst, self._nloc, job.gfid, job.src)
        await self._open(job.dst, self._dfd)
        await self._open(job.src, self._sfd)
        await job.dst.ftruncate(self._dfd, 0)  # whatever an abandoned attempt left

    async def _finish_interrupted(self) -> None:
        """A switch that died after the commit point: the destination is the file; drop the source."""
        self.dht.log.info("%s: finishing an interrupted migration to %s", self.job.path, self.job.dst.name)
        await self.job.src.unlink(self._nloc, 0)
        raise _Abandon(Outcome("moved", detail="finished an interrupted migration"))

    async def _lock(self, kind: int, off: int = 0, length: int = 0) -> None:
        cmd = LockCmd.SETLK if kind == LockType.UNLCK else LockCmd.SETLKW
        await self.job.src.finodelk(DATA_DOMAIN, self._sfd, cmd, Flock(kind, off, length))

    async def _unlock(self, off: int = 0, length: int = 0) -> None:
        try:
            await self._lock(LockType.UNLCK, off, length)
        except FopError as exc:
            self.dht.log.warning("%s: unlocking [%d, +%d): %s", self.job.path, off, length, exc)

    async def _mark(self) -> None:
        """Phase 1, then wait out the writes that started before it."""
        src, sfd = self.job.src, self._sfd
        await self._lock(LockType.WRLCK)
        try:
            await src.fsetxattr(sfd, {MIGRATING_XATTR: self.marker}, 0)
            self._marked = True
            mode = (await src.fstat(sfd)).iatt.mode
            await src.fsetattr(sfd, AttrSet(SetAttrValid.MODE, mode=(mode & 0o7777) | stat.S_ISVTX))
        finally:
            await self._unlock()
        drain = src.name  # a replica set's data transactions lock this domain: their end is ours to see
        await src.finodelk(drain, sfd, LockCmd.SETLKW, Flock(LockType.WRLCK))
        await src.finodelk(drain, sfd, LockCmd.SETLK, Flock(LockType.UNLCK))

    async def _data_from(self, pos: int, end: int) -> tuple[int, int] | None:
        """The first data extent of the source within [pos, end), holes skipped (no hole
        information: all of it)."""
        src, sfd = self.job.src, self._sfd
        try:
            start = (await src.seek(sfd, pos, SeekWhat.DATA)).offset
            if start >= end:
                return None
            return start, min((await src.seek(sfd, start, SeekWhat.HOLE)).offset, end)
        except FopError as exc:
            if exc.errno == errno.ENXIO:
                return None
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return pos, end

    async def _extents(self, size: int) -> AsyncIterator[tuple[int, int]]:
        """(offset, length) of the chunks to copy: 1 MiB pieces of the source's data extents."""
        pos = 0
        while (found := await self._data_from(pos, size)) is not None:
            start, end = found
            for off in range(start, end, CHUNK):
                yield off, min(CHUNK, end - off)
            pos = max(end, pos + 1)

    async def _copy(self, size: int) -> None:
        pending: set[asyncio.Task[None]] = set()
        try:
            async for off, n in self._extents(size):
                if len(pending) >= self.inflight:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        task.result()
                pending.add(asyncio.create_task(self._chunk(off, n)))
            if pending:
                done, pending = await asyncio.wait(pending)
                for task in done:
                    task.result()
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _chunk(self, off: int, n: int) -> None:
        """Copy one chunk under its lock, looking for holes again (a client may have punched one)."""
        await self._lock(LockType.WRLCK, off, n)
        try:
            pos, end = off, off + n
            while pos < end and (found := await self._data_from(pos, end)) is not None:
                start, stop = found
                data = (await self.job.src.readv(self._sfd, stop - start, start, 0)).data
                if len(data):
                    await self.job.dst.writev(self._dfd, data, start, 0)
                self.copied += len(data)
                if len(data) < stop - start:
                    break  # the end of the file
                pos = stop
        finally:
            await self._unlock(off, n)
        if self.hook is not None:
            await self.hook("chunk", self.job, off)

    async def _switch(self) -> None:
        job, src, dst, sfd, dfd = self.job, self.job.src, self.job.dst, self._sfd, self._dfd
        await self._lock(LockType.WRLCK)
        try:
            await self._check_names()
            try:
                marker = (await src.fgetxattr(sfd, MIGRATING_XATTR)).xattrs.get(MIGRATING_XATTR)
            except FopError as exc:
                if exc.errno != errno.ENODATA:
                    raise
                marker = None
            if marker != self.marker:
                raise _Abandon(Outcome("failed", "cancelled", "a client could not repeat a write there"))
            st = (await src.fstat(sfd)).iatt
            if (await dst.fstat(dfd)).iatt.size != st.size:
                await dst.ftruncate(dfd, st.size)
            await self._copy_xattrs()
            await dst.fsetattr(dfd, AttrSet(SetAttrValid.UID | SetAttrValid.GID, uid=st.uid, gid=st.gid))
            await dst.fsync(dfd, 0)
            self._committed = True
            await dst.fsetattr(dfd, AttrSet(SetAttrValid.MODE, mode=st.mode & 0o7777 & ~stat.S_ISVTX))
            await self._remove(dst, dfd, LINKTO_XATTR)
            times = SetAttrValid.ATIME | SetAttrValid.MTIME
            await dst.fsetattr(dfd, AttrSet(times, atime_ns=st.atime_ns, mtime_ns=st.mtime_ns))
            await src.unlink(self._nloc, 0)
            await src.fsetxattr(sfd, {LINKTO_XATTR: encode_linkto(dst.name)}, 0)
            await self._remove(src, sfd, MIGRATING_XATTR)
            await src.fsetattr(sfd, AttrSet(SetAttrValid.MODE, mode=stat.S_ISVTX))
            await src.ftruncate(sfd, 0)
        finally:
            await self._unlock()
        self.dht.log.info("%s: moved from %s to %s (%d bytes)", job.path, src.name, dst.name, self.copied)

    async def _check_names(self) -> None:
        """The name still means this file on both sides, with no other name (a hard link) made."""
        for sub in (self.job.src, self.job.dst):
            try:
                cur = await sub.lookup(self._nloc)
            except FopError as exc:
                if exc.errno in STALE:
                    raise _Abandon(Outcome("gone")) from None
                raise
            if cur.iatt.gfid != self.job.gfid:
                raise _Abandon(Outcome("gone"))
            if sub is self.job.src and cur.iatt.nlink > 1:
                raise _Abandon(Outcome("skipped", "hardlinks", "a hard link was made during the migration"))

    async def _copy_xattrs(self) -> None:
        src, dst = self.job.src, self.job.dst
        want = {k: v for k, v in (await src.fgetxattr(self._sfd, None)).xattrs.items() if copyable_xattr(k)}
        have = (await dst.fgetxattr(self._dfd, None)).xattrs
        if want:
            await dst.fsetxattr(self._dfd, want, 0)
        for name in have:
            if copyable_xattr(name) and name not in want:
                await self._remove(dst, self._dfd, name)

    @staticmethod
    async def _remove(sub: Translator, fd: Fd, name: str) -> None:
        try:
            await sub.fremovexattr(fd, name)
        except FopError as exc:
            if exc.errno != errno.ENODATA:
                raise

    async def _abort(self) -> None:
        """Undo phase 1: the source is the file again, the destination an empty link file."""
        src, dst = self.job.src, self.job.dst
        try:
            if self._marked:
                await self._lock(LockType.WRLCK)
                try:
                    mode = (await src.fstat(self._sfd)).iatt.mode
                    await self._remove(src, self._sfd, MIGRATING_XATTR)
                    await src.fsetattr(
                        self._sfd, AttrSet(SetAttrValid.MODE, mode=mode & 0o7777 & ~stat.S_ISVTX)
                    )
                finally:
                    await self._unlock()
            if any(fd is self._dfd for _, fd in self._opened):
                await dst.ftruncate(self._dfd, 0)
        except FopError as exc:
            self.dht.log.warning("%s: undoing the migration to %s: %s", self.job.path, dst.name, exc)

    async def _move_special(self, iatt: Iatt) -> Outcome:
        """Symlinks, fifos, sockets, devices have no data: recreate them there, then drop the source."""
        job, src, dst, nloc, gloc = self.job, self.job.src, self.job.dst, self._nloc, self._gloc
        target = (await src.readlink(nloc)).target if iatt.is_lnk else ""
        xattrs = {k: v for k, v in (await src.getxattr(gloc, None)).xattrs.items() if copyable_xattr(k)}
        await self.dht._unlink_linkfile(dst, nloc, job.gfid)
        req = {GFID_REQ: bytes(job.gfid)}
        try:
            if iatt.is_lnk:
                await dst.symlink(target, nloc, 0, req)
            else:
                await dst.mknod(nloc, iatt.mode, iatt.rdev, 0, req)
            valid = SetAttrValid.UID | SetAttrValid.GID | SetAttrValid.ATIME | SetAttrValid.MTIME
            if not iatt.is_lnk:
                valid |= SetAttrValid.MODE
            attr = AttrSet(valid, iatt.mode & 0o7777, iatt.uid, iatt.gid, iatt.atime_ns, iatt.mtime_ns)
            await dst.setattr(gloc, attr)
            if xattrs:
                await dst.setxattr(gloc, xattrs, 0)
        except FopError:
            await self.dht._unlink_linkfile(dst, nloc, job.gfid, data_too=True)
            await self.dht.make_linkfile(dst, nloc, job.gfid, src)
            raise
        await src.unlink(nloc, 0)
        return Outcome("moved")


__all__ = ["COPYING", "IDLE", "MOVED", "FileMigration", "FileToMove", "MigrationClient", "Outcome"]
