"""Self-heal entry points, for the client (heal on access) and for the heal daemon.

- `heal_gfid`: heal whatever one object needs (data, metadata, entry), judged from its changelog;
- `pending_from_index` / `heal_index`: the gfids a brick's index lists (`INDEX_XATTROP_GFID`, and the
  dirty index for operations interrupted by a crash) and healing them all, repeating while heals
  reveal more work (entries created on a sink need their contents healed next);
- `heal_full`: a crawl from the root that also merges directories with no marks at all;
- `heal_info` / `list_split_brain`: what `volume heal VOL info [split-brain]` reports;
- `resolve_split_brain` / `resolve_gfid_split_brain`: the `bigger-file`, `latest-mtime` and
  `source-brick` resolutions;
- `BackgroundHealer`: heals triggered by lookups, a bounded number at a time.
"""

from __future__ import annotations

import asyncio
import errno
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from mortar.core.errors import FopError
from mortar.core.fops import Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, ENTRY, KIND_NAMES, METADATA
from mortar.xlators.cluster.afr.heal_common import (
    HealResult,
    HealStats,
    choose_by_policy,
    list_dir,
    normal_policy,
    touch,
)
from mortar.xlators.cluster.afr.heal_entry import NameVerdict, entry_conflicts, heal_entry, heal_name
from mortar.xlators.cluster.afr.heal_inode import heal_data, heal_metadata
from mortar.xlators.cluster.afr.state import acting_as, identity
from mortar.xlators.features.index import INDEX_DIRTY_GFID, INDEX_XATTROP_GFID

__all__ = [
    "BackgroundHealer",
    "HealInfo",
    "HealResult",
    "HealStats",
    "heal_data",
    "heal_entry",
    "heal_full",
    "heal_gfid",
    "heal_index",
    "heal_info",
    "heal_metadata",
    "heal_name",
    "list_split_brain",
    "pending_from_index",
    "resolve_gfid_split_brain",
    "resolve_split_brain",
]

ALL_KINDS = frozenset({DATA, METADATA, ENTRY})


async def heal_gfid(
    afr: ReplicateBase,
    gfid: Gfid,
    kinds: Iterable[int] = ALL_KINDS,
    blocking: bool = True,
    merge: bool = False,
) -> HealResult:
    """Heal what object `gfid` needs among `kinds`: data, then metadata, then entries."""
    wanted = frozenset(kinds)
    result = HealResult(gfid)
    sv = await afr.survey(gfid_loc(gfid))
    if not sv.present:
        result.missing = all(e.errno in (errno.ENOENT, errno.ESTALE) for e in sv.errors.values())
        return result
    judged = afr.judge_survey(sv)
    steps = []
    for kind, fn in ((DATA, heal_data), (METADATA, heal_metadata)):
        v = judged.verdicts.get(kind)
        if kind in wanted and v is not None and v.needs_heal:
            steps.append(fn)
    for fn in steps:
        _merge(result, await fn(afr, gfid, blocking=blocking))
    v = judged.verdicts.get(ENTRY)
    if ENTRY in wanted and v is not None and (v.needs_heal or merge):
        _merge(result, await heal_entry(afr, gfid, blocking=blocking, merge=merge))
    if not steps and not result.healed and not result.split_brain and not result.busy:
        await touch(afr, gfid, sv.present)  # nothing to do: let the indexes drop a stale entry
    afr.forget(gfid)
    return result


def _merge(into: HealResult, res: HealResult) -> None:
    into.healed |= res.healed
    into.sinks |= res.sinks
    into.bytes += res.bytes
    into.split_brain |= res.split_brain
    into.busy = into.busy or res.busy
    into.missing = into.missing or res.missing
    into.created.extend(res.created)


async def pending_from_index(afr: ReplicateBase, child: int, dirty: bool = True) -> list[Gfid]:
    """The gfids child `child`'s index lists as needing heal (and, with `dirty`, those with an
    operation that never finished)."""
    xl = afr.children[child]
    found: dict[Gfid, None] = {}
    with acting_as(identity()):
        for vgfid in (INDEX_XATTROP_GFID, INDEX_DIRTY_GFID) if dirty else (INDEX_XATTROP_GFID,):
            fd = Fd(vgfid, is_dir=True)
            await xl.opendir(gfid_loc(vgfid), fd)
            try:
                offset = 0
                while entries := (await xl.readdirp(fd, 64 << 10, offset)).entries:
                    for e in entries:
                        try:
                            found[Gfid(e.name)] = None
                        except ValueError:
                            afr.log.warning("index of %s lists %r, not a gfid", xl.name, e.name)
                    offset = entries[-1].offset
            finally:
                await xl.releasedir(fd)
    return list(found)


async def _purge(afr: ReplicateBase, child: int, gfid: Gfid) -> None:
    """Drop a stale index entry (its object is gone)."""
    with acting_as(identity()):
        for vgfid in (INDEX_XATTROP_GFID, INDEX_DIRTY_GFID):
            try:
                await afr.children[child].unlink(
                    Loc(f"<index>/{gfid}", pargfid=vgfid, name=gfid.canonical), 0
                )
            except FopError as exc:
                if exc.errno not in (errno.ENOENT, errno.ESTALE):
                    afr.log.debug("purging %s from the index of %s: %s", gfid, afr.children[child].name, exc)


async def heal_index(
    afr: ReplicateBase, children: Iterable[int] | None = None, max_passes: int = 8, blocking: bool = True
) -> HealStats:
    """Heal everything the indexes of `children` (default: every child that is up) list, pass after
    pass while passes make progress (healing a directory can create entries whose contents are then
    listed). Each object counts once, with the outcome of its last attempt; bytes add up."""
    which = sorted(afr.up_indices() if children is None else set(children) & set(afr.up_indices()))
    final: dict[Gfid, HealResult | None] = {}
    moved = 0
    for _ in range(max_passes):
        listed: dict[Gfid, list[int]] = {}
        for i in which:
            try:
                for g in await pending_from_index(afr, i):
                    listed.setdefault(g, []).append(i)
            except FopError as exc:
                afr.log.warning("cannot read the index of %s: %s", afr.children[i].name, exc)
        progress = False
        for gfid, holders in listed.items():
            try:
                res = await heal_gfid(afr, gfid, blocking=blocking)
            except FopError as exc:
                afr.log.warning("heal of %s failed: %s", gfid, exc)
                final[gfid] = None
                continue
            if res.missing:
                for i in holders:
                    await _purge(afr, i, gfid)
                progress = True
                continue
            final[gfid] = res
            moved += res.bytes
            progress = progress or bool(res.healed) or bool(res.created)
        if not progress:
            break
    stats = HealStats()
    for gfid, last in final.items():
        if last is None:
            stats.fail(gfid)
        else:
            last.bytes = 0
            stats.add(last)
    stats.bytes = moved
    return stats


async def heal_full(afr: ReplicateBase, blocking: bool = True) -> HealStats:
    """Crawl every directory from the root, merging entries even where nothing is marked, and heal
    every object found (GlusterFS's `heal VOL full`)."""
    stats = HealStats()
    queue: list[Gfid] = [ROOT_GFID]
    seen: set[Gfid] = set()
    who = identity()
    while queue:
        gfid = queue.pop()
        if gfid in seen:
            continue
        seen.add(gfid)
        try:
            res = await heal_gfid(afr, gfid, blocking=blocking, merge=True)
        except FopError as exc:
            afr.log.warning("heal of %s failed: %s", gfid, exc)
            stats.fail(gfid)
            continue
        stats.add(res)
        st = afr.known(gfid) or await afr.inode_state(gfid)
        if not stat.S_ISDIR(st.type_bits):
            continue
        source = next(iter(afr.read_order(gfid, st.readable.get(ENTRY, st.present))), None)
        if source is None:
            continue
        for e in (await list_dir(afr, source, gfid, who)).values():
            if e.iatt is not None and e.iatt.gfid not in seen:
                queue.append(e.iatt.gfid)
    return stats


@dataclass(slots=True)
class HealInfo:
    """One object that needs heal: which children's indexes list it and its split-brain kinds."""

    gfid: Gfid
    children: list[int] = field(default_factory=list)
    split_brain: list[str] = field(default_factory=list)
    #: for a directory, names whose copies have different gfids or types
    conflicts: list[str] = field(default_factory=list)


async def heal_info(afr: ReplicateBase) -> list[HealInfo]:
    """Every object listed by the index of a child that is up, with what kind of split-brain (if
    any) each is in (`volume heal VOL info`)."""
    listed: dict[Gfid, HealInfo] = {}
    for i in afr.up_indices():
        try:
            for g in await pending_from_index(afr, i):
                listed.setdefault(g, HealInfo(g)).children.append(i)
        except FopError as exc:
            afr.log.warning("cannot read the index of %s: %s", afr.children[i].name, exc)
    for info in listed.values():
        sv = await afr.survey(gfid_loc(info.gfid))
        if not sv.present:
            continue
        judged = afr.judge_survey(sv)
        info.split_brain = sorted(KIND_NAMES[k] for k, v in judged.verdicts.items() if v.split_brain)
        if ENTRY in judged.verdicts:
            info.conflicts = await entry_conflicts(afr, info.gfid)
            if info.conflicts and "entry" not in info.split_brain:
                info.split_brain.append("gfid")
    return sorted(listed.values(), key=lambda h: bytes(h.gfid))


async def list_split_brain(afr: ReplicateBase) -> list[HealInfo]:
    """The objects in split-brain (`volume heal VOL info split-brain`)."""
    return [h for h in await heal_info(afr) if h.split_brain]


def _chosen(afr: ReplicateBase, policy: str, source: int | str | None, iatts: dict, what: str) -> int:
    if policy == "source-brick":
        if source is None:
            raise FopError(errno.EINVAL, "source-brick needs a child index or name")
        chosen = afr.child_index(source)
        if chosen not in iatts:
            raise FopError(
                errno.EINVAL, f"child {afr.children[chosen].name} does not hold {what} (or is down)"
            )
        return chosen
    pol = normal_policy(policy)
    if pol not in ("size", "mtime", "ctime", "majority"):
        raise FopError(errno.EINVAL, f"unknown split-brain policy {policy!r}")
    chosen_or_none = choose_by_policy(pol, list(iatts), iatts, afr.n)
    if chosen_or_none is None:
        raise FopError(errno.EINVAL, f"{policy} cannot choose a copy of {what}: the copies tie")
    return chosen_or_none


async def resolve_split_brain(
    afr: ReplicateBase, gfid: Gfid, policy: str, source: int | str | None = None
) -> int:
    """Resolve the split-brain of `gfid` with `policy` (bigger-file, latest-mtime, latest-ctime,
    majority, or source-brick with `source` a child index or name): the chosen copy becomes the
    source of every kind in split-brain, the others are healed from it and the counters cleared.
    Returns the chosen child."""
    sv = await afr.survey(gfid_loc(gfid))
    if not sv.present:
        raise FopError(errno.ENOENT, f"{gfid} is on no child that is up")
    judged = afr.judge_survey(sv)
    split = [k for k, v in judged.verdicts.items() if v.split_brain]
    if not split:
        raise FopError(errno.EINVAL, f"{gfid} is not in split-brain")
    iatts = {i: sv.iatt(i) for i in sv.present if not (DATA in split and i == afr.arbiter)}
    chosen = _chosen(afr, policy, source, iatts, str(gfid))
    afr.log.info(
        "resolving split-brain of %s (%s) with %s: child %s", gfid, split, policy, afr.children[chosen].name
    )
    if DATA in split:
        await heal_data(afr, gfid, force_source=chosen)
    if METADATA in split:
        await heal_metadata(afr, gfid, force_source=chosen)
    if ENTRY in split:
        await heal_entry(afr, gfid, force_source=chosen)
    afr.forget(gfid)
    return chosen


async def resolve_gfid_split_brain(
    afr: ReplicateBase, parent: Gfid, name: str, policy: str, source: int | str | None = None
) -> int:
    """Resolve a name whose copies have different gfids: the chosen copy stays, the others are
    replaced by it. Returns the chosen child."""
    sv = await afr.survey(Loc(name, pargfid=parent, name=name))
    iatts = {i: r.iatt for i, r in sv.replies.items()}
    if len({ia.gfid for ia in iatts.values()}) < 2:
        raise FopError(errno.EINVAL, f"{name!r} in {parent} is not in gfid split-brain")
    chosen = _chosen(afr, policy, source, iatts, repr(name))
    verdict: NameVerdict = await heal_name(afr, parent, name, force_source=chosen)
    if verdict.split_brain or verdict.gfid is None:
        raise FopError(errno.EIO, f"could not resolve {name!r} in {parent}")
    afr.forget(parent)
    return chosen


class BackgroundHealer:
    """Heals started by lookups: at most `background-self-heal-count` at a time and one per object;
    beyond a queue of `queue_limit` waiting, new requests are dropped (the index keeps them)."""

    queue_limit = 128

    def __init__(self, afr: ReplicateBase) -> None:
        self.afr = afr
        self._tasks: dict[Gfid, asyncio.Task[None]] = {}
        self._slots: asyncio.Semaphore | None = None
        self.completed = 0

    def schedule(self, gfid: Gfid, kinds: Iterable[int]) -> bool:
        limit = self.afr.opts["background-self-heal-count"]
        wanted = frozenset(kinds)
        if not limit or not wanted or gfid in self._tasks:
            return False
        if len(self._tasks) >= limit + self.queue_limit:
            self.afr.log.debug("background heal queue full: %s left to the heal daemon", gfid)
            return False
        if self._slots is None:
            self._slots = asyncio.Semaphore(limit)
        task = asyncio.get_running_loop().create_task(self._run(gfid, wanted, self._slots))
        self._tasks[gfid] = task
        task.add_done_callback(lambda _t: self._tasks.pop(gfid, None))
        return True

    async def _run(self, gfid: Gfid, kinds: frozenset[int], slots: asyncio.Semaphore) -> None:
        async with slots:
            try:
                res = await heal_gfid(self.afr, gfid, kinds, blocking=False)
                self.completed += 1
                if res.split_brain:
                    self.afr.log.warning("%s is in %s split-brain", gfid, ", ".join(sorted(res.split_brain)))
            except FopError as exc:
                self.afr.log.info("background heal of %s: %s", gfid, exc)
            except Exception:
                self.afr.log.exception("background heal of %s failed", gfid)

    async def idle(self) -> None:
        """Wait for the heals in progress (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
        self._tasks.clear()
