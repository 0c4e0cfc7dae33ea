"""Small pieces DHT's modules share: per-inode and per-fd state, link-file tests, fan-out, identity,
the names and markers of the migration protocol, and `plan_layout` (fix-layout's range reuse)."""

from __future__ import annotations

import asyncio
import errno
import stat
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TypeVar

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import EntryReply, Fd, Xdata
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht_layout import (
    HASH_SPACE,
    LINKTO_XATTR,
    Layout,
    LayoutRange,
    check_layout,
    compute_layout,
    decode_linkto,
)

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


@dataclass(slots=True)
class ReplayFd:
    """The destination of a migration in progress, opened to repeat this fd's writes there; valid
    for the migration whose marker it was opened for."""

    marker: bytes
    subvol: Translator
    fd: Fd


@dataclass(slots=True)
class FileFd:
    """A file opened through DHT: the subvolume it is open on and the flags, so that it can be
    reopened where the file went when a migration moves it."""

    subvol: Translator
    flags: int
    replay: ReplayFd | None = None
    reopening: asyncio.Lock | None = None


# ---- the migration protocol (dht_migrate) ---------------------------------------------------

#: held (write, non-blocking) by a migrator for a whole migration, and by rename: one at a time
MIGRATE_DOMAIN = "dht.file.migrate"
#: byte ranges of the source: the migrator's chunk copies and its switch take write locks, a client
#: repeating its write on the destination takes a read lock on the range it wrote
DATA_DOMAIN = "dht.file.data"
#: on the source while its data is copied (phase 1): the destination subvolume, NUL, a run id
MIGRATING_XATTR = "trusted.mortar.dht.migrating"
#: on each subvolume's root: the commit hash of the last complete rebalance (4 bytes, big-endian);
#: directories whose layout carries it have every file on its hashed subvolume
VOL_COMMIT_XATTR = "trusted.mortar.dht.commithash"

#: states `MigrationClient.probe` tells apart
IDLE, COPYING, MOVED = 0, 1, 2


def encode_marker(subvol: str, run: bytes) -> bytes:
    return subvol.encode() + b"\0" + run


def marker_target(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def migration_bit(iatt: Iatt | None) -> bool:
    """A regular file with the sticky bit: being migrated (phase 1), moved away (phase 2, a link
    file), or both told apart only by their xattrs. DHT refuses the bit on regular files otherwise."""
    return iatt is not None and iatt.is_reg and bool(iatt.mode & stat.S_ISVTX)


def hide_migration(iatt: Iatt) -> Iatt:
    """The attributes an application sees: without the migration bit."""
    if migration_bit(iatt):
        return replace(iatt, mode=iatt.mode & ~stat.S_ISVTX)
    return iatt


def copyable_xattr(name: str) -> bool:
    """Xattrs that belong to the file and move with it (not DHT's placement or AFR's changelog)."""
    return not name.startswith(("trusted.mortar.dht", "trusted.afr.", "trusted.mortar.gfid"))


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


def holds_data(rep: EntryReply) -> bool:
    """A lookup reply (asked for the linkto and marker xattrs) that is the file's data: neither a
    link file nor one being made (mknod gives it its mode, a setxattr its linkto a moment later; a
    file under migration whose permission bits are 0 has that mode too, and carries the marker)."""
    if linkto_of(rep) is not None:
        return False
    return not is_linkfile(rep.iatt) or MIGRATING_XATTR in wanted_xattrs(rep.xdata)


async def gather_fops(calls: Iterable[Awaitable[_T]]) -> list[_T | FopError]:
    """Run fops on several subvolumes at once; each result is the reply or the FopError it raised
    (any other exception is a bug and propagates). The calls become tasks at once, so a cancelled
    fan-out cancels every call instead of leaking coroutines that never ran."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    out: list[_T | FopError] = []
    for r in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(r, BaseException) and not isinstance(r, FopError):
            raise r
        out.append(r)
    return out


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


# ---- fix-layout: new ranges that keep as much of the old ones as contiguous ranges allow ------


def _sizes(weights: Sequence[int]) -> list[int]:
    total = sum(weights)
    out, cum, lower = [], 0, 0
    for w in weights:
        cum += w
        upper = HASH_SPACE * cum // total if total else 0
        out.append(upper - lower)
        lower = upper
    return out


Spans = dict[str, tuple[int, int]]  # subvolume -> [start, end) of its old range


def _kept(order: Sequence[str], size: dict[str, int], old: Spans) -> int:
    """Hash values that stay on the same subvolume when ranges are laid out in `order` from 0."""
    pos = kept = 0
    for s in order:
        end = pos + size[s]
        span = old.get(s)
        if span is not None:
            kept += max(0, min(end, span[1]) - max(pos, span[0]))
        pos = end
    return kept


def _insert_best(order: list[str], s: str, size: dict[str, int], old: Spans) -> list[str]:
    cands = [[*order[:i], s, *order[i:]] for i in range(len(order) + 1)]
    return max(cands, key=lambda c: _kept(c, size, old))


def plan_layout(
    old: Layout,
    subvols: Sequence[str],
    weights: Sequence[int] | None = None,
    *,
    commit_hash: int,
    zero: Iterable[str] = (),
    start: int = 0,
) -> Layout:
    """A layout over `subvols` (sized by `weights`) that moves as few hash values as it can away from
    the subvolume that owns them in `old` (GlusterFS's "reuse existing ranges"): remaining
    subvolumes keep their old order and new ones are inserted where they keep the most, each range
    contiguous and the whole space covered once. Two subvolumes added to two move half the space
    (the least possible), one added to four about 0.3 (a fresh layout: up to 0.8). An unusable
    `old` (holes, overlaps) gets a fresh layout rotated to `start`. `zero` subvolumes get empty
    ranges."""
    weights = list(weights) if weights is not None else [1] * len(subvols)
    size = {s: n for s, n in zip(subvols, _sizes(weights), strict=True) if n}
    empty = [s for s in subvols if s not in size] + [z for z in zero if z not in subvols]
    if not size:
        raise ValueError("a layout needs at least one subvolume with a range")
    if not old.owners or not check_layout(old).ok:
        return compute_layout(subvols, weights, start=start, commit_hash=commit_hash, zero=zero)
    spans = {r.subvol: (r.start, r.stop + 1) for r in old.owners}
    order = [r.subvol for r in old.owners if r.subvol in size]
    newcomers = [s for s in subvols if s in size and s not in spans]
    for s in newcomers:
        order = _insert_best(order, s, size, spans)
    for _ in range(3):  # move each newcomer again now that all are placed, until nothing improves
        before = list(order)
        for s in newcomers:
            order.remove(s)
            order = _insert_best(order, s, size, spans)
        if order == before:
            break
    weight = dict(zip(subvols, weights, strict=True))
    total, cum, lower = sum(weight[s] for s in order), 0, 0
    ranges = []
    for s in order:  # bounds as compute_layout rounds them: an unchanged layout comes out the same
        cum += weight[s]
        upper = HASH_SPACE * cum // total
        ranges.append(LayoutRange(s, lower, upper - 1, commit_hash))
        lower = upper
    ranges.extend(LayoutRange(s, 0, 0, commit_hash) for s in empty)
    return Layout(ranges)
