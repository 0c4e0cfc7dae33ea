"""FUSE inode numbers <-> gfids, with the kernel's lookup counts.

The kernel names every object by a 64-bit number it got from a lookup-like reply (lookup, create,
mkdir, mknod, symlink, link, each readdirplus entry) and says with `forget` when it drops its
references. mortar names objects by gfid, so the table maps one to the other: the number is the
gfid's low 64 bits (what `Iatt.ino` already is, so `stat` agrees with the native client), the root is
FUSE_ROOT_ID (1), and a record lives while the kernel holds a lookup on it.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

from mortar.core.errors import FopError
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.inode import Inode

log = logging.getLogger(__name__)

ROOT_INO = 1  # FUSE_ROOT_ID
_INO_MASK = (1 << 64) - 1


@dataclass(slots=True)
class InodeRecord:
    ino: int
    gfid: Gfid
    #: the core inode translators keep per-inode state in (DHT's cached subvolume, layouts...)
    inode: Inode
    nlookup: int = 0
    #: the size the kernel was last told (-1: never), to spot writes that landed elsewhere than it thinks
    size: int = -1
    #: for a directory, the inode of the directory it was last seen in (its `..`)
    parent: int = ROOT_INO
    #: open file handles on this inode, for fstat when the object is gone by gfid
    handles: set[int] = field(default_factory=set)
    #: until when (monotonic) the object is known to have no security.capability (see ops.getxattr)
    no_capability_until: float = 0.0
    #: how messages name the object (GlusterFS's `<gfid:...>` notation), made once
    path: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            self.path = "/" if self.ino == ROOT_INO else f"<gfid:{self.gfid}>"


class InodeMap:
    def __init__(self) -> None:
        root = InodeRecord(ROOT_INO, ROOT_GFID, Inode(ROOT_GFID, 0o040755), nlookup=1)
        self.root = root
        self._by_ino: dict[int, InodeRecord] = {ROOT_INO: root}
        self._by_gfid: dict[Gfid, InodeRecord] = {ROOT_GFID: root}

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> InodeRecord:
        rec = self._by_ino.get(ino)
        if rec is None:
            raise FopError(errno.ESTALE, f"inode {ino} is not known (forgotten)")
        return rec

    def by_gfid(self, gfid: Gfid) -> InodeRecord | None:
        return self._by_gfid.get(gfid)

    def remember(self, iatt: Iatt, parent: int | None = None) -> InodeRecord:
        """The record for the object `iatt` describes, made if new; the lookup is not counted yet."""
        rec = self._by_gfid.get(iatt.gfid)
        if rec is None:
            ino = self._free_ino(iatt)
            rec = InodeRecord(ino, iatt.gfid, Inode(iatt.gfid, iatt.mode))
            self._by_ino[ino] = rec
            self._by_gfid[iatt.gfid] = rec
        elif iatt.mode:
            rec.inode.mode = iatt.mode
        if parent is not None and iatt.is_dir:
            rec.parent = parent
        return rec

    def counted(self, rec: InodeRecord) -> None:
        """The kernel received a reply naming `rec`: it now holds one more lookup on it."""
        rec.nlookup += 1

    def discard(self, rec: InodeRecord) -> None:
        """Drop a record `remember` made that never reached the kernel (a refused readdir entry)."""
        if rec.nlookup <= 0 and not rec.handles and rec.ino != ROOT_INO:
            self._drop(rec)

    def forget(self, ino: int, nlookup: int) -> None:
        if ino == ROOT_INO:
            return
        rec = self._by_ino.get(ino)
        if rec is None:
            log.debug("forget of unknown inode %d", ino)
            return
        rec.nlookup -= nlookup
        if rec.nlookup <= 0:
            if rec.nlookup < 0:
                log.warning("inode %d (%s) forgotten more often than looked up", ino, rec.gfid)
            self._drop(rec)

    def _drop(self, rec: InodeRecord) -> None:
        self._by_ino.pop(rec.ino, None)
        if self._by_gfid.get(rec.gfid) is rec:
            del self._by_gfid[rec.gfid]

    def _free_ino(self, iatt: Iatt) -> int:
        """`iatt.ino`, unless another live object holds that number (two gfids with the same low
        64 bits, or a brick that reports 1): then the next free number, so the kernel never
        confuses two objects."""
        ino = iatt.ino & _INO_MASK
        if ino > ROOT_INO and ino not in self._by_ino:
            return ino
        candidate = int.from_bytes(iatt.gfid[:8], "big") & _INO_MASK
        while candidate <= ROOT_INO or candidate in self._by_ino:
            candidate = (candidate + 1) & _INO_MASK
        log.warning("inode number %d of %s is taken: using %d", iatt.ino, iatt.gfid, candidate)
        return candidate
