"""Rebalance: fix-layout over the whole volume and migration of every file that is not on its hashed
subvolume, while the volume is in use; also the drain of subvolumes being removed (remove-brick).

GlusterFS's rebalance can run for weeks, reports files "skipped" with little to say why, and cannot
resume (its pain point #4). Here:
- one pass does both jobs: a breadth-first crawl over the DHT graph itself (readdirp) fixes each
  directory's layout (reusing the old ranges, so few files change hashed subvolume) and hands its
  misplaced files to a few workers (the throttle) while the crawl goes on;
- a stopped run resumes by running again: files already moved are where they hash and are left
  alone, so no state needs keeping, and an interrupted migration is finished or redone;
- every skipped or failed file is counted by reason and listed (the first `MAX_LISTED`) with the
  reason in words;
- the run's commit hash goes on the root only when every directory was crawled; directories with
  files left behind get another commit hash, so `lookup-unhashed auto` still searches there.

The node daemon drives it: `Rebalance(dht, ...)`, `await run()` in a task, `stop()`, and `status`,
`watch()` or an `on_progress` callback for progress. For remove-brick, `decommission=[...]` gives
those subvolumes no range and moves everything off them; `status.drained` says when they hold
nothing but directories and link files (then the caller may commit: volgen drops them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath
import struct
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mortar.core.errors import FopError
from mortar.core.fops import DirEntry, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_common import STALE, as_root, is_linkfile
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR, Layout
from mortar.xlators.cluster.dht_migrator import FileMigration, FileToMove, Outcome, StepHook

log = logging.getLogger(__name__)

#: files migrated at once: lazy, normal, aggressive (each copies two chunks at a time)
THROTTLE = {"lazy": 1, "normal": 2, "aggressive": 4}
CHUNKS_IN_FLIGHT = 2
#: skipped and failed files listed by path in the status (all are counted)
MAX_LISTED = 1000
_QUEUE = 256  # misplaced files found by the crawl and not yet taken by a worker
_READDIR_SIZE = 128 * 1024
_FINAL = ("completed", "stopped", "failed")
#: seconds between progress reports (on_progress, watch)
PROGRESS_INTERVAL = 0.2


class RebalanceError(RuntimeError):
    """The rebalance cannot start or go on (a subvolume down, a bad decommission list, already running)."""


@dataclass(slots=True)
class FileReport:
    path: str
    status: str
    reason: str
    detail: str


@dataclass(slots=True)
class RebalanceStatus:
    """Progress of a run; `state` is not-started, running, completed, stopped or failed."""

    state: str = "not-started"
    commit_hash: int = 0
    fix_layout_only: bool = False
    dirs_fixed: int = 0
    dirs_failed: int = 0
    files_scanned: int = 0
    files_moved: int = 0
    bytes_moved: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    files_gone: int = 0
    #: reason -> count, for skipped and for failed files
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    files: list[FileReport] = field(default_factory=list)
    started: float = 0.0
    elapsed: float = 0.0
    error: str = ""
    decommissioned: list[str] = field(default_factory=list)
    #: per decommissioned subvolume, the files still on it when the run ended
    remaining: dict[str, int] = field(default_factory=dict)

    @property
    def drained(self) -> bool:
        """Every decommissioned subvolume holds only directories and link files."""
        return (
            self.state == "completed"
            and bool(self.decommissioned)
            and set(self.remaining) == set(self.decommissioned)
            and not any(self.remaining.values())
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["drained"] = self.drained
        return out


class Rebalance:
    """One rebalance (or remove-brick drain) of the volume `dht` serves; see the module docstring."""

    def __init__(
        self,
        dht: DistributeTranslator,
        *,
        force: bool = False,
        throttle: str = "normal",
        fix_layout_only: bool = False,
        decommission: Sequence[str | Translator] = (),
        on_progress: Callable[[RebalanceStatus], None] | None = None,
        hook: StepHook | None = None,
    ) -> None:
        if throttle not in THROTTLE:
            raise ValueError(f"throttle {throttle!r} is not one of {', '.join(THROTTLE)}")
        given = {d if isinstance(d, str) else d.name for d in decommission} | dht.decommissioned
        names = [c.name for c in dht.children if c.name in given]  # in the volfile's order
        unknown = sorted(given - {c.name for c in dht.children})
        if unknown:
            raise RebalanceError(f"{dht.name} has no subvolume {', '.join(unknown)}")
        if names and len(names) >= len(dht.children):
            raise RebalanceError("cannot decommission every subvolume")
        self.dht = dht
        self.force = force
        self.workers = THROTTLE[throttle]
        self.fix_layout_only = fix_layout_only
        self.decommission = tuple(names)
        self.on_progress = on_progress
        self.hook = hook
        self._status = RebalanceStatus(decommissioned=list(self.decommission))
        self._running = False
        self._stopping = False
        self._t0 = 0.0
        self._tick: asyncio.Future[None] | None = None
        self._told = 0.0
        self._dirty: dict[str, Loc] = {}
        self._reserved: dict[str, int] = {}

    # ---- control and progress -----------------------------------------------------------------

    def stop(self) -> None:
        """Stop after the files being moved now; a later run picks up where this one stopped."""
        if self._running and not self._stopping:
            log.info("%s: rebalance stopping", self.dht.name)
            self._stopping = True
            self._changed(final=True)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def status(self) -> RebalanceStatus:
        """A snapshot of the progress."""
        st = self._status
        elapsed = time.monotonic() - self._t0 if self._running else st.elapsed
        return replace(
            st,
            skipped=dict(st.skipped),
            failed=dict(st.failed),
            files=list(st.files),
            decommissioned=list(st.decommissioned),
            remaining=dict(st.remaining),
            elapsed=elapsed,
        )

    async def watch(self, interval: float = PROGRESS_INTERVAL) -> AsyncIterator[RebalanceStatus]:
        """Snapshots as the progress changes, at most one per `interval` seconds, ending with the
        final state of the run."""
        while True:
            snap = self.status
            yield snap
            if snap.state in _FINAL and not self._running:
                return
            await asyncio.sleep(interval)
            if self._tick is None or self._tick.done():
                self._tick = asyncio.get_running_loop().create_future()
            if self._running:
                await asyncio.shield(self._tick)

    def _changed(self, final: bool = False) -> None:
        """Wake watchers; call `on_progress` at most once per PROGRESS_INTERVAL (and at the end)."""
        if self._tick is not None and not self._tick.done():
            self._tick.set_result(None)
        now = time.monotonic()
        if self.on_progress is None or (not final and now - self._told < PROGRESS_INTERVAL):
            return
        self._told = now
        try:
            self.on_progress(self.status)
        except Exception:
            log.exception("%s: rebalance progress callback failed", self.dht.name)

    # ---- the run -------------------------------------------------------------------------------

    async def run(self) -> RebalanceStatus:
        """Fix every layout and move every misplaced file; returns the final status."""
        if self._running:
            raise RebalanceError(f"{self.dht.name}: a rebalance is already running")
        commit = struct.unpack(">I", os.urandom(4))[0] or 1
        while commit == self.dht.volume_commit:
            commit = struct.unpack(">I", os.urandom(4))[0] or 1
        self._status = RebalanceStatus(
            state="running",
            commit_hash=commit,
            fix_layout_only=self.fix_layout_only,
            started=time.time(),
            decommissioned=list(self.decommission),
        )
        self._running, self._stopping = True, False
        self._dirty.clear()
        self._t0 = time.monotonic()
        self._changed(final=True)
        what = "fix-layout" if self.fix_layout_only else "rebalance"
        log.info(
            "%s: %s started (commit %#x, decommissioning %s)",
            self.dht.name,
            what,
            commit,
            ", ".join(self.decommission) or "nothing",
        )
        state, error = "failed", ""
        try:
            with as_root():
                self._check_up()
                self.dht.set_decommissioned(self.dht.decommissioned | set(self.decommission))
                complete = await self._crawl_and_move(commit)
                complete = await self._finish(commit, complete)
                if self.decommission:
                    self._status.remaining = await self._leftovers()
            state = "completed" if complete else ("stopped" if self._stopping else "failed")
            if state == "failed":
                error = "some directories could not be crawled"
        except (FopError, RebalanceError) as exc:
            error = str(exc)
            log.error("%s: %s failed: %s", self.dht.name, what, exc)
        except asyncio.CancelledError:
            state, error = "stopped", "cancelled"
            raise
        finally:
            self._status.state, self._status.error = state, error
            self._status.elapsed = time.monotonic() - self._t0
            self._running = False
            self._changed(final=True)
        st = self._status
        log.info(
            "%s: %s %s: %d files scanned, %d moved (%d bytes), %d skipped, %d failed in %.1fs",
            self.dht.name, what, st.state, st.files_scanned, st.files_moved, st.bytes_moved,
            st.files_skipped, st.files_failed, st.elapsed,
        )  # fmt: skip
        return self.status

    def _check_up(self) -> None:
        down = [c.name for c in self.dht.children if c not in self.dht.up_children()]
        if down:
            raise RebalanceError(f"subvolumes down: {', '.join(down)} (a layout would leave them out)")

    async def _crawl_and_move(self, commit: int) -> bool:
        queue: asyncio.Queue[FileToMove | None] = asyncio.Queue(_QUEUE)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.workers)]
        try:
            complete = await self._crawl(commit, queue)
        except BaseException:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        return complete and not self._stopping

    async def _crawl(self, commit: int, queue: asyncio.Queue[FileToMove | None]) -> bool:
        """Breadth-first over the directories: fix each layout, queue its misplaced files."""
        dirs: deque[Loc] = deque([Loc("/", ROOT_GFID)])
        complete = True
        st = self._status
        while dirs and not self._stopping:
            dirloc = dirs.popleft()
            gfid, path = dirloc.gfid or ROOT_GFID, dirloc.path
            self._check_up()
            try:  # named by parent and name: the lookup creates the directory where it is missing
                layout = await self.dht.fix_layout(dirloc, zero=self.decommission, commit_hash=commit)
            except FopError as exc:
                if exc.errno in STALE:
                    continue  # removed meanwhile
                complete = self._dir_failed(dirloc, exc)
                continue
            st.dirs_fixed += 1
            self._changed()
            try:
                await self._crawl_dir(gfid, path, layout, queue, dirs)
            except FopError as exc:
                if exc.errno not in STALE:
                    complete = self._dir_failed(dirloc, exc)
        return complete and not dirs

    async def _crawl_dir(
        self, gfid: Gfid, path: str, layout: Layout, queue: asyncio.Queue[FileToMove | None], dirs: deque[Loc]
    ) -> None:
        """Queue the directory's misplaced files, note its subdirectories."""
        st = self._status
        seen: set[Gfid] = set()  # a file moved while listed shows up twice: count it once
        async with contextlib.aclosing(self._entries(gfid, path)) as entries:
            async for entry, on in entries:
                iatt = entry.iatt
                if self._stopping:
                    return
                if iatt is None or (iatt.is_dir and iatt.gfid in seen):
                    continue
                if iatt.is_dir:
                    seen.add(iatt.gfid)
                    dirs.append(Loc(posixpath.join(path, entry.name), iatt.gfid, gfid, entry.name))
                    continue
                if iatt.gfid not in seen:
                    seen.add(iatt.gfid)
                    st.files_scanned += 1
                hashed = self.dht.hashed_for(layout, entry.name)
                if hashed is None:
                    job = FileToMove(gfid, path, entry.name, iatt.gfid, on, on)
                    self._account(job, Outcome("failed", "unplaced", "no subvolume owns its hash"))
                elif hashed is not on and not self.fix_layout_only:
                    await queue.put(FileToMove(gfid, path, entry.name, iatt.gfid, on, hashed))
                else:
                    self._changed()

    def _dir_failed(self, dirloc: Loc, exc: FopError) -> bool:
        log.warning("%s: rebalance of directory %s failed: %s", self.dht.name, dirloc.path, exc)
        self._status.dirs_failed += 1
        self._dirty[dirloc.path] = dirloc
        self._changed()
        return False

    async def _entries(self, gfid: Gfid, path: str) -> AsyncGenerator[tuple[DirEntry, Translator], None]:
        """The directory's entries through DHT, each with the subvolume that listed it."""
        fd = Fd(gfid, is_dir=True)
        await self.dht.opendir(Loc(path, gfid), fd)
        try:
            offset = 0
            while entries := (await self.dht.readdirp(fd, _READDIR_SIZE, offset)).entries:
                offset = entries[-1].offset
                for e in entries:
                    yield e, self.dht.listed_on(e)
        finally:
            await self.dht.releasedir(fd)

    async def _worker(self, queue: asyncio.Queue[FileToMove | None]) -> None:
        while (job := await queue.get()) is not None:
            if self._stopping:
                continue  # drain the queue so the crawler never blocks
            migration = FileMigration(
                self.dht,
                job,
                force=self.force,
                inflight=CHUNKS_IN_FLIGHT,
                hook=self.hook,
                reserved=self._reserved,
            )
            try:
                outcome = await migration.run()
            except Exception as exc:  # a bug: count it against the file and go on with the others
                log.exception("%s: migrating %s", self.dht.name, job.path)
                outcome = Outcome("failed", "error", repr(exc), migration.copied)
            self._account(job, outcome)

    def _account(self, job: FileToMove, outcome: Outcome) -> None:
        st = self._status
        if outcome.status == "moved":
            st.files_moved += 1
            st.bytes_moved += outcome.bytes
        elif outcome.status == "gone":
            st.files_gone += 1
        elif outcome.status in ("skipped", "failed"):
            counts = st.skipped if outcome.status == "skipped" else st.failed
            counts[outcome.reason] = counts.get(outcome.reason, 0) + 1
            if outcome.status == "skipped":
                st.files_skipped += 1
            else:
                st.files_failed += 1
            if len(st.files) < MAX_LISTED:
                st.files.append(FileReport(job.path, outcome.status, outcome.reason, outcome.detail))
            self._dirty.setdefault(job.dirpath, Loc(job.dirpath, job.parent))
        self._changed()

    async def _finish(self, commit: int, complete: bool) -> bool:
        """Directories with files left behind get another commit hash; then, if the crawl covered
        the volume, its commit goes on the root (a fix-layout alone leaves files to move: no)."""
        dirty_commit = commit % 0xFFFFFFFF + 1
        marked = True
        for path, dirloc in self._dirty.items():
            try:
                await self.dht.fix_layout(dirloc, zero=self.decommission, commit_hash=dirty_commit)
            except FopError as exc:
                if exc.errno not in STALE:
                    log.warning("%s: marking %s as not rebalanced: %s", self.dht.name, path, exc)
                    marked = False
        if complete and marked and not self.fix_layout_only:
            await self.dht.write_volume_commit(commit)
        return complete

    async def _leftovers(self) -> dict[str, int]:
        """Files (not directories, not link files) still on each decommissioned subvolume."""
        out: dict[str, int] = {}
        for name in self.decommission:
            child = next(c for c in self.dht.children if c.name == name)
            out[name] = await self._count_files(child)
        return out

    async def _count_files(self, child: Translator) -> int:
        count = 0
        dirs: deque[tuple[Gfid, str]] = deque([(ROOT_GFID, "/")])
        while dirs:
            gfid, path = dirs.popleft()
            fd = Fd(gfid, is_dir=True)
            try:
                await child.opendir(Loc(path, gfid), fd)
            except FopError as exc:
                if exc.errno in STALE:
                    continue
                raise
            try:
                offset = 0
                while entries := (await child.readdirp(fd, _READDIR_SIZE, offset)).entries:
                    offset = entries[-1].offset
                    for e in entries:
                        if e.iatt is not None and e.iatt.is_dir:
                            dirs.append((e.iatt.gfid, posixpath.join(path, e.name)))
                        elif e.iatt is None or not await self._is_linkfile(child, e.iatt.gfid, e.iatt.mode):
                            count += 1
            finally:
                await child.releasedir(fd)
        return count

    @staticmethod
    async def _is_linkfile(child: Translator, gfid: Gfid, mode: int) -> bool:
        if not is_linkfile(Iatt(gfid, mode)):
            return False
        try:
            rep = await child.getxattr(Loc("", gfid), LINKTO_XATTR)
        except FopError:
            return False
        return bool(rep.xattrs.get(LINKTO_XATTR))


async def migrate_file(
    dht: DistributeTranslator, dirloc: Loc, name: str, *, force: bool = False, hook: StepHook | None = None
) -> Outcome:
    """Move one file of the directory `dirloc` (named by gfid) to its hashed subvolume now."""
    if dirloc.gfid is None:
        raise FopError(errno.EINVAL, f"{dirloc.path}: the directory must be named by gfid")
    path = posixpath.join(dirloc.path or "/", name)
    with as_root():
        layout = await dht.layout_for(dirloc)
        hashed = dht.hashed_for(layout, name)
        rep = await dht.lookup(Loc(path, pargfid=dirloc.gfid, name=name))
        ctx = dht._ctx(rep.iatt.gfid, None)
        if hashed is None or ctx is None or ctx.cached is None:
            return Outcome("failed", "unplaced", f"{path}: no hashed or cached subvolume")
        if ctx.cached is hashed:
            return Outcome("in-place")
        job = FileToMove(dirloc.gfid, dirloc.path or "/", name, rep.iatt.gfid, ctx.cached, hashed)
        return await FileMigration(dht, job, force=force, inflight=CHUNKS_IN_FLIGHT, hook=hook).run()
