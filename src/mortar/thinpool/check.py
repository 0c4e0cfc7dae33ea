"""Pool consistency check (the thin_check role): recompute every count from the mapping and compare.

It reports counts of tops, leaves and data blocks that disagree with what references them,
blocks mapped past a volume's end or past the data device, mapped blocks the allocator holds as
free (the next allocation would hand them out twice), leaked blocks (busy, unreferenced and not
waiting for reuse), bookkeeping errors, and whatever the loader found unreadable. Run on a freshly
opened pool it checks the stored metadata, since the counts in memory are those read from disk.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import TYPE_CHECKING

from mortar.thinpool.mapping import LEAF_BLOCKS, LEAF_SHIFT, Leaf, Top

if TYPE_CHECKING:
    from mortar.thinpool.pool import ThinPool

_MAX_DETAILS = 20


def check_pool(pool: ThinPool) -> list[str]:
    """Caller holds the pool lock."""
    problems = list(pool._load_problems)
    space = pool._map.space
    nblocks, bs = space.nblocks, pool._bs
    tops: dict[int, Top] = {}
    leaves: dict[int, Leaf] = {}
    top_refs: Counter[int] = Counter()
    leaf_refs: Counter[int] = Counter()
    for vol in pool._vols.values():
        if pool._names.get(vol.name) is not vol:
            problems.append(f"volume {vol.id} ({vol.name!r}) is missing from the name index")
        top = vol.top
        if tops.setdefault(top.id, top) is not top:
            problems.append(f"two different tops carry id {top.id}")
        top_refs[top.id] += 1
        end_vb = -(-vol.size // bs)
        for li, leaf in top.leaves.items():
            if top_refs[top.id] == 1:
                if leaves.setdefault(leaf.id, leaf) is not leaf:
                    problems.append(f"two different leaves carry id {leaf.id}")
                leaf_refs[leaf.id] += 1
            if (li + 1) << LEAF_SHIFT > end_vb:
                lo = max(0, end_vb - (li << LEAF_SHIFT))
                beyond = [j for j in range(lo, LEAF_BLOCKS) if leaf.map[j] >= 0]
                if beyond:
                    vb = (li << LEAF_SHIFT) + beyond[0]
                    problems.append(
                        f"volume {vol.name!r}: {len(beyond)} blocks mapped beyond its size, first at {vb}"
                    )
    if len(pool._names) != len(pool._vols):
        problems.append("name index and volume table differ in size")
    problems += [
        f"top {t.id}: count {t.rc}, used by {top_refs[i]} volumes"
        for i, t in tops.items()
        if t.rc != top_refs[i]
    ]
    expected = array("I", bytes(4 * nblocks))
    busy = space.busy
    freed_but_mapped: list[int] = []
    for lid, leaf in leaves.items():
        if leaf.rc != leaf_refs[lid]:
            problems.append(f"leaf {lid}: count {leaf.rc}, referenced by {leaf_refs[lid]} tops")
        for b in leaf.map:
            if b < 0:
                continue
            if b >= nblocks:
                problems.append(f"leaf {lid} maps data block {b}, beyond the {nblocks} of the device")
                continue
            expected[b] += 1
            if not busy[b]:
                freed_but_mapped.append(b)
    if pool._map.live_nodes != len(tops) + len(leaves):
        problems.append(f"node count {pool._map.live_nodes}, found {len(tops) + len(leaves)} live nodes")
    if expected != space.rc:
        wrong = [b for b in range(nblocks) if expected[b] != space.rc[b]]
        problems.append(
            f"{len(wrong)} data blocks have wrong counts: "
            + ", ".join(f"{b} has {space.rc[b]} not {expected[b]}" for b in wrong[:_MAX_DETAILS])
        )
    if freed_but_mapped:
        problems.append(
            f"{len(freed_but_mapped)} mapped blocks are free in the allocator (double allocation): "
            f"{sorted(set(freed_but_mapped))[:_MAX_DETAILS]}"
        )
    withheld = list(space.pending) + list(space.sealed) + [b for _, q in space.quarantine for b in q]
    bad = [b for b in withheld if space.rc[b] or not busy[b]]
    if bad or len(set(withheld)) != len(withheld):
        problems.append(
            f"blocks waiting for reuse are referenced, free or listed twice: {bad[:_MAX_DETAILS]}"
        )
    in_use = nblocks - space.rc.count(0)
    if busy.count(1) != in_use + len(withheld):
        problems.append(
            f"allocator marks {busy.count(1)} blocks busy; {in_use} are referenced "
            f"and {len(withheld)} wait for reuse (leak or double allocation)"
        )
    if space.nfree != busy.count(0):
        problems.append(f"free count {space.nfree} but {busy.count(0)} blocks are free")
    return problems
