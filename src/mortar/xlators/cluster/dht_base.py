"""DHT's state and its placement machinery: subvolume events, per-inode context, layouts (read,
heal, fix), link files, free-space placement, and lookup, which ties them together.

`DistributeTranslator` (dht.py) adds the fops on top; the rebalance engine (dht_rebalance) reuses
`fix_layout`, `layout_for`, `hashed_for`, `make_linkfile`, `set_decommissioned` and the volume
commit hash (`write_volume_commit`), which lets `lookup-unhashed auto` trust fully rebalanced
directories.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from mortar.core.context import call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, AttrSet, EntryReply, Flock, Loc, LockCmd, LockType, StatfsReply, Xdata
from mortar.core.gfid import NULL_GFID, ROOT_GFID, Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.core.inode import Inode
from mortar.core.options import Option
from mortar.core.translator import Event, Translator
from mortar.xlators.cluster.dht_common import (
    MIGRATING_XATTR,
    STALE,
    VOL_COMMIT_XATTR,
    DhtCtx,
    as_root,
    gather_fops,
    hide_migration,
    holds_data,
    is_linkfile,
    linkfile_mode,
    linkto_of,
    plan_layout,
    wanted_xattrs,
)
from mortar.xlators.cluster.dht_hash import RSYNC_HASH_REGEX, NameHasher
from mortar.xlators.cluster.dht_layout import (
    COMMIT_FRESH,
    LAYOUT_XATTR,
    LINKTO_XATTR,
    Layout,
    check_layout,
    compute_layout,
    encode_linkto,
    encode_range,
    layout_from_xattrs,
    rotation_start,
)

_LAYOUT_LOCK_DOMAIN = "dht.layout.heal"


class DhtBase(Translator):
    """Distribute's state and placement; the fops are in `DistributeTranslator`."""

    options: ClassVar[Mapping[str, Option]] = {
        "lookup-unhashed": Option(
            "enum",
            "on",
            "when a name is not on its hashed subvolume, look on all of them (auto: only in directories "
            "whose layout changed since they were created)",
            choices=("on", "auto", "off"),
        ),
        "min-free-disk": Option(
            "percent",
            10.0,
            "a subvolume with less free space than this takes no new files: they go to the emptiest "
            "subvolume, with a link file on the hashed one",
        ),
        "weighted-rebalance": Option(
            "bool", False, "size new layouts' ranges in proportion to subvolume size"
        ),
        "rsync-hash-regex": Option(
            "str", RSYNC_HASH_REGEX, "names matching this hash like its first group (rsync's temporaries)"
        ),
        "extra-hash-regex": Option("str", "", "tried before rsync-hash-regex, same meaning"),
        "decommissioned-bricks": Option(
            "str",
            "",
            "subvolumes being drained by remove-brick (names, space or comma separated): new layouts give "
            "them no range and no new file is placed on them",
        ),
    }
    #: seconds to wait for every subvolume to report before telling parents CHILD_UP with some up
    child_wait: float = 10.0
    #: seconds between refreshes of the subvolumes' free space (min-free-disk, weights)
    du_refresh: float = 5.0
    #: cached-subvolume entries kept for gfids that arrive without an inode
    max_ctx: int = 65536

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        if not self.children:
            raise ValueError(f"{name}: cluster/distribute needs at least one subvolume")
        self._by_name = {c.name: c for c in self.children}
        if len(self._by_name) != len(self.children):
            raise ValueError(f"{name}: subvolume names must be unique (they are stored in link files)")
        self._index = {id(c): i for i, c in enumerate(self.children)}
        self._hasher = self._make_hasher()
        self._state: dict[int, bool | None] = {i: None for i in range(len(self.children))}
        self._reported: Event | None = None
        self._waited = False
        self._timer: asyncio.TimerHandle | None = None
        self._ctx_by_gfid: OrderedDict[Gfid, DhtCtx] = OrderedDict()
        self._du: dict[int, StatVfs] = {}
        self._du_at = 0.0
        self._du_lock = asyncio.Lock()
        self._decommissioned = self._parse_decommissioned(self.opts["decommissioned-bricks"])
        #: commit hash of the last complete rebalance, read from the root (0: none)
        self.volume_commit = COMMIT_FRESH

    def _parse_decommissioned(self, text: str) -> frozenset[str]:
        names = frozenset(n for n in re.split(r"[\s,]+", text) if n)
        unknown = sorted(names - set(self._by_name))
        if unknown:
            raise ValueError(f"{self.name}: decommissioned-bricks names no subvolume: {', '.join(unknown)}")
        return names

    @property
    def decommissioned(self) -> frozenset[str]:
        return self._decommissioned

    def set_decommissioned(self, names: Collection[str]) -> None:
        """Drain these subvolumes (remove-brick): no range in new layouts, no new files."""
        self._decommissioned = self._parse_decommissioned(" ".join(names))

    def _make_hasher(self) -> NameHasher:
        return NameHasher(self.opts["rsync-hash-regex"], self.opts["extra-hash-regex"])

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        super().reconfigure(options)
        self._hasher = self._make_hasher()
        self._decommissioned = self._parse_decommissioned(self.opts["decommissioned-bricks"])

    async def fini(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- events --------------------------------------------------------------------------------

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        """Tell parents CHILD_UP once every subvolume has reported (or `child_wait` passed) and one
        is up, CHILD_DOWN when all are down; remember which are up so new layouts skip the others."""
        idx = self._index.get(id(source))
        if idx is not None and event in (Event.CHILD_UP, Event.CHILD_DOWN):
            self._state[idx] = event is Event.CHILD_UP
            self._arm_timer()
            self._child_changed()
            return
        if event is Event.PARENT_UP:
            self._arm_timer()
        super().notify(event, source, data)

    def _arm_timer(self) -> None:
        if self._timer is not None or self._waited:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.child_wait, self._wait_over)

    def _wait_over(self) -> None:
        self._waited = True
        self._timer = None
        self._child_changed()

    def _child_changed(self) -> None:
        states = self._state.values()
        if any(states):
            if self._reported is not Event.CHILD_UP and (self._waited or None not in states):
                self._report(Event.CHILD_UP)
        elif None not in states and self._reported is not Event.CHILD_DOWN:
            self._report(Event.CHILD_DOWN)

    def _report(self, event: Event) -> None:
        self._reported = event
        if self._timer is not None and event is Event.CHILD_UP:
            self._timer.cancel()
            self._timer = None
        self.log.info("%s (subvolumes up: %s)", event.value, ", ".join(c.name for c in self.up_children()))
        for parent in self.parents:
            parent.notify(event, self, None)

    def up_children(self) -> list[Translator]:
        """Subvolumes not known to be down (one that never reported counts as up: in-process
        graphs have children that never send events)."""
        return [c for i, c in enumerate(self.children) if self._state[i] is not False]

    # ---- per-inode state -----------------------------------------------------------------------

    def _ctx(self, gfid: Gfid | None, inode: Inode | None) -> DhtCtx | None:
        if inode is not None:
            ctx = inode.ctx.get(self)
            if isinstance(ctx, DhtCtx):
                return ctx
            gfid = gfid or inode.gfid
        if gfid is None:
            return None
        ctx = self._ctx_by_gfid.get(gfid)
        if ctx is not None:
            self._ctx_by_gfid.move_to_end(gfid)
        return ctx

    def _remember(
        self, iatt: Iatt, inode: Inode | None, cached: Translator | None = None, layout: Layout | None = None
    ) -> DhtCtx:
        """Record what a lookup found, in the one context object this gfid has (the inode's, if any)."""
        inode = inode if inode is not None and inode.gfid in (iatt.gfid, NULL_GFID) else None
        ctx = self._ctx(iatt.gfid, inode)
        if ctx is None or ctx.gfid != iatt.gfid or ctx.is_dir != iatt.is_dir:
            ctx = DhtCtx(iatt.gfid, iatt.is_dir)
        ctx.cached = cached if cached is not None else ctx.cached
        ctx.layout = layout if layout is not None else ctx.layout
        if inode is not None:
            inode.ctx[self] = ctx
        self._ctx_by_gfid[iatt.gfid] = ctx
        self._ctx_by_gfid.move_to_end(iatt.gfid)
        while len(self._ctx_by_gfid) > self.max_ctx:
            self._ctx_by_gfid.popitem(last=False)
        return ctx

    def _forget(self, gfid: Gfid, inode: Inode | None = None) -> None:
        self._ctx_by_gfid.pop(gfid, None)
        if inode is not None:
            inode.ctx.pop(self, None)

    async def _resolve(self, loc: Loc, refresh: bool = False) -> tuple[DhtCtx, bool]:
        """What `loc` is and where its data lives; the flag says it came from the cache."""
        if not refresh:
            ctx = self._ctx(loc.gfid, loc.inode)
            if ctx is not None and (ctx.is_dir or ctx.cached is not None):
                return ctx, True
        rep = await self.lookup(loc)
        ctx = self._ctx(rep.iatt.gfid, None)
        if ctx is None:  # pragma: no cover - lookup always remembers what it found
            raise FopError(errno.EIO, f"{loc.path}: lookup found nothing to remember")
        return ctx, False

    # ---- layouts -------------------------------------------------------------------------------

    def hashed_for(self, layout: Layout, name: str) -> Translator | None:
        """The subvolume `name` hashes to under `layout` (None: its range belongs to no live subvolume)."""
        owner = layout.owner(self._hasher(name))
        return self._by_name.get(owner) if owner is not None else None

    async def layout_for(self, dirloc: Loc) -> Layout:
        """The layout of a directory (cached, else read and healed by a lookup)."""
        ctx = self._ctx(dirloc.gfid, dirloc.inode)
        if ctx is not None and ctx.layout is not None:
            return ctx.layout
        rep = await self.lookup(dirloc)
        ctx = self._ctx(rep.iatt.gfid, None)
        if ctx is None or ctx.layout is None:
            raise FopError(errno.ENOTDIR, f"{dirloc.path} is not a directory")
        return ctx.layout

    async def _parent(self, loc: Loc) -> tuple[Layout, Translator]:
        """The parent's layout and the subvolume `loc.name` hashes to (ENOTCONN if nobody owns it)."""
        if loc.pargfid is None or not loc.name:
            raise FopError(errno.EINVAL, f"{loc.path}: an entry fop needs a parent gfid and a name")
        layout = await self.layout_for(Loc(posixpath.dirname(loc.path) or "/", loc.pargfid, inode=loc.parent))
        hashed = self.hashed_for(layout, loc.name)
        if hashed is None:
            raise FopError(errno.ENOTCONN, f"{loc.path}: no subvolume up owns the hash range of this name")
        return layout, hashed

    def _may_look_unhashed(self, layout: Layout) -> bool:
        mode = self.opts["lookup-unhashed"]
        return mode == "on" or (mode == "auto" and not self.settled(layout))

    def settled(self, layout: Layout) -> bool:
        """Every file of the directory is on its hashed subvolume (or has a link file there): the
        directory was created with this layout, or a complete rebalance left it so."""
        if layout.fresh:
            return True
        vol = self.volume_commit
        return (
            vol != COMMIT_FRESH
            and bool(layout.ranges)
            and not layout.missing
            and all(r.commit_hash == vol for r in layout.ranges)
        )

    def _next_commit(self, commit: int) -> int:
        """A commit hash for a rewritten layout: never "fresh" and never the volume's."""
        nxt = commit % 0xFFFFFFFF + 1
        return nxt % 0xFFFFFFFF + 1 if nxt == self.volume_commit else nxt

    async def write_volume_commit(self, commit: int) -> None:
        """Record on every subvolume's root that a rebalance with `commit` completed."""
        raw = struct.pack(">I", commit)
        with as_root():
            res = await gather_fops(
                c.setxattr(Loc("/", ROOT_GFID), {VOL_COMMIT_XATTR: raw}, 0) for c in self.children
            )
        errs = [r for r in res if isinstance(r, FopError)]
        if errs:
            raise errs[0]
        self.volume_commit = commit

    def _note_volume_commit(self, replies: Sequence[EntryReply]) -> None:
        found = [wanted_xattrs(r.xdata).get(VOL_COMMIT_XATTR) for r in replies]
        values = {struct.unpack(">I", raw)[0] for raw in found if raw is not None and len(raw) == 4}
        # subvolumes that disagree (one was added since): trust none of them
        self.volume_commit = values.pop() if len(values) == 1 and None not in found else COMMIT_FRESH

    async def _weights(self, children: Sequence[Translator]) -> list[int] | None:
        if not self.opts["weighted-rebalance"]:
            return None
        await self._refresh_du()
        weights = []
        for c in children:
            sv = self._du.get(self._index[id(c)])
            weights.append(max(1, (sv.blocks * sv.frsize) >> 20) if sv else 1)
        return weights

    def _live(self, children: Sequence[Translator]) -> list[Translator]:
        """The subvolumes of `children` that may own a range (all of them if all are drained)."""
        return [c for c in children if c.name not in self._decommissioned] or list(children)

    async def _new_layout(self, gfid: Gfid, children: Sequence[Translator], commit_hash: int) -> Layout:
        live = self._live(children)
        names = [c.name for c in live]
        zero = [c.name for c in children if c not in live]
        start = rotation_start(gfid.canonical, len(names))
        return compute_layout(
            names, await self._weights(live), start=start, commit_hash=commit_hash, zero=zero
        )

    async def _write_layout(
        self, gfid: Gfid, path: str, layout: Layout, only: Sequence[str] = ()
    ) -> list[FopError]:
        """Write each subvolume's range (just those named in `only`, when given); returns failures."""
        ranges = [r for r in layout.ranges if r.subvol in self._by_name and (not only or r.subvol in only)]
        with as_root():
            res = await gather_fops(
                self._by_name[r.subvol].setxattr(Loc(path, gfid), {LAYOUT_XATTR: encode_range(r)}, 0)
                for r in ranges
            )
        for r, rep in zip(ranges, res, strict=True):
            if isinstance(rep, FopError):
                self.log.warning("%s: writing the layout on %s failed: %s", path, r.subvol, rep)
        return [r for r in res if isinstance(r, FopError)]

    async def _read_layouts(self, gfid: Gfid, path: str, children: Sequence[Translator]) -> Layout:
        req = {"xattrs": [LAYOUT_XATTR]}
        with as_root():
            res = await gather_fops(c.lookup(Loc(path, gfid), dict(req)) for c in children)
        raws: dict[str, bytes | None] = {}
        for child, r in zip(children, res, strict=True):
            if isinstance(r, FopError):
                if r.errno not in STALE:
                    raise r
                raws[child.name] = None
            else:
                raws[child.name] = wanted_xattrs(r.xdata).get(LAYOUT_XATTR)
        return layout_from_xattrs(raws)

    async def _lock_layout(self, gfid: Gfid, path: str, children: Sequence[Translator]) -> list[Translator]:
        """Take the layout-heal write lock on every subvolume, one after the other in a fixed order
        (so two healers cannot deadlock); returns those locked, none if the subvolumes have no lock
        support (ENOSYS) and heal runs unlocked."""
        held: list[Translator] = []
        for child in children:
            try:
                await child.inodelk(
                    _LAYOUT_LOCK_DOMAIN, Loc(path, gfid), LockCmd.SETLKW, Flock(LockType.WRLCK)
                )
            except FopError as exc:
                if exc.errno == errno.ENOSYS and not held:
                    return []
                await self._unlock_layout(gfid, path, held)
                raise
            held.append(child)
        return held

    async def _unlock_layout(self, gfid: Gfid, path: str, held: Sequence[Translator]) -> None:
        for child in reversed(held):
            try:
                await child.inodelk(
                    _LAYOUT_LOCK_DOMAIN, Loc(path, gfid), LockCmd.SETLK, Flock(LockType.UNLCK)
                )
            except FopError as exc:
                self.log.warning("%s: releasing the layout lock on %s failed: %s", path, child.name, exc)

    async def _heal_layout(
        self,
        gfid: Gfid,
        path: str,
        children: Sequence[Translator],
        force: bool,
        zero: Collection[str] = (),
        commit_hash: int | None = None,
    ) -> Layout:
        """Repair the layout under the heal lock: a layout with holes or overlaps (or none at all) is
        replaced; one that covers the range gets empty ranges written where it is missing. `force`
        (fix-layout) always spreads the range over `children` again, reusing the old ranges as far as
        it can, with `zero` (and decommissioned) subvolumes given none."""
        with as_root(lk_owner=os.urandom(8)):
            held = await self._lock_layout(gfid, path, children)
            try:
                layout = await self._read_layouts(gfid, path, children)
                if force:
                    return await self._replan(gfid, path, layout, children, zero, commit_hash)
                anomalies = check_layout(layout)
                if anomalies.ok and not anomalies.missing:
                    return layout
                if anomalies.ok:
                    fill = [c.name for c in children if c.name in layout.missing]
                    empty = compute_layout([], zero=fill, commit_hash=layout.commit_hash)
                    layout = Layout(layout.ranges + empty.ranges)
                    self.log.info("%s: gave an empty range to %s", path, ", ".join(fill))
                    await self._write_layout(gfid, path, layout, only=fill)
                    return layout
                fresh = not layout.ranges  # a directory nobody gave a layout yet
                commit = COMMIT_FRESH if fresh else self._next_commit(layout.commit_hash)
                old = anomalies
                layout = await self._new_layout(gfid, children, commit)
                self.log.info("%s: new layout (had %d holes, %d overlaps)", path, old.holes, old.overlaps)
                await self._write_layout(gfid, path, layout)
                return layout
            finally:
                await self._unlock_layout(gfid, path, held)

    async def _replan(
        self,
        gfid: Gfid,
        path: str,
        old: Layout,
        children: Sequence[Translator],
        zero: Collection[str],
        commit_hash: int | None,
    ) -> Layout:
        excluded = set(zero) | self._decommissioned
        live = [c for c in children if c.name not in excluded]
        if not live:
            raise FopError(errno.EINVAL, f"{path}: every subvolume would be left without a hash range")
        commit = commit_hash if commit_hash is not None else self._next_commit(old.commit_hash)
        layout = plan_layout(
            old,
            [c.name for c in live],
            await self._weights(live),
            commit_hash=commit,
            zero=[c.name for c in children if c not in live],
            start=rotation_start(gfid.canonical, len(live)),
        )
        failed = await self._write_layout(gfid, path, layout)
        if failed:
            raise FopError(failed[0].errno, f"{path}: the new layout could not be written everywhere")
        self.log.info("%s: layout fixed over %s (commit %#x)", path, ", ".join(c.name for c in live), commit)
        return layout

    async def fix_layout(
        self, dirloc: Loc, *, zero: Collection[str] = (), commit_hash: int | None = None
    ) -> Layout:
        """Spread a directory's hash range over every live subvolume again (rebalance's first step),
        keeping as much of each old range as possible; `zero` subvolumes (being drained) get none.
        Existing files stay where they are and are found through lookup-unhashed until migrated.
        `commit_hash` (a rebalance run's) is written with the new ranges."""
        rep = await self.lookup(dirloc)
        if not rep.iatt.is_dir:
            raise FopError(errno.ENOTDIR, f"{dirloc.path} is not a directory")
        layout = await self._heal_layout(
            rep.iatt.gfid, dirloc.path, self.up_children(), True, zero, commit_hash
        )
        ctx = self._ctx(rep.iatt.gfid, dirloc.inode)
        if ctx is not None:
            ctx.layout = layout
        return layout

    # ---- lookup --------------------------------------------------------------------------------

    def _lookup_req(self, xdata: Xdata) -> tuple[dict[str, Any], list[str] | None]:
        asked = list(xdata["xattrs"]) if xdata and "xattrs" in xdata else None
        req = dict(xdata or {})
        own = (LAYOUT_XATTR, LINKTO_XATTR, MIGRATING_XATTR)
        req["xattrs"] = [*(asked or []), *(k for k in own if k not in (asked or []))]
        return req, asked

    @staticmethod
    def _answer(rep: EntryReply, asked: list[str] | None, iatt: Iatt | None = None) -> EntryReply:
        """The reply as the caller asked for it: only the xattrs it requested."""
        xdata = dict(rep.xdata or {})
        if asked is None:
            xdata.pop("xattrs", None)
        else:
            xdata["xattrs"] = {k: v for k, v in wanted_xattrs(rep.xdata).items() if k in asked}
        return EntryReply(hide_migration(iatt or rep.iatt), rep.parent_pre, rep.parent_post, xdata or None)

    async def _child_lookup(self, child: Translator, loc: Loc, req: dict[str, Any]) -> EntryReply:
        """A lookup on one subvolume as the caller (the brick checks search permission) with DHT's
        xattrs. A brick shows trusted.* xattrs to root only, so for another caller the layout or
        linkto of what needs one is read again as root, by gfid."""
        rep = await child.lookup(loc, dict(req))
        if call_context.get().uid == 0 or not (rep.iatt.is_dir or is_linkfile(rep.iatt)):
            return rep
        keys = [LAYOUT_XATTR] if rep.iatt.is_dir else [LINKTO_XATTR, MIGRATING_XATTR]
        with as_root():
            again = await child.lookup(Loc(loc.path, rep.iatt.gfid), {"xattrs": keys})
        found = {k: v for k, v in wanted_xattrs(again.xdata).items() if k in keys}
        if found:
            xdata = dict(rep.xdata or {})
            xdata["xattrs"] = {**wanted_xattrs(rep.xdata), **found}
            rep.xdata = xdata
        return rep

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        req, asked = self._lookup_req(xdata)
        if not loc.name:
            return await self._lookup_gfid(loc, req, asked)
        layout, hashed = await self._parent(loc)
        try:
            rep = await self._child_lookup(hashed, loc, req)
        except FopError as exc:
            if exc.errno != errno.ENOENT or not self._may_look_unhashed(layout):
                raise
            return await self._lookup_everywhere(loc, req, asked, hashed)
        if rep.iatt.is_dir:
            return await self._lookup_dir(loc, req, asked, {id(hashed): rep})
        target = linkto_of(rep)
        if target is None and holds_data(rep):
            self._remember(rep.iatt, loc.inode, cached=hashed)
            return self._answer(rep, asked)
        if target is None:  # a link file being made (a migration starting): the data is elsewhere
            return await self._lookup_everywhere(loc, req, asked, hashed)
        cached = self._by_name.get(target)
        if cached is not None:
            try:
                data = await self._child_lookup(cached, loc, req)
            except FopError as exc:
                if exc.errno not in STALE:
                    raise
            else:
                if data.iatt.gfid == rep.iatt.gfid and holds_data(data):
                    self._remember(data.iatt, loc.inode, cached=cached)
                    return self._answer(data, asked)
        self.log.info("%s: stale link file on %s (to %s), looking everywhere", loc.path, hashed.name, target)
        return await self._lookup_everywhere(loc, req, asked, hashed)

    async def _lookup_everywhere(
        self, loc: Loc, req: dict[str, Any], asked: list[str] | None, hashed: Translator
    ) -> EntryReply:
        """Find a name on any subvolume; leave a link file on the hashed one pointing to the data."""
        children = self.up_children()
        res = await gather_fops(self._child_lookup(c, loc, req) for c in children)
        found = {id(c): r for c, r in zip(children, res, strict=True) if isinstance(r, EntryReply)}
        if any(r.iatt.is_dir for r in found.values()):
            return await self._lookup_dir(loc, req, asked, found)
        data = [
            (c, r) for c, r in zip(children, res, strict=True) if isinstance(r, EntryReply) and holds_data(r)
        ]
        links = [
            (c, r) for c, r in zip(children, res, strict=True) if isinstance(r, EntryReply) and linkto_of(r)
        ]
        if not data:
            for child, r in links:
                self.log.info("%s: removing stale link file on %s", loc.path, child.name)
                await self._unlink_linkfile(child, loc, r.iatt.gfid)
            raise FopError(errno.ENOENT, f"{loc.path}: no such file on any subvolume")
        if len({r.iatt.gfid for _, r in data}) > 1:
            self.log.error("%s: different files (gfids) on %s", loc.path, ", ".join(c.name for c, _ in data))
        child, rep = data[0]
        if child is not hashed:
            try:
                await self.make_linkfile(hashed, loc, rep.iatt.gfid, child)
            except FopError as exc:
                self.log.warning("%s: cannot leave a link file on %s: %s", loc.path, hashed.name, exc)
        self._remember(rep.iatt, loc.inode, cached=child)
        return self._answer(rep, asked)

    async def _lookup_gfid(self, loc: Loc, req: dict[str, Any], asked: list[str] | None) -> EntryReply:
        """Revalidate by gfid: a directory on all subvolumes, a file where its data is."""
        ctx = self._ctx(loc.gfid, loc.inode)
        if loc.gfid == ROOT_GFID:
            root_req = {**req, "xattrs": [*req["xattrs"], VOL_COMMIT_XATTR]}
            return await self._lookup_dir(loc, root_req, asked, {})
        if ctx is not None and ctx.is_dir:
            return await self._lookup_dir(loc, req, asked, {})
        if ctx is not None and ctx.cached is not None:
            try:
                rep = await self._child_lookup(ctx.cached, loc, req)
            except FopError as exc:
                if exc.errno not in STALE:
                    raise
            else:
                if holds_data(rep):
                    return self._answer(rep, asked)
        children = self.up_children()
        res = await gather_fops(self._child_lookup(c, loc, req) for c in children)
        found = {id(c): r for c, r in zip(children, res, strict=True) if isinstance(r, EntryReply)}
        if any(r.iatt.is_dir for r in found.values()):
            return await self._lookup_dir(loc, req, asked, found)
        for child, r in zip(children, res, strict=True):
            if isinstance(r, EntryReply) and holds_data(r):
                self._remember(r.iatt, loc.inode, cached=child)
                return self._answer(r, asked)
        self._forget(loc.gfid or NULL_GFID, loc.inode)
        errs = [r for r in res if isinstance(r, FopError) and r.errno not in STALE]
        raise errs[0] if errs else FopError(errno.ESTALE, f"{loc.path}: gfid {loc.gfid} is on no subvolume")

    async def _lookup_dir(
        self, loc: Loc, req: dict[str, Any], asked: list[str] | None, known: dict[int, EntryReply]
    ) -> EntryReply:
        """A directory: look on every subvolume, heal missing copies and the layout, merge attributes."""
        todo = [c for c in self.up_children() if id(c) not in known]
        res = await gather_fops(self._child_lookup(c, loc, req) for c in todo)
        replies: dict[int, EntryReply | FopError] = dict(known)
        replies.update({id(c): r for c, r in zip(todo, res, strict=True)})
        order = [c for c in self.children if id(c) in replies]
        dirs = [(c, r) for c in order if isinstance(r := replies[id(c)], EntryReply)]
        if not dirs:
            errs = [r for r in replies.values() if isinstance(r, FopError)]
            raise errs[0] if errs else FopError(errno.ENOENT, loc.path)
        auth = next((r for _, r in dirs if r.iatt.is_dir), dirs[0][1])
        gfid = auth.iatt.gfid
        bad = [c.name for c, r in dirs if r.iatt.gfid != gfid or not r.iatt.is_dir]
        if bad:
            self.log.error("%s: directory %s differs (type or gfid) on %s", loc.path, gfid, ", ".join(bad))
            raise FopError(
                errno.EIO, f"{loc.path}: the directory differs between subvolumes ({', '.join(bad)})"
            )
        if gfid == ROOT_GFID:
            self._note_volume_commit([r for _, r in dirs])
        missing = [c for c in order if isinstance(r := replies[id(c)], FopError) and r.errno == errno.ENOENT]
        healed = (
            await self._heal_dirs(loc, auth.iatt, missing) if missing and loc.name and loc.pargfid else []
        )
        failed = [c for c in order if isinstance(replies[id(c)], FopError) and c not in healed]
        raws: dict[str, bytes | None] = {c.name: wanted_xattrs(r.xdata).get(LAYOUT_XATTR) for c, r in dirs}
        raws.update({c.name: None for c in healed})
        layout = layout_from_xattrs(raws)
        anomalies = check_layout(layout)
        if not failed and (not anomalies.ok or anomalies.missing):
            present = [c for c in self.children if c.name in raws]
            layout = await self._heal_layout(gfid, loc.path, present, force=False)
        merged = replace(
            auth.iatt,
            atime_ns=max(r.iatt.atime_ns for _, r in dirs),
            mtime_ns=max(r.iatt.mtime_ns for _, r in dirs),
            ctime_ns=max(r.iatt.ctime_ns for _, r in dirs),
        )
        self._remember(merged, loc.inode, layout=layout)
        return self._answer(auth, asked, merged)

    async def _heal_dirs(self, loc: Loc, iatt: Iatt, missing: list[Translator]) -> list[Translator]:
        """Create a directory where it is missing, with the same gfid, mode and owner."""
        self.log.info("%s: creating missing directory on %s", loc.path, ", ".join(c.name for c in missing))
        mode = iatt.mode & 0o7777
        attr = AttrSet(valid=0x1 | 0x2 | 0x4, mode=mode, uid=iatt.uid, gid=iatt.gid)
        with as_root():
            res = await gather_fops(c.mkdir(loc, mode, 0, {GFID_REQ: bytes(iatt.gfid)}) for c in missing)
            healed = [
                c
                for c, r in zip(missing, res, strict=True)
                if not isinstance(r, FopError) or r.errno == errno.EEXIST
            ]
            for c, r in zip(missing, res, strict=True):
                if isinstance(r, FopError) and r.errno != errno.EEXIST:
                    self.log.warning("%s: cannot create the directory on %s: %s", loc.path, c.name, r)
            await gather_fops(c.setattr(Loc(loc.path, iatt.gfid), attr) for c in healed)
        return healed

    # ---- link files ----------------------------------------------------------------------------

    async def make_linkfile(self, child: Translator, loc: Loc, gfid: Gfid, target: Translator) -> None:
        """Make `loc` on `child` a link file to `target` for the file `gfid` (replacing a stale one);
        if the name there already holds this file's data (a migration just moved it), leave it."""
        name_loc = Loc(loc.path, pargfid=loc.pargfid, name=loc.name)
        with as_root():
            try:
                await child.mknod(name_loc, linkfile_mode(), 0, 0, {GFID_REQ: bytes(gfid)})
            except FopError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                if not await self._adopt_linkfile(child, name_loc, gfid):
                    return
            await child.setxattr(Loc(loc.path, gfid), {LINKTO_XATTR: encode_linkto(target.name)}, 0)

    async def _adopt_linkfile(self, child: Translator, loc: Loc, gfid: Gfid) -> bool:
        """mknod said EEXIST: the name is taken, or the gfid already has a link file under another
        name on this subvolume (a brick keeps one inode per gfid: add a name to it). False when the
        name is this very file with its data."""
        req = {"xattrs": [LINKTO_XATTR]}
        try:
            cur = await child.lookup(loc, dict(req))
        except FopError as exc:
            if exc.errno != errno.ENOENT:
                raise
            other = await child.lookup(Loc(loc.path, gfid), dict(req))
            if linkto_of(other) is None:
                raise FopError(errno.EEXIST, f"{loc.path}: the data of {gfid} is on {child.name}") from None
            await child.link(Loc(loc.path, gfid), loc)
            return True
        if cur.iatt.gfid == gfid:
            return is_linkfile(cur.iatt)
        if linkto_of(cur) is None:
            raise FopError(errno.EEXIST, f"{loc.path}: another file has this name on {child.name}")
        await child.unlink(loc, 0)
        await child.mknod(loc, linkfile_mode(), 0, 0, {GFID_REQ: bytes(gfid)})
        return True

    async def _unlink_linkfile(self, child: Translator, loc: Loc, gfid: Gfid, data_too: bool = False) -> None:
        """Remove `loc` on `child` if it is a link file for `gfid`; anything else is left alone, except
        (`data_too`, unlink) this very file's data, which a migration moved there meanwhile."""
        name_loc = Loc(loc.path, pargfid=loc.pargfid, name=loc.name)
        with as_root():
            try:
                cur = await child.lookup(name_loc, {"xattrs": [LINKTO_XATTR]})
                if cur.iatt.gfid == gfid and (data_too or linkto_of(cur) is not None):
                    await child.unlink(name_loc, 0)
            except FopError as exc:
                if exc.errno not in STALE:
                    self.log.warning("%s: removing the link file on %s failed: %s", loc.path, child.name, exc)

    # ---- entry fops ----------------------------------------------------------------------------

    @staticmethod
    def _gfid_req(loc: Loc, xdata: Xdata) -> Gfid:
        raw = (xdata or {}).get(GFID_REQ)
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != 16:
            raise FopError(errno.EINVAL, f"{loc.path}: entry fops need xdata['{GFID_REQ}'] (16 bytes)")
        return Gfid(raw)

    async def _refresh_du(self) -> None:
        async with self._du_lock:
            if self._du and time.monotonic() - self._du_at < self.du_refresh:
                return
            children = self.up_children()
            res = await gather_fops(c.statfs(Loc("/", ROOT_GFID)) for c in children)
            self._du = {
                self._index[id(c)]: r.statvfs
                for c, r in zip(children, res, strict=True)
                if isinstance(r, StatfsReply)
            }
            self._du_at = time.monotonic()

    def _free(self, child: Translator) -> tuple[float, int]:
        sv = self._du.get(self._index[id(child)])
        if sv is None or not sv.blocks:
            return 100.0, 0
        return 100.0 * sv.bavail / sv.blocks, sv.bavail * sv.frsize

    async def _placement(self, hashed: Translator) -> Translator:
        """Where a new file goes: its hashed subvolume, unless that is below min-free-disk and
        another has more free space."""
        if self.opts["min-free-disk"] <= 0:
            return hashed
        await self._refresh_du()
        percent, avail = self._free(hashed)
        if percent >= self.opts["min-free-disk"]:
            return hashed
        best = max(self._live(self.up_children()), key=lambda c: self._free(c)[1])
        return best if self._free(best)[1] > avail else hashed

    async def _undrained(self, loc: Loc, layout: Layout) -> Translator:
        """Where a new file goes when its name hashes to a subvolume being drained (a layout cached
        or written before remove-brick started): where the rebalance's new layout of the directory
        will hash it, so it needs no move; a link file on the drained one serves older layouts."""
        live = self._live(self.children)
        assert loc.pargfid is not None  # _parent checked it
        plan = plan_layout(
            layout,
            [c.name for c in live],
            await self._weights(live),
            commit_hash=layout.commit_hash,
            zero=[c.name for c in self.children if c not in live],
            start=rotation_start(loc.pargfid.canonical, len(live)),
        )
        return self.hashed_for(plan, loc.name) or live[0]

    async def _place(
        self,
        loc: Loc,
        xdata: Xdata,
        make: Callable[[Translator], Awaitable[EntryReply]],
        spill: bool = True,
    ) -> tuple[EntryReply, Translator]:
        """Create an entry on its hashed subvolume, or (full) elsewhere behind a link file."""
        gfid = self._gfid_req(loc, xdata)
        layout, hashed = await self._parent(loc)
        if hashed.name in self._decommissioned:
            target = await self._undrained(loc, layout)
        else:
            target = await self._placement(hashed) if spill else hashed
        if target is not hashed:
            self.log.info("%s: %s is drained or below min-free-disk, placing on %s", loc.path, hashed.name,
                          target.name)  # fmt: skip
            await self.make_linkfile(hashed, loc, gfid, target)
            try:
                rep = await make(target)
            except BaseException:
                await self._unlink_linkfile(hashed, loc, gfid)
                raise
        else:
            rep = await make(hashed)
        self._remember(rep.iatt, loc.inode, cached=target)
        return rep, target
