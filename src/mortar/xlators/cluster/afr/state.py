"""Small records AFR keeps and shares: what it knows of an inode and an fd, what the children said
about an object (a survey), local range serialisation, and the identities it acts under."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import EntryReply
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.xlators.cluster.afr.changelog import Matrix, Verdict

_T = TypeVar("_T")

#: errors after which a read is retried on the next readable child (the copy, not the request, failed)
RETRY_ERRNOS = frozenset(
    {errno.ENOTCONN, errno.EBADF, errno.ESTALE, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE}
)
#: errors that mean "this child does not have the object"
MISSING_ERRNOS = frozenset({errno.ENOENT, errno.ESTALE})
OFFSET_MAX = 1 << 63


@dataclass(slots=True)
class InodeState:
    """What AFR last learned about one inode: which children have it and may be read, per kind."""

    gfid: Gfid
    type_bits: int
    generation: int
    present: frozenset[int]
    #: kind -> children whose copy is good for that kind (the arbiter never, for data)
    readable: dict[int, frozenset[int]]
    #: kinds whose copies accuse each other
    split: frozenset[int] = frozenset()


@dataclass(slots=True)
class AfrFd:
    """An fd opened through AFR: where it is open and how to reopen it."""

    flags: int
    is_dir: bool
    opened: set[int] = field(default_factory=set)
    append: bool = False
    #: the child a directory listing is read from (cookies belong to one child)
    read_child: int | None = None


@dataclass(slots=True)
class Survey:
    """Each asked child's answer to one lookup (with the changelog xattrs)."""

    asked: tuple[int, ...]
    replies: dict[int, EntryReply]
    errors: dict[int, FopError]
    matrix: Matrix
    present: frozenset[int]

    def iatt(self, i: int) -> Iatt:
        return self.replies[i].iatt

    def xattrs(self, i: int) -> dict[str, bytes]:
        got = (self.replies[i].xdata or {}).get("xattrs")
        return got if isinstance(got, dict) else {}

    def gfids(self) -> set[Gfid]:
        return {r.iatt.gfid for r in self.replies.values()}


@dataclass(slots=True)
class Judged:
    """A survey's verdicts for the kinds that apply to the object's type."""

    survey: Survey
    verdicts: dict[int, Verdict]


class RangeSerial:
    """Transactions of one client on one inode whose byte ranges overlap run one at a time, so every
    replica applies them in the same order; disjoint ones run concurrently."""

    def __init__(self) -> None:
        self._active: list[tuple[int, int, asyncio.Event]] = []

    def __bool__(self) -> bool:
        return bool(self._active)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            blocking = [ev for s, e, ev in self._active if s < end and start < e]
            if not blocking:
                break
            await blocking[0].wait()
        entry = (start, end, asyncio.Event())
        self._active.append(entry)
        try:
            yield
        finally:
            self._active.remove(entry)
            entry[2].set()


def identity(lk_owner: bytes | None = None) -> CallContext:
    """Root with the caller's connection (and pid), owning locks as `lk_owner` if given: AFR's own
    bookkeeping (changelog xattrs, locks, heal) needs privilege the caller was already granted."""
    cur = call_context.get()
    return CallContext(0, 0, (), cur.pid, cur.lk_owner if lk_owner is None else lk_owner, cur.client)


@contextlib.contextmanager
def acting_as(ctx: CallContext) -> Iterator[None]:
    token = call_context.set(ctx)
    try:
        yield
    finally:
        call_context.reset(token)


def new_owner() -> bytes:
    return os.urandom(8)


async def gather_map(calls: Mapping[int, Awaitable[_T]]) -> tuple[dict[int, _T], dict[int, FopError]]:
    """Run one call per child at once; (replies, errors) by child index."""
    keys = list(calls)
    # tasks at once, so a cancelled fan-out cancels (and closes) every call instead of leaking
    # coroutines that never ran
    tasks = [asyncio.ensure_future(calls[k]) for k in keys]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok: dict[int, _T] = {}
    bad: dict[int, FopError] = {}
    for k, r in zip(keys, results, strict=True):
        if isinstance(r, FopError):
            bad[k] = r
        elif isinstance(r, BaseException):
            raise r
        else:
            ok[k] = r
    return ok, bad


def pick_error(errors: Iterable[FopError], default: str = "no child answered") -> FopError:
    """The error to report when every child failed: the most common errno, transport errors last."""
    errs = list(errors)
    if not errs:
        return FopError(errno.ENOTCONN, default)
    counts: dict[int, int] = {}
    for e in errs:
        counts[e.errno] = counts.get(e.errno, 0) + 1
    best = max(counts, key=lambda n: (n not in RETRY_ERRNOS, counts[n]))
    return next(e for e in errs if e.errno == best)
