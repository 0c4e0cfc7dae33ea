"""The synchronous core of `storage/bd`: a pool shown as one directory of image files.

Every method runs whole in a worker thread (the translator offloads it) and raises FopError.

Objects: the pool root (ROOT_GFID, a directory) and one regular file per visible thin volume. Their
gfid, mode, owner, times and xattrs live in the attribute store (`bd_store`); size and allocation
come from the pool. Gfids resolve through an in-memory map.

Namespace semantics (the seed's): create -> new empty volume; truncate -> resize, both ways;
link -> full clone under the new name; symlink(TARGET, NEW) -> snapshot of the volume named TARGET,
a writable volume of its own. A snapshot is a *regular file* so that every tool opens it as an
image (a symlink would be followed to its origin); its origin is reported by the read-only xattr
`user.mortar.bd.origin` and by readlink. unlink deletes (blocks freed once no volume shares them);
a file unlinked while open is hidden and deleted at its last release. There is one directory:
mkdir and special files are refused with EPERM.

Crash ordering of a namespace change: the pool commits first, then the attribute store. A crash
in between leaves a volume without a record (adopted at the next start with a fresh gfid) or a
record without a volume (dropped), never a record attached to the wrong volume.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import uuid
from typing import Any

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import (
    GFID_REQ,
    AttrSet,
    ChangeReply,
    EntryReply,
    Loc,
    RenameReply,
    SetAttrValid,
    StatfsReply,
    Xdata,
)
from mortar.core.gfid import NULL_GFID, ROOT_GFID, Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.thinpool.backend import Pool, Volume
from mortar.thinpool.bdpool import ALLOCATED_XATTR, HIDDEN_PREFIX, ORIGIN_XATTR, SHARED_XATTR
from mortar.xlators.storage.bd_store import ROOT_KEY, AttrStore, Meta
from mortar.xlators.storage.posix_entry import gfid_req
from mortar.xlators.storage.posix_handles import check_name
from mortar.xlators.storage.posix_xattr import check_settable, listable, readable, xattrop_apply

UNLINKED_PREFIX = HIDDEN_PREFIX + "unlinked-"
VIRTUAL_PREFIX = "user.mortar.bd."
R_OK, W_OK, X_OK = 4, 2, 1
_BLOCKS_TTL = 1.0  # seconds an allocation figure may be reused in the post-attributes of I/O


def now_ns() -> int:
    return time.time_ns()


def permitted(meta: Meta, who: CallContext, want: int, is_dir: bool = False) -> bool:
    """The classic owner/group/other check (root may do anything but execute a non-executable)."""
    if who.uid == 0:
        return not want & X_OK or is_dir or bool(meta.mode & 0o111)
    if who.uid == meta.uid:
        bits = meta.mode >> 6
    elif who.gid == meta.gid or meta.gid in who.groups:
        bits = meta.mode >> 3
    else:
        bits = meta.mode
    return (bits & 7 & want) == want


class Entry:
    """One image file: its volume, its record, open count and whether it was unlinked while open."""

    __slots__ = ("blocks", "blocks_at", "grow_lock", "meta", "opens", "unlinked", "vol")

    def __init__(self, vol: Volume, meta: Meta) -> None:
        self.vol = vol
        self.meta = meta
        self.opens = 0
        self.unlinked = False
        self.grow_lock = threading.Lock()  # writes past the end and O_APPEND
        self.blocks = -1
        self.blocks_at = 0.0

    @property
    def name(self) -> str:
        return self.vol.name


class BdFd:
    """What an open fd of the brick refers to: an image (`entry`) or the pool directory."""

    __slots__ = ("entry", "flags", "listing")

    def __init__(self, entry: Entry | None, flags: int) -> None:
        self.entry = entry
        self.flags = flags
        self.listing: list[str] | None = None

    @property
    def is_dir(self) -> bool:
        return self.entry is None


class BdBrick:
    """State shared by the worker threads; `load` must run once before any fop."""

    def __init__(self, pool: Pool, store: AttrStore, log: logging.LoggerAdapter[logging.Logger]) -> None:
        self.pool = pool
        self.store = store
        self.log = log
        self.blksize = pool.block_size
        self._lock = threading.RLock()  # the maps and the records' fields
        self._ns = threading.RLock()  # one namespace change at a time (clone copies run outside)
        self.by_gfid: dict[Gfid, Entry] = {}
        self.by_name: dict[str, Entry] = {}
        self.fds: set[BdFd] = set()
        t = now_ns()
        self.root = Meta(ROOT_KEY, ROOT_GFID, 0o755, 0, 0, t, t, t)
        self._fsid = int.from_bytes(pool.uuid.bytes[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF

    # ---- start -------------------------------------------------------------------------------

    def load(self, metas: dict[str, Meta]) -> None:
        """Pair volumes with their records; delete what an earlier run left half done."""
        root = metas.pop(ROOT_KEY, None)
        if root is None:
            self.store.put(self.root)
        else:
            self.root = root
        dropped = 0
        for vol in self.pool.volumes():
            if vol.name.startswith(HIDDEN_PREFIX):
                self.log.info("deleting %s, left by an earlier run", vol.name)
                self.pool.delete_volume(vol.name)
                dropped += 1
                continue
            meta = metas.pop(str(vol.id), None)
            if meta is None:
                t = now_ns()
                meta = Meta(str(vol.id), Gfid.random(), 0o600, 0, 0, t, t, t)
                self.store.put(meta)
                self.log.warning(
                    "volume %r had no attributes: adopted as gfid %s, mode 0600", vol.name, meta.gfid
                )
            entry = Entry(vol, meta)
            self.by_gfid[meta.gfid] = entry
            self.by_name[vol.name] = entry
        if metas:
            self.log.info("dropping the attributes of %d volumes that no longer exist", len(metas))
            self.store.delete(list(metas))
        if dropped:
            self.pool.commit()

    def close(self) -> None:
        with self._lock:
            dirty = [e.meta for e in self.by_gfid.values() if e.meta.times_dirty]
            if self.root.times_dirty:
                dirty.append(self.root)
        if dirty:
            self.store.save_attrs(dirty)
        for bfd in list(self.fds):
            self.release(bfd)
        self.pool.close()
        self.store.close()

    # ---- resolution and attributes -------------------------------------------------------------

    def _parent(self, loc: Loc) -> str:
        """The validated name of an entry fop; its parent must be the pool directory."""
        if loc.pargfid != ROOT_GFID:
            if loc.pargfid is None:
                raise FopError(errno.EINVAL, "entry fop without a parent gfid")
            if loc.pargfid in self.by_gfid:
                raise FopError(errno.ENOTDIR, f"{loc.path or loc.name}: an image is not a directory")
            raise FopError(errno.ESTALE, f"directory {loc.pargfid} is not on this brick")
        check_name(loc.name)
        return loc.name

    def _new_name(self, loc: Loc) -> str:
        name = self._parent(loc)
        if name.startswith(HIDDEN_PREFIX):
            raise FopError(errno.EPERM, f"names starting with {HIDDEN_PREFIX} are reserved on a bd brick")
        return name

    def _named(self, name: str) -> Entry:
        entry = self.by_name.get(name)
        if entry is None:
            raise FopError(errno.ENOENT, f"no image {name!r} in this pool")
        return entry

    def resolve(self, loc: Loc) -> Entry | None:
        """The image a Loc names, or None for the pool directory."""
        if loc.gfid is not None and loc.gfid != NULL_GFID:
            return self.by_gfid_or_root(loc.gfid)
        return self._named(self._parent(loc))

    def by_gfid_or_root(self, gfid: Gfid) -> Entry | None:
        if gfid == ROOT_GFID:
            return None
        entry = self.by_gfid.get(gfid)
        if entry is None:
            raise FopError(errno.ESTALE, f"gfid {gfid} not found on this brick")
        return entry

    def meta(self, entry: Entry | None) -> Meta:
        return self.root if entry is None else entry.meta

    def iatt(self, entry: Entry | None, fresh: bool = True) -> Iatt:
        """Attributes; `fresh=False` may reuse an allocation figure up to a second old (I/O replies)."""
        if entry is None:
            m = self.root
            return Iatt(
                ROOT_GFID, stat.S_IFDIR | m.mode, 2, m.uid, m.gid, 0, 4096, 4096, 8,
                m.atime_ns, m.mtime_ns, m.ctime_ns, 1, 0,
            )  # fmt: skip
        m = entry.meta
        mono = time.monotonic()
        if fresh or entry.blocks < 0 or mono - entry.blocks_at > _BLOCKS_TTL:
            entry.blocks = entry.vol.allocated_bytes // 512
            entry.blocks_at = mono
        return Iatt(
            m.gfid, stat.S_IFREG | m.mode, 1, m.uid, m.gid, 0, entry.vol.size, self.blksize, entry.blocks,
            m.atime_ns, m.mtime_ns, m.ctime_ns, int.from_bytes(m.gfid[8:], "big") or 1, 0,
        )  # fmt: skip

    def check(self, entry: Entry | None, who: CallContext, want: int) -> None:
        if not permitted(self.meta(entry), who, want, entry is None):
            what = "the pool directory" if entry is None else repr(entry.name)
            raise FopError(errno.EACCES, f"permission denied on {what}")

    def _claim(self, gfid: Gfid) -> None:
        if gfid in self.by_gfid or gfid == ROOT_GFID:
            raise FopError(errno.EEXIST, f"gfid {gfid} already exists on this brick")

    def _touch_dir(self) -> None:
        t = now_ns()
        self.root.mtime_ns = self.root.ctime_ns = t
        self.store.save_attrs([self.root])

    def _register(self, vol: Volume, meta: Meta) -> Entry:
        """Make a new volume visible: pool commit first, then its record (see the module doc)."""
        self.pool.commit()
        self.store.put(meta)
        entry = Entry(vol, meta)
        with self._lock:
            self.by_gfid[meta.gfid] = entry
            self.by_name[vol.name] = entry
        self._touch_dir()
        return entry

    def _new_meta(self, vol: Volume, gfid: Gfid, mode: int, who: CallContext) -> Meta:
        t = now_ns()
        return Meta(str(vol.id), gfid, mode & 0o7777, who.uid, who.gid, t, t, t)

    def _undo_volume(self, name: str, why: BaseException) -> None:
        try:
            self.pool.delete_volume(name)
        except FopError as exc:
            self.log.warning("could not remove volume %r after %s: %s", name, why, exc)

    # ---- lookup ------------------------------------------------------------------------------

    def lookup(self, who: CallContext, loc: Loc, xdata: Xdata) -> EntryReply:
        if loc.name:
            name = self._parent(loc)
            if name.startswith(HIDDEN_PREFIX):
                raise FopError(errno.ENOENT, name)
            self.check(None, who, X_OK)
            entry: Entry | None = self._named(name)
        elif loc.gfid is not None:
            entry = self.by_gfid_or_root(loc.gfid)
        else:
            raise FopError(errno.EINVAL, "lookup needs a gfid or a parent and a name")
        wanted = (xdata or {}).get("xattrs")
        extra = None
        if wanted is not None:
            if not isinstance(wanted, (list, tuple)) or not all(isinstance(n, str) for n in wanted):
                raise FopError(errno.EINVAL, "xdata['xattrs'] must be a list of names")
            found: dict[str, bytes] = {}
            for n in wanted:
                try:
                    found.update(self.getxattr(who, entry, n))
                except FopError as exc:
                    if exc.errno not in (errno.ENODATA, errno.EACCES):
                        raise
            extra = {"xattrs": found}
        parent = self.iatt(None) if loc.name else None
        return EntryReply(self.iatt(entry), parent_post=parent, xdata=extra)

    # ---- creation ----------------------------------------------------------------------------

    def create(
        self, who: CallContext, loc: Loc, flags: int, mode: int, umask: int, xdata: Xdata
    ) -> tuple[EntryReply, BdFd]:
        """O_CREAT open: a new empty volume, or (without O_EXCL) the existing image opened."""
        gfid = gfid_req(xdata)
        name = self._new_name(loc)
        with self._ns:
            existing = self.by_name.get(name)
            if existing is not None:
                if flags & os.O_EXCL:
                    raise FopError(errno.EEXIST, f"image {name!r} exists")
                pre = self.iatt(None)
                bfd = self.open_entry(who, existing, flags)
                return EntryReply(self.iatt(existing), pre, self.iatt(None)), bfd
            entry, pre = self._make(who, name, gfid, mode & ~umask)
            bfd = self.open_entry(who, entry, flags & ~os.O_TRUNC)
            return EntryReply(self.iatt(entry), pre, self.iatt(None)), bfd

    def _make(self, who: CallContext, name: str, gfid: Gfid, mode: int) -> tuple[Entry, Iatt]:
        self.check(None, who, W_OK | X_OK)
        self._claim(gfid)
        pre = self.iatt(None)
        vol = self.pool.create_volume(name, 0)
        try:
            return self._register(vol, self._new_meta(vol, gfid, mode, who)), pre
        except BaseException as exc:
            self._undo_volume(name, exc)
            raise

    def mknod(self, who: CallContext, loc: Loc, mode: int, umask: int, xdata: Xdata) -> EntryReply:
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise FopError(
                errno.EPERM, "a bd brick holds only images (thin volumes): no device, fifo or socket files"
            )
        gfid = gfid_req(xdata)
        name = self._new_name(loc)
        with self._ns:
            if name in self.by_name:
                raise FopError(errno.EEXIST, f"image {name!r} exists")
            entry, pre = self._make(who, name, gfid, mode & ~umask)
            return EntryReply(self.iatt(entry), pre, self.iatt(None))

    def link(self, who: CallContext, oldloc: Loc, newloc: Loc, xdata: Xdata) -> EntryReply:
        """A full, independent copy of the image under the new name (copied outside the namespace
        lock, so other namespace changes go on; the pool holds the new name meanwhile)."""
        src = self.resolve(oldloc)
        if src is None:
            raise FopError(errno.EPERM, "hard links to directories are not allowed")
        name = self._new_name(newloc)
        self.check(None, who, W_OK | X_OK)
        self.check(src, who, R_OK)
        raw = (xdata or {}).get(GFID_REQ)
        # without gfid-req, replicas must still agree: derive it from the source and the name
        gfid = (
            gfid_req(xdata)
            if raw is not None
            else Gfid(uuid.uuid5(uuid.UUID(bytes=src.meta.gfid), name).bytes)
        )
        self._claim(gfid)
        if name in self.by_name:
            raise FopError(errno.EEXIST, f"image {name!r} exists")
        pre = self.iatt(None)
        vol = self.pool.clone(src.name, name)
        with self._ns:
            try:
                self._claim(gfid)
                meta = self._new_meta(vol, gfid, src.meta.mode, who)
                meta.xattrs = {k: v for k, v in src.meta.xattrs.items() if k.startswith("user.")}
                entry = self._register(vol, meta)
            except BaseException as exc:
                self._undo_volume(name, exc)
                raise
        self.log.info("cloned %r to %r", src.name, name)
        return EntryReply(self.iatt(entry), pre, self.iatt(None))

    def symlink(self, who: CallContext, target: str, loc: Loc, umask: int, xdata: Xdata) -> EntryReply:
        """A snapshot of the image named `target` (a name in this pool, nothing else)."""
        gfid = gfid_req(xdata)
        if not target or "/" in target or target in (".", "..") or "\0" in target:
            raise FopError(
                errno.EINVAL, f"snapshot target {target!r} must be the name of an image in this pool (no '/')"
            )
        name = self._new_name(loc)
        with self._ns:
            origin = self.by_name.get(target)
            if origin is None:
                raise FopError(errno.ENOENT, f"no image {target!r} to snapshot")
            self.check(None, who, W_OK | X_OK)
            self.check(origin, who, R_OK)
            self._claim(gfid)
            if name in self.by_name:
                raise FopError(errno.EEXIST, f"image {name!r} exists")
            pre = self.iatt(None)
            vol = self.pool.snapshot(origin.name, name)
            try:
                meta = self._new_meta(vol, gfid, origin.meta.mode & ~umask, who)
                meta.xattrs = {k: v for k, v in origin.meta.xattrs.items() if k.startswith("user.")}
                entry = self._register(vol, meta)
            except BaseException as exc:
                self._undo_volume(name, exc)
                raise
        self.log.info("snapshot %r of %r", name, target)
        return EntryReply(self.iatt(entry), pre, self.iatt(None))

    def mkdir(self) -> EntryReply:
        raise FopError(errno.EPERM, "a bd brick has one directory, the pool: mkdir is refused")

    # ---- removal and rename ------------------------------------------------------------------

    def _hide(self, entry: Entry) -> None:
        """Take the image's name away; its volume goes now, or at its last release if open."""
        with self._lock:
            del self.by_name[entry.name]
        if entry.opens:
            self.pool.rename_volume(entry.name, UNLINKED_PREFIX + entry.meta.gfid.hex())
            entry.unlinked = True
            self.pool.commit()
        else:
            self._destroy(entry)

    def _destroy(self, entry: Entry) -> None:
        self.pool.delete_volume(entry.name)
        self.pool.commit()  # frees the blocks now, not at the next periodic commit
        self.store.delete([entry.meta.vkey])
        with self._lock:
            self.by_gfid.pop(entry.meta.gfid, None)

    def unlink(self, who: CallContext, loc: Loc) -> ChangeReply:
        name = self._parent(loc)
        with self._ns:
            entry = self._named(name)
            self.check(None, who, W_OK | X_OK)
            pre = self.iatt(None)
            self._hide(entry)
            self._touch_dir()
            return ChangeReply(pre, self.iatt(None))

    def rmdir(self, loc: Loc) -> ChangeReply:
        name = self._parent(loc)
        self._named(name)
        raise FopError(errno.ENOTDIR, f"{name!r} is an image, not a directory")

    def rename(self, who: CallContext, oldloc: Loc, newloc: Loc) -> RenameReply:
        old = self._parent(oldloc)
        new = self._new_name(newloc)
        with self._ns:
            src = self._named(old)
            self.check(None, who, W_OK | X_OK)
            pre = self.iatt(None)
            if old != new:
                dst = self.by_name.get(new)
                if dst is not None:  # out of the way first, so a failed rename loses nothing
                    self.pool.rename_volume(new, UNLINKED_PREFIX + dst.meta.gfid.hex())
                try:
                    self.pool.rename_volume(old, new)
                except BaseException:
                    if dst is not None:
                        self.pool.rename_volume(UNLINKED_PREFIX + dst.meta.gfid.hex(), new)
                    raise
                self.pool.commit()
                with self._lock:
                    del self.by_name[old]
                    self.by_name[new] = src
                    src.meta.ctime_ns = now_ns()
                    src.meta.times_dirty = True
                if dst is not None:
                    dst.unlinked = True
                    if not dst.opens:
                        self._destroy(dst)
                self._touch_dir()
            post = self.iatt(None)
            return RenameReply(self.iatt(src), pre, post, pre, post)

    # ---- open and release --------------------------------------------------------------------

    def open(self, who: CallContext, loc: Loc, flags: int) -> BdFd:
        entry = self.resolve(loc)
        if entry is None:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
                raise FopError(errno.EISDIR, "the pool directory opens read-only")
            return self.opendir(who, loc)
        return self.open_entry(who, entry, flags)

    def open_entry(self, who: CallContext, entry: Entry, flags: int) -> BdFd:
        acc = flags & os.O_ACCMODE
        want = {os.O_RDONLY: R_OK, os.O_WRONLY: W_OK}.get(acc, R_OK | W_OK)
        if flags & os.O_TRUNC:
            want |= W_OK
        self.check(entry, who, want)
        with self._lock:
            if entry.unlinked:
                raise FopError(errno.ENOENT, "the image was unlinked")
            entry.opens += 1
        bfd = BdFd(entry, flags)
        self.fds.add(bfd)
        if flags & os.O_TRUNC and entry.vol.size:
            try:
                self.resize(entry, 0)
            except BaseException:
                self.release(bfd)
                raise
        return bfd

    def opendir(self, who: CallContext, loc: Loc) -> BdFd:
        if self.resolve(loc) is not None:
            raise FopError(errno.ENOTDIR, "an image is not a directory")
        self.check(None, who, R_OK)
        bfd = BdFd(None, os.O_RDONLY)
        self.fds.add(bfd)
        return bfd

    def release(self, bfd: BdFd) -> None:
        if bfd not in self.fds:
            return
        self.fds.discard(bfd)
        entry = bfd.entry
        if entry is None:
            return
        self.save_times(entry)
        with self._ns:
            with self._lock:
                entry.opens -= 1
                last = entry.opens == 0 and entry.unlinked
            if last:
                self._destroy(entry)

    def save_times(self, entry: Entry | None) -> None:
        meta = self.meta(entry)
        if meta.times_dirty and (entry is None or not entry.unlinked):
            self.store.save_attrs([meta])

    # ---- attributes --------------------------------------------------------------------------

    def resize(self, entry: Entry, size: int) -> None:
        entry.vol.resize(size)
        t = now_ns()
        entry.meta.mtime_ns = entry.meta.ctime_ns = t
        entry.meta.times_dirty = True

    def truncate(self, who: CallContext, entry: Entry | None, size: int) -> ChangeReply:
        if entry is None:
            raise FopError(errno.EISDIR, "the pool directory cannot be truncated")
        self.check(entry, who, W_OK)
        pre = self.iatt(entry)
        self.resize(entry, size)
        return ChangeReply(pre, self.iatt(entry))

    def setattr(self, who: CallContext, entry: Entry | None, attr: AttrSet) -> ChangeReply:
        valid = attr.valid
        if valid & SetAttrValid.SIZE:
            raise FopError(errno.EINVAL, "setattr does not change the size: use truncate")
        m = self.meta(entry)
        owner = who.uid in (0, m.uid)
        pre = self.iatt(entry)
        with self._lock:
            if valid & (SetAttrValid.UID | SetAttrValid.GID):
                uid = attr.uid if valid & SetAttrValid.UID and attr.uid != -1 else m.uid
                gid = attr.gid if valid & SetAttrValid.GID and attr.gid != -1 else m.gid
                if who.uid != 0 and (
                    uid != m.uid or not owner or (gid != m.gid and gid not in (who.gid, *who.groups))
                ):
                    raise FopError(errno.EPERM, "only root changes owners; an owner may change to own group")
                if (uid, gid) != (m.uid, m.gid) and entry is not None:
                    m.mode &= ~0o6000  # as the kernel does on chown of a regular file
                m.uid, m.gid = uid, gid
            if valid & SetAttrValid.MODE:
                if not owner:
                    raise FopError(errno.EPERM, "only the owner changes the mode")
                m.mode = attr.mode & 0o7777
            if valid & (SetAttrValid.ATIME | SetAttrValid.MTIME):
                if not owner and not permitted(m, who, W_OK, entry is None):
                    raise FopError(errno.EPERM, "only the owner sets times")
                if valid & SetAttrValid.ATIME:
                    m.atime_ns = attr.atime_ns
                if valid & SetAttrValid.MTIME:
                    m.mtime_ns = attr.mtime_ns
            m.ctime_ns = now_ns()
            self.store.save_attrs([m])
        return ChangeReply(pre, self.iatt(entry))

    def access(self, who: CallContext, entry: Entry | None, mask: int) -> None:
        if mask & ~(R_OK | W_OK | X_OK):
            raise FopError(errno.EINVAL, f"access mask {mask:#o}")
        self.check(entry, who, mask)

    @staticmethod
    def origin(entry: Entry) -> str | None:
        """The image a snapshot was taken of, while it exists under a name clients can see."""
        origin = entry.vol.origin
        return None if origin is None or origin.startswith(HIDDEN_PREFIX) else origin

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.by_name)

    def readlink(self, entry: Entry | None) -> tuple[str, Iatt]:
        origin = self.origin(entry) if entry is not None else None
        if entry is None or origin is None:
            raise FopError(
                errno.EINVAL, "not a snapshot (images are regular files; snapshots name their origin)"
            )
        return origin, self.iatt(entry)

    def statfs(self) -> StatfsReply:
        st = self.pool.stats()
        bs = st.block_size
        free = st.free_blocks + st.withheld_blocks
        files = max(st.data_blocks, st.volumes)
        return StatfsReply(
            StatVfs(
                bs,
                bs,
                st.data_blocks,
                free,
                free,
                files,
                files - st.volumes,
                files - st.volumes,
                self._fsid,
                0,
                255,
            )
        )

    # ---- extended attributes -----------------------------------------------------------------

    def _virtual(self, entry: Entry | None, name: str | None) -> dict[str, bytes]:
        """The read-only xattrs an image shows: its origin, allocated and shared bytes."""
        if entry is None:
            return {}
        vol = entry.vol
        out: dict[str, bytes] = {}
        if name in (None, ORIGIN_XATTR) and (origin := self.origin(entry)) is not None:
            out[ORIGIN_XATTR] = origin.encode()
        if name in (None, ALLOCATED_XATTR):
            out[ALLOCATED_XATTR] = str(vol.allocated_bytes).encode()
        if name in (None, SHARED_XATTR):
            info: dict[str, Any] = vol.info()
            if "shared_blocks" in info:
                out[SHARED_XATTR] = str(int(info["shared_blocks"]) * int(info["block_size"])).encode()
        return out

    def getxattr(self, who: CallContext, entry: Entry | None, name: str | None) -> dict[str, bytes]:
        m = self.meta(entry)
        if name is None:
            self.check(entry, who, R_OK)
            with self._lock:
                out = {k: v for k, v in m.xattrs.items() if listable(k, who.uid)}
            out.update(self._virtual(entry, None))
            return out
        if name.startswith(VIRTUAL_PREFIX):
            found = self._virtual(entry, name)
            if name not in found:
                raise FopError(errno.ENODATA, name)
            return found
        if not readable(name, who.uid):
            raise FopError(errno.ENODATA, name)
        if name.startswith("user."):
            self.check(entry, who, R_OK)
        with self._lock:
            value = m.xattrs.get(name)
        if value is None:
            raise FopError(errno.ENODATA, name)
        return {name: value}

    def _settable(self, who: CallContext, entry: Entry | None, name: str) -> None:
        check_settable(name, who.uid)
        if name.startswith(VIRTUAL_PREFIX):
            raise FopError(errno.EPERM, f"{name} is reported by the pool and cannot be changed")
        if name.startswith("user.") and not permitted(self.meta(entry), who, W_OK, entry is None):
            raise FopError(errno.EACCES, f"no write permission to set {name}")

    def setxattr(self, who: CallContext, entry: Entry | None, xattrs: dict[str, bytes], flags: int) -> None:
        if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            raise FopError(errno.EINVAL, f"setxattr flags {flags:#x}")
        for name in xattrs:
            self._settable(who, entry, name)
        m = self.meta(entry)
        with self._lock:
            for name in xattrs:
                if flags & os.XATTR_CREATE and name in m.xattrs:
                    raise FopError(errno.EEXIST, name)
                if flags & os.XATTR_REPLACE and name not in m.xattrs:
                    raise FopError(errno.ENODATA, name)
            values = {k: bytes(v) for k, v in xattrs.items()}
            m.xattrs.update(values)
            m.ctime_ns = now_ns()
            self.store.set_xattrs(m, values)

    def removexattr(self, who: CallContext, entry: Entry | None, name: str) -> None:
        self._settable(who, entry, name)
        m = self.meta(entry)
        with self._lock:
            if name not in m.xattrs:
                raise FopError(errno.ENODATA, name)
            del m.xattrs[name]
            m.ctime_ns = now_ns()
            self.store.remove_xattr(m, name)

    def xattrop(self, entry: Entry | None, optype: int, xattrs: dict[str, bytes]) -> dict[str, bytes]:
        """Atomic read-modify-write of counters (replication's changelog), GlusterFS's arithmetic."""
        for name in xattrs:
            check_settable(name, 0)
            if name.startswith(VIRTUAL_PREFIX):
                raise FopError(errno.EPERM, f"{name} is reported by the pool and cannot be changed")
        m = self.meta(entry)
        out: dict[str, bytes] = {}
        with self._lock:
            stored: dict[str, bytes] = {}
            for name, arg in xattrs.items():
                stored[name], out[name] = xattrop_apply(optype, name, m.xattrs.get(name), bytes(arg))
            m.xattrs.update(stored)
            self.store.set_xattrs(m, stored)
        return out
