"""The migrator's half of moving one file between subvolumes while it stays in use (`FileMigration`,
run by rebalance for each misplaced file); the protocol, and the clients' half, are described in
`dht_migrate`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mortar.core.errors import FopError
from mortar.core.fops import (
    GFID_REQ,
    AttrSet,
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
    DATA_DOMAIN,
    MIGRATE_DOMAIN,
    MIGRATING_XATTR,
    STALE,
    as_root,
    copyable_xattr,
    encode_marker,
    is_linkfile,
    linkto_of,
    wanted_xattrs,
)
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR, encode_linkto

CHUNK = 1 << 20


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
        async with self._writers_out():
            pass

    @contextlib.asynccontextmanager
    async def _writers_out(self) -> AsyncIterator[None]:
        """Wait out the source's writes in flight and keep new ones out meanwhile: a replica set's
        data transactions (and the changelog work batched after them) hold a lock in the set's own
        name, so a write lock there is granted once every client has settled its writes."""
        src, sfd, domain = self.job.src, self._sfd, self.job.src.name
        await src.finodelk(domain, sfd, LockCmd.SETLKW, Flock(LockType.WRLCK))
        try:
            yield
        finally:
            try:
                await src.finodelk(domain, sfd, LockCmd.SETLK, Flock(LockType.UNLCK))
            except FopError as exc:
                self.dht.log.warning("%s: unlocking %s: %s", self.job.path, domain, exc)

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
            # the source becomes a link file before it loses its name (a replica set's transactions
            # address the inode by gfid, which a brick resolves only while the file has a name); the
            # marker goes after the mode and before the truncation: a read that saw the link file's
            # mode finds the file moved if what it read may have been cut
            await src.fsetxattr(sfd, {LINKTO_XATTR: encode_linkto(dst.name)}, 0)
            await src.fsetattr(sfd, AttrSet(SetAttrValid.MODE, mode=stat.S_ISVTX))
            await self._remove(src, sfd, MIGRATING_XATTR)
            await src.ftruncate(sfd, 0)
            await src.flush(sfd)  # a replica set settles its changelog of this fd's changes now
            async with self._writers_out():
                await src.unlink(self._nloc, 0)
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


__all__ = ["FileMigration", "FileToMove", "Outcome", "StepHook"]
