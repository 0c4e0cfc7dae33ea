"""Client-side inode table: gfid -> Inode, plus a bounded dentry cache (parent gfid, name) -> Inode.

Translators keep per-inode state in `inode.ctx[translator]` (DHT's cached subvolume, AFR's readable
replicas...). The table is a cache: anything found here may be stale and is revalidated by lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt


class Inode:
    __slots__ = ("__weakref__", "ctx", "gfid", "mode", "ndentries", "nlookup")

    def __init__(self, gfid: Gfid, mode: int = 0) -> None:
        self.gfid = gfid
        self.mode = mode
        self.ctx: dict[object, Any] = {}
        self.nlookup = 0
        self.ndentries = 0

    def __repr__(self) -> str:
        return f"Inode({self.gfid}, mode={self.mode:o})"


class InodeTable:
    """Inodes by gfid and a least-recently-used dentry cache, bounded by `max_dentries`."""

    def __init__(self, max_dentries: int = 65536) -> None:
        self.max_dentries = max_dentries
        self._inodes: dict[Gfid, Inode] = {}
        self._dentries: OrderedDict[tuple[Gfid, str], Inode] = OrderedDict()
        self.root = self._get_or_make(ROOT_GFID, 0o40755)

    def _get_or_make(self, gfid: Gfid, mode: int) -> Inode:
        inode = self._inodes.get(gfid)
        if inode is None:
            inode = self._inodes[gfid] = Inode(gfid, mode)
        elif mode:
            inode.mode = mode
        return inode

    def get(self, gfid: Gfid) -> Inode | None:
        return self._inodes.get(gfid)

    def link(self, pargfid: Gfid | None, name: str, iatt: Iatt) -> Inode:
        """Record that `name` in `pargfid` is the object `iatt` describes; returns its inode."""
        inode = self._get_or_make(iatt.gfid, iatt.mode)
        inode.nlookup += 1
        if pargfid is not None and name:
            key = (pargfid, name)
            old = self._dentries.get(key)
            if old is not inode:
                if old is not None:
                    self._release(old)
                inode.ndentries += 1
            self._dentries[key] = inode
            self._dentries.move_to_end(key)
            while len(self._dentries) > self.max_dentries:
                _, evicted = self._dentries.popitem(last=False)
                self._release(evicted)
        return inode

    def find(self, pargfid: Gfid, name: str) -> Inode | None:
        inode = self._dentries.get((pargfid, name))
        if inode is not None:
            self._dentries.move_to_end((pargfid, name))
        return inode

    def unlink(self, pargfid: Gfid, name: str) -> None:
        inode = self._dentries.pop((pargfid, name), None)
        if inode is not None:
            self._release(inode)

    def rename(self, oldpar: Gfid, oldname: str, newpar: Gfid, newname: str) -> None:
        inode = self._dentries.pop((oldpar, oldname), None)
        self.unlink(newpar, newname)
        if inode is not None:
            self._dentries[(newpar, newname)] = inode

    def forget(self, gfid: Gfid) -> None:
        """Drop an inode and every dentry that points to it (it went stale)."""
        if gfid == ROOT_GFID:
            return
        self._inodes.pop(gfid, None)
        for key in [k for k, v in self._dentries.items() if v.gfid == gfid or k[0] == gfid]:
            self._release(self._dentries.pop(key))

    def _release(self, inode: Inode) -> None:
        inode.ndentries -= 1
        if inode.ndentries <= 0 and inode.gfid != ROOT_GFID:
            self._inodes.pop(inode.gfid, None)

    def __len__(self) -> int:
        return len(self._inodes)
