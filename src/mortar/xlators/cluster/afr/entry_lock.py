"""Eager entry locks: one directory lock kept across this client's consecutive namespace changes.

A plain entry transaction costs, on a replica set, an entrylk on every child (one after another),
a pre-op raising `dirty` on the parent, the fop, a post-op lowering it and an unlock: six rounds
for one create. A tar extraction or a small-file loop makes its changes one directory at a time, so
this client takes the whole directory (entrylk with no name) once, raises the parent's entry
`dirty` once, and then each create/unlink/mkdir in that directory is the fop alone. The batch ends
(dirty lowered, lock given back) when the directory has been idle for `post-op-delay`, when another
owner waits for the directory's entry lock on any child (seen in the brick's lock dump, as the data
eager lock does), when a child comes back, or on shutdown.

Crash safety is the data eager lock's: while a batch is open the parent is marked dirty on every
child, so a client killed mid-batch leaves the directory in the heal index and the self-heal daemon
compares its replicas; a child that misses a change is blamed on the children that made it before
the change is acknowledged. Namespace changes of this client to one name are serialised locally,
because the directory lock no longer keeps two of them apart on the bricks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from mortar.core.errors import FopError
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase
from mortar.xlators.cluster.afr.changelog import ENTRY
from mortar.xlators.cluster.afr.held_lock import CONTENTION_HOLDOFF, HeldLock, HeldLocks

if TYPE_CHECKING:
    from mortar.xlators.cluster.afr.transaction import Outcome

_T = TypeVar("_T")
__all__ = ["CONTENTION_HOLDOFF", "ENTRY_BATCH_KEY", "EntryBatch", "EntryLocks"]
#: reply xdata key naming the batch a namespace change ran in: two changes of one client with the
#: same token prove that no other client changed the directory's names between them (nl-cache)
ENTRY_BATCH_KEY = "afr.entry-batch"
#: directories remembered for "a change here just happened" before the old ones are pruned
RECENT_MAX = 1024


@dataclass(eq=False)
class EntryBatch(HeldLock):
    """The directory lock this client holds on one parent (`gfid`), and the changelog state of its
    batch."""

    @property
    def parent(self) -> Gfid:
        return self.gfid


class _NameLocks:
    """In-process exclusion per (parent, name): what the per-name entrylk did between this client's
    own transactions, now that they share one directory lock."""

    def __init__(self) -> None:
        self._locks: dict[tuple[Gfid, str], tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: Iterable[tuple[Gfid, str]]) -> AsyncIterator[None]:
        ordered = sorted(set(keys), key=lambda k: (bytes(k[0]), k[1]))
        counted: list[tuple[Gfid, str]] = []
        acquired: list[asyncio.Lock] = []
        try:
            for key in ordered:
                lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
                users[0] += 1
                counted.append(key)
                await lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in acquired:
                lock.release()
            for key in counted:
                users = self._locks[key][1]
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


class EntryLocks(HeldLocks[EntryBatch]):
    """The eager entry locks of one replicate translator, by parent directory."""

    lock_type = EntryBatch
    kind = ENTRY
    dump_section = "entrylk"
    lock_name = "eager entry lock"
    locking = "entry locking"

    def __init__(self, afr: ReplicateBase) -> None:
        super().__init__(afr)
        #: parent -> when this client's last plain entry transaction there finished
        self._recent: dict[Gfid, float] = {}
        self._names = _NameLocks()

    @property
    def batches(self) -> dict[Gfid, EntryBatch]:
        """The open batches, by parent directory."""
        return self.held

    def usable(self, parents: list[Gfid]) -> bool:
        """Whether a transaction on `parents` may run in a batch: one parent, eager locking on, no
        other owner seen waiting for that directory lately, and a batch already open there or this
        client's previous change in it less than `post-op-delay` ago (a lone mkdir or create keeps
        the plain transaction: it leaves nothing marked behind it)."""
        if len(parents) != 1 or not self.afr.opts["eager-lock"]:
            return False
        parent = parents[0]
        now = asyncio.get_running_loop().time()
        if self._contended_lately(parent, now):
            return False
        if parent in self.batches:
            return True
        last = self._recent.get(parent)
        return last is not None and now - last <= self.afr.opts["post-op-delay"]

    def noted(self, parents: Iterable[Gfid]) -> None:
        """A plain entry transaction in `parents` finished: the next change there soon after starts
        a batch."""
        now = asyncio.get_running_loop().time()
        if len(self._recent) > RECENT_MAX:
            window = self.afr.opts["post-op-delay"]
            self._recent = {g: t for g, t in self._recent.items() if now - t <= window}
        for parent in parents:
            self._recent[parent] = now

    async def settle(self, parents: Iterable[Gfid]) -> None:
        """End the batches on `parents` (a per-name transaction of this client is about to lock
        there and would otherwise wait for this client's own directory lock)."""
        tasks = [self.release_soon(b, "per-name transaction") for p in parents if (b := self.batches.get(p))]
        for task in tasks:
            await asyncio.shield(task)

    async def run(
        self,
        what: str,
        parent: Gfid,
        names: list[str],
        wind: Callable[[list[int]], Awaitable[Outcome[_T]]],
    ) -> tuple[Outcome[_T], set[int]]:
        """One namespace change in `parent`'s batch: `wind(participants)` makes it on the children
        (and judges their replies). Returns the outcome and the children whose success is recorded
        (every child that missed the change is blamed on them before this returns)."""
        afr = self.afr
        async with self._names.hold((parent, n) for n in names):
            batch = await self._join(parent)
            try:
                participants = [i for i in batch.locked if afr.is_up(i)]
                afr.check_quorum(participants, what)
                participants, _ = await self._raise_dirty(batch, participants)
                afr.check_quorum(participants, what)
                outcome = await wind(participants)
                token = batch.who.lk_owner.hex()
                for reply in outcome.replies.values():
                    if hasattr(reply, "xdata"):
                        reply.xdata = {**(reply.xdata or {}), ENTRY_BATCH_KEY: token}
                failed = set(range(afr.n)) - outcome.succeeded
                recorded = set(outcome.succeeded)
                if outcome.succeeded and failed:
                    recorded -= await self._blame(batch, outcome.succeeded, failed)
                    afr.log.info(
                        "%s done on %s only; %s marked for entry heal",
                        what,
                        sorted(outcome.succeeded),
                        sorted(failed),
                    )
                afr.mark_failed(parent, ENTRY, failed)
                return outcome, recorded
            finally:
                self._leave(batch)

    # ---- the batch's life --------------------------------------------------------------------------

    async def _lock(self, lock: EntryBatch) -> list[int]:
        afr = self.afr
        return await afr.entrylk_all(afr.up_indices(), [(lock.parent, None)], lock.who)

    async def _unlock(self, lock: EntryBatch) -> None:
        await self.afr.entrylk_release(lock.locked, [(lock.parent, None)], lock.who)

    def _watched(self, held: list[int]) -> list[int]:
        # waiters queue on the lowest child they lock first; the arbiter is asked only alone
        return [i for i in held if i != self.afr.arbiter] or held

    def defer(self, then: Callable[[], None], timeout: float = 10.0) -> bool:
        """If batches are open, end them and call `then` afterwards (at most `timeout` later);
        returns False (nothing deferred) when there is none."""
        if not any(not b.failed for b in self.batches.values()):
            return False

        async def settle_then() -> None:
            try:
                async with asyncio.timeout(timeout):
                    await self.settle(list(self.batches))
            except (TimeoutError, FopError) as exc:
                self.afr.log.warning("entry batches not settled before going down: %r", exc)
            finally:
                then()

        self._spawn(settle_then())
        return True
