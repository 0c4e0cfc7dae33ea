"""Small pieces DHT's modules share: per-inode and per-fd state, link-file tests, fan-out, identity."""

from __future__ import annotations

import asyncio
import errno
import stat
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import EntryReply, Xdata
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR, Layout, decode_linkto

_T = TypeVar("_T")

#: errors that mean "not (or no longer) there": a cached location went stale
STALE = (errno.ENOENT, errno.ESTALE)


@dataclass(slots=True)
class DhtCtx:
    """What DHT knows of an inode: where a file's data is, or a directory's layout."""

    gfid: Gfid
    is_dir: bool
    cached: Translator | None = None
    layout: Layout | None = None


@dataclass(slots=True)
class DirFd:
    """A directory opened through DHT: indexes of the subvolumes whose copy is open (listing order)."""

    opened: list[int]


def linkfile_mode() -> int:
    """A link file is a regular file whose permission bits are exactly the sticky bit (`---------T`)."""
    return stat.S_IFREG | stat.S_ISVTX


def is_linkfile(iatt: Iatt) -> bool:
    """The mode test alone; a regular file may legitimately look like this, so callers that must be
    sure also check the linkto xattr (`linkto_of`)."""
    return iatt.is_reg and (iatt.mode & 0o7777) == stat.S_ISVTX


def wanted_xattrs(xdata: Xdata) -> dict[str, bytes]:
    """The xattrs a brick returned in a lookup reply (`xdata["xattrs"]`)."""
    got = (xdata or {}).get("xattrs")
    return got if isinstance(got, dict) else {}


def linkto_of(rep: EntryReply) -> str | None:
    """The subvolume a lookup reply's link file points to, or None if the reply is not a link file."""
    if not is_linkfile(rep.iatt):
        return None
    raw = wanted_xattrs(rep.xdata).get(LINKTO_XATTR)
    return decode_linkto(raw) if raw else None


async def _capture(aw: Awaitable[_T]) -> _T | FopError:
    try:
        return await aw
    except FopError as exc:
        return exc


async def gather_fops(calls: Iterable[Awaitable[_T]]) -> list[_T | FopError]:
    """Run fops on several subvolumes at once; each result is the reply or the FopError it raised
    (any other exception is a bug and propagates)."""
    return list(await asyncio.gather(*(_capture(c) for c in calls)))


@contextmanager
def as_root(lk_owner: bytes | None = None) -> Iterator[None]:
    """DHT's own bookkeeping (link files, layouts, directory heal) runs as root: the caller was
    already allowed the operation that needs it, and trusted xattrs need privilege. The connection
    stays the caller's; so does the lock owner unless DHT takes locks of its own (`lk_owner`)."""
    cur = call_context.get()
    owner = cur.lk_owner if lk_owner is None else lk_owner
    token = call_context.set(CallContext(0, 0, (), cur.pid, owner, cur.client))
    try:
        yield
    finally:
        call_context.reset(token)


def first_ok(results: Iterable[_T | FopError]) -> _T:
    """The first result that is not an error, else raise the first error."""
    errors: list[FopError] = []
    for r in results:
        if not isinstance(r, FopError):
            return r
        errors.append(r)
    raise errors[0] if errors else FopError(errno.EIO, "no subvolume answered")
