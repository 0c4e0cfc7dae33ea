"""Write transactions: lock, pre-op, the fop on every child, post-op, unlock.

- data (writev, truncate, fallocate, discard, zerofill...): inodelk on the range in `<name>`; with
  eager-lock, one full-file lock per inode is kept across this client's consecutive writes and their
  changelog work is batched: the first write of a batch raises `dirty`, the batch's end (idle for
  `post-op-delay`, fsync, flush, release, a child coming back, another client waiting) lowers it.
- metadata (setattr, setxattr, removexattr, xattrop): inodelk in `<name>:metadata`.
- entry (create, mknod, mkdir, symlink, link, unlink, rmdir, rename): entrylk on each (parent, name),
  pre/post-op on the parents; with eager-lock, changes in one directory share one directory lock and
  one dirty marking (entry_lock.py).

A child that misses a change is recorded (+1 on its pending counter, on the children that made the
change) before the fop is acknowledged, so no acknowledged write depends on a counter not yet
written. Locks are taken child by child in index order, so clients never deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import Loc
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, DIRTY_KEY, ENTRY, METADATA, one
from mortar.xlators.cluster.afr.entry_lock import EntryLocks
from mortar.xlators.cluster.afr.held_lock import CONTENTION_HOLDOFF, HeldLock, HeldLocks
from mortar.xlators.cluster.afr.state import (
    MISSING_ERRNOS,
    OFFSET_MAX,
    RangeSerial,
    gather_map,
    identity,
    new_owner,
    pick_error,
)

__all__ = ["CONTENTION_HOLDOFF", "EagerLock", "Outcome", "Transactions"]

_T = TypeVar("_T")


@dataclass(eq=False)
class EagerLock(HeldLock):
    """A full-file data lock this client keeps across consecutive writes to one inode."""


@dataclass(slots=True)
class Outcome(Generic[_T]):
    """Which children made the change and what they answered."""

    replies: dict[int, _T]
    succeeded: set[int]
    errors: dict[int, FopError]


class Transactions(HeldLocks[EagerLock]):
    """The transaction engine of one replicate translator; the eager data locks are its own
    (HeldLocks), the eager entry locks are `entries`."""

    lock_type = EagerLock
    kind = DATA
    dump_section = "inodelk"
    lock_name = "eager lock"
    locking = "locking"

    def __init__(self, afr: ReplicateBase) -> None:
        super().__init__(afr)
        self._serials: dict[Gfid, tuple[RangeSerial, list[int]]] = {}
        self.entries = EntryLocks(afr)

    @property
    def eager(self) -> dict[Gfid, EagerLock]:
        """The eager data locks this client holds, by inode."""
        return self.held

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

    def _raise_if_gone(
        self, what: str, gfid: Gfid, participants: list[int], bad: dict[int, FopError]
    ) -> None:
        """No child took the pre-op because none has the inode any more (removed, or unlinked while
        open: a brick resolves a gfid only while the file has a name): ESTALE, not a lost quorum,
        so that the caller looks for the file again."""
        if not participants and bad and all(e.errno in MISSING_ERRNOS for e in bad.values()):
            raise FopError(errno.ESTALE, f"{self.afr.name}: {what}: {gfid} is on no child any more")

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
            pre, bad = await afr.xattrop_on({i: {DIRTY_KEY: one(kind)} for i in locked}, loc)
            participants = [i for i in locked if i in pre]
            self._raise_if_gone(what, gfid, participants, bad)
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
        return not self._contended_lately(gfid, asyncio.get_running_loop().time())

    async def _in_batch(
        self, lock: EagerLock, what: str, call: Callable[[int], Awaitable[_T]]
    ) -> Outcome[_T]:
        afr = self.afr
        participants = [i for i in lock.locked if afr.is_up(i)]
        afr.check_quorum(participants, what)
        participants, bad = await self._raise_dirty(lock, participants)
        self._raise_if_gone(what, lock.gfid, participants, bad)
        afr.check_quorum(participants, what)
        outcome = await self._wind(participants, call, skip_arbiter=True)
        failed = set(range(afr.n)) - outcome.succeeded
        recorded = set(outcome.succeeded)
        if outcome.succeeded and failed:
            recorded -= await self._blame(lock, outcome.succeeded, failed)
        afr.mark_failed(lock.gfid, DATA, failed)
        self._raise_if_short(what, recorded, outcome)
        return outcome

    async def _lock(self, lock: EagerLock) -> list[int]:
        afr = self.afr
        return await afr.inodelk_all(afr.up_indices(), afr.domain, lock.gfid, 0, 0, lock.who)

    async def _unlock(self, lock: EagerLock) -> None:
        await self.afr.inodelk_release(lock.locked, self.afr.domain, lock.gfid, 0, 0, lock.who)

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
        super().child_changed(i, up)
        self.entries.child_changed(i, up)

    async def close(self) -> None:
        await self.entries.close()
        await super().close()

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
        failure (a reply that disagrees with the others). Changes in one directory run in this
        client's eager entry batch on it (see entry_lock.py) unless another owner contends."""
        afr = self.afr
        up = afr.up_indices()
        afr.check_quorum(up, what)
        parents = list(dict.fromkeys(g for g, _ in targets))

        async def wind(participants: list[int]) -> Outcome[_T]:
            outcome = await self._wind(participants, call, skip_arbiter=False)
            if validate is not None and outcome.succeeded:
                for i in validate(outcome):
                    outcome.succeeded.discard(i)
                    outcome.replies.pop(i, None)
                    outcome.errors[i] = FopError(errno.EIO, f"{what}: reply of child {i} disagrees")
            return outcome

        if self.entries.usable(parents):
            outcome, recorded = await self.entries.run(what, parents[0], [n for _, n in targets], wind)
            self._raise_if_short(what, recorded, outcome)
            return outcome
        await self.entries.settle(parents)
        who = identity(new_owner())
        lock_targets: list[tuple[Gfid, str | None]] = [(g, n) for g, n in targets]
        locked = await afr.entrylk_all(up, lock_targets, who)
        try:
            afr.check_quorum(locked, what)
            pres = []
            for parent in parents:
                pre, _ = await afr.xattrop_on({i: {DIRTY_KEY: one(ENTRY)} for i in locked}, gfid_loc(parent))
                pres.append(set(pre))
            participants = [i for i in locked if all(i in p for p in pres)]
            afr.check_quorum(participants, what)
            outcome = await wind(participants)
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
            self.entries.noted(parents)
            return outcome
        finally:
            await afr.entrylk_release(locked, lock_targets, who)
