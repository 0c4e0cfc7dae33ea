"""performance/nl-cache: negative lookup cache, per directory.

Creating a file costs a lookup that answers ENOENT before the create itself (the kernel and the
client API both ask first). This translator remembers, per directory, the names known to be absent
and, for a directory this client made (empty when made), that its whole name set is known; a lookup
of a name known absent is answered ENOENT without a round trip.

What is remembered is good for `timeout` seconds after it was learned (GlusterFS's nl-cache relies
on upcalls to invalidate; mortar has none yet, so the window is short, like md-cache's). It stays
good past that while this client keeps changing the directory and each change proves that nobody
else changed its names since this client's previous one: the directory's mtime before this change
is the one this client's previous change left, and, on a replicated volume, both changes ran under
one eager entry lock of the replicate translator (replies carry the batch's token,
`ENTRY_BATCH_KEY`; no other client can change the names while that lock is held). Without
replication the mtime alone is the proof; it needs distinct timestamps for changes made after a
stat, which Linux >= 6.13 gives on ext4, xfs, btrfs and tmpfs (multigrain timestamps): on older
kernels two changes within one clock tick can share an mtime, and a name another client made in
that tick stays hidden until the changes stop.
This client's own creates, unlinks and renames keep the entries right; a change that proves
nothing drops what is known about the directory. Under cluster/distribute a directory lives on
every subvolume and a change answers for one only, so nothing is extended there (the timeout
alone applies).
"""

from __future__ import annotations

import errno
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mortar.core.errors import FopError
from mortar.core.fops import ChangeReply, EntryReply, Fd, Loc, RenameReply, Xdata
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.core.options import Option
from mortar.core.translator import Translator
from mortar.xlators.cluster.afr.entry_lock import ENTRY_BATCH_KEY


@dataclass(slots=True)
class _Dir:
    """What this client knows about one directory's names."""

    until: float
    #: names known to be absent
    absent: set[str] = field(default_factory=set)
    #: every name the directory holds, when the whole set is known (None: not known)
    names: set[str] | None = None
    #: the eager entry batch of this client's last change here
    batch: Any = None
    #: the directory's mtime after this client's last change here
    stamp: int | None = None


class NlCacheTranslator(Translator):
    """Answers lookups of names known to be absent without a round trip."""

    type_name = "performance/nl-cache"
    options: ClassVar[dict[str, Option]] = {
        "timeout": Option(
            "time", 1.0, "seconds what is known about a directory's absent names stays good", min=0, max=600
        ),
        "limit": Option("int", 10000, "directories remembered (least recently used go first)", 1, 10_000_000),
        "max-names": Option(
            "int", 100_000, "names known per directory before it is forgotten", 16, 100_000_000
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dirs: OrderedDict[Gfid, _Dir] = OrderedDict()
        #: whether a change proves anything about a whole directory (not under distribute)
        self._extend = True
        self.hits = 0
        self.misses = 0

    async def init(self) -> None:
        self._extend = not any(x.type_name == "cluster/distribute" for x in self.descendants())
        await super().init()

    # ---- the table -------------------------------------------------------------------------------

    def _fresh(self, parent: Gfid) -> _Dir | None:
        d = self._dirs.get(parent)
        if d is None:
            return None
        if d.until < time.monotonic():
            del self._dirs[parent]
            return None
        self._dirs.move_to_end(parent)
        return d

    def _entry(self, parent: Gfid) -> _Dir:
        d = self._fresh(parent)
        if d is None:
            d = self._dirs[parent] = _Dir(time.monotonic() + self.opts["timeout"])
            while len(self._dirs) > self.opts["limit"]:
                self._dirs.popitem(last=False)
        return d

    def _too_big(self, parent: Gfid, d: _Dir) -> None:
        if len(d.absent) + len(d.names or ()) > self.opts["max-names"]:
            self._dirs.pop(parent, None)

    def forget(self, parent: Gfid | None) -> None:
        if parent is not None:
            self._dirs.pop(parent, None)

    def _changed(
        self, parent: Gfid | None, name: str, present: bool, xdata: Xdata, pre: Iatt | None, post: Iatt | None
    ) -> None:
        """This client changed `name` in `parent` (`pre`/`post`: the directory's attributes around
        the change): keep the name's entry right; keep what is known about the others only if
        nobody else changed the directory since this client's previous change, and extend it when
        both changes ran under one eager entry lock (which proves it)."""
        if parent is None or not name:
            return
        batch = (xdata or {}).get(ENTRY_BATCH_KEY)
        d = self._fresh(parent)
        if d is None:
            if batch is None:
                return
            d = self._entry(parent)
        elif pre is None or d.stamp != _stamp(pre):
            d.absent.clear()  # another change came between: the old knowledge is unproven
            d.names = None
        elif self._extend and (batch is None or batch == d.batch):
            d.until = time.monotonic() + self.opts["timeout"]
        d.batch = batch
        d.stamp = _stamp(post) if post is not None else None
        if present:
            d.absent.discard(name)
            if d.names is not None:
                d.names.add(name)
        else:
            d.absent.add(name)
            if d.names is not None:
                d.names.discard(name)
        self._too_big(parent, d)

    def _known_absent(self, loc: Loc) -> bool:
        if loc.pargfid is None or not loc.name or loc.gfid is not None:
            return False
        d = self._fresh(loc.pargfid)
        if d is None:
            return False
        return loc.name in d.absent or (d.names is not None and loc.name not in d.names)

    # ---- fops ------------------------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        if self._known_absent(loc):
            self.hits += 1
            raise FopError(errno.ENOENT, f"{loc.path}: no such entry (nl-cache)")
        named = loc.pargfid is not None and bool(loc.name) and loc.gfid is None
        if named:
            self.misses += 1
        try:
            reply = await self.children[0].lookup(loc, xdata)
        except FopError as exc:
            if exc.errno == errno.ENOENT and named and loc.pargfid is not None:
                d = self._entry(loc.pargfid)
                d.absent.add(loc.name)
                if d.names is not None:
                    d.names.discard(loc.name)
                self._too_big(loc.pargfid, d)
            raise
        if named and loc.pargfid is not None:
            d2 = self._fresh(loc.pargfid)
            if d2 is not None:
                d2.absent.discard(loc.name)
                if d2.names is not None:
                    d2.names.add(loc.name)
        return reply

    async def _entry_fop(self, loc: Loc, reply: EntryReply) -> EntryReply:
        self._changed(loc.pargfid, loc.name, True, reply.xdata, reply.parent_pre, reply.parent_post)
        return reply

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        try:
            reply = await self.children[0].create(loc, flags, mode, umask, fd, xdata)
        except FopError:
            self.forget(loc.pargfid)
            raise
        return await self._entry_fop(loc, reply)

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        try:
            reply = await self.children[0].mknod(loc, mode, rdev, umask, xdata)
        except FopError:
            self.forget(loc.pargfid)
            raise
        return await self._entry_fop(loc, reply)

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        try:
            reply = await self.children[0].mkdir(loc, mode, umask, xdata)
        except FopError:
            self.forget(loc.pargfid)
            raise
        made = self._entry(reply.iatt.gfid)  # a directory this client just made holds no name
        made.names = set()
        made.absent.clear()
        made.stamp = _stamp(reply.iatt)
        return await self._entry_fop(loc, reply)

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        try:
            reply = await self.children[0].symlink(target, loc, umask, xdata)
        except FopError:
            self.forget(loc.pargfid)
            raise
        return await self._entry_fop(loc, reply)

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        try:
            reply = await self.children[0].link(oldloc, newloc, xdata)
        except FopError:
            self.forget(newloc.pargfid)
            raise
        return await self._entry_fop(newloc, reply)

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        try:
            reply = await self.children[0].unlink(loc, flags, xdata)
        except FopError:
            self.forget(loc.pargfid)
            raise
        self._changed(loc.pargfid, loc.name, False, reply.xdata, reply.pre, reply.post)
        return reply

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        try:
            reply = await self.children[0].rmdir(loc, flags, xdata)
        except FopError:
            self.forget(loc.pargfid)
            raise
        self.forget(loc.gfid)
        self._changed(loc.pargfid, loc.name, False, reply.xdata, reply.pre, reply.post)
        return reply

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        try:
            reply = await self.children[0].rename(oldloc, newloc, xdata)
        except FopError:
            self.forget(oldloc.pargfid)
            self.forget(newloc.pargfid)
            raise
        if oldloc.pargfid == newloc.pargfid:
            xd, pre, post = reply.xdata, reply.oldparent_pre, reply.oldparent_post
            self._changed(oldloc.pargfid, oldloc.name, False, xd, pre, post)
            self._changed(newloc.pargfid, newloc.name, True, xd, post, post)
        else:
            self._changed(oldloc.pargfid, oldloc.name, False, None, reply.oldparent_pre, reply.oldparent_post)
            self._changed(newloc.pargfid, newloc.name, True, None, reply.newparent_pre, reply.newparent_post)
        return reply


def _stamp(iatt: Iatt) -> int:
    """A directory's mtime moves with every name added or removed (its ctime also moves with
    xattr changes, such as replication's own changelog marks, so it proves nothing here)."""
    return iatt.mtime_ns
