"""Write transactions: lock, pre-op, the fop on every child, post-op, unlock.

- data (writev, truncate, fallocate, discard, zerofill...): inodelk on the range in `<name>`; with
  eager-lock, one full-file lock per inode is kept across this client's consecutive writes and their
  changelog work is batched: the first write of a batch raises `dirty`, the batch's end (idle for
  `post-op-delay`, fsync, flush, release, a child coming back, another client waiting) lowers it.
- metadata (setattr, setxattr, removexattr, xattrop): inodelk in `<name>:metadata`.
- entry (create, mknod, mkdir, symlink, link, unlink, rmdir, rename): entrylk on each (parent, name),
  pre/post-op on the parents.

A child that misses a change is recorded (+1 on its pending counter, on the children that made the
change) before the fop is acknowledged, so no acknowledged write depends on a counter not yet
written. Locks are taken child by child in index order, so clients never deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import Loc
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, DIRTY_KEY, ENTRY, METADATA, one
from mortar.xlators.cluster.afr.state import (
    OFFSET_MAX,
    RangeSerial,
    acting_as,
    gather_map,
    identity,
    new_owner,
    pick_error,
)
from mortar.xlators.features.locks import DUMP_KEY

_T = TypeVar("_T")
#: after another client was seen waiting for a file's lock, this client takes per-write range locks
#: on it for this long instead of the eager full-file lock
CONTENTION_HOLDOFF = 5.0


@dataclass(eq=False)
class EagerLock:
    """A full-file data lock this client keeps across consecutive writes to one inode."""

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
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None
    watcher: asyncio.Task[None] | None = None
    #: takes the lock on the children; a task of its own, so no one joiner's cancellation can
    #: leave the shared lock half taken or taken by an owner nobody remembers
    acquiring: asyncio.Task[None] | None = None
    #: why the acquisition failed (`failed`), raised to every transaction that waited for it
    error: BaseException | None = None
    release_task: asyncio.Task[None] | None = None


@dataclass(slots=True)
class Outcome(Generic[_T]):
    """Which children made the change and what they answered."""

    replies: dict[int, _T]
    succeeded: set[int]
    errors: dict[int, FopError]


class Transactions:
    """The transaction engine of one replicate translator."""

    def __init__(self, afr: ReplicateBase) -> None:
        self.afr = afr
        self.eager: dict[Gfid, EagerLock] = {}
        self._contended: dict[Gfid, float] = {}
        self._serials: dict[Gfid, tuple[RangeSerial, list[int]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- common steps ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serialised(self, gfid: Gfid, start: int, end: int) -> AsyncIterator[None]:
        serial, users = self._serials.setdefault(gfid, (RangeSerial(), [0]))
        users[0] += 1
        try:
            async with serial.hold(start, end):
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                self._serials.pop(gfid, None)

    async def _wind(
        self, participants: Iterable[int], call: Callable[[int], Awaitable[_T]], skip_arbiter: bool
    ) -> Outcome[_T]:
        """The fop on every participant at once; with `skip_arbiter`, the arbiter counts as done
        without receiving it (data fops: it stores no data)."""
        afr = self.afr
        calls = {i: call(i) for i in participants if not (skip_arbiter and i == afr.arbiter)}
        replies, errors = await gather_map(calls)
        succeeded = set(replies)
        if skip_arbiter and afr.arbiter is not None and afr.arbiter in participants and replies:
            succeeded.add(afr.arbiter)
        return Outcome(replies, succeeded, errors)

    def _check_data_copies(self, what: str, readable: frozenset[int], split: bool) -> None:
        afr = self.afr
        if split:
            raise FopError(errno.EIO, f"{afr.name}: {what}: the file is in data split-brain")
        if not any(afr.is_up(i) for i in readable):
            raise FopError(
                errno.ENOTCONN,
                f"{afr.name}: {what} refused: no up child has a good copy of the data "
                "(writing now would leave no trustworthy replica)",
            )

    def _raise_if_short(self, what: str, recorded: set[int], outcome: Outcome[_T]) -> None:
        afr = self.afr
        data_ok = [i for i in outcome.replies if i != afr.arbiter] or list(outcome.replies)
        if not data_ok:
            raise pick_error(outcome.errors.values(), f"{afr.name}: {what} reached no child")
        if not recorded:
            raise FopError(errno.EIO, f"{afr.name}: {what}: the change could not be recorded on any child")
        if not afr.has_quorum(recorded):
            raise FopError(
                errno.ENOTCONN,
                f"{afr.name}: {what} succeeded on {len(recorded)} of {afr.n} children only: quorum lost "
                "(the children that missed it are marked for heal)",
            )

    async def _post_op(self, loc: Loc, kind: int, pre_done: Iterable[int], succeeded: set[int]) -> set[int]:
        """Lower `dirty` where the change was made (everywhere if it was made nowhere) and record
        the children that missed it on those that made it; returns the children whose record was
        written (all that succeeded when there was nothing to record)."""
        afr = self.afr
        failed = set(range(afr.n)) - succeeded
        deltas: dict[int, dict[str, bytes]] = {}
        for i in pre_done:
            if i in succeeded or not succeeded:  # a failed child keeps dirty: it is accused anyway
                deltas[i] = {DIRTY_KEY: one(kind, -1)}
        if succeeded and failed:
            for i in succeeded:
                deltas.setdefault(i, {}).update({afr.keys[j]: one(kind) for j in sorted(failed)})
        ok, _ = await afr.xattrop_on(deltas, loc)
        return set(ok) & succeeded if succeeded and failed else set(succeeded)

    # ---- metadata and non-eager data -------------------------------------------------------------

    async def inode(
        self,
        kind: int,
        gfid: Gfid,
        what: str,
        call: Callable[[int], Awaitable[_T]],
        start: int = 0,
        length: int = 0,
        skip_arbiter: bool = False,
    ) -> Outcome[_T]:
        """One locked transaction on an inode: data on a range, or metadata (whole-inode lock)."""
        afr = self.afr
        up = afr.up_indices()
        afr.check_quorum(up, what)
        st = await afr.inode_state(gfid)
        if kind == DATA:
            self._check_data_copies(what, st.readable.get(DATA, frozenset()), DATA in st.split)
        elif METADATA in st.split:
            raise FopError(errno.EIO, f"{afr.name}: {what}: the object is in metadata split-brain")
        domain = afr.domain if kind == DATA else afr.meta_domain
        who = identity(new_owner())
        loc = gfid_loc(gfid)
        locked = await afr.inodelk_all(up, domain, gfid, start, length, who)
        try:
            afr.check_quorum(locked, what)
            pre, _ = await afr.xattrop_on({i: {DIRTY_KEY: one(kind)} for i in locked}, loc)
            participants = [i for i in locked if i in pre]
            afr.check_quorum(participants, what)
            outcome = await self._wind(participants, call, skip_arbiter)
            recorded = await self._post_op(loc, kind, pre, outcome.succeeded)
            afr.mark_failed(gfid, kind, set(range(afr.n)) - outcome.succeeded)
            self._raise_if_short(what, recorded, outcome)
            return outcome
        finally:
            await afr.inodelk_release(locked, domain, gfid, start, length, who)

    # ---- data, with eager locking ----------------------------------------------------------------

    async def data(
        self, gfid: Gfid, what: str, start: int, end: int, call: Callable[[int], Awaitable[_T]]
    ) -> Outcome[_T]:
        """A data transaction over [start, end) (end OFFSET_MAX: to the end of the file)."""
        afr = self.afr
        async with self._serialised(gfid, start, end):
            if not self._use_eager(gfid):
                length = 0 if end >= OFFSET_MAX else end - start
                return await self.inode(DATA, gfid, what, call, start, length, skip_arbiter=True)
            afr.check_quorum(afr.up_indices(), what)
            st = await afr.inode_state(gfid)
            self._check_data_copies(what, st.readable.get(DATA, frozenset()), DATA in st.split)
            lock = await self._join(gfid)
            try:
                return await self._in_batch(lock, what, call)
            finally:
                self._leave(lock)

    def _use_eager(self, gfid: Gfid) -> bool:
        if not self.afr.opts["eager-lock"]:
            return False
        seen = self._contended.get(gfid)
        if seen is None:
            return True
        if asyncio.get_running_loop().time() - seen > CONTENTION_HOLDOFF:
            del self._contended[gfid]
            return True
        return False

    async def _in_batch(
        self, lock: EagerLock, what: str, call: Callable[[int], Awaitable[_T]]
    ) -> Outcome[_T]:
        afr = self.afr
        loc = gfid_loc(lock.gfid)
        participants = [i for i in lock.locked if afr.is_up(i)]
        afr.check_quorum(participants, what)
        if any(i not in lock.dirty_on for i in participants):
            async with lock.pre_op:
                fresh = [i for i in participants if i not in lock.dirty_on]
                if fresh:
                    pre, bad = await afr.xattrop_on({i: {DIRTY_KEY: one(DATA)} for i in fresh}, loc)
                    lock.dirty_on.update(pre)
                    participants = [i for i in participants if i not in bad]
            afr.check_quorum(participants, what)
        outcome = await self._wind(participants, call, skip_arbiter=True)
        failed = set(range(afr.n)) - outcome.succeeded
        recorded = set(outcome.succeeded)
        if outcome.succeeded and failed:
            deltas = {
                i: {afr.keys[j]: one(DATA) for j in sorted(failed - lock.blamed.get(i, set()))}
                for i in outcome.succeeded
            }
            ok, bad = await afr.xattrop_on(deltas, loc)
            for i in ok:
                lock.blamed.setdefault(i, set()).update(failed)
            recorded -= set(bad)
        afr.mark_failed(lock.gfid, DATA, failed)
        self._raise_if_short(what, recorded, outcome)
        return outcome

    async def _join(self, gfid: Gfid) -> EagerLock:
        """Enter the inode's batch: the one eager lock this client holds on it, whichever fd the
        write comes from (taken if there is none; waited for while it is taken or given back)."""
        while True:
            lock = self.eager.get(gfid)
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

    def _acquire(self, gfid: Gfid) -> EagerLock:
        """Register a new eager lock for `gfid` at once (later writers join it) and take it on the
        children in a task of its own."""
        lock = EagerLock(gfid, identity(new_owner()))
        self.eager[gfid] = lock
        task = asyncio.get_running_loop().create_task(self._take(lock))
        lock.acquiring = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return lock

    async def _take(self, lock: EagerLock) -> None:
        afr = self.afr
        try:
            lock.locked = await afr.inodelk_all(afr.up_indices(), afr.domain, lock.gfid, 0, 0, lock.who)
        except BaseException as exc:
            lock.failed = True
            lock.error = exc
            lock.released.set()
            if self.eager.get(lock.gfid) is lock:
                del self.eager[lock.gfid]
            if not isinstance(exc, Exception):
                raise
            return  # the waiting transactions raise it (see _failure)
        finally:
            lock.ready.set()
        afr.log.debug("eager lock on %s taken on %s", lock.gfid, lock.locked)
        if not lock.releasing:
            lock.watcher = asyncio.get_running_loop().create_task(self._watch(lock))
            # idle until a waiting transaction joins (which stops the timer): a lock whose writers
            # were all cancelled meanwhile is still given back
            self._arm_idle(lock)

    def _failure(self, lock: EagerLock) -> FopError:
        """A fresh error for one transaction that waited for a lock whose acquisition failed."""
        exc = lock.error
        if isinstance(exc, FopError):
            return FopError(exc.errno, exc.message)
        if isinstance(exc, asyncio.CancelledError):
            return FopError(errno.ENOTCONN, f"{self.afr.name}: locking {lock.gfid} was abandoned (shutdown)")
        return FopError(errno.EIO, f"{self.afr.name}: locking {lock.gfid} failed: {exc!r}")

    def _leave(self, lock: EagerLock) -> None:
        lock.active -= 1
        if lock.active:
            return
        lock.idle.set()
        if not lock.releasing:
            self._arm_idle(lock)

    def _arm_idle(self, lock: EagerLock) -> None:
        if lock.timer is not None:
            lock.timer.cancel()
        delay = self.afr.opts["post-op-delay"]
        lock.timer = asyncio.get_running_loop().call_later(delay, self.release_soon, lock, "idle")

    def release_soon(self, lock: EagerLock, reason: str) -> asyncio.Task[None]:
        """End the batch: once the lock is held and the writes in flight finish, lower dirty and
        unlock. Safe at any point of the lock's life: a lock still being taken is given back as soon
        as it is held (it must never leave `eager` while some child may still grant it)."""
        if lock.release_task is not None:
            return lock.release_task
        lock.releasing = True
        if lock.timer is not None:
            lock.timer.cancel()
            lock.timer = None
        task = asyncio.get_running_loop().create_task(self._release(lock, reason))
        lock.release_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _release(self, lock: EagerLock, reason: str) -> None:
        afr = self.afr
        try:
            await lock.ready.wait()
            if lock.failed:
                return
            if lock.active:
                await lock.idle.wait()
            if lock.watcher is not None and lock.watcher is not asyncio.current_task():
                lock.watcher.cancel()
            loc = gfid_loc(lock.gfid)
            with acting_as(lock.who):
                await afr.xattrop_on(
                    {i: {DIRTY_KEY: one(DATA, -1)} for i in lock.dirty_on if afr.is_up(i)}, loc
                )
            await afr.inodelk_release(lock.locked, afr.domain, lock.gfid, 0, 0, lock.who)
            afr.log.debug("eager lock on %s released (%s)", lock.gfid, reason)
        finally:
            if self.eager.get(lock.gfid) is lock:
                del self.eager[lock.gfid]
            lock.released.set()

    async def _watch(self, lock: EagerLock) -> None:
        """Give the lock up when another owner waits for it on any child (the brick's lock dump
        lists waiters; GlusterFS learns the same from a contention upcall)."""
        afr = self.afr
        period = min(0.5, max(0.05, afr.opts["post-op-delay"] / 2))
        loc = gfid_loc(lock.gfid)
        while not lock.releasing:
            await asyncio.sleep(period)
            held = [i for i in lock.locked if afr.is_up(i)]
            if not held or lock.releasing:
                return
            with acting_as(lock.who):
                dumps, _ = await gather_map({i: afr.children[i].getxattr(loc, DUMP_KEY) for i in held})
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
            return bool(dump.get("inodelk", {}).get(self.afr.domain, {}).get("blocked"))
        except (ValueError, AttributeError):
            return False

    async def flush(self, gfid: Gfid) -> None:
        """End this inode's batch now (fsync, flush, release need the changelog settled). The batch
        is shared by every fd of the inode: it ends once the writes in flight from all of them are
        done. A lock still being taken covers no write yet (the batch before it was settled before
        it was registered), so there is nothing to settle and it is left to the writers waiting
        for it."""
        lock = self.eager.get(gfid)
        if lock is not None and lock.ready.is_set():
            await asyncio.shield(self.release_soon(lock, "flush"))

    def child_changed(self, i: int, up: bool) -> None:
        """A child that comes back must join the next batch (and lost, with its connection, any
        lock it held for this client): end the current batches."""
        if up:
            for lock in list(self.eager.values()):
                if not lock.failed:
                    self.release_soon(lock, f"child {i} is back")

    async def close(self) -> None:
        for lock in list(self.eager.values()):
            if lock.failed:
                continue
            if not lock.ready.is_set() and lock.acquiring is not None:
                lock.acquiring.cancel()  # inodelk_all gives back what it took
            else:
                self.release_soon(lock, "shutdown")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- entries ---------------------------------------------------------------------------------

    async def entry(
        self,
        what: str,
        targets: list[tuple[Gfid, str]],
        call: Callable[[int], Awaitable[_T]],
        validate: Callable[[Outcome[_T]], set[int]] | None = None,
    ) -> Outcome[_T]:
        """A namespace change under entry locks on `targets` (parent gfid, name), recorded in the
        parents' entry counters. `validate` may name children whose success is to be treated as a
        failure (a reply that disagrees with the others)."""
        afr = self.afr
        up = afr.up_indices()
        afr.check_quorum(up, what)
        who = identity(new_owner())
        lock_targets: list[tuple[Gfid, str | None]] = [(g, n) for g, n in targets]
        locked = await afr.entrylk_all(up, lock_targets, who)
        try:
            afr.check_quorum(locked, what)
            parents = list(dict.fromkeys(g for g, _ in targets))
            pres = []
            for parent in parents:
                pre, _ = await afr.xattrop_on({i: {DIRTY_KEY: one(ENTRY)} for i in locked}, gfid_loc(parent))
                pres.append(set(pre))
            participants = [i for i in locked if all(i in p for p in pres)]
            afr.check_quorum(participants, what)
            outcome = await self._wind(participants, call, skip_arbiter=False)
            if validate is not None and outcome.succeeded:
                for i in validate(outcome):
                    outcome.succeeded.discard(i)
                    outcome.replies.pop(i, None)
                    outcome.errors[i] = FopError(errno.EIO, f"{what}: reply of child {i} disagrees")
            recorded = set(outcome.succeeded)
            for parent, raised in zip(parents, pres, strict=True):
                recorded &= await self._post_op(gfid_loc(parent), ENTRY, raised, outcome.succeeded)
                afr.mark_failed(parent, ENTRY, set(range(afr.n)) - outcome.succeeded)
            if outcome.succeeded and len(outcome.succeeded) < afr.n:
                afr.log.info(
                    "%s done on %s only; %s marked for entry heal",
                    what,
                    sorted(outcome.succeeded),
                    sorted(set(range(afr.n)) - outcome.succeeded),
                )
            self._raise_if_short(what, recorded, outcome)
            return outcome
        finally:
            await afr.entrylk_release(locked, lock_targets, who)
