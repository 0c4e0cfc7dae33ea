"""The block mapping: a two-level tree of reference-counted nodes with copy-on-write sharing.

Design (the dm-thin idea of shared btree nodes, flattened to two fixed levels):

- A **leaf** maps 512 consecutive virtual blocks to data blocks (`array('q')`, -1 = unmapped);
  stored as a 4 KiB blob. A **top** maps leaf index -> leaf for one volume's whole address space
  (a dict, so a sparse 64 GiB volume costs only the leaves it uses).
- A volume points at a top; a top may be pointed at by several volumes, a leaf by several tops,
  a data block by several leaves. Each count is kept (tops, leaves: `rc`; blocks: the space map).
- **Snapshot = the new volume points at the origin's top, top.rc += 1**: O(1) whatever the size.
  The copy happens lazily and only along the path a write takes: the writer first "shadows" a
  shared top (copies its dict, every leaf gains a reference), then a shared leaf (copies 512
  entries, every block gains a reference), then copies the one shared data block. Untouched
  parts stay shared forever. A data block may be written in place only when top, leaf and block
  all have count 1.
- **Crash rule:** in-place writes must also respect the *committed* state. If a count fell to 1
  in the open transaction (say a snapshot was deleted), the last commit still shares the object,
  so it is marked *tainted* until the next commit and its blocks are copied on write. Blocks
  allocated in the open transaction are *fresh*: no durable (or being-committed) mapping reaches
  them, so they are always safe to overwrite; they stop being fresh when the transaction closes.

`Mapping` owns these rules and records what changed, so `take_changes` hands the commit exactly
the rows to rewrite.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mortar.thinpool.spacemap import SpaceMap, _le

if TYPE_CHECKING:
    from mortar.thinpool.volume import ThinVolume

LEAF_SHIFT = 9
LEAF_BLOCKS = 1 << LEAF_SHIFT
LEAF_MASK = LEAF_BLOCKS - 1
UNMAPPED = -1
_EMPTY = array("q", [UNMAPPED]) * LEAF_BLOCKS


class Leaf:
    """512 map entries and how many of them are mapped: the count is kept as entries change
    (`Mapping.set_entry`, `Mapping.unmap`), so a volume's allocation is a sum over its leaves
    rather than a scan of every entry (snapshot creation reports it and must not grow with size)."""

    __slots__ = ("count", "id", "map", "rc")

    def __init__(self, node_id: int, entries: array[int] | None = None) -> None:
        self.id = node_id
        self.rc = 0
        self.map: array[int] = entries if entries is not None else array("q", _EMPTY)
        self.count = LEAF_BLOCKS - self.map.count(UNMAPPED)

    def mapped(self) -> int:
        return self.count

    def blob(self) -> bytes:
        return _le(array("q", self.map)).tobytes()

    @classmethod
    def from_blob(cls, node_id: int, blob: bytes) -> Leaf:
        entries = _le(array("q", blob))
        if len(entries) != LEAF_BLOCKS:
            entries = (entries + _EMPTY)[:LEAF_BLOCKS]
        return cls(node_id, entries)


class Top:
    __slots__ = ("id", "leaves", "rc")

    def __init__(self, node_id: int) -> None:
        self.id = node_id
        self.rc = 0
        self.leaves: dict[int, Leaf] = {}


@dataclass
class Changes:
    """Node-level rows one commit writes (blobs are copies: the live arrays keep changing)."""

    tops_full: list[tuple[int, list[tuple[int, int]]]] = field(default_factory=list)
    top_set: list[tuple[int, int, int]] = field(default_factory=list)
    top_del: list[tuple[int, int]] = field(default_factory=list)
    dead_tops: list[int] = field(default_factory=list)
    leaves: list[tuple[int, bytes]] = field(default_factory=list)
    dead_leaves: list[int] = field(default_factory=list)
    chunks: list[tuple[int, bytes]] = field(default_factory=list)


class Mapping:
    """Every change to tops, leaves and block counts goes through here (caller holds the pool lock)."""

    def __init__(self, space: SpaceMap, next_node: int, committed_txn: int) -> None:
        self.space = space
        self.next_node = next_node
        self.committed = committed_txn
        self.txn = committed_txn + 1
        self.live_nodes = 0
        self.taint: set[int] = set()  # node ids whose count fell to 1 since the last durable commit
        self.taint_blocks: set[int] = set()
        self.fresh: set[int] = set()  # blocks allocated in the open transaction
        self._marks: list[tuple[int, bool, int]] = []  # (txn, is_node, id): taints to drop at commit
        self.new_tops: dict[int, Top] = {}
        self.top_edits: dict[int, tuple[Top, set[int]]] = {}
        self.dead_tops: set[int] = set()
        self.dirty_leaves: dict[int, Leaf] = {}
        self.dead_leaves: set[int] = set()
        self.moved: set[int] = set()  # volumes whose top changed (their row must be rewritten)

    # -- node lifecycle -------------------------------------------------------------------------
    def _node_id(self) -> int:
        self.next_node += 1
        return self.next_node

    def new_top(self) -> Top:
        top = Top(self._node_id())
        top.rc = 1
        self.new_tops[top.id] = top
        self.live_nodes += 1
        return top

    def new_leaf(self, entries: array[int] | None = None) -> Leaf:
        leaf = Leaf(self._node_id(), entries)
        leaf.rc = 1
        self.dirty_leaves[leaf.id] = leaf
        self.live_nodes += 1
        return leaf

    def _taint(self, is_node: bool, ident: int) -> None:
        (self.taint if is_node else self.taint_blocks).add(ident)
        self._marks.append((self.txn, is_node, ident))

    def unref_top(self, top: Top) -> None:
        top.rc -= 1
        if top.rc == 1:
            self._taint(True, top.id)
        elif top.rc == 0:
            for leaf in top.leaves.values():
                self.unref_leaf(leaf)
            self.live_nodes -= 1
            self.new_tops.pop(top.id, None)
            self.top_edits.pop(top.id, None)
            self.dead_tops.add(top.id)

    def unref_leaf(self, leaf: Leaf) -> None:
        leaf.rc -= 1
        if leaf.rc == 1:
            self._taint(True, leaf.id)
        elif leaf.rc == 0:
            for b in leaf.map:
                if b >= 0:
                    self.unref_block(b)
            self.live_nodes -= 1
            self.dirty_leaves.pop(leaf.id, None)
            self.dead_leaves.add(leaf.id)

    def unref_block(self, b: int) -> None:
        if self.space.decref(b) == 1:
            self._taint(False, b)

    def alloc(self, n: int) -> list[int]:
        blocks = self.space.alloc(n)
        self.fresh.update(blocks)
        return blocks

    # -- copy on write --------------------------------------------------------------------------
    def writable_top(self, vol: ThinVolume) -> Top:
        """The volume's top, copied first if another volume shares it."""
        old = vol.top
        if old.rc == 1:
            return old
        top = self.new_top()
        top.leaves = dict(old.leaves)
        for leaf in top.leaves.values():
            leaf.rc += 1
        self.unref_top(old)
        vol.top = top
        self.moved.add(vol.id)
        return top

    def writable_leaf(self, top: Top, li: int, create: bool) -> Leaf | None:
        """Leaf `li` of an exclusive top, copied first if shared; created empty if asked."""
        leaf = top.leaves.get(li)
        if leaf is None:
            if not create:
                return None
            leaf = top.leaves[li] = self.new_leaf()
            self.edit_top(top, li)
            return leaf
        if leaf.rc == 1:
            return leaf
        copy = self.new_leaf(array("q", leaf.map))
        for b in copy.map:
            if b >= 0:
                self.space.incref(b)
        self.unref_leaf(leaf)
        top.leaves[li] = copy
        self.edit_top(top, li)
        return copy

    def edit_top(self, top: Top, li: int) -> None:
        if top.id not in self.new_tops:
            self.top_edits.setdefault(top.id, (top, set()))[1].add(li)

    def set_entry(self, leaf: Leaf, j: int, b: int) -> None:
        leaf.count += (b >= 0) - (leaf.map[j] >= 0)
        leaf.map[j] = b
        self.dirty_leaves[leaf.id] = leaf

    def drop_leaf(self, top: Top, li: int) -> None:
        leaf = top.leaves.pop(li)
        self.edit_top(top, li)
        self.unref_leaf(leaf)

    def safe_in_place(self, top: Top, leaf: Leaf, b: int) -> bool:
        """May block `b` (reached through top and leaf) be overwritten without copying?"""
        if self.space.rc[b] != 1 or leaf.rc != 1 or top.rc != 1:
            return False
        if b in self.fresh:
            return True
        taint = self.taint
        return not (top.id in taint or leaf.id in taint or b in self.taint_blocks)

    def unmap(self, vol: ThinVolume, vb0: int, vb1: int) -> None:
        """Unmap virtual blocks [vb0, vb1): drop whole leaves, clear entries of partial ones."""
        if vb1 <= vb0:
            return
        li0, li1 = vb0 >> LEAF_SHIFT, (vb1 - 1) >> LEAF_SHIFT
        if li1 - li0 < len(vol.top.leaves):
            hit = [li for li in range(li0, li1 + 1) if li in vol.top.leaves]
        else:
            hit = sorted(li for li in vol.top.leaves if li0 <= li <= li1)
        if not hit:
            return
        top = self.writable_top(vol)
        for li in hit:
            base = li << LEAF_SHIFT
            lo, hi = max(vb0, base) - base, min(vb1, base + LEAF_BLOCKS) - base
            if lo == 0 and hi == LEAF_BLOCKS:
                self.drop_leaf(top, li)
                continue
            if top.leaves[li].map[lo:hi].count(UNMAPPED) == hi - lo:
                continue
            leaf = self.writable_leaf(top, li, False)
            assert leaf is not None
            m = leaf.map
            for j in range(lo, hi):
                b = m[j]
                if b >= 0:
                    m[j] = UNMAPPED
                    leaf.count -= 1
                    self.unref_block(b)
            self.dirty_leaves[leaf.id] = leaf
            if leaf.count == 0:
                self.drop_leaf(top, li)

    # -- transactions ---------------------------------------------------------------------------
    def dirty(self) -> bool:
        return bool(
            self.new_tops
            or self.moved
            or self.top_edits
            or self.dead_tops
            or self.dirty_leaves
            or self.dead_leaves
            or self.space.dirty
            or self.space.pending
        )

    def take_changes(self) -> tuple[int, Changes]:
        """Close the open transaction: return its number and rows; a new transaction opens."""
        ch = Changes()
        for top in self.new_tops.values():
            ch.tops_full.append((top.id, [(li, leaf.id) for li, leaf in top.leaves.items()]))
        for top, idxs in self.top_edits.values():
            for li in idxs:
                leaf = top.leaves.get(li)
                if leaf is None:
                    ch.top_del.append((top.id, li))
                else:
                    ch.top_set.append((top.id, li, leaf.id))
        ch.dead_tops = sorted(self.dead_tops)
        ch.leaves = [(leaf.id, leaf.blob()) for leaf in self.dirty_leaves.values()]
        ch.dead_leaves = sorted(self.dead_leaves)
        ch.chunks = [(i, self.space.chunk_blob(i)) for i in sorted(self.space.dirty)]
        self.new_tops, self.top_edits, self.dead_tops = {}, {}, set()
        self.dirty_leaves, self.dead_leaves = {}, set()
        self.space.dirty = set()
        self.space.seal()
        self.fresh = set()
        txn = self.txn
        self.txn += 1
        return txn, ch

    def committed_txn(self, txn: int) -> None:
        """Transaction `txn` is durable: taints it (or earlier ones) set no longer apply."""
        self.committed = txn
        keep = [m for m in self._marks if m[0] > txn]
        for _, is_node, ident in self._marks:
            (self.taint if is_node else self.taint_blocks).discard(ident)
        for _, is_node, ident in keep:
            (self.taint if is_node else self.taint_blocks).add(ident)
        self._marks = keep
