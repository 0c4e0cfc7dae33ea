"""features/locks: the brick's lock manager (GlusterFS's features/locks, in memory).

Three lock spaces, all owned by (client connection, lk_owner) from the call context:
- inodelk/finodelk: byte ranges per (inode, domain). Replication and distribute use them to
  serialise their own transactions; each domain is independent. A lock is a record of its own (no
  merging): the same owner may take a range again (re-lock, upgrade) and never conflicts with
  itself; unlock removes that owner's lock on exactly that range. Waiters are served in FIFO order,
  and a new request that conflicts with an older waiter queues behind it, so a stream of readers
  cannot starve a writer; an owner that already holds a lock in the domain is exempt (nested locks,
  e.g. self-heal's chunk locks inside its full-file lock, would otherwise deadlock).
- entrylk/fentrylk: names in a directory, or the whole directory (basename None) per domain.
- lk: POSIX record locks for applications (fcntl through FUSE): per-owner ranges that merge and
  split as the kernel's do, GETLK, and no queue ordering (POSIX grants whatever does not conflict).

Nothing survives a brick restart, as in GlusterFS: clients re-acquire after reconnecting. A client
that disconnects (Event.CLIENT_DISCONNECT) loses all its locks and its waiters fail with ENOTCONN.
Every operation costs O(locks on that inode in that space); re-examining waiters after a release
costs O(waiters x locks).
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mortar.core.context import call_context
from mortar.core.errors import FopError
from mortar.core.fops import (
    EntrylkCmd,
    Fd,
    Flock,
    LkReply,
    Loc,
    LockCmd,
    LockType,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.translator import Event, Translator

DUMP_KEY = "mortar.locks.dump"
#: exclusive end of a lock whose length is 0 ("to the end of the file"), beyond any file offset
OFFSET_INF = 1 << 64

Owner = tuple[str, bytes]  # (client connection id, lk_owner)


def _owner() -> Owner:
    ctx = call_context.get()
    return (ctx.client, ctx.lk_owner)


@dataclass(eq=False, slots=True)
class RangeLock:
    """A byte range [start, end) held (or wanted) by one owner; `end` OFFSET_INF means to EOF."""

    owner: Owner
    type: int
    start: int
    end: int
    pid: int = 0
    since: float = field(default_factory=time.time)

    def overlaps(self, other: RangeLock) -> bool:
        return self.start < other.end and other.start < self.end

    def describe(self) -> dict[str, Any]:
        return {
            "client": self.owner[0],
            "owner": self.owner[1].hex(),
            "type": LockType(self.type).name,
            "start": self.start,
            "length": 0 if self.end >= OFFSET_INF else self.end - self.start,
            "pid": self.pid,
            "since": self.since,
        }


@dataclass(eq=False, slots=True)
class EntryLock:
    """A name in a directory, or the whole directory when `name` is None."""

    owner: Owner
    type: int
    name: str | None
    pid: int = 0
    since: float = field(default_factory=time.time)

    def overlaps(self, other: EntryLock) -> bool:
        return self.name is None or other.name is None or self.name == other.name

    def describe(self) -> dict[str, Any]:
        return {
            "client": self.owner[0],
            "owner": self.owner[1].hex(),
            "type": LockType(self.type).name,
            "basename": self.name,
            "pid": self.pid,
            "since": self.since,
        }


L = TypeVar("L", RangeLock, EntryLock)


def _conflict(a: L, b: L) -> bool:
    """Two owners' locks on common ground, at least one of them exclusive."""
    return a.owner != b.owner and LockType.WRLCK in (a.type, b.type) and a.overlaps(b)


@dataclass(eq=False, slots=True)
class _Waiter(Generic[L]):
    lock: L
    future: asyncio.Future[None]
    granted: bool = False


class LockQueue(Generic[L]):
    """Granted locks and blocked requests of one lock space; locks stack (inodelk, entrylk)."""

    fifo = True

    def __init__(self) -> None:
        self.granted: list[L] = []
        self.waiters: deque[_Waiter[L]] = deque()

    def __bool__(self) -> bool:
        return bool(self.granted or self.waiters)

    def blocker(self, lock: L, ahead: Iterable[_Waiter[L]]) -> L | None:
        """The lock that keeps `lock` from being granted now: a held one, or an older waiter."""
        for held in self.granted:
            if _conflict(held, lock):
                return held
        if self.fifo and not any(held.owner == lock.owner for held in self.granted):
            for waiter in ahead:
                if _conflict(waiter.lock, lock):
                    return waiter.lock
        return None

    def apply(self, lock: L) -> None:
        self.granted.append(lock)

    def try_lock(self, lock: L) -> L | None:
        """Grant `lock` now if possible; otherwise return what blocks it."""
        blocking = self.blocker(lock, self.waiters)
        if blocking is None:
            self.apply(lock)
        return blocking

    async def lock(self, lock: L) -> None:
        """Grant `lock`, waiting as long as needed. Cancelling the caller leaves no trace."""
        if self.try_lock(lock) is None:
            return
        waiter: _Waiter[L] = _Waiter(lock, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.granted:  # granted in the same loop turn as the cancellation: give it back
                self.undo(lock)
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.exception()  # failed by drop_client meanwhile: nobody else will look
            self.regrant()
            raise

    def undo(self, lock: L) -> None:
        """Withdraw a lock granted to a waiter that was cancelled before it could use it."""
        self.granted = [held for held in self.granted if held is not lock]

    def release_one(self, owner: Owner, match: Iterable[L]) -> bool:
        """Remove the most recent of `match` (candidates held by `owner`); False if none."""
        for held in reversed(list(match)):
            if held.owner == owner:
                self.granted = [h for h in self.granted if h is not held]
                return True
        return False

    def regrant(self) -> int:
        """Grant, in arrival order, every waiter that nothing held and no older waiter blocks."""
        granted = 0
        still: deque[_Waiter[L]] = deque()
        for waiter in self.waiters:
            if waiter.future.done():  # its task was cancelled; it removes itself too
                continue
            if self.blocker(waiter.lock, still) is None:
                self.apply(waiter.lock)
                waiter.granted = True
                waiter.future.set_result(None)
                granted += 1
            else:
                still.append(waiter)
        self.waiters = still
        return granted

    def drop_client(self, client: str) -> int:
        """Forget every lock of `client` and fail its waiters; returns how many locks went."""
        before = len(self.granted)
        self.granted = [held for held in self.granted if held.owner[0] != client]
        kept: deque[_Waiter[L]] = deque()
        for waiter in self.waiters:
            if waiter.lock.owner[0] != client:
                kept.append(waiter)
            elif not waiter.future.done():
                waiter.future.set_exception(FopError(errno.ENOTCONN, "lock owner disconnected"))
        self.waiters = kept
        self.regrant()
        return before - len(self.granted)

    def fail_all(self, exc: FopError) -> None:
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        self.waiters.clear()

    def describe(self) -> dict[str, Any]:
        return {
            "granted": [held.describe() for held in self.granted],
            "blocked": [w.lock.describe() for w in self.waiters if not w.future.done()],
        }


class PosixQueue(LockQueue[RangeLock]):
    """POSIX record locks: one owner's ranges merge and split; grants ignore arrival order."""

    fifo = False

    def apply(self, lock: RangeLock) -> None:
        """Set (or, with UNLCK, clear) `lock`'s range for its owner, as fcntl(F_SETLK) does."""
        start, end = lock.start, lock.end
        kept: list[RangeLock] = []
        for held in self.granted:
            if held.owner != lock.owner:
                kept.append(held)
            elif (
                lock.type != LockType.UNLCK
                and held.type == lock.type
                and held.start <= end
                and start <= held.end
            ):
                start, end = min(start, held.start), max(end, held.end)  # same type, touching: merge
            elif held.end <= lock.start or held.start >= lock.end:
                kept.append(held)
            else:  # overlapped by a different type or an unlock: keep what sticks out
                if held.start < lock.start:
                    kept.append(
                        RangeLock(held.owner, held.type, held.start, lock.start, held.pid, held.since)
                    )
                if held.end > lock.end:
                    kept.append(RangeLock(held.owner, held.type, lock.end, held.end, held.pid, held.since))
        if lock.type != LockType.UNLCK:
            kept.append(RangeLock(lock.owner, lock.type, start, end, lock.pid, lock.since))
        kept.sort(key=lambda held: held.start)
        self.granted = kept

    def undo(self, lock: RangeLock) -> None:
        """Unlock the range: a merged grant cannot be told apart from what the owner held before,
        and a cancelled caller is a client going away, whose locks all go soon anyway."""
        self.apply(RangeLock(lock.owner, LockType.UNLCK, lock.start, lock.end))

    def regrant(self) -> int:
        """Repeat until stable: a granted conversion (write -> read) can free earlier waiters."""
        total = 0
        while granted := super().regrant():
            total += granted
        return total

    def release_owner(self, owner: Owner) -> int:
        before = len(self.granted)
        self.granted = [held for held in self.granted if held.owner != owner]
        return before - len(self.granted)


class _InodeLocks:
    """All lock spaces of one inode."""

    __slots__ = ("entrylk", "inodelk", "posix")

    def __init__(self) -> None:
        self.inodelk: dict[str, LockQueue[RangeLock]] = {}
        self.entrylk: dict[str, LockQueue[EntryLock]] = {}
        self.posix = PosixQueue()

    def __bool__(self) -> bool:
        return bool(self.inodelk or self.entrylk or self.posix)

    def queues(self) -> Iterator[LockQueue[RangeLock] | LockQueue[EntryLock]]:
        yield from self.inodelk.values()
        yield from self.entrylk.values()
        yield self.posix

    def prune(self) -> None:
        for table in (self.inodelk, self.entrylk):
            for domain in [d for d, q in table.items() if not q]:
                del table[domain]

    def describe(self) -> dict[str, Any]:
        return {
            "inodelk": {d: q.describe() for d, q in self.inodelk.items()},
            "entrylk": {d: q.describe() for d, q in self.entrylk.items()},
            "posix": self.posix.describe(),
        }


def _range(flock: Flock) -> tuple[int, int]:
    """[start, end) of a flock; a negative length counts back from start, as fcntl allows."""
    if flock.whence != 0:
        raise FopError(errno.EINVAL, "locks take absolute offsets (whence SEEK_SET)")
    start, length = flock.start, flock.length
    if length < 0:
        start, length = start + length, -length
    if start < 0:
        raise FopError(errno.EINVAL, f"lock range starts at a negative offset ({start})")
    return start, (start + length if length else OFFSET_INF)


def _check_type(lktype: int, allow_unlock: bool = True) -> None:
    allowed = (LockType.RDLCK, LockType.WRLCK, LockType.UNLCK) if allow_unlock else (0, 1)
    if lktype not in allowed:
        raise FopError(errno.EINVAL, f"bad lock type {lktype}")


class LocksTranslator(Translator):
    """In-memory inodelk, entrylk and POSIX locks for one brick."""

    type_name = "features/locks"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inodes: dict[Gfid, _InodeLocks] = {}

    # ---- helpers ----------------------------------------------------------------------------

    async def _gfid(self, loc: Loc) -> Gfid:
        if loc.gfid is not None:
            return loc.gfid
        if loc.pargfid is None or not loc.name:
            raise FopError(errno.EINVAL, f"cannot lock {loc.path!r}: no gfid and no parent/name")
        return (await self.children[0].lookup(Loc(loc.path, pargfid=loc.pargfid, name=loc.name))).iatt.gfid

    def _inode(self, gfid: Gfid) -> _InodeLocks:
        state = self._inodes.get(gfid)
        if state is None:
            state = self._inodes[gfid] = _InodeLocks()
        return state

    def _tidy(self, gfid: Gfid) -> None:
        state = self._inodes.get(gfid)
        if state is not None:
            state.prune()
            if not state:
                del self._inodes[gfid]

    def dump(self, gfid: Gfid) -> dict[str, Any]:
        """Every lock on `gfid`, granted and blocked, as plain data (the getxattr dump key)."""
        state = self._inodes.get(gfid)
        body = (
            state.describe()
            if state
            else {"inodelk": {}, "entrylk": {}, "posix": {"granted": [], "blocked": []}}
        )
        return {"gfid": gfid.canonical, **body}

    # ---- inodelk ----------------------------------------------------------------------------

    async def inodelk(self, domain: str, loc: Loc, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        return await self._inodelk(domain, await self._gfid(loc), cmd, flock)

    async def finodelk(self, domain: str, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        return await self._inodelk(domain, fd.gfid, cmd, flock)

    async def _inodelk(self, domain: str, gfid: Gfid, cmd: int, flock: Flock) -> XdataReply:
        if cmd not in (LockCmd.SETLK, LockCmd.SETLKW):
            raise FopError(errno.EINVAL, f"inodelk supports SETLK and SETLKW, not {cmd}")
        _check_type(flock.type)
        start, end = _range(flock)
        owner = _owner()
        state = self._inode(gfid)
        queue = state.inodelk.get(domain)
        if queue is None:
            queue = state.inodelk[domain] = LockQueue()
        try:
            if flock.type == LockType.UNLCK:
                exact = [h for h in queue.granted if h.start == start and h.end == end]
                if not queue.release_one(owner, exact):
                    inside = [
                        h for h in queue.granted if h.owner == owner and start <= h.start and h.end <= end
                    ]
                    if not inside:
                        raise FopError(errno.EINVAL, f"no lock of this owner on [{start}, {end}) in {domain}")
                    queue.granted = [h for h in queue.granted if h not in inside]
                queue.regrant()
                return XdataReply()
            lock = RangeLock(owner, flock.type, start, end, flock.pid)
            if cmd == LockCmd.SETLK:
                if queue.try_lock(lock) is not None:
                    raise FopError(errno.EAGAIN, f"inodelk [{start}, {end}) in {domain} is held")
            else:
                await queue.lock(lock)
            return XdataReply()
        finally:
            self._tidy(gfid)

    # ---- entrylk ----------------------------------------------------------------------------

    async def entrylk(
        self, domain: str, loc: Loc, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._entrylk(domain, await self._gfid(loc), basename, cmd, lktype)

    async def fentrylk(
        self, domain: str, fd: Fd, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self._entrylk(domain, fd.gfid, basename, cmd, lktype)

    async def _entrylk(
        self, domain: str, gfid: Gfid, basename: str | None, cmd: int, lktype: int
    ) -> XdataReply:
        if cmd not in (EntrylkCmd.LOCK, EntrylkCmd.LOCK_NB, EntrylkCmd.UNLOCK):
            raise FopError(errno.EINVAL, f"bad entrylk command {cmd}")
        name = basename or None
        owner = _owner()
        state = self._inode(gfid)
        queue = state.entrylk.get(domain)
        if queue is None:
            queue = state.entrylk[domain] = LockQueue()
        try:
            if cmd == EntrylkCmd.UNLOCK:
                if not queue.release_one(owner, [h for h in queue.granted if h.name == name]):
                    raise FopError(errno.EINVAL, f"no entry lock of this owner on {name!r} in {domain}")
                queue.regrant()
                return XdataReply()
            _check_type(lktype, allow_unlock=False)
            lock = EntryLock(owner, lktype, name, call_context.get().pid)
            if cmd == EntrylkCmd.LOCK_NB:
                if queue.try_lock(lock) is not None:
                    raise FopError(errno.EAGAIN, f"entry {name!r} in {domain} is locked")
            else:
                await queue.lock(lock)
            return XdataReply()
        finally:
            self._tidy(gfid)

    # ---- POSIX locks ------------------------------------------------------------------------

    async def lk(self, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> LkReply:
        if cmd not in (LockCmd.GETLK, LockCmd.SETLK, LockCmd.SETLKW):
            raise FopError(errno.EINVAL, f"bad lk command {cmd}")
        _check_type(flock.type)
        start, end = _range(flock)
        owner = _owner()
        lock = RangeLock(owner, flock.type, start, end, flock.pid)
        state = self._inode(fd.gfid)
        queue = state.posix
        try:
            if cmd == LockCmd.GETLK:
                found = None if flock.type == LockType.UNLCK else queue.blocker(lock, ())
                if found is None:
                    return LkReply(Flock(LockType.UNLCK, flock.start, flock.length, flock.pid, flock.owner))
                length = 0 if found.end >= OFFSET_INF else found.end - found.start
                return LkReply(Flock(found.type, found.start, length, found.pid, found.owner[1]))
            fd.ctx.setdefault(self, set()).add(owner)  # release(fd) drops these owners' locks
            if flock.type == LockType.UNLCK:
                queue.apply(lock)
            elif cmd == LockCmd.SETLK:
                if queue.try_lock(lock) is not None:
                    raise FopError(errno.EAGAIN, f"range [{start}, {end}) is locked")
            else:
                await queue.lock(lock)
            if flock.type != LockType.WRLCK:  # an unlock or a write -> read conversion frees others
                queue.regrant()
            return LkReply(Flock(flock.type, flock.start, flock.length, flock.pid, flock.owner))
        finally:
            self._tidy(fd.gfid)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        """Closing a file drops the POSIX locks its users took on that inode (POSIX close rule)."""
        owners: set[Owner] = fd.ctx.pop(self, set())
        state = self._inodes.get(fd.gfid)
        if state is not None and owners:
            dropped = sum(state.posix.release_owner(owner) for owner in owners)
            if dropped:
                self.log.debug("release of %s dropped %d posix locks", fd.gfid, dropped)
                state.posix.regrant()
            self._tidy(fd.gfid)
        return await self.children[0].release(fd, xdata)

    # ---- dump -------------------------------------------------------------------------------

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        if name == DUMP_KEY:
            gfid = await self._gfid(loc)
            return XattrReply({DUMP_KEY: json.dumps(self.dump(gfid)).encode()})
        return await self.children[0].getxattr(loc, name, xdata)

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        if name == DUMP_KEY:
            return XattrReply({DUMP_KEY: json.dumps(self.dump(fd.gfid)).encode()})
        return await self.children[0].fgetxattr(fd, name, xdata)

    # ---- events and lifecycle -------------------------------------------------------------

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        if event is Event.CLIENT_DISCONNECT and isinstance(data, str):
            self.release_client(data)
        super().notify(event, source, data)

    def release_client(self, client: str) -> int:
        """Drop every lock `client` holds, fail its waiters and wake those that can now proceed."""
        dropped = 0
        for gfid, state in list(self._inodes.items()):
            for queue in state.queues():
                dropped += queue.drop_client(client)
            self._tidy(gfid)
        if dropped:
            self.log.info("client %s went away: released %d locks", client, dropped)
        return dropped

    async def fini(self) -> None:
        exc = FopError(errno.ENOTCONN, "brick is shutting down")
        for state in self._inodes.values():
            for queue in state.queues():
                queue.fail_all(exc)
        self._inodes.clear()
