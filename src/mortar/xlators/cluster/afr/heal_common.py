"""What the heal algorithms share: results, the choice of a source, locks, and resetting counters."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import DirEntry, Fd, Loc
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, DIRTY_KEY, KIND_NAMES, ZERO, Verdict, encode
from mortar.xlators.cluster.afr.state import Survey, acting_as

#: CLI policy names -> favorite-child-policy names
POLICY_ALIASES = {"bigger-file": "size", "latest-mtime": "mtime", "latest-ctime": "ctime"}


@dataclass(slots=True)
class HealResult:
    """What healing one object did."""

    gfid: Gfid
    healed: set[str] = field(default_factory=set)  # kinds healed ("data", "metadata", "entry")
    sinks: set[int] = field(default_factory=set)
    bytes: int = 0
    split_brain: set[str] = field(default_factory=set)
    #: the object is on no child that is up (a stale index entry)
    missing: bool = False
    #: another healer holds the object
    busy: bool = False
    #: objects created on sinks by entry heal, whose contents and attributes still need heal
    created: list[Gfid] = field(default_factory=list)


@dataclass(slots=True)
class HealStats:
    """Totals of a heal run (`heal_index`, `heal_full`)."""

    scanned: int = 0
    healed: int = 0
    failed: int = 0
    split_brain: int = 0
    skipped: int = 0
    bytes: int = 0
    split_brain_gfids: list[Gfid] = field(default_factory=list)
    failed_gfids: list[Gfid] = field(default_factory=list)

    def add(self, res: HealResult) -> None:
        self.scanned += 1
        self.bytes += res.bytes
        if res.split_brain:
            self.split_brain += 1
            self.split_brain_gfids.append(res.gfid)
        elif res.busy:
            self.skipped += 1
        elif res.healed:
            self.healed += 1

    def fail(self, gfid: Gfid) -> None:
        self.scanned += 1
        self.failed += 1
        self.failed_gfids.append(gfid)


def normal_policy(policy: str) -> str:
    return POLICY_ALIASES.get(policy, policy)


def choose_by_policy(policy: str, candidates: Iterable[int], iatts: dict[int, Iatt], n: int) -> int | None:
    """The copy a split-brain policy picks, or None when it cannot decide (a tie, no majority).

    size: the biggest file; mtime/ctime: the newest; majority: a copy that more than half of all
    children hold identically (same size and mtime, same mode and owner)."""
    cands = sorted(i for i in candidates if i in iatts)
    policy = normal_policy(policy)
    if not cands or policy == "none":
        return None
    if policy == "majority":
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in cands:
            ia = iatts[i]
            groups.setdefault((ia.size, ia.mtime_ns, ia.mode, ia.uid, ia.gid), []).append(i)
        for members in groups.values():
            if 2 * len(members) > n:
                return members[0]
        return None
    metric = {
        "size": lambda ia: ia.size,
        "mtime": lambda ia: ia.mtime_ns,
        "ctime": lambda ia: ia.ctime_ns,
    }.get(policy)
    if metric is None:
        raise FopError(errno.EINVAL, f"unknown split-brain policy {policy!r}")
    best = max(metric(iatts[i]) for i in cands)
    winners = [i for i in cands if metric(iatts[i]) == best]
    return winners[0] if len(winners) == 1 else None


@dataclass(slots=True)
class Decision:
    """Which copy to heal from and which copies to heal, or why not."""

    source: int | None
    sinks: frozenset[int]
    split_brain: bool = False


def decide(
    afr: ReplicateBase,
    verdict: Verdict,
    sv: Survey,
    force_source: int | None = None,
    prefer: str = "first",
) -> Decision:
    """Source and sinks for one kind. Forced source, then the verdict's sources; in split-brain the
    favorite-child policy; with only `dirty` marks (an operation interrupted), a dirty copy (the
    biggest one with `prefer="size"`) is made the source of all the others."""
    present = verdict.present
    if force_source is not None:
        if force_source not in present:
            raise FopError(errno.EINVAL, f"child {force_source} does not hold this object (or is down)")
        return Decision(force_source, present - {force_source})
    no_src = {afr.arbiter} if afr.arbiter is not None and verdict.kind == DATA else set()
    if verdict.split_brain or (verdict.sinks and not verdict.sources):
        policy = afr.opts["favorite-child-policy"]
        iatts = {i: sv.iatt(i) for i in present if i not in no_src}
        chosen = choose_by_policy(policy, list(iatts), iatts, afr.n)
        if chosen is None:
            return Decision(None, frozenset(), split_brain=verdict.split_brain)
        afr.log.info(
            "split-brain of %s resolved by favorite-child-policy %s: child %d",
            sv.iatt(chosen).gfid,
            policy,
            chosen,
        )
        return Decision(chosen, present - {chosen})
    if verdict.sinks:
        return Decision(_pick(afr, verdict.sources, sv, prefer), verdict.sinks)
    if verdict.dirty:
        cands = (verdict.dirty - no_src) or verdict.sources
        if not cands:
            return Decision(None, frozenset())
        src = _pick(afr, cands, sv, prefer)
        return Decision(src, present - {src})
    return Decision(None, frozenset())


def _pick(afr: ReplicateBase, cands: Iterable[int], sv: Survey, prefer: str) -> int:
    ordered = sorted(cands)
    if prefer == "size":
        return max(ordered, key=lambda i: (sv.iatt(i).size, -i))
    non_arbiter = [i for i in ordered if i != afr.arbiter]
    return (non_arbiter or ordered)[0]


def reset_deltas(
    afr: ReplicateBase,
    sv: Survey,
    kind: int,
    sources: Iterable[int],
    sinks: Iterable[int],
    participants: Iterable[int],
) -> dict[int, dict[str, bytes]]:
    """The xattrops that clear what this heal repaired.

    Every participant forgets the healed sinks' missed changes; a healed sink forgets its own
    accusations but takes over the sources' accusations of children that did not take part (they
    are down: the sink now holds changes they missed); stale `dirty` marks go. Counters are moved by
    differences from the values read, never overwritten, so increments made meanwhile survive. Every
    changelog key is included (zeros where nothing changes) so the brick's index sees the whole
    state and drops the entry once it is clean."""
    src_set, sink_set, part = set(sources), set(sinks), set(participants) & set(sv.present)
    pending = sv.matrix.pending
    out: dict[int, dict[str, bytes]] = {}
    for c in part:
        d: dict[str, bytes] = {}
        for j, key in enumerate(afr.keys):
            have = pending[c][j][kind]
            want = have
            if j == c:
                want = have
            elif c in sink_set:
                absent = j not in part
                want = 1 if absent and any(pending[s][j][kind] > 0 for s in src_set) else 0
                if absent and want and have > 0:
                    want = have
            elif j in sink_set:
                want = 0
            values = [0, 0, 0]
            values[kind] = want - have
            d[key] = encode(*values)
        dirty = [0, 0, 0]
        dirty[kind] = -sv.matrix.dirty[c][kind]
        d[DIRTY_KEY] = encode(*dirty)
        out[c] = d
    return out


async def touch(afr: ReplicateBase, gfid: Gfid, children: Iterable[int]) -> None:
    """A zero xattrop of every changelog key: the brick's index drops the entry if all are clean."""
    zero = dict.fromkeys(afr.afr_keys, ZERO)
    await afr.xattrop_on({i: dict(zero) for i in children}, gfid_loc(gfid))


@contextlib.asynccontextmanager
async def inode_locks(
    afr: ReplicateBase,
    children: Iterable[int],
    domain: str,
    gfid: Gfid,
    who: CallContext,
    blocking: bool = True,
    start: int = 0,
    length: int = 0,
) -> AsyncIterator[list[int]]:
    """inodelk on the children (in order) for the duration of the block; yields those locked."""
    taken = await afr.inodelk_all(children, domain, gfid, start, length, who, blocking)
    try:
        yield taken
    finally:
        await afr.inodelk_release(taken, domain, gfid, start, length, who)


async def list_dir(afr: ReplicateBase, i: int, gfid: Gfid, who: CallContext) -> dict[str, DirEntry]:
    """Every entry of directory `gfid` on child `i` that has a gfid, by name."""
    child = afr.children[i]
    fd = Fd(gfid, is_dir=True)
    out: dict[str, DirEntry] = {}
    with acting_as(who):
        await child.opendir(gfid_loc(gfid), fd)
        try:
            offset = 0
            while entries := (await child.readdirp(fd, 128 << 10, offset)).entries:
                for e in entries:
                    if e.iatt is not None and e.name not in (".", ".."):
                        out[e.name] = e
                offset = entries[-1].offset
        finally:
            await child.releasedir(fd)
    return out


def kind_names(kinds: Iterable[int]) -> set[str]:
    return {KIND_NAMES[k] for k in kinds}


def entry_loc(parent: Gfid, name: str) -> Loc:
    return Loc(f"<gfid:{parent}>/{name}", pargfid=parent, name=name)
