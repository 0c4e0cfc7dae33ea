"""Entry self-heal of a directory, and name heal of one entry (at lookup).

Under an entry lock on the whole directory, the directory's entry counters decide:
- sources and sinks: the sinks are made to list what the sources list. A missing name is created
  with the source's gfid and type (a hard link when the sink already has that gfid, a rename when a
  sink directory sits under another name in the same directory); a name whose gfid or type differs
  is removed and re-created; a name no source has is removed (it was deleted while the sink was
  away). New objects are marked pending on the sources (data and metadata for files, entry and
  metadata for directories) so the index drives their contents' heal next;
- no accusation (only `dirty`, an interrupted operation) or split-brain: conservative merge, every
  name any child has is created where it is missing and nothing is deleted;
- one name with different gfids on copies that are both sources: gfid split-brain, reported and
  left alone unless a policy or a chosen source resolves it.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, AttrSet, DirEntry, SetAttrValid
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import ENTRY, encode, judge
from mortar.xlators.cluster.afr.heal_common import (
    HealResult,
    choose_by_policy,
    entry_loc,
    list_dir,
    reset_deltas,
)
from mortar.xlators.cluster.afr.state import MISSING_ERRNOS, acting_as, identity, new_owner

#: how deep a stale directory tree on a sink may be when it is removed
MAX_DELETE_DEPTH = 4096


@dataclass(slots=True)
class _Plan:
    """The directory being healed and what happened to it."""

    gfid: Gfid
    who: CallContext
    sources: frozenset[int]
    sinks: frozenset[int]
    authoritative: bool
    listings: dict[int, dict[str, DirEntry]]
    conflicts: list[str] = field(default_factory=list)
    created: list[Gfid] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)


def _same(a: Iatt, b: Iatt) -> bool:
    return a.gfid == b.gfid and a.type_bits == b.type_bits


def _pending_for_new(iatt: Iatt) -> bytes:
    if iatt.is_dir:
        return encode(0, 1, 1)
    if iatt.is_reg:
        return encode(1, 1, 0)
    return encode(0, 1, 0)


async def _exists(afr: ReplicateBase, i: int, gfid: Gfid) -> Iatt | None:
    try:
        return (await afr.children[i].lookup(gfid_loc(gfid))).iatt
    except FopError as exc:
        if exc.errno in MISSING_ERRNOS:
            return None
        raise


async def recreate(
    afr: ReplicateBase, sink: int, parent: Gfid, name: str, iatt: Iatt, sources: list[int]
) -> bool:
    """Create `name` in `parent` on `sink` as the object `iatt` describes (same gfid and type), once
    the sources record it as pending against the sink: at no moment does the new, still empty copy
    look complete (to a reader, a concurrent heal that would drop the index entry, or anyone after
    a crash in between). False when it cannot be done now (a directory with that gfid lives
    elsewhere on the sink: healing that other parent first moves it out of the way)."""
    child = afr.children[sink]
    loc = entry_loc(parent, name)
    xd = {GFID_REQ: bytes(iatt.gfid)}
    perm = iatt.mode & 0o7777
    elsewhere = await _exists(afr, sink, iatt.gfid)
    if elsewhere is not None and elsewhere.type_bits != iatt.type_bits:
        raise FopError(errno.EEXIST, f"gfid {iatt.gfid} is a different kind of object on {child.name}")
    if iatt.is_dir and elsewhere is not None:
        return False
    mark = {afr.keys[sink]: _pending_for_new(iatt)}
    _, bad = await afr.xattrop_on({s: dict(mark) for s in sources}, gfid_loc(iatt.gfid))
    if bad and len(bad) == len(set(sources)):
        raise next(iter(bad.values()))
    if iatt.is_dir:
        await child.mkdir(loc, perm, 0, xd)
    elif elsewhere is not None:
        await child.link(gfid_loc(iatt.gfid), loc)
    elif iatt.is_reg:
        await child.mknod(loc, stat.S_IFREG | perm, 0, 0, xd)
    elif iatt.is_lnk:
        src = next(iter(sources))
        target = (await afr.children[src].readlink(gfid_loc(iatt.gfid))).target
        await child.symlink(target, loc, 0, xd)
    else:
        await child.mknod(loc, iatt.type_bits | perm, iatt.rdev, 0, xd)
    if elsewhere is None and (iatt.uid or iatt.gid):
        await child.setattr(
            gfid_loc(iatt.gfid), AttrSet(SetAttrValid.UID | SetAttrValid.GID, uid=iatt.uid, gid=iatt.gid)
        )
    afr.log.info("entry heal: created %r (%s) in %s on %s", name, iatt.gfid, parent, child.name)
    return True


async def remove_tree(
    afr: ReplicateBase, i: int, parent: Gfid, name: str, iatt: Iatt, who: CallContext
) -> None:
    """Remove `name` from `parent` on child `i`; a directory goes with everything under it."""
    child = afr.children[i]
    if iatt.is_dir:
        await _empty_dir(afr, i, iatt.gfid, who, 0)
        await child.rmdir(entry_loc(parent, name), 0)
    else:
        await child.unlink(entry_loc(parent, name), 0)
    afr.log.info("entry heal: removed stale %r (%s) from %s on %s", name, iatt.gfid, parent, child.name)


async def _empty_dir(afr: ReplicateBase, i: int, gfid: Gfid, who: CallContext, depth: int) -> None:
    if depth > MAX_DELETE_DEPTH:
        raise FopError(errno.ELOOP, f"stale directory {gfid} is nested too deeply to remove")
    child = afr.children[i]
    for name, e in (await list_dir(afr, i, gfid, who)).items():
        assert e.iatt is not None
        if e.iatt.is_dir:
            await _empty_dir(afr, i, e.iatt.gfid, who, depth + 1)
            await child.rmdir(entry_loc(gfid, name), 0)
        else:
            await child.unlink(entry_loc(gfid, name), 0)


async def _heal_name_in(afr: ReplicateBase, plan: _Plan, name: str, targets: list[int]) -> None:
    """Make `name` on `targets` match the sources' copy. (In a merge every child is a source, so a
    differing copy shows up as a conflict between holders, never here as a target.)"""
    holders = {i: plan.listings[i][name] for i in sorted(plan.sources) if name in plan.listings[i]}
    if not holders:
        if plan.authoritative:
            for t in targets:
                e = plan.listings[t].get(name)
                if e is not None and e.iatt is not None:
                    await remove_tree(afr, t, plan.gfid, name, e.iatt, plan.who)
                    del plan.listings[t][name]
        return
    versions = {(e.iatt.gfid, e.iatt.type_bits) for e in holders.values() if e.iatt is not None}
    if len(versions) > 1:
        iatts = {i: e.iatt for i, e in holders.items() if e.iatt is not None}
        chosen = choose_by_policy(afr.opts["favorite-child-policy"], list(iatts), iatts, afr.n)
        if chosen is None:
            plan.conflicts.append(name)
            afr.log.warning(
                "gfid split-brain on %r in %s: copies %s differ", name, plan.gfid, sorted(holders)
            )
            return
        holders = {chosen: holders[chosen]}
        targets = sorted(set(targets) | (set(plan.listings) - {chosen}))
    good = next(iter(holders.values())).iatt
    assert good is not None
    srcs = [i for i, e in holders.items() if e.iatt is not None and _same(e.iatt, good)]
    for t in targets:
        if t in srcs:
            continue
        have = plan.listings[t].get(name)
        if have is not None and have.iatt is not None:
            if _same(have.iatt, good):
                continue
            await remove_tree(afr, t, plan.gfid, name, have.iatt, plan.who)
            del plan.listings[t][name]
        if good.is_dir and await _rename_in_place(afr, plan, t, name, good):
            continue
        if await recreate(afr, t, plan.gfid, name, good, srcs):
            plan.created.append(good.gfid)
            plan.listings[t][name] = DirEntry(name, 0, good)
        else:
            plan.deferred.append(name)


async def _rename_in_place(afr: ReplicateBase, plan: _Plan, t: int, name: str, good: Iatt) -> bool:
    """A sink directory renamed within this directory while the sink was away: rename it back."""
    for old, e in plan.listings[t].items():
        if old != name and e.iatt is not None and e.iatt.gfid == good.gfid and e.iatt.is_dir:
            if any(old in plan.listings[s] for s in plan.sources):
                return False
            await afr.children[t].rename(entry_loc(plan.gfid, old), entry_loc(plan.gfid, name))
            plan.listings[t][name] = plan.listings[t].pop(old)
            afr.log.info(
                "entry heal: renamed %r to %r in %s on %s", old, name, plan.gfid, afr.children[t].name
            )
            return True
    return False


async def heal_entry(
    afr: ReplicateBase,
    gfid: Gfid,
    force_source: int | None = None,
    blocking: bool = True,
    merge: bool = False,
) -> HealResult:
    """Heal the entries of directory `gfid` (see the module docstring). With `merge`, a directory
    with no marks at all is merged anyway (a full crawl: a brick that was replaced empty)."""
    result = HealResult(gfid)
    who = identity(new_owner())
    up = afr.up_indices()
    with acting_as(who):
        try:
            locked = await afr.entrylk_all(up, [(gfid, None)], who, blocking)
        except FopError as exc:
            if exc.errno != errno.EAGAIN or blocking:
                raise
            result.busy = True
            return result
        try:
            await _heal_entry_locked(afr, gfid, locked, who, force_source, merge, result)
        finally:
            await afr.entrylk_release(locked, [(gfid, None)], who)
    afr.forget(gfid)
    return result


async def _heal_entry_locked(
    afr: ReplicateBase,
    gfid: Gfid,
    locked: list[int],
    who: CallContext,
    force_source: int | None,
    merge: bool,
    result: HealResult,
) -> None:
    sv = await afr.survey(gfid_loc(gfid), children=locked)
    present = frozenset(i for i in sv.present if sv.iatt(i).is_dir)
    if not present:
        result.missing = not sv.present
        return
    verdict = judge(sv.matrix, ENTRY, present)
    if force_source is not None:
        sources, sinks = frozenset({force_source}), present - {force_source}
    elif verdict.sinks and verdict.sources:
        sources, sinks = verdict.sources, verdict.sinks
    elif verdict.needs_heal or merge:
        sources, sinks = present, frozenset()
    else:
        return
    authoritative = bool(sinks)
    listings = {i: await list_dir(afr, i, gfid, who) for i in sorted(present)}
    plan = _Plan(gfid, who, sources, sinks, authoritative, listings)
    targets = sorted(sinks) if authoritative else sorted(present)
    names = sorted(set().union(*(set(v) for v in listings.values())))
    for name in names:
        await _heal_name_in(afr, plan, name, targets)
    if plan.deferred:
        afr.log.info("entry heal of %s: %s wait for another directory's heal", gfid, plan.deferred)
    result.created.extend(plan.created)
    if plan.conflicts:
        result.split_brain.add("entry")
        return
    if plan.deferred:
        return
    await afr.xattrop_on(reset_deltas(afr, sv, ENTRY, sources, sinks, present), gfid_loc(gfid))
    result.healed.add("entry")
    result.sinks |= set(sinks)


async def entry_conflicts(afr: ReplicateBase, gfid: Gfid) -> list[str]:
    """Names of directory `gfid` whose copies have different gfids or types (no locks taken: for
    reports)."""
    who = identity()
    listings = {i: await list_dir(afr, i, gfid, who) for i in afr.up_indices()}
    out = []
    for name in sorted(set().union(*(set(v) for v in listings.values()))):
        kinds = {(e.iatt.gfid, e.iatt.type_bits) for v in listings.values() if (e := v.get(name)) and e.iatt}
        if len(kinds) > 1:
            out.append(name)
    return out


@dataclass(slots=True)
class NameVerdict:
    """What name heal concluded about one name: its gfid, or None when it does not exist."""

    gfid: Gfid | None
    split_brain: bool = False


async def heal_name(
    afr: ReplicateBase, parent: Gfid, name: str, force_source: int | None = None
) -> NameVerdict:
    """Make one name agree on the children that are up, under its entry lock: created where the
    parent's sources have it and it is missing, left for the parent's entry heal where only sinks
    have it; a gfid conflict between sources is a split-brain."""
    who = identity(new_owner())
    with acting_as(who):
        locked = await afr.entrylk_all(afr.up_indices(), [(parent, name)], who)
        try:
            psv = await afr.survey(gfid_loc(parent), children=locked)
            ppresent = frozenset(i for i in psv.present if psv.iatt(i).is_dir)
            pv = judge(psv.matrix, ENTRY, ppresent)
            nsv = await afr.survey(entry_loc(parent, name), children=ppresent)
            have = {i: r.iatt for i, r in nsv.replies.items()}
            if force_source is not None:
                sources: frozenset[int] = frozenset({force_source})
                sinks = ppresent - sources
            elif pv.sinks and pv.sources:
                sources, sinks = pv.sources, pv.sinks
            else:
                sources, sinks = ppresent, frozenset()
            holders = {i: ia for i, ia in have.items() if i in sources}
            if not holders:
                return NameVerdict(None)
            kinds = {(ia.gfid, ia.type_bits) for ia in holders.values()}
            if len(kinds) > 1:
                chosen = choose_by_policy(afr.opts["favorite-child-policy"], list(holders), holders, afr.n)
                if chosen is None:
                    afr.log.warning("gfid split-brain on %r in %s", name, parent)
                    return NameVerdict(None, split_brain=True)
                holders = {chosen: holders[chosen]}
                sinks = ppresent - {chosen}
            good = next(iter(holders.values()))
            srcs = [i for i, ia in holders.items() if _same(ia, good)]
            for t in sorted(ppresent - set(srcs)):
                mine = have.get(t)
                if mine is not None and _same(mine, good):
                    continue
                if mine is not None:
                    if t not in sinks:
                        return NameVerdict(None, split_brain=True)
                    await remove_tree(afr, t, parent, name, mine, who)
                await recreate(afr, t, parent, name, good, srcs)
            return NameVerdict(good.gfid)
        finally:
            await afr.entrylk_release(locked, [(parent, name)], who)
