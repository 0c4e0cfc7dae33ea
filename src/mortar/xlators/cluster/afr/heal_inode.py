"""Data and metadata self-heal of one inode.

Data heal (regular files), as GlusterFS does it:
1. a full lock in `<name>:self-heal` (one healer per file; a background heal gives up if taken);
2. a brief full data lock: read the changelog and sizes, choose the source and the sinks;
   with the `full` algorithm the sinks are truncated to zero here (holes then need no writing);
3. window by window (`data-self-heal-window-size` blocks of 128 KiB) under a lock on that range
   only, so writers wait at most one window: `full` copies the source's data extents (found with
   seek data/hole, all-zero blocks skipped), `diff` compares each block's checksum on the source
   and the sinks and copies only the blocks that differ (zero blocks are punched, not written);
4. a full data lock again: sinks are cut to the source's size and the counters read in step 2 are
   taken back, so the brick indexes forget the file.
The arbiter holds no data: it is never a source and, as a sink, only its counters are reset.

Metadata heal copies mode, owner and xattrs (all but the changelog's) from the source under the
metadata lock.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat

from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Fd, SeekWhat, SetAttrValid
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase, gfid_loc
from mortar.xlators.cluster.afr.changelog import DATA, METADATA, PREFIX, judge
from mortar.xlators.cluster.afr.heal_common import (
    HealResult,
    decide,
    inode_locks,
    reset_deltas,
)
from mortar.xlators.cluster.afr.state import acting_as, gather_map, identity, new_owner

BLOCK = 128 << 10
_ZEROS = bytes(BLOCK)


def _nonzero_runs(data: memoryview, base: int) -> list[tuple[int, memoryview]]:
    """(offset, view) runs of `data` made of blocks that are not all zeros (compared with memcmp)."""
    runs: list[tuple[int, memoryview]] = []
    start = -1
    pos = 0
    total = len(data)
    while pos < total:
        end = min(pos + BLOCK, total)
        zero = data[pos:end] == _ZEROS[: end - pos]
        if not zero and start < 0:
            start = pos
        elif zero and start >= 0:
            runs.append((base + start, data[start:pos]))
            start = -1
        pos = end
    if start >= 0:
        runs.append((base + start, data[start:total]))
    return runs


class _DataHeal:
    """One data heal in progress: the fds, the source, the sinks and the byte count."""

    def __init__(self, afr: ReplicateBase, gfid: Gfid, source: int, sinks: list[int]) -> None:
        self.afr = afr
        self.gfid = gfid
        self.source = source
        self.sinks = sinks
        self.fd = Fd(gfid)
        self.opened: list[int] = []
        self.bytes = 0

    async def open(self) -> None:
        loc = gfid_loc(self.gfid)
        await self.afr.children[self.source].open(loc, os.O_RDONLY, self.fd)
        self.opened.append(self.source)
        for i in self.sinks:
            await self.afr.children[i].open(loc, os.O_RDWR, self.fd)
            self.opened.append(i)

    async def close(self) -> None:
        for i in self.opened:
            try:
                await self.afr.children[i].release(self.fd)
            except FopError as exc:
                self.afr.log.debug("heal: release on %s: %s", self.afr.children[i].name, exc)

    async def _on_sinks(self, targets: list[int], fop: str, *args: object) -> None:
        _, bad = await gather_map({i: getattr(self.afr.children[i], fop)(self.fd, *args) for i in targets})
        if bad:
            i, exc = next(iter(bad.items()))
            raise FopError(
                exc.errno, f"heal of {self.gfid}: {fop} on {self.afr.children[i].name}: {exc.message}"
            )

    async def write(self, targets: list[int], data: memoryview, offset: int) -> None:
        for off, run in _nonzero_runs(data, offset):
            await self._on_sinks(targets, "writev", run, off, 0)
            self.bytes += len(run) * len(targets)

    async def truncate(self, size: int, only_if: dict[int, int] | None = None) -> None:
        targets = [i for i in self.sinks if only_if is None or only_if.get(i) != size]
        if targets:
            await self._on_sinks(targets, "ftruncate", size)

    async def _read(self, offset: int, length: int) -> memoryview:
        reply = await self.afr.children[self.source].readv(self.fd, length, offset, 0)
        return memoryview(reply.data)

    async def full_window(self, start: int, end: int) -> None:
        """Copy the source's data extents in [start, end) (the sinks were truncated to zero)."""
        src = self.afr.children[self.source]
        pos = start
        while pos < end:
            try:
                data_at = (await src.seek(self.fd, pos, SeekWhat.DATA)).offset
            except FopError as exc:
                if exc.errno == errno.ENXIO:
                    return
                raise
            if data_at >= end:
                return
            try:
                hole_at = min(end, (await src.seek(self.fd, data_at, SeekWhat.HOLE)).offset)
            except FopError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                hole_at = end
            if hole_at <= data_at:
                return
            await self.write(self.sinks, await self._read(data_at, hole_at - data_at), data_at)
            pos = hole_at

    async def diff_window(self, start: int, end: int) -> None:
        """Copy only the blocks of [start, end) whose checksums differ on a sink."""
        for off in range(start, end, BLOCK):
            length = min(BLOCK, end - off)
            sums, bad = await gather_map(
                {i: self.afr.children[i].rchecksum(self.fd, off, length) for i in [self.source, *self.sinks]}
            )
            if bad:
                i, exc = next(iter(bad.items()))
                raise FopError(
                    exc.errno, f"heal of {self.gfid}: checksum on {self.afr.children[i].name}: {exc}"
                )
            want = (sums[self.source].weak, sums[self.source].strong)
            differ = [i for i in self.sinks if (sums[i].weak, sums[i].strong) != want]
            if not differ:
                continue
            data = await self._read(off, length)
            if data == _ZEROS[: len(data)]:
                await self._on_sinks(differ, "discard", off, len(data))
            else:
                await self._on_sinks(differ, "writev", data, off, 0)
                self.bytes += len(data) * len(differ)


async def heal_data(
    afr: ReplicateBase, gfid: Gfid, force_source: int | None = None, blocking: bool = True
) -> HealResult:
    """Heal a regular file's contents from a source to the sinks (see the module docstring)."""
    result = HealResult(gfid)
    who = identity(new_owner())
    with acting_as(who):
        try:
            async with inode_locks(afr, afr.up_indices(), afr.heal_domain, gfid, who, blocking) as held:
                if held:
                    await _heal_data_locked(afr, gfid, held, force_source, result)
                else:
                    result.missing = True
        except FopError as exc:
            if exc.errno != errno.EAGAIN or blocking:
                raise
            result.busy = True
    afr.forget(gfid)
    if result.healed:
        names = [afr.children[i].name for i in sorted(result.sinks)]
        afr.log.info("data heal of %s: %d bytes to %s", gfid, result.bytes, names)
    return result


async def _heal_data_locked(
    afr: ReplicateBase, gfid: Gfid, held: list[int], force_source: int | None, result: HealResult
) -> None:
    who = identity()
    loc = gfid_loc(gfid)
    async with inode_locks(afr, held, afr.domain, gfid, who) as full:
        sv = await afr.survey(loc, children=full)
        if not sv.present:
            result.missing = True
            return
        if not stat.S_ISREG(sv.iatt(min(sv.present)).mode):
            return
        no_src = [afr.arbiter] if afr.arbiter is not None else []
        decision = decide(afr, judge(sv.matrix, DATA, sv.present, no_src), sv, force_source, prefer="size")
        if decision.source is None:
            if decision.split_brain:
                result.split_brain.add("data")
                afr.log.warning("%s is in data split-brain: not healed", gfid)
            return
        source = decision.source
        data_sinks = sorted(i for i in decision.sinks if i != afr.arbiter)
        sizes = {i: sv.iatt(i).size for i in sv.present}
        algorithm = afr.opts["data-self-heal-algorithm"]
        if algorithm == "auto":
            algorithm = "diff" if any(sizes[i] for i in data_sinks) else "full"
        job = _DataHeal(afr, gfid, source, data_sinks)
        try:
            await job.open()
            if algorithm == "full" and data_sinks:
                await job.truncate(0, only_if=sizes)
        except BaseException:
            await job.close()
            raise
    try:
        window = BLOCK * afr.opts["data-self-heal-window-size"]
        size = sizes[source]
        for start in range(0, size if data_sinks else 0, window):
            end = min(size, start + window)
            async with inode_locks(
                afr, [source, *data_sinks], afr.domain, gfid, who, True, start, end - start
            ):
                if algorithm == "full":
                    await job.full_window(start, end)
                else:
                    await job.diff_window(start, end)
        async with inode_locks(afr, held, afr.domain, gfid, who) as final:
            if data_sinks:
                await job.truncate((await afr.children[source].fstat(job.fd)).iatt.size)
            await afr.xattrop_on(reset_deltas(afr, sv, DATA, [source], decision.sinks, final), loc)
    finally:
        await job.close()
    result.healed.add("data")
    result.sinks |= set(decision.sinks)
    result.bytes += job.bytes


async def heal_metadata(
    afr: ReplicateBase, gfid: Gfid, force_source: int | None = None, blocking: bool = True
) -> HealResult:
    """Copy mode, owner and xattrs from the metadata source to the sinks, then clear the counters."""
    result = HealResult(gfid)
    who = identity(new_owner())
    loc = gfid_loc(gfid)
    with acting_as(who):
        try:
            async with inode_locks(afr, afr.up_indices(), afr.meta_domain, gfid, who, blocking) as held:
                sv = await afr.survey(loc, children=held)
                if not sv.present:
                    result.missing = True
                    return result
                verdict = judge(sv.matrix, METADATA, sv.present)
                decision = decide(afr, verdict, sv, force_source)
                if decision.source is None:
                    if decision.split_brain:
                        result.split_brain.add("metadata")
                        afr.log.warning("%s is in metadata split-brain: not healed", gfid)
                    return result
                await _copy_metadata(afr, gfid, decision.source, sorted(decision.sinks))
                deltas = reset_deltas(afr, sv, METADATA, [decision.source], decision.sinks, held)
                await afr.xattrop_on(deltas, loc)
                result.healed.add("metadata")
                result.sinks |= set(decision.sinks)
        except FopError as exc:
            if exc.errno != errno.EAGAIN or blocking:
                raise
            result.busy = True
    afr.forget(gfid)
    return result


def _copyable(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    return {k: bytes(v) for k, v in xattrs.items() if not k.startswith(PREFIX)}


async def _copy_metadata(afr: ReplicateBase, gfid: Gfid, source: int, sinks: list[int]) -> None:
    loc = gfid_loc(gfid)
    children = afr.children
    got, bad = await gather_map({i: children[i].getxattr(loc, None) for i in [source, *sinks]})
    if source in bad:
        raise bad[source]
    want = _copyable(got[source].xattrs)
    src = afr.children[source]
    src_iatt = (await src.stat(loc)).iatt

    async def fix(i: int) -> None:
        mine = (await children[i].stat(loc)).iatt
        valid = 0
        if not stat.S_ISLNK(src_iatt.mode) and (mine.mode & 0o7777) != (src_iatt.mode & 0o7777):
            valid |= SetAttrValid.MODE
        if mine.uid != src_iatt.uid:
            valid |= SetAttrValid.UID
        if mine.gid != src_iatt.gid:
            valid |= SetAttrValid.GID
        if valid:
            await children[i].setattr(loc, AttrSet(valid, src_iatt.mode & 0o7777, src_iatt.uid, src_iatt.gid))
        have = _copyable(got[i].xattrs) if i in got else {}
        changed = {k: v for k, v in want.items() if have.get(k) != v}
        if changed:
            await children[i].setxattr(loc, changed, 0)
        for key in sorted(set(have) - set(want)):
            await children[i].removexattr(loc, key)

    results = await asyncio.gather(*(fix(i) for i in sinks), return_exceptions=True)
    for i, r in zip(sinks, results, strict=True):
        if isinstance(r, FopError):
            raise FopError(r.errno, f"metadata heal of {gfid} on {children[i].name}: {r.message}")
        if isinstance(r, BaseException):
            raise r
