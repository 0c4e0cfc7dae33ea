"""ThinVolume: byte-addressed I/O on a thin volume, mapped block by block onto the data device.

Three write cases, cheapest first:
- every block touched is already the volume's own (see `Mapping.safe_in_place`): the mapping is
  resolved under the pool lock, then the bytes go out with one `pwrite` per run of physically
  adjacent blocks, outside the lock (the fast path: a 1 MiB write is usually a single syscall);
- a block is unmapped: a new block is allocated and written whole (the write plus zero padding),
  so it can never show what a previous owner left there;
- a block is shared (snapshot) or shared in the last commit: copy on write into a new block.
The last two run under the pool lock and install the new mapping only after the data is written.
Reads of unmapped blocks return zeros without touching the device.

Writes past the end raise EFBIG (resize first); discard and write_zeroes are clipped to the size.
"""

from __future__ import annotations

import errno
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from mortar.core.errors import FopError
from mortar.core.fops import Buffer
from mortar.thinpool.mapping import LEAF_BLOCKS, LEAF_MASK, LEAF_SHIFT, Top
from mortar.thinpool.metadata import VolumeRow

if TYPE_CHECKING:
    from mortar.thinpool.pool import ThinPool

VISIBLE, BUILDING, PIN = 0, 1, 2  # volume states; BUILDING (a clone being copied) and PIN are hidden
MAX_VOLUME_SIZE = 1 << 60
_INPLACE, _NEW, _COW = 0, 1, 2
_ZEROS = memoryview(bytes(1 << 20))


def check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_VOLUME_SIZE:
        raise FopError(errno.EINVAL, f"bad volume size {size!r}")


def _view(data: Buffer) -> memoryview:
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


class ThinVolume:
    """Handle of one thin volume; the pool returns the same object for the volume's lifetime."""

    def __init__(self, pool: ThinPool, row: VolumeRow, top: Top) -> None:
        self._pool = pool
        self.id = row.id
        self.name = row.name
        self._size = row.size
        self.top = top
        self.origin_id = row.origin
        self.state = row.state
        self.ctime = row.ctime
        self.writers = 0  # unlocked (fast-path) writes in flight
        self.suspended = 0  # a snapshot/clone is waiting for those to drain
        self.deleted = False

    def __repr__(self) -> str:
        return f"ThinVolume({self.name!r}, size={self._size})"

    def row(self) -> VolumeRow:
        return VolumeRow(self.id, self.name, self._size, self.top.id, self.origin_id, self.state, self.ctime)

    def _alive(self, write: bool = True) -> None:
        self._pool._usable(write)
        if self.deleted:
            raise FopError(errno.ENOENT, f"thin volume {self.name!r} was deleted")

    # -- properties -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def origin(self) -> str | None:
        """Name of the volume this one is a snapshot of, while that volume exists."""
        with self._pool._lock:
            vol = self._pool._vols.get(self.origin_id) if self.origin_id is not None else None
            return vol.name if vol is not None and vol.state == VISIBLE else None

    @property
    def allocated_bytes(self) -> int:
        with self._pool._lock:
            return sum(leaf.mapped() for leaf in self.top.leaves.values()) << self._pool._bshift

    def info(self) -> dict[str, Any]:
        pool = self._pool
        with pool._lock:
            self._alive(write=False)
            rc = pool._map.space.rc
            top = self.top
            mapped = exclusive = 0
            for leaf in top.leaves.values():
                mapped += leaf.mapped()
                if top.rc == 1 and leaf.rc == 1:
                    exclusive += sum(1 for b in leaf.map if b >= 0 and rc[b] == 1)
            origin = pool._vols.get(self.origin_id) if self.origin_id is not None else None
            return {
                "name": self.name,
                "id": self.id,
                "size": self._size,
                "origin": origin.name if origin is not None and origin.state == VISIBLE else None,
                "block_size": pool._bs,
                "mapped_blocks": mapped,
                "exclusive_blocks": exclusive,
                "shared_blocks": mapped - exclusive,
                "allocated_bytes": mapped << pool._bshift,
                "created": self.ctime,
            }

    # -- lookups (pool lock held) ---------------------------------------------------------------
    def _lookup(self, vb: int) -> int:
        leaf = self.top.leaves.get(vb >> LEAF_SHIFT)
        return -1 if leaf is None else leaf.map[vb & LEAF_MASK]

    def _classify(self, vb: int) -> tuple[int, int]:
        """(current block, what a write to it takes)."""
        top = self.top
        leaf = top.leaves.get(vb >> LEAF_SHIFT)
        b = -1 if leaf is None else leaf.map[vb & LEAF_MASK]
        if b < 0:
            return b, _NEW
        assert leaf is not None
        return b, _INPLACE if self._pool._map.safe_in_place(top, leaf, b) else _COW

    def _inplace_runs(self, offset: int, n: int) -> list[list[int]] | None:
        """[device offset, length, buffer offset] runs if every block touched is safe to overwrite.

        Works a leaf's slice of entries at a time with C-level helpers (slices, count, list
        compare) because this is the per-request cost of the fast path.
        """
        pool = self._pool
        m = pool._map
        top = self.top
        if top.rc != 1:
            return None
        rc = m.space.rc
        tainted_pool = bool(m.taint or m.taint_blocks)
        sh = pool._bshift
        end = offset + n
        vb, last = offset >> sh, (end - 1) >> sh
        spans: list[tuple[int, int, int]] = []  # (first data block, first virtual block, count)
        while vb <= last:
            leaf = top.leaves.get(vb >> LEAF_SHIFT)
            if leaf is None or leaf.rc != 1:
                return None
            j0 = vb & LEAF_MASK
            cnt = min(LEAF_BLOCKS - j0, last - vb + 1)
            ents = leaf.map[j0 : j0 + cnt]
            b0 = ents[0]
            if b0 >= 0 and ents[-1] - b0 == cnt - 1 and ents.tolist() == list(range(b0, b0 + cnt)):
                if rc[b0 : b0 + cnt].count(1) != cnt:
                    return None
                spans.append((b0, vb, cnt))
            else:
                if min(ents) < 0 or max(itemgetter(*ents)(rc) if cnt > 1 else (rc[b0],)) != 1:
                    return None
                spans.extend((b, vb + k, 1) for k, b in enumerate(ents))
            if tainted_pool and not all(m.safe_in_place(top, leaf, b) for b in ents):
                return None
            vb += cnt
        return self._to_runs(spans, offset, end)

    def _segments(self, offset: int, n: int) -> tuple[list[list[int]], bool]:
        """[device offset or -1 for a hole, length, buffer offset] covering [offset, offset+n)."""
        sh = self._pool._bshift
        leaves = self.top.leaves
        spans: list[tuple[int, int, int]] = []
        vb, last = offset >> sh, (offset + n - 1) >> sh
        while vb <= last:
            j0 = vb & LEAF_MASK
            cnt = min(LEAF_BLOCKS - j0, last - vb + 1)
            leaf = leaves.get(vb >> LEAF_SHIFT)
            ents = leaf.map[j0 : j0 + cnt] if leaf is not None else None
            if ents is None or max(ents) < 0:
                spans.append((-1, vb, cnt))
            elif (
                (b0 := ents[0]) >= 0
                and ents[-1] - b0 == cnt - 1
                and ents.tolist() == list(range(b0, b0 + cnt))
            ):
                spans.append((b0, vb, cnt))
            else:
                spans.extend((max(b, -1), vb + k, 1) for k, b in enumerate(ents))
            vb += cnt
        runs = self._to_runs(spans, offset, offset + n)
        return runs, any(r[0] >= 0 for r in runs)

    def _to_runs(self, spans: list[tuple[int, int, int]], offset: int, end: int) -> list[list[int]]:
        """Block spans (first data block or -1, first virtual block, count) to coalesced byte runs."""
        sh, start = self._pool._bshift, self._pool._start
        runs: list[list[int]] = []
        for b0, v0, cnt in spans:
            lo, hi = max(offset, v0 << sh), min(end, (v0 + cnt) << sh)
            dev = -1 if b0 < 0 else start + (b0 << sh) + lo - (v0 << sh)
            prev = runs[-1] if runs else None
            if prev and ((dev < 0 and prev[0] < 0) or (dev >= 0 and prev[0] >= 0 and sum(prev[:2]) == dev)):
                prev[1] += hi - lo
            else:
                runs.append([dev, hi - lo, lo - offset])
        return runs

    # -- reads ----------------------------------------------------------------------------------
    def _read_plan(self, offset: int, length: int) -> tuple[int, list[list[int]], int]:
        if offset < 0 or length < 0:
            raise FopError(errno.EINVAL, "negative offset or length")
        pool = self._pool
        with pool._lock:
            self._alive(write=False)
            n = max(0, min(length, self._size - offset))
            if not n:
                return 0, [], -1
            segs, mapped = self._segments(offset, n)
            return n, segs, pool._io_begin(None, False) if mapped else -1

    def _fill(self, mv: memoryview, segs: list[list[int]], epoch: int, zeroed: bool = False) -> None:
        """Read the mapped segments into `mv`, zero the holes (unless `mv` is known zeroed)."""
        try:
            for dev, ln, pos in segs:
                if dev < 0:
                    if not zeroed:
                        for at in range(pos, pos + ln, len(_ZEROS)):
                            end = min(pos + ln, at + len(_ZEROS))
                            mv[at:end] = _ZEROS[: end - at]
                else:
                    self._pool._dev.readinto(mv[pos : pos + ln], dev)
        except OSError as exc:
            raise FopError(errno.EIO, f"read from data device failed: {exc}") from exc
        finally:
            if epoch >= 0:
                self._pool._io_end(None, epoch, False)

    def readinto(self, buf: Buffer, offset: int) -> int:
        """Read into `buf` from `offset`; returns the byte count (short only at the end)."""
        mv = _view(buf)
        n, segs, epoch = self._read_plan(offset, len(mv))
        if n:
            self._fill(mv[:n], segs, epoch)
        return n

    def read(self, offset: int, length: int) -> bytes:
        n, segs, epoch = self._read_plan(offset, length)
        if not n:
            return b""
        if len(segs) == 1:
            dev = segs[0][0]
            if dev < 0:
                return bytes(n)
            try:
                return self._pool._dev.read(n, dev)
            except OSError as exc:
                raise FopError(errno.EIO, f"read from data device failed: {exc}") from exc
            finally:
                self._pool._io_end(None, epoch, False)
        buf = bytearray(n)
        self._fill(memoryview(buf), segs, epoch, zeroed=True)
        return bytes(buf)

    # -- writes ---------------------------------------------------------------------------------
    def write(self, data: Buffer, offset: int) -> int:
        """Write all of `data` at `offset`; returns its length. ENOSPC changes nothing."""
        mv = _view(data)
        n = len(mv)
        if offset < 0:
            raise FopError(errno.EINVAL, "negative offset")
        pool = self._pool
        with pool._lock:
            self._alive()
            while self.suspended:
                pool._cond.wait()
                self._alive()
            if not n:
                return 0
            if offset + n > self._size:
                raise FopError(errno.EFBIG, f"write beyond the end of {self.name!r} ({self._size} bytes)")
            runs = self._inplace_runs(offset, n)
            epoch = pool._io_begin(self, True) if runs is not None else -1
        if runs is None:
            pool._with_reclaim(lambda mc: self._write_slow(mv, offset, mc))
            return n
        try:
            for dev, ln, pos in runs:
                pool._dev.pwrite(mv[pos : pos + ln], dev)
        except OSError as exc:
            raise FopError(errno.EIO, f"write to data device failed: {exc}") from exc
        finally:
            pool._io_end(self, epoch, True)
        return n

    def _write_slow(self, mv: memoryview, offset: int, may_commit: bool) -> None:
        with self._pool._lock:
            self._alive()
            if offset + len(mv) > self._size:
                raise FopError(errno.EFBIG, f"write beyond the end of {self.name!r} ({self._size} bytes)")
            self._write_locked(mv, offset, may_commit)

    def _write_locked(self, mv: memoryview, offset: int, may_commit: bool) -> None:
        """Write with allocation and copy-on-write; all or nothing as far as space goes."""
        pool = self._pool
        m = pool._map
        sh, n = pool._bshift, len(mv)
        plan = [(vb, *self._classify(vb)) for vb in range(offset >> sh, ((offset + n - 1) >> sh) + 1)]
        need = sum(1 for _, _, act in plan if act != _INPLACE)
        pool._check_space(need, may_commit)
        blocks = m.alloc(need) if need else []
        try:
            runs, installs = self._build_runs(mv, offset, plan, blocks)
            for at, bufs in runs:
                pool._dev.write(bufs, at)
        except (OSError, FopError) as exc:
            m.space.unalloc(blocks)  # never mapped: free again at once
            m.fresh.difference_update(blocks)
            if isinstance(exc, FopError):
                raise
            raise FopError(errno.EIO, f"write to data device failed: {exc}") from exc
        if installs:
            top = m.writable_top(self)
            for vb, nb, old in installs:
                leaf = m.writable_leaf(top, vb >> LEAF_SHIFT, True)
                assert leaf is not None
                m.set_entry(leaf, vb & LEAF_MASK, nb)
                if old >= 0:
                    m.unref_block(old)
            pool._allocated()

    def _build_runs(
        self, mv: memoryview, offset: int, plan: list[tuple[int, int, int]], blocks: list[int]
    ) -> tuple[list[tuple[int, list[Buffer]]], list[tuple[int, int, int]]]:
        """Device writes (coalesced where blocks are adjacent) and the mappings to install after."""
        pool = self._pool
        sh, bs, start = pool._bshift, pool._bs, pool._start
        zero = memoryview(pool._zero)
        new = iter(blocks)
        runs: list[tuple[int, list[Buffer]]] = []
        installs: list[tuple[int, int, int]] = []
        run_end, pos, n = -1, 0, len(mv)
        for vb, old, act in plan:
            boff = offset + pos - (vb << sh)
            ln = min(bs - boff, n - pos)
            piece = mv[pos : pos + ln]
            bufs: list[Buffer]
            if act == _INPLACE:
                at, bufs = start + (old << sh) + boff, [piece]
            else:
                nb = next(new)
                installs.append((vb, nb, old))
                at = start + (nb << sh)
                if ln == bs:
                    bufs = [piece]
                elif act == _NEW:
                    bufs = [zero[:boff], piece, zero[boff + ln :]]
                else:  # copy on write of part of a block: old bytes around the new ones
                    base = bytearray(bs)
                    pool._dev.readinto(memoryview(base), start + (old << sh))
                    base[boff : boff + ln] = piece
                    bufs = [base]
            if at == run_end:
                runs[-1][1].extend(bufs)
            else:
                runs.append((at, bufs))
            run_end = at + sum(len(b) for b in bufs)
            pos += ln
        return runs, installs

    # -- zeroing, discard, resize ---------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Free whole blocks in the range; zero the partial ones at its ends (they stay mapped)."""
        self._zero_range(offset, length, True)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make the range read as zeros; with `unmap=False` whole blocks stay (or become) allocated."""
        self._zero_range(offset, length, unmap)

    def _zero_range(self, offset: int, length: int, unmap: bool) -> None:
        if offset < 0 or length < 0:
            raise FopError(errno.EINVAL, "negative offset or length")
        self._pool._with_reclaim(lambda mc: self._zero_locked(offset, length, unmap, mc))

    def _zero_locked(self, offset: int, length: int, unmap: bool, may_commit: bool) -> None:
        pool = self._pool
        sh, bs = pool._bshift, pool._bs
        with pool._lock:
            self._alive()
            end = min(offset + length, self._size)
            if offset >= end:
                return
            first = -(-offset // bs)  # first whole block
            last = end >> sh  # one past the last whole block
            if first > last:  # inside one block
                partials, first, last = [(offset, end - offset)], 0, 0
            else:
                partials = [
                    (o, ln)
                    for o, ln in ((offset, (first << sh) - offset), (last << sh, end - (last << sh)))
                    if ln
                ]
            partials = [
                (o, ln) for o, ln in partials if self._lookup(o >> sh) >= 0
            ]  # unmapped: zeros already
            need = sum(1 for o, _ in partials if self._classify(o >> sh)[1] != _INPLACE)
            if not unmap:
                need += sum(1 for vb in range(first, last) if self._classify(vb)[1] != _INPLACE)
            pool._check_space(need, may_commit)
            zero = memoryview(pool._zero)
            for o, ln in partials:
                self._write_locked(zero[:ln], o, False)
            if unmap:
                pool._map.unmap(self, first, last)
            else:
                for vb in range(first, last):
                    self._write_locked(zero, vb << sh, False)

    def resize(self, size: int) -> None:
        """Grow (new space reads as zeros) or shrink (blocks past the end are freed)."""
        check_size(size)
        self._pool._with_reclaim(lambda mc: self._resize_locked(size, mc))

    def _resize_locked(self, size: int, may_commit: bool) -> None:
        pool = self._pool
        sh, bs = pool._bshift, pool._bs
        with pool._lock:
            self._alive()
            old = self._size
            if size < old:
                if size & (bs - 1) and self._lookup(size >> sh) >= 0:
                    # zero the cut-off tail of the last block, so growing again shows zeros
                    act = self._classify(size >> sh)[1]
                    pool._check_space(int(act != _INPLACE), may_commit)
                    tail = min(old, ((size >> sh) + 1) << sh) - size
                    self._write_locked(memoryview(pool._zero)[:tail], size, False)
                pool._map.unmap(self, -(-size // bs), -(-old // bs))
            self._size = size
            pool._mark_dirty(self)

    def flush(self) -> None:
        """fsync the data and commit the pool's metadata: every completed write is now durable."""
        with self._pool._lock:
            self._alive()
        self._pool.commit()

    # -- sparseness -----------------------------------------------------------------------------
    def seek_data(self, offset: int) -> int:
        """First offset >= `offset` inside a mapped block; ENXIO if none (as lseek SEEK_DATA)."""
        pool = self._pool
        sh = pool._bshift
        with pool._lock:
            self._alive(write=False)
            if offset < 0 or offset >= self._size:
                raise FopError(errno.ENXIO, "offset beyond end of volume")
            vb = offset >> sh
            li0 = vb >> LEAF_SHIFT
            for li in sorted(k for k in self.top.leaves if k >= li0):
                emap = self.top.leaves[li].map
                for j in range(vb - (li << LEAF_SHIFT) if li == li0 else 0, LEAF_BLOCKS):
                    if emap[j] >= 0:
                        found = ((li << LEAF_SHIFT) + j) << sh
                        if found >= self._size:
                            break
                        return max(offset, found)
            raise FopError(errno.ENXIO, "no data after offset")

    def seek_hole(self, offset: int) -> int:
        """First offset >= `offset` inside an unmapped block, or the size (as lseek SEEK_HOLE)."""
        pool = self._pool
        sh = pool._bshift
        with pool._lock:
            self._alive(write=False)
            if offset < 0 or offset >= self._size:
                raise FopError(errno.ENXIO, "offset beyond end of volume")
            vb = offset >> sh
            while (vb << sh) < self._size:
                li = vb >> LEAF_SHIFT
                leaf = self.top.leaves.get(li)
                if leaf is None:
                    return max(offset, vb << sh)
                try:
                    j = leaf.map.index(-1, vb & LEAF_MASK)
                except ValueError:
                    vb = (li + 1) << LEAF_SHIFT
                    continue
                return min(self._size, max(offset, ((li << LEAF_SHIFT) + j) << sh))
            return self._size
