"""The life of an eager lock: one lock this client keeps on an inode across consecutive changes.

Both eager locks of replicate follow it: the data lock (a full-file inodelk kept across writes,
transaction.py) and the entry lock (a whole-directory entrylk kept across namespace changes,
entry_lock.py). A lock is registered at once and taken in a task of its own, so that later
transactions join it and no one joiner's cancellation leaves it half taken; the first transaction
of a batch raises `dirty` on the inode, and the batch ends (dirty lowered, lock given back) when it
has been idle for `post-op-delay`, when another owner waits for the lock on a child (seen in the
brick's lock dump; GlusterFS learns the same from a contention upcall), when a child comes back,
or on shutdown. Subclasses say how the lock is taken and given back and what it covers.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DIRTY_KEY, one
from mortar.xlators.cluster.afr.state import acting_as, gather_map, identity, new_owner
from mortar.xlators.features.locks import DUMP_KEY

#: after another owner was seen waiting for an inode's lock, this client locks per change there
#: (per-write ranges, per-name entries) for this long instead of keeping the eager lock
CONTENTION_HOLDOFF = 5.0


@dataclass(eq=False)
class HeldLock:
    """One eager lock of this client on `gfid`, and the changelog state of its batch."""

    gfid: Gfid
    who: CallContext
    locked: list[int] = field(default_factory=list)
    #: children where this batch raised `dirty` (lowered at the end of the batch)
    dirty_on: set[int] = field(default_factory=set)
    #: held while raising `dirty`: transactions entering the batch together raise it once, not once
    #: each (the batch's end lowers it once)
    pre_op: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: child -> the children it has recorded, in this batch, as having missed a change
    blamed: dict[int, set[int]] = field(default_factory=dict)
    active: int = 0
    releasing: bool = False
    failed: bool = False
    #: why the acquisition failed (`failed`), raised to every transaction that waited for it
    error: BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    watcher: asyncio.Task[None] | None = None
    #: takes the lock on the children; a task of its own, so no one joiner's cancellation can
    #: leave the shared lock half taken or taken by an owner nobody remembers
    acquiring: asyncio.Task[None] | None = None
    release_task: asyncio.Task[None] | None = None


_L = TypeVar("_L", bound=HeldLock)


class HeldLocks(Generic[_L]):
    """The eager locks of one kind of one replicate translator, by inode. Subclasses set the class
    attributes and implement `_lock` and `_unlock`."""

    #: the per-lock state class created for each new lock
    lock_type: type[_L]
    #: the changelog kind whose `dirty` the batch raises and lowers (DATA, ENTRY)
    kind: ClassVar[int]
    #: the section of the brick's lock dump listing this kind's waiters ("inodelk", "entrylk")
    dump_section: ClassVar[str]
    #: what the lock is called in log lines and errors
    lock_name: ClassVar[str]
    locking: ClassVar[str]

    def __init__(self, afr: ReplicateBase) -> None:
        self.afr = afr
        self.held: dict[Gfid, _L] = {}
        self._contended: dict[Gfid, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- hooks -------------------------------------------------------------------------------------

    async def _lock(self, lock: _L) -> list[int]:
        """Take the lock on the up children; returns where it is held."""
        raise NotImplementedError

    async def _unlock(self, lock: _L) -> None:
        """Give the lock back on the children that hold it."""
        raise NotImplementedError

    def _watched(self, held: list[int]) -> list[int]:
        """The children whose lock dump is polled for waiters."""
        return held

    # ---- in a batch --------------------------------------------------------------------------------

    def _contended_lately(self, gfid: Gfid, now: float) -> bool:
        """Whether another owner was seen waiting for `gfid`'s lock within CONTENTION_HOLDOFF."""
        seen = self._contended.get(gfid)
        if seen is None:
            return False
        if now - seen <= CONTENTION_HOLDOFF:
            return True
        del self._contended[gfid]
        return False

    async def _raise_dirty(self, lock: _L, participants: list[int]) -> tuple[list[int], dict[int, FopError]]:
        """Raise `dirty` where this batch has not yet; returns the participants that remain and
        the children where raising it failed."""
        if all(i in lock.dirty_on for i in participants):
            return participants, {}
        async with lock.pre_op:
            fresh = [i for i in participants if i not in lock.dirty_on]
            if fresh:
                pre, bad = await self.afr.xattrop_on(
                    {i: {DIRTY_KEY: one(self.kind)} for i in fresh}, gfid_loc(lock.gfid)
                )
                lock.dirty_on.update(pre)
                return [i for i in participants if i not in bad], bad
        return participants, {}

    async def _blame(self, lock: _L, succeeded: set[int], failed: set[int]) -> set[int]:
        """Record `failed` on the children that made the change (once a batch); returns where that
        failed."""
        afr = self.afr
        deltas = {
            i: {afr.keys[j]: one(self.kind) for j in sorted(failed - lock.blamed.get(i, set()))}
            for i in succeeded
        }
        ok, bad = await afr.xattrop_on(deltas, gfid_loc(lock.gfid))
        for i in set(ok) | {i for i, d in deltas.items() if not d}:
            lock.blamed.setdefault(i, set()).update(failed)
        return set(bad)

    # ---- the lock's life ---------------------------------------------------------------------------

    async def _join(self, gfid: Gfid) -> _L:
        """Enter the inode's batch: the one lock of this kind this client holds on it (taken if
        there is none; waited for while it is taken or given back)."""
        while True:
            lock = self.held.get(gfid)
            if lock is None:
                lock = self._acquire(gfid)
            if not lock.ready.is_set():
                await lock.ready.wait()
            if lock.failed:
                raise self._failure(lock)
            if lock.releasing:
                await lock.released.wait()
                continue
            lock.active += 1
            lock.idle.clear()
            if lock.timer is not None:
                lock.timer.cancel()
                lock.timer = None
            return lock

    def _acquire(self, gfid: Gfid) -> _L:
        """Register a new lock for `gfid` at once (later transactions join it) and take it on the
        children in a task of its own."""
        lock = self.lock_type(gfid, identity(new_owner()))
        self.held[gfid] = lock
        lock.acquiring = self._spawn(self._take(lock))
        return lock

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _take(self, lock: _L) -> None:
        try:
            lock.locked = await self._lock(lock)
        except BaseException as exc:
            lock.failed = True
            lock.error = exc
            lock.released.set()
            if self.held.get(lock.gfid) is lock:
                del self.held[lock.gfid]
            if not isinstance(exc, Exception):
                raise
            return  # the waiting transactions raise it (see _failure)
        finally:
            lock.ready.set()
        self.afr.log.debug("%s on %s taken on %s", self.lock_name, lock.gfid, lock.locked)
        if not lock.releasing:
            lock.watcher = self._spawn(self._watch(lock))
            # idle until a waiting transaction joins (which stops the timer): a lock whose
            # transactions were all cancelled meanwhile is still given back
            self._arm_idle(lock)

    def _failure(self, lock: _L) -> FopError:
        """A fresh error for one transaction that waited for a lock whose acquisition failed."""
        exc = lock.error
        if isinstance(exc, FopError):
            return FopError(exc.errno, exc.message)
        if isinstance(exc, asyncio.CancelledError):
            return FopError(
                errno.ENOTCONN, f"{self.afr.name}: {self.locking} {lock.gfid} was abandoned (shutdown)"
            )
        return FopError(errno.EIO, f"{self.afr.name}: {self.locking} {lock.gfid} failed: {exc!r}")

    def _leave(self, lock: _L) -> None:
        lock.active -= 1
        if lock.active:
            return
        lock.idle.set()
        if not lock.releasing:
            self._arm_idle(lock)

    def _arm_idle(self, lock: _L) -> None:
        if lock.timer is not None:
            lock.timer.cancel()
        delay = self.afr.opts["post-op-delay"]
        lock.timer = asyncio.get_running_loop().call_later(delay, self.release_soon, lock, "idle")

    def release_soon(self, lock: _L, reason: str) -> asyncio.Task[None]:
        """End the batch: once the lock is held and the changes in flight finish, lower dirty and
        unlock. Safe at any point of the lock's life: a lock still being taken is given back as soon
        as it is held (it must never leave `held` while some child may still grant it)."""
        if lock.release_task is not None:
            return lock.release_task
        lock.releasing = True
        if lock.timer is not None:
            lock.timer.cancel()
            lock.timer = None
        lock.release_task = self._spawn(self._release(lock, reason))
        return lock.release_task

    async def _release(self, lock: _L, reason: str) -> None:
        afr = self.afr
        try:
            await lock.ready.wait()
            if lock.failed:
                return
            if lock.active:
                await lock.idle.wait()
            if lock.watcher is not None and lock.watcher is not asyncio.current_task():
                lock.watcher.cancel()
            with acting_as(lock.who):
                _, bad = await afr.xattrop_on(
                    {i: {DIRTY_KEY: one(self.kind, -1)} for i in lock.dirty_on if afr.is_up(i)},
                    gfid_loc(lock.gfid),
                )
            if bad:  # the child keeps `dirty`: heal looks at the inode, nothing is lost
                afr.log.info("%s on %s: dirty left on %s", self.lock_name, lock.gfid, sorted(bad))
            await self._unlock(lock)
            afr.log.debug("%s on %s released (%s)", self.lock_name, lock.gfid, reason)
        finally:
            if self.held.get(lock.gfid) is lock:
                del self.held[lock.gfid]
            lock.released.set()

    async def _watch(self, lock: _L) -> None:
        """Give the lock up when another owner waits for it on any child."""
        afr = self.afr
        period = min(0.5, max(0.05, afr.opts["post-op-delay"] / 2))
        loc = gfid_loc(lock.gfid)
        while not lock.releasing:
            await asyncio.sleep(period)
            held = [i for i in lock.locked if afr.is_up(i)]
            if not held or lock.releasing:
                return
            polled = self._watched(held)
            with acting_as(lock.who):
                dumps, _ = await gather_map({i: afr.children[i].getxattr(loc, DUMP_KEY) for i in polled})
            if any(self._has_waiters(reply.xattrs.get(DUMP_KEY)) for reply in dumps.values()):
                now = asyncio.get_running_loop().time()
                for gfid in [g for g, t in self._contended.items() if now - t > CONTENTION_HOLDOFF]:
                    del self._contended[gfid]
                self._contended[lock.gfid] = now
                self.release_soon(lock, "another owner is waiting")
                return

    def _has_waiters(self, raw: bytes | None) -> bool:
        try:
            dump = json.loads(bytes(raw or b"{}"))
            return bool(dump.get(self.dump_section, {}).get(self.afr.domain, {}).get("blocked"))
        except (ValueError, AttributeError):
            return False

    def child_changed(self, i: int, up: bool) -> None:
        """A child that comes back must join the next batch (and lost, with its connection, any
        lock it held for this client): end the current batches."""
        if up:
            for lock in list(self.held.values()):
                if not lock.failed:
                    self.release_soon(lock, f"child {i} is back")

    async def close(self) -> None:
        for lock in list(self.held.values()):
            if lock.failed:
                continue
            if not lock.ready.is_set() and lock.acquiring is not None:
                lock.acquiring.cancel()  # the lock call gives back what it took
            else:
                self.release_soon(lock, "shutdown")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
