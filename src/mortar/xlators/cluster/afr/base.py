"""Replicate's state and the machinery every fop uses: children and their events, quorum, what is
known of each inode (from surveys of the changelog), the order reads try children in, fds open on
several children, and locks taken on all children in a fixed order.

`ReplicateTranslator` (replicate.py) adds the fops; transaction.py and heal*.py build on this.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import EntrylkCmd, EntryReply, Fd, Flock, Loc, LockCmd, LockType, XattropFlag, Xdata
from mortar.core.gfid import Gfid
from mortar.core.options import Option, OptionError
from mortar.core.translator import Event, Translator
from mortar.xlators.cluster.afr.changelog import (
    DATA,
    DIRTY_KEY,
    ENTRY,
    METADATA,
    Matrix,
    Verdict,
    judge,
    pending_key,
)
from mortar.xlators.cluster.afr.state import (
    MISSING_ERRNOS,
    RETRY_ERRNOS,
    AfrFd,
    InodeState,
    Judged,
    Survey,
    acting_as,
    gather_map,
    identity,
    pick_error,
)

_T = TypeVar("_T")
TRANSPORT_ERRNOS = frozenset(
    {errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE, errno.EHOSTDOWN}
)


def gfid_loc(gfid: Gfid, path: str = "") -> Loc:
    return Loc(path or f"<gfid:{gfid}>", gfid=gfid)


class ReplicateBase(Translator):
    """Children, events, quorum, inode knowledge, read order, fds and locks of cluster/replicate."""

    type_name: ClassVar[str] = "cluster/replicate"
    options: ClassVar[Mapping[str, Option]] = {
        "volume-name": Option(
            "str",
            "",
            "volume name, for messages and reports (default: this translator's name up to '-replicate-')",
        ),
        "afr-pending-xattr": Option(
            "str",
            "",
            "comma-separated pending names of the children in order (vol-client-0,...); the changelog "
            "xattr of child i is trusted.afr.<name i>. Default: the children's names",
        ),
        "quorum-type": Option(
            "enum",
            "none",
            "client quorum: none, auto (more than half the children up, or exactly half including the "
            "first) or fixed (quorum-count). Unset, auto applies to sets of more than 2 or with an arbiter",
            choices=("none", "auto", "fixed"),
        ),
        "quorum-count": Option("int", 1, "children that must be up with quorum-type fixed", min=1),
        "eager-lock": Option(
            "bool", True, "keep a file's lock across consecutive writes and share their changelog updates"
        ),
        "post-op-delay": Option(
            "time", 1.0, "seconds an idle eager lock is kept before its post-op and unlock", min=0
        ),
        "read-hash-mode": Option(
            "int", 1, "read child: 0 first up, 1 hash of the gfid, 2 gfid and pid, 3 least outstanding", 0, 3
        ),
        "data-self-heal-algorithm": Option(
            "enum",
            "auto",
            "full copies everything, diff compares block checksums; auto: diff when a sink is not empty",
            choices=("full", "diff", "auto"),
        ),
        "data-self-heal-window-size": Option(
            "int", 8, "128 KiB blocks healed under one lock (writers wait at most that long)", 1, 1024
        ),
        "favorite-child-policy": Option(
            "enum",
            "none",
            "resolve split-brain automatically during heal: size (bigger file), mtime, ctime (newest), "
            "majority (a copy more than half the children agree on)",
            choices=("none", "size", "mtime", "ctime", "majority"),
        ),
        "arbiter-count": Option("int", 0, "1: the last child is an arbiter (names and metadata only)", 0, 1),
        "background-self-heal-count": Option(
            "int", 8, "heals triggered by access run this many at a time", 0
        ),
        "data-self-heal": Option("bool", True, "heal file contents found stale on access"),
        "metadata-self-heal": Option("bool", True, "heal attributes and xattrs found stale on access"),
        "entry-self-heal": Option("bool", True, "heal directory entries found stale on access"),
        "child-up-timeout": Option(
            "time", 2.0, "seconds to wait for every child before reporting CHILD_UP with some up", min=0
        ),
    }
    #: inode states kept (LRU)
    max_states: int = 65536

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        if not self.children:
            raise ValueError(f"{name}: cluster/replicate needs at least one subvolume")
        self.n = len(self.children)
        self._index = {id(c): i for i, c in enumerate(self.children)}
        self.child_up: list[bool | None] = [None] * self.n
        #: bumped by every child event: knowledge gathered before may be stale
        self.generation = 0
        self._states: OrderedDict[Gfid, InodeState] = OrderedDict()
        self._outstanding = [0] * self.n
        self._reported: Event | None = None
        self._waited = False
        self._timer: asyncio.TimerHandle | None = None
        self._given = dict(options or {})
        self._configure()

    def _configure(self) -> None:
        names = [s.strip() for s in self.opts["afr-pending-xattr"].split(",") if s.strip()]
        if not names:
            names = [c.name for c in self.children]
        if len(names) != self.n:
            raise OptionError(f"afr-pending-xattr names {len(names)} children, the set has {self.n}")
        self.pending_names = names
        self.keys = [pending_key(x) for x in names]
        self.afr_keys = [*self.keys, DIRTY_KEY]
        vol = self.opts["volume-name"] or self.name.split("-replicate-")[0]
        self.volname = vol
        self.domain = self.name
        self.meta_domain = f"{self.name}:metadata"
        self.heal_domain = f"{self.name}:self-heal"
        self.arbiter: int | None = self.n - 1 if self.opts["arbiter-count"] and self.n > 1 else None
        given = self._given.get("quorum-type")
        if self.arbiter is not None:
            self.quorum_type = "auto"
        elif given is None:
            self.quorum_type = "auto" if self.n > 2 else "none"
        else:
            self.quorum_type = self.opts["quorum-type"]

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        super().reconfigure(options)
        self._given = dict(options)
        self._configure()

    async def fini(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- children and events -------------------------------------------------------------------

    def is_up(self, i: int) -> bool:
        """A child that never reported counts as up: in-process graphs have children that never
        send events."""
        return self.child_up[i] is not False

    def up_indices(self) -> list[int]:
        return [i for i in range(self.n) if self.is_up(i)]

    def child_index(self, which: int | str) -> int:
        """A child by index, translator name or pending name."""
        if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
            i = int(which)
            if 0 <= i < self.n:
                return i
        else:
            for i, c in enumerate(self.children):
                if which in (c.name, self.pending_names[i]):
                    return i
        raise FopError(errno.EINVAL, f"{self.name} has no child {which!r}")

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        idx = self._index.get(id(source))
        if idx is not None and event in (Event.CHILD_UP, Event.CHILD_DOWN, Event.CHILD_CONNECTING):
            if event is Event.CHILD_CONNECTING:
                return
            up = event is Event.CHILD_UP
            if self.child_up[idx] is not up:
                self.generation += 1
                self.log.info("child %s is %s", self.children[idx].name, "up" if up else "down")
            self.child_up[idx] = up
            self.child_changed(idx, up)
            self._arm_timer()
            self._report_state()
            return
        if event is Event.PARENT_UP:
            self._arm_timer()
        super().notify(event, source, data)

    def child_changed(self, i: int, up: bool) -> None:
        """Hook for the transaction and heal machinery."""

    def _arm_timer(self) -> None:
        if self._timer is not None or self._waited:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.opts["child-up-timeout"], self._wait_over)

    def _wait_over(self) -> None:
        self._waited = True
        self._timer = None
        self._report_state()

    def _report_state(self) -> None:
        states = self.child_up
        if any(states):
            if self._reported is not Event.CHILD_UP and (self._waited or None not in states):
                self._report(Event.CHILD_UP)
        elif None not in states and self._reported is not Event.CHILD_DOWN:
            self._report(Event.CHILD_DOWN)

    def _report(self, event: Event) -> None:
        self._reported = event
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._waited = True
        up = ", ".join(self.children[i].name for i in self.up_indices()) or "none"
        self.log.info("%s (children up: %s)", event.value, up)
        for parent in self.parents:
            parent.notify(event, self, None)

    # ---- quorum --------------------------------------------------------------------------------

    def has_quorum(self, indices: Iterable[int]) -> bool:
        have = set(indices)
        if self.quorum_type == "fixed":
            return len(have) >= self.opts["quorum-count"]
        if self.quorum_type == "auto":
            return 2 * len(have) > self.n or (2 * len(have) == self.n and 0 in have)
        return bool(have)

    def check_quorum(self, indices: Iterable[int], what: str) -> None:
        have = sorted(set(indices))
        if not self.has_quorum(have):
            raise FopError(
                errno.ENOTCONN,
                f"{self.name} (volume {self.volname}): {what} refused: client quorum not met "
                f"({len(have)} of {self.n} children usable, quorum-type {self.quorum_type}); "
                "nothing was changed",
            )

    # ---- inode knowledge -------------------------------------------------------------------------

    def known(self, gfid: Gfid) -> InodeState | None:
        """The state of `gfid` if learned since the last child event."""
        st = self._states.get(gfid)
        if st is None or st.generation != self.generation:
            return None
        self._states.move_to_end(gfid)
        return st

    def remember(self, state: InodeState) -> InodeState:
        self._states[state.gfid] = state
        self._states.move_to_end(state.gfid)
        while len(self._states) > self.max_states:
            self._states.popitem(last=False)
        return state

    def forget(self, gfid: Gfid) -> None:
        self._states.pop(gfid, None)

    def mark_failed(self, gfid: Gfid, kind: int, failed: Iterable[int]) -> None:
        """Children that missed a change of `kind` are no longer readable for it."""
        st = self._states.get(gfid)
        gone = frozenset(failed)
        if st is not None and gone:
            st.readable[kind] = st.readable.get(kind, frozenset()) - gone
            if kind == METADATA and not stat.S_ISREG(st.type_bits):
                st.readable[DATA] = st.readable.get(DATA, frozenset()) - gone

    async def survey(
        self,
        loc: Loc,
        children: Iterable[int] | None = None,
        expect: Gfid | None = None,
        extra: Sequence[str] = (),
        xdata: Xdata = None,
    ) -> Survey:
        """Look `loc` up on the children (default: all up) asking for the changelog xattrs."""
        asked = tuple(self.up_indices() if children is None else sorted(set(children)))
        wanted = list(dict.fromkeys([*self.afr_keys, *extra, *((xdata or {}).get("xattrs") or [])]))
        sub = {**(xdata or {}), "xattrs": wanted}
        with acting_as(identity()):
            replies, errors = await gather_map({i: self.children[i].lookup(loc, dict(sub)) for i in asked})
        gfid = expect or loc.gfid
        present = frozenset(i for i, r in replies.items() if gfid is None or r.iatt.gfid == gfid)
        sv = Survey(asked, replies, errors, Matrix.build(self.keys, {}), present)
        sv.matrix = Matrix.build(self.keys, {i: sv.xattrs(i) for i in present})
        return sv

    def judge_survey(self, sv: Survey, present: Iterable[int] | None = None) -> Judged:
        """Verdicts for the kinds that apply to the object: data for regular files, entry for
        directories, metadata for all."""
        here = frozenset(sv.present if present is None else present)
        some = next(iter(here), None)
        type_bits = stat.S_IFMT(sv.iatt(some).mode) if some is not None else 0
        kinds = [METADATA]
        if stat.S_ISREG(type_bits):
            kinds.append(DATA)
        elif stat.S_ISDIR(type_bits):
            kinds.append(ENTRY)
        no_data = [self.arbiter] if self.arbiter is not None else []
        verdicts: dict[int, Verdict] = {}
        for kind in kinds:
            verdicts[kind] = judge(sv.matrix, kind, here, no_data if kind == DATA else ())
        return Judged(sv, verdicts)

    def state_from(self, gfid: Gfid, judged: Judged) -> InodeState:
        sv = judged.survey
        some = next(iter(sorted(sv.present)), None)
        type_bits = stat.S_IFMT(sv.iatt(some).mode) if some is not None else 0
        readable = {kind: v.sources for kind, v in judged.verdicts.items()}
        if DATA not in readable:
            readable[DATA] = readable[METADATA]
        split = frozenset(kind for kind, v in judged.verdicts.items() if v.split_brain)
        return self.remember(InodeState(gfid, type_bits, self.generation, sv.present, readable, split))

    async def inode_state(self, gfid: Gfid, path: str = "") -> InodeState:
        """What is known of `gfid`, surveying the children if nothing fresh is."""
        st = self.known(gfid)
        if st is not None:
            return st
        sv = await self.survey(gfid_loc(gfid, path))
        if not sv.present:
            raise pick_error(sv.errors.values(), f"{self.name}: {gfid} is on no child that is up")
        return self.state_from(gfid, self.judge_survey(sv))

    # ---- reads -----------------------------------------------------------------------------------

    def read_order(self, gfid: Gfid | None, candidates: Iterable[int]) -> list[int]:
        """Up, non-arbiter candidates, the one `read-hash-mode` prefers first, then the others."""
        cands = sorted(i for i in set(candidates) if self.is_up(i) and i != self.arbiter)
        if len(cands) < 2:
            return cands
        mode = self.opts["read-hash-mode"]
        if mode == 3:
            return sorted(cands, key=lambda i: (self._outstanding[i], i))
        if mode == 0 or gfid is None:
            return cands
        key = bytes(gfid)
        if mode == 2:
            key += call_context.get().pid.to_bytes(8, "big", signed=True)
        first = zlib.crc32(key) % len(cands)
        return cands[first:] + cands[:first]

    async def read_from(self, order: Sequence[int], call: Callable[[int], Awaitable[_T]], what: str) -> _T:
        """Try `call` on each child of `order` until one answers; only failures of the copy (not
        of the request) move on to the next."""
        if not order:
            raise FopError(errno.ENOTCONN, f"{self.name}: {what}: no readable child is up")
        last: FopError | None = None
        for i in order:
            self._outstanding[i] += 1
            try:
                return await call(i)
            except FopError as exc:
                if exc.errno not in RETRY_ERRNOS:
                    raise
                self.log.debug(
                    "%s on %s failed (%s), trying the next child", what, self.children[i].name, exc
                )
                last = exc
            finally:
                self._outstanding[i] -= 1
        assert last is not None
        raise last

    # ---- fds -------------------------------------------------------------------------------------

    def fd_ctx(self, fd: Fd) -> AfrFd | None:
        ctx = fd.ctx.get(self)
        return ctx if isinstance(ctx, AfrFd) else None

    async def reopen(self, fd: Fd, afd: AfrFd, i: int) -> None:
        """Open `fd` on a child it is not open on (down at open time, or reconnected since)."""
        child = self.children[i]
        flags = afd.flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        with acting_as(identity()):
            if afd.is_dir:
                await child.opendir(gfid_loc(fd.gfid), fd)
            else:
                await child.open(gfid_loc(fd.gfid), flags, fd)
        afd.opened.add(i)
        self.log.debug("reopened %r on %s", fd, child.name)

    async def on_fd(self, fd: Fd, i: int, call: Callable[[Translator], Awaitable[_T]]) -> _T:
        """Run an fd fop on child `i`, reopening the fd there first if needed (once on EBADF)."""
        afd = self.fd_ctx(fd)
        child = self.children[i]
        if afd is not None and i not in afd.opened:
            await self.reopen(fd, afd, i)
        try:
            return await call(child)
        except FopError as exc:
            if exc.errno != errno.EBADF or afd is None:
                raise
            afd.opened.discard(i)
            await self.reopen(fd, afd, i)
            return await call(child)

    # ---- locks on every child, in child order ------------------------------------------------

    async def inodelk_all(
        self,
        indices: Iterable[int],
        domain: str,
        gfid: Gfid,
        start: int,
        length: int,
        who: CallContext,
        blocking: bool = True,
    ) -> list[int]:
        """Take a write lock on each child; children that cannot be reached are left out. EAGAIN
        (non-blocking) undoes what was taken. As GlusterFS does, all children are first tried at
        once without blocking (one round trip when nobody else holds the lock); only when some
        child is busy is everything given back and taken again one child after another in
        ascending order, blocking, so that two clients never deadlock."""
        order = sorted(set(indices))
        loc = gfid_loc(gfid)
        flock = Flock(LockType.WRLCK, start, length)
        with acting_as(who):
            taken, errors = await self._inodelk_at_once(order, domain, loc, flock)
        busy = [e for e in errors.values() if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)]
        hard = [
            e for e in errors.values() if e not in busy and e.errno not in TRANSPORT_ERRNOS | MISSING_ERRNOS
        ]
        if not busy and not hard:
            return taken
        await self.inodelk_release(taken, domain, gfid, start, length, who)
        if hard:
            raise hard[0]
        if not blocking:
            raise busy[0]
        taken = []
        with acting_as(who):
            for i in order:
                try:
                    await self.children[i].inodelk(domain, loc, LockCmd.SETLKW, flock)
                except FopError as exc:
                    if exc.errno in TRANSPORT_ERRNOS or exc.errno in MISSING_ERRNOS:
                        continue
                    await self.inodelk_release(taken, domain, gfid, start, length, who)
                    raise
                except asyncio.CancelledError:
                    # nobody will unlock what this call took: give it back before going away
                    if taken:
                        await asyncio.shield(self.inodelk_release(taken, domain, gfid, start, length, who))
                    raise
                taken.append(i)
        return taken

    async def _inodelk_at_once(
        self, order: list[int], domain: str, loc: Loc, flock: Flock
    ) -> tuple[list[int], dict[int, FopError]]:
        """Try the lock on every child at once without blocking: (children that granted it, errors)."""
        tasks = {
            i: asyncio.ensure_future(self.children[i].inodelk(domain, loc, LockCmd.SETLK, flock))
            for i in order
        }
        try:
            await asyncio.wait(tasks.values())
        except asyncio.CancelledError:
            # non-blocking requests answer at once: let them, then give back what they took
            await asyncio.shield(self._give_back_attempt(tasks, domain, loc, flock))
            raise
        return self._attempt_outcome(tasks)

    @staticmethod
    def _attempt_outcome(tasks: Mapping[int, asyncio.Future[Any]]) -> tuple[list[int], dict[int, FopError]]:
        taken: list[int] = []
        errors: dict[int, FopError] = {}
        for i, t in tasks.items():
            exc = t.exception() if not t.cancelled() else FopError(errno.EINTR, "lock attempt cancelled")
            if exc is None:
                taken.append(i)
            elif isinstance(exc, FopError):
                errors[i] = exc
            else:
                raise exc
        return taken, errors

    async def _give_back_attempt(
        self, tasks: Mapping[int, asyncio.Future[Any]], domain: str, loc: Loc, flock: Flock
    ) -> None:
        await asyncio.wait(tasks.values())
        taken = [i for i, t in tasks.items() if not t.cancelled() and t.exception() is None]
        unlock = Flock(LockType.UNLCK, flock.start, flock.length)
        await gather_map({i: self.children[i].inodelk(domain, loc, LockCmd.SETLK, unlock) for i in taken})

    async def inodelk_release(
        self, indices: Iterable[int], domain: str, gfid: Gfid, start: int, length: int, who: CallContext
    ) -> None:
        loc = gfid_loc(gfid)
        with acting_as(who):
            calls = {
                i: self.children[i].inodelk(domain, loc, LockCmd.SETLK, Flock(LockType.UNLCK, start, length))
                for i in indices
                if self.is_up(i)
            }
            _, bad = await gather_map(calls)
        for i, exc in bad.items():
            if exc.errno not in TRANSPORT_ERRNOS:
                self.log.warning("unlock of %s in %s on %s: %s", gfid, domain, self.children[i].name, exc)

    async def entrylk_all(
        self,
        indices: Iterable[int],
        targets: Sequence[tuple[Gfid, str | None]],
        who: CallContext,
        blocking: bool = True,
        domain: str | None = None,
    ) -> list[int]:
        """Entry locks on (directory, name) targets, on each child in order, targets in sorted order."""
        ordered = sorted(set(targets), key=lambda t: (bytes(t[0]), t[1] or ""))
        cmd = EntrylkCmd.LOCK if blocking else EntrylkCmd.LOCK_NB
        dom = domain or self.domain
        taken: list[int] = []
        with acting_as(who):
            for i in sorted(set(indices)):
                got: list[tuple[Gfid, str | None]] = []
                try:
                    for dir_gfid, name in ordered:
                        await self.children[i].entrylk(dom, gfid_loc(dir_gfid), name, cmd, LockType.WRLCK)
                        got.append((dir_gfid, name))
                except FopError as exc:
                    await self._entry_unlock_one(i, got, who, dom)
                    if exc.errno in TRANSPORT_ERRNOS or exc.errno in MISSING_ERRNOS:
                        continue
                    await self.entrylk_release(taken, ordered, who, dom)
                    raise
                taken.append(i)
        return taken

    async def _entry_unlock_one(
        self, i: int, targets: Sequence[tuple[Gfid, str | None]], who: CallContext, domain: str
    ) -> None:
        with acting_as(who):
            for dir_gfid, name in targets:
                try:
                    await self.children[i].entrylk(
                        domain, gfid_loc(dir_gfid), name, EntrylkCmd.UNLOCK, LockType.WRLCK
                    )
                except FopError as exc:
                    if exc.errno not in TRANSPORT_ERRNOS:
                        self.log.warning("entry unlock on %s: %s", self.children[i].name, exc)

    async def entrylk_release(
        self,
        indices: Iterable[int],
        targets: Sequence[tuple[Gfid, str | None]],
        who: CallContext,
        domain: str | None = None,
    ) -> None:
        dom = domain or self.domain
        await asyncio.gather(
            *(self._entry_unlock_one(i, targets, who, dom) for i in indices if self.is_up(i))
        )

    # ---- changelog updates -----------------------------------------------------------------------

    async def xattrop_on(
        self, deltas: Mapping[int, dict[str, bytes]], loc: Loc
    ) -> tuple[dict[int, dict[str, bytes]], dict[int, FopError]]:
        """ADD_ARRAY `deltas[i]` on child i; returns the new values and the failures by child."""
        with acting_as(identity()):
            ok, bad = await gather_map(
                {i: self.children[i].xattrop(loc, XattropFlag.ADD_ARRAY, d) for i, d in deltas.items() if d}
            )
        for i, exc in bad.items():
            self.log.warning("changelog update on %s for %s failed: %s", self.children[i].name, loc.path, exc)
        return {i: r.xattrs for i, r in ok.items()}, bad

    # ---- helpers for replies -----------------------------------------------------------------

    def preferred(self, succeeded: Iterable[int]) -> int:
        """The child whose reply to return: the lowest non-arbiter that succeeded."""
        ok = sorted(succeeded)
        for i in ok:
            if i != self.arbiter:
                return i
        return ok[0]

    def strip_afr(self, reply: EntryReply, asked: Sequence[str]) -> EntryReply:
        """Drop the changelog xattrs the caller did not ask for from a lookup reply."""
        xd = reply.xdata
        got = (xd or {}).get("xattrs")
        if isinstance(got, dict):
            keep = {k: v for k, v in got.items() if k in asked or k not in self.afr_keys}
            reply.xdata = {**(xd or {}), "xattrs": keep}
        return reply
