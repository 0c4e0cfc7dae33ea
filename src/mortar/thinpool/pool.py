"""ThinPool: thin volumes, snapshots and clones on one data device, with dm-thin's semantics.

Concurrency: one pool lock guards all metadata (mapping, space map, volume table). Data I/O that
only touches blocks the volume owns exclusively runs outside the lock (it takes the lock twice,
briefly, to resolve the mapping and to sign off); I/O that allocates or copies runs under it, so a
new mapping is never visible before its block holds the right bytes. Freed blocks are reused only
after the freeing transaction is committed and every I/O that might still address them is done
(I/O epochs), and a snapshot or clone first waits for the origin's unlocked writes to finish, as
dm-thin suspends an origin before snapshotting it.

Durability: `commit` (called by `ThinVolume.flush`, by a background thread every
`commit_interval` seconds while something changed, and at close) fsyncs the data device and only
then commits the metadata transaction, so a committed mapping never points at unwritten data.
After a crash the pool reopens at its last commit: flushed writes read back; later ones read as
old data or zeros, never as another volume's data.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mortar.core.errors import FopError
from mortar.thinpool.device import DataDevice, is_block_device
from mortar.thinpool.mapping import LEAF_BLOCKS, Changes, Leaf, Mapping, Top
from mortar.thinpool.metadata import Loaded, MetadataStore, VolumeRow
from mortar.thinpool.spacemap import SpaceMap
from mortar.thinpool.superblock import MAGIC, VERSION, Superblock, layout, read_superblock, write_superblock
from mortar.thinpool.volume import BUILDING, PIN, VISIBLE, ThinVolume, check_size

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_CLONE_BATCH_BYTES = 32 << 20


class _NeedCommit(Exception):
    """A request is short of space that committing would release (freed blocks still withheld)."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    uuid: str
    block_size: int
    data_blocks: int
    used_blocks: int
    free_blocks: int
    withheld_blocks: int  # unreferenced, reusable after the next commit
    data_bytes: int
    used_bytes: int
    free_bytes: int
    metadata_bytes: int
    mapping_nodes: int
    volumes: int
    virtual_bytes: int
    overcommit: float  # sum of volume sizes / data size
    low_water_blocks: int
    transaction: int


def check_name(name: str) -> None:
    raw = name.encode() if isinstance(name, str) else b""
    if not isinstance(name, str) or not 1 <= len(raw) <= 255 or "/" in name or "\0" in name:
        raise FopError(errno.EINVAL, f"bad volume name {name!r}: 1..255 bytes, no '/' or NUL")


class ThinPool:
    """A thin pool; use `create` or `open`. Thread-safe; every error is a `FopError`."""

    def __init__(
        self,
        dev: DataDevice,
        store: MetadataStore,
        sb: Superblock,
        *,
        commit_interval: float,
        read_only: bool,
    ) -> None:
        self._dev = dev
        self._store = store
        self._sb = sb
        self._read_only = read_only
        self._bs = sb.block_size
        self._bshift = sb.block_size.bit_length() - 1
        self._start = sb.data_start
        self._zero = bytes(sb.block_size)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._commit_lock = threading.Lock()
        self._closed = False
        self._failed: str | None = None
        self._vols: dict[int, ThinVolume] = {}
        self._names: dict[str, ThinVolume] = {}
        self._dirty_vols: set[int] = set()
        self._dead_vols: set[int] = set()
        self._io_epoch = 0
        self._io_active: dict[int, int] = {}
        self._callbacks: list[Callable[[PoolStats], None]] = []
        self._low = False
        self._fire_low = False
        self._kv_dirty = False
        self._load(store.load())
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if commit_interval and not read_only:
            self._timer = threading.Thread(
                target=self._committer,
                args=(commit_interval,),
                name=f"thinpool-commit-{sb.uuid}",
                daemon=True,
            )
            self._timer.start()

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path_or_dev: str | os.PathLike[str],
        *,
        metadata_path: str | os.PathLike[str] | None = None,
        size: int | None = None,
        block_size: int = 64 << 10,
        low_water: int | None = None,
        commit_interval: float = 1.0,
        force: bool = False,
    ) -> ThinPool:
        """Make a pool on a file (created or grown to `size`) or block device; metadata beside it."""
        path = os.path.abspath(os.fspath(path_or_dev))
        blk = is_block_device(path)
        if metadata_path is None:
            if blk:
                raise FopError(errno.EINVAL, "a pool on a block device needs metadata_path")
            metadata_path = path + ".meta"
        meta = os.path.abspath(os.fspath(metadata_path))
        if size is None and not blk and not os.path.exists(path):
            raise FopError(errno.EINVAL, f"{path} does not exist: give the pool a size")
        dev = DataDevice(path, create_size=None if blk else size)
        try:
            if size is not None and size > dev.size:
                raise FopError(errno.ENOSPC, f"{path} has {dev.size} bytes, fewer than {size}")
            start, nblocks = layout(size if size is not None else dev.size, block_size)
            if not force:
                if _holds_superblock(dev.fd):
                    raise FopError(errno.EEXIST, f"{path} already holds a thin pool (use force)")
                if os.path.exists(meta):
                    raise FopError(errno.EEXIST, f"metadata {meta} exists (use force)")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(meta + suffix)
            sb = Superblock(uuid.uuid4(), block_size, start, nblocks, meta)
            store = MetadataStore(meta, create=True)
            kv: dict[str, Any] = {
                "magic": MAGIC.decode(),
                "version": VERSION,
                "uuid": str(sb.uuid),
                "block_size": block_size,
                "data_start": start,
                "data_blocks": nblocks,
                "low_water": nblocks // 10 if low_water is None else low_water,
                "next_node": 0,
                "next_volume": 0,
                "txn": 0,
                "created": time.time(),
            }
            store.commit(kv, [], [], Changes())
            write_superblock(dev.fd, sb)  # last: a pool exists once both halves do
        except BaseException:
            dev.close()
            raise
        log.info("created thin pool %s on %s: %d blocks of %d bytes", sb.uuid, path, nblocks, block_size)
        return cls(dev, store, sb, commit_interval=commit_interval, read_only=False)

    @classmethod
    def open(
        cls,
        path_or_dev: str | os.PathLike[str],
        *,
        metadata_path: str | os.PathLike[str] | None = None,
        commit_interval: float = 1.0,
        read_only: bool = False,
    ) -> ThinPool:
        """Open a pool; its metadata path comes from the superblock unless given."""
        path = os.path.abspath(os.fspath(path_or_dev))
        if not os.path.exists(path):
            raise FopError(errno.ENOENT, f"{path} does not exist")
        dev = DataDevice(path, read_only=read_only)
        try:
            sb = read_superblock(dev.fd)
            meta = os.fspath(metadata_path) if metadata_path is not None else sb.metadata_path
            if dev.size < sb.data_start + sb.nblocks * sb.block_size:
                raise FopError(errno.EUCLEAN, f"{path} is smaller than the pool it holds")
            store = MetadataStore(meta)
            try:
                return cls(dev, store, sb, commit_interval=commit_interval, read_only=read_only)
            except BaseException:
                store.close()
                raise
        except BaseException:
            dev.close()
            raise

    def _load(self, loaded: Loaded) -> None:
        sb, kv = self._sb, loaded.kv
        if kv.get("uuid") != str(sb.uuid):
            raise FopError(errno.EINVAL, f"metadata {self._store.path} belongs to another pool")
        if (kv.get("block_size"), kv.get("data_blocks"), kv.get("data_start")) != (
            sb.block_size,
            sb.nblocks,
            sb.data_start,
        ):
            raise FopError(errno.EUCLEAN, "metadata and superblock disagree on the pool layout")
        space, problems = SpaceMap.load(sb.nblocks, loaded.chunks)
        leaves = {lid: Leaf.from_blob(lid, blob) for lid, blob in loaded.leaves}
        problems += [
            f"leaf {lid} has a {len(b)}-byte map" for lid, b in loaded.leaves if len(b) != 8 * LEAF_BLOCKS
        ]
        tops: dict[int, Top] = {}
        for top_id, li, lid in loaded.top_entries:
            leaf = leaves.get(lid)
            if leaf is None:
                problems.append(f"top {top_id} entry {li} names missing leaf {lid}")
                continue
            tops.setdefault(top_id, Top(top_id)).leaves[li] = leaf
            leaf.rc += 1
        self._map = Mapping(space, int(kv["next_node"]), int(kv["txn"]))
        for row in loaded.volumes:
            top = tops.setdefault(row.top, Top(row.top))
            top.rc += 1
            vol = ThinVolume(self, row, top)
            self._vols[vol.id] = vol
            self._names[vol.name] = vol
        problems += [f"leaf {lf.id} is referenced by no top" for lf in leaves.values() if not lf.rc]
        problems += [f"top {t.id} is used by no volume" for t in tops.values() if not t.rc]
        ids = list(leaves) + list(tops)
        if ids and max(ids) > self._map.next_node:
            problems.append(f"node id {max(ids)} beyond the allocator's {self._map.next_node}")
            self._map.next_node = max(ids)
        self._map.live_nodes = sum(1 for lf in leaves.values() if lf.rc) + sum(
            1 for t in tops.values() if t.rc
        )
        self._next_volume = max([int(kv["next_volume"]), *self._vols])
        self._low_water = int(kv["low_water"])
        self._kv = kv
        self._load_problems = problems
        for vol in [v for v in self._vols.values() if v.state != VISIBLE]:
            log.info("dropping %s left by an interrupted clone", "copy" if vol.state == BUILDING else "pin")
            self._drop_volume(vol)
        self._low = space.nfree < self._low_water

    def close(self) -> None:
        """Commit what is pending and release the device. Volume handles become unusable."""
        with self._lock:
            if self._closed:
                return
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        if not self._read_only and self._failed is None:
            try:
                self.commit()
            except FopError as exc:
                log.error("final commit of pool %s failed: %s", self._sb.uuid, exc)
        with self._lock:
            self._closed = True
            self._store.close()
            self._dev.close()

    def __enter__(self) -> ThinPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uuid(self) -> uuid.UUID:
        return self._sb.uuid

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def path(self) -> str:
        return self._dev.path

    @property
    def metadata_path(self) -> str:
        return self._store.path

    # -- guards ---------------------------------------------------------------------------------
    def _usable(self, write: bool = True) -> None:
        """Raise unless the pool can serve a request (caller holds the lock)."""
        if self._closed:
            raise FopError(errno.EBADF, "thin pool is closed")
        if self._failed is not None:
            raise FopError(errno.EIO, f"thin pool failed: {self._failed}")
        if write and self._read_only:
            raise FopError(errno.EROFS, "thin pool is open read-only")

    def _check_space(self, n: int, may_commit: bool) -> None:
        """Raise ENOSPC (or ask for a commit that would free enough) unless `n` blocks are free."""
        space = self._map.space
        if n <= space.nfree:
            return
        if may_commit and space.nfree + space.withheld() >= n:
            raise _NeedCommit
        raise FopError(errno.ENOSPC, f"thin pool full: {n} blocks needed, {space.nfree} free")

    def _with_reclaim(self, fn: Callable[[bool], _T]) -> _T:
        """Run `fn(may_commit)`; if it is short of space a commit would free, commit and run again."""
        try:
            result = fn(True)
        except _NeedCommit:
            self.commit()
            result = fn(False)
        self._dispatch()
        return result

    def _allocated(self) -> None:
        if not self._low and self._map.space.nfree < self._low_water:
            self._low = self._fire_low = True

    def _dispatch(self) -> None:
        if not self._fire_low:
            return
        with self._lock:
            fire, self._fire_low = self._fire_low, False
        if fire:
            stats = self.stats()
            log.warning("thin pool %s below low water: %d blocks free", self._sb.uuid, stats.free_blocks)
            for cb in list(self._callbacks):
                try:
                    cb(stats)
                except Exception:
                    log.exception("low-water callback failed")

    def on_low_water(self, callback: Callable[[PoolStats], None]) -> None:
        """Call `callback(stats)` each time free blocks fall below the low-water mark."""
        self._callbacks.append(callback)

    def set_low_water(self, blocks: int) -> None:
        with self._lock:
            self._usable()
            self._low_water = max(0, int(blocks))
            self._kv["low_water"] = self._low_water
            self._kv_dirty = True
            self._low = self._map.space.nfree < self._low_water

    # -- I/O bookkeeping (caller of _io_begin holds the lock) -------------------------------------
    def _io_begin(self, vol: ThinVolume | None, writer: bool) -> int:
        if writer and vol is not None:
            vol.writers += 1
        epoch = self._io_epoch
        self._io_active[epoch] = self._io_active.get(epoch, 0) + 1
        return epoch

    def _io_end(self, vol: ThinVolume | None, epoch: int, writer: bool) -> None:
        with self._lock:
            left = self._io_active[epoch] - 1
            if left:
                self._io_active[epoch] = left
            else:
                del self._io_active[epoch]
                if self._map.space.quarantine:
                    self._reclaim()
            if writer and vol is not None:
                vol.writers -= 1
                if not vol.writers and vol.suspended:
                    self._cond.notify_all()

    def _reclaim(self) -> None:
        space = self._map.space
        space.reclaim(min(self._io_active) if self._io_active else None)
        if self._low and space.nfree >= self._low_water:
            self._low = False

    def _quiesce(self, vol: ThinVolume) -> None:
        """Wait until no unlocked write is in flight on `vol` (new ones wait for us)."""
        vol.suspended += 1
        try:
            while vol.writers:
                self._cond.wait()
        finally:
            vol.suspended -= 1
            if not vol.suspended:
                self._cond.notify_all()

    # -- commit ---------------------------------------------------------------------------------
    def _needs_commit(self) -> bool:
        return bool(self._map.dirty() or self._dirty_vols or self._dead_vols or self._kv_dirty)

    def commit(self) -> None:
        """Make everything written so far durable: fsync data, then commit metadata if it changed."""
        with self._commit_lock:
            with self._lock:
                self._usable()
                txn = None
                if self._needs_commit():
                    self._dirty_vols |= self._map.moved
                    self._map.moved = set()
                    txn, changes = self._map.take_changes()
                    rows = [self._vols[i].row() for i in sorted(self._dirty_vols) if i in self._vols]
                    dead = sorted(self._dead_vols)
                    self._kv.update(next_node=self._map.next_node, next_volume=self._next_volume, txn=txn)
                    kv = dict(self._kv)
                    self._dirty_vols, self._dead_vols, self._kv_dirty = set(), set(), False
            try:
                self._dev.sync()
                if txn is not None:
                    self._store.commit(kv, rows, dead, changes)
            except (OSError, sqlite3.Error) as exc:
                with self._lock:
                    self._failed = f"commit failed: {exc}"
                log.error("thin pool %s: commit failed, pool is now failed: %s", self._sb.uuid, exc)
                raise FopError(errno.EIO, f"thin pool commit failed: {exc}") from exc
            if txn is not None:
                with self._lock:
                    self._map.committed_txn(txn)
                    self._map.space.retire(self._io_epoch)
                    self._io_epoch += 1
                    self._reclaim()

    def _committer(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                due = not self._closed and self._failed is None and self._needs_commit()
            if due:
                try:
                    self.commit()
                except FopError as exc:
                    log.error("periodic commit failed: %s", exc)

    # -- volumes --------------------------------------------------------------------------------
    def _visible(self, name: str) -> ThinVolume:
        vol = self._names.get(name)
        if vol is None or vol.state != VISIBLE:
            raise FopError(errno.ENOENT, f"no thin volume {name!r}")
        return vol

    def _add_volume(self, name: str, size: int, top: Top, origin: int | None, state: int) -> ThinVolume:
        self._next_volume += 1
        row = VolumeRow(self._next_volume, name, size, top.id, origin, state, time.time())
        vol = ThinVolume(self, row, top)
        self._vols[vol.id] = vol
        self._names[name] = vol
        self._dirty_vols.add(vol.id)
        return vol

    def _drop_volume(self, vol: ThinVolume) -> None:
        del self._vols[vol.id]
        del self._names[vol.name]
        vol.deleted = True
        self._dirty_vols.discard(vol.id)
        self._dead_vols.add(vol.id)
        self._map.unref_top(vol.top)
        for other in self._vols.values():
            if other.origin_id == vol.id:
                other.origin_id = None
                self._dirty_vols.add(other.id)

    def _mark_dirty(self, vol: ThinVolume) -> None:
        self._dirty_vols.add(vol.id)

    def create_volume(self, name: str, size: int) -> ThinVolume:
        check_name(name)
        check_size(size)
        with self._lock:
            self._usable()
            if name in self._names:
                raise FopError(errno.EEXIST, f"thin volume {name!r} exists")
            return self._add_volume(name, size, self._map.new_top(), None, VISIBLE)

    def volume(self, name: str) -> ThinVolume:
        with self._lock:
            self._usable(write=False)
            return self._visible(name)

    def volumes(self) -> list[ThinVolume]:
        with self._lock:
            self._usable(write=False)
            return sorted((v for v in self._vols.values() if v.state == VISIBLE), key=lambda v: v.name)

    def snapshot(self, origin_name: str, new_name: str) -> ThinVolume:
        """A writable snapshot sharing every block of the origin: O(1), whatever the origin's size."""
        check_name(new_name)
        with self._lock:
            self._usable()
            origin = self._visible(origin_name)
            self._quiesce(origin)
            self._usable()
            origin = self._visible(origin_name)
            if new_name in self._names:
                raise FopError(errno.EEXIST, f"thin volume {new_name!r} exists")
            origin.top.rc += 1
            return self._add_volume(new_name, origin.size, origin.top, origin.id, VISIBLE)

    def clone(self, src_name: str, new_name: str) -> ThinVolume:
        """A full, independent copy of `src` as it is now (copied in batches; src stays usable)."""
        check_name(new_name)
        with self._lock:
            self._usable()
            src = self._visible(src_name)
            self._quiesce(src)
            self._usable()
            src = self._visible(src_name)
            if new_name in self._names:
                raise FopError(errno.EEXIST, f"thin volume {new_name!r} exists")
            need = sum(leaf.mapped() for leaf in src.top.leaves.values())
            space = self._map.space
            if need > space.nfree + space.withheld():
                raise FopError(errno.ENOSPC, f"clone needs {need} blocks, {space.nfree} free")
            src.top.rc += 1
            pin = self._add_volume(f"\0pin-{self._next_volume + 1}", src.size, src.top, src.id, PIN)
            dst = self._add_volume(new_name, src.size, self._map.new_top(), None, BUILDING)
            indexes = sorted(pin.top.leaves)
        try:
            batch = max(1, _CLONE_BATCH_BYTES >> self._bshift)
            for li in indexes:
                j = 0
                while j < LEAF_BLOCKS:
                    j = self._with_reclaim(functools.partial(self._clone_step, pin, dst, li, j, batch))
            with self._lock:
                self._usable()
                dst.state = VISIBLE
                self._mark_dirty(dst)
                self._drop_volume(pin)
            return dst
        except BaseException:
            with self._lock:
                for vol in (dst, pin):
                    if not vol.deleted:
                        self._drop_volume(vol)
            raise

    def _clone_step(self, pin: ThinVolume, dst: ThinVolume, li: int, j0: int, batch: int, mc: bool) -> int:
        """Copy up to `batch` mapped blocks of leaf `li` from `j0`; returns where to continue."""
        with self._lock:
            self._usable()
            src_map = pin.top.leaves[li].map
            items: list[tuple[int, int]] = []
            j = j0
            while j < LEAF_BLOCKS and len(items) < batch:
                if src_map[j] >= 0:
                    items.append((j, src_map[j]))
                j += 1
            if not items:
                return j
            self._check_space(len(items), mc)
            new = self._map.alloc(len(items))
            try:
                run_src, run_dst, run_n = items[0][1], new[0], 0
                for (_, s), d in zip(items, new, strict=True):
                    if s == run_src + run_n and d == run_dst + run_n:
                        run_n += 1
                        continue
                    self._copy_blocks(run_src, run_dst, run_n)
                    run_src, run_dst, run_n = s, d, 1
                self._copy_blocks(run_src, run_dst, run_n)
            except (OSError, FopError) as exc:
                self._map.space.unalloc(new)  # never mapped: free again at once
                self._map.fresh.difference_update(new)
                raise FopError(getattr(exc, "errno", None) or errno.EIO, f"clone copy failed: {exc}") from exc
            leaf = self._map.writable_leaf(dst.top, li, True)
            assert leaf is not None
            for (jj, _), d in zip(items, new, strict=True):
                self._map.set_entry(leaf, jj, d)
            self._allocated()
            return j

    def _copy_blocks(self, src: int, dst: int, n: int) -> None:
        sh, start = self._bshift, self._start
        self._dev.copy(start + (src << sh), start + (dst << sh), n << sh)

    def delete_volume(self, name: str) -> None:
        """Delete a volume; blocks it alone used are freed (reusable after the next commit)."""
        with self._lock:
            self._usable()
            self._drop_volume(self._visible(name))

    def rename_volume(self, old: str, new: str) -> None:
        check_name(new)
        with self._lock:
            self._usable()
            vol = self._visible(old)
            if new == old:
                return
            if new in self._names:
                raise FopError(errno.EEXIST, f"thin volume {new!r} exists")
            del self._names[old]
            vol.name = new
            self._names[new] = vol
            self._mark_dirty(vol)

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        with self._lock:
            self._usable(write=False)
            space, bs = self._map.space, self._bs
            visible = [v for v in self._vols.values() if v.state == VISIBLE]
            virtual = sum(v.size for v in visible)
            data = space.nblocks * bs
            return PoolStats(
                uuid=str(self._sb.uuid),
                block_size=bs,
                data_blocks=space.nblocks,
                used_blocks=space.used(),
                free_blocks=space.nfree,
                withheld_blocks=space.withheld(),
                data_bytes=data,
                used_bytes=space.used() * bs,
                free_bytes=space.nfree * bs,
                metadata_bytes=self._store.size(),
                mapping_nodes=self._map.live_nodes,
                volumes=len(visible),
                virtual_bytes=virtual,
                overcommit=virtual / data,
                low_water_blocks=self._low_water,
                transaction=self._map.committed,
            )

    def check(self) -> list[str]:
        """Consistency problems found (refcounts vs mappings, bounds, allocator); empty = clean."""
        from mortar.thinpool.check import check_pool

        with self._lock:
            self._usable(write=False)
            return check_pool(self)

    def __repr__(self) -> str:
        return f"ThinPool({self._dev.path!r}, uuid={self._sb.uuid})"


def _holds_superblock(fd: int) -> bool:
    """Whether a thin pool's superblock is already written at the start of the device."""
    try:
        read_superblock(fd)
    except FopError:
        return False
    return True
