"""features/index: the brick's list of inodes that need healing (GlusterFS's features/index).

Replication records missed changes as pending counters in xattrs (`trusted.afr.<vol>-client-<N>`,
three big-endian int32 [data, metadata, entry]) and marks in-flight operations in
`trusted.afr.dirty`. Finding those inodes by crawling a brick is slow, so this translator watches
the ADD_ARRAY xattrops that change the counters and keeps one empty file per affected gfid:

    <index-base>/xattrop/<gfid>   some `trusted.afr.*` counter other than dirty is non-zero
    <index-base>/dirty/<gfid>     `trusted.afr.dirty` is non-zero

An entry is created before the child applies an increment (so a killed brick never has a counter
without its entry; if the child then fails, the entry stays until the heal daemon purges it) and
removed once the child reports every counter of that kind zero. Entries are hard links to one empty
base file (`<index-base>/link-base`), as in GlusterFS: a link costs a directory entry where a new
file costs an inode too (measured on ext4: ~37 us for link + unlink against ~270 us for create +
unlink, and every small replicated write makes and drops one). Past the file system's link ceiling
(EMLINK) an entry is an empty file of its own. They are not fsynced; after a power loss
`heal full` finds what they missed.
The files are mirrored in memory, so the common xattrop (no change of state) costs no disk I/O.

The heal daemon reads the index through the graph: `INDEX_XATTROP_GFID` and `INDEX_DIRTY_GFID` are
virtual directories. `lookup`/`stat` of them succeed, `opendir` + `readdirp` list entries named by
canonical gfid (no attributes: the daemon looks each gfid up itself), and `unlink` of
(virtual gfid, name) drops a stale entry. `getxattr(any loc, "mortar.index.count")` answers the
number of xattrop entries in ASCII digits (and `mortar.index.dirty-count` the dirty ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrReply,
    ChangeReply,
    DirEntry,
    DirReply,
    EntryReply,
    Fd,
    Loc,
    XattropFlag,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.core.options import Option
from mortar.core.translator import Translator

INDEX_XATTROP_GFID = Gfid("00000000-0000-0000-0000-00000000000d")
INDEX_DIRTY_GFID = Gfid("00000000-0000-0000-0000-00000000000e")
COUNT_KEY = "mortar.index.count"
DIRTY_COUNT_KEY = "mortar.index.dirty-count"

XATTROP = "xattrop"
#: the empty file every index entry is a hard link to (in index-base, beside the two lists)
LINK_BASE = "link-base"
DIRTY = "dirty"
_VIRTUAL = {INDEX_XATTROP_GFID: XATTROP, INDEX_DIRTY_GFID: DIRTY}
#: what one entry counts against readdirp's byte budget (a dirent with a 36-character name)
_DIRENT_COST = 64


def _nonzero(value: bytes) -> bool:
    return bytes(value).strip(b"\0") != b""


def _increments(delta: bytes) -> bool:
    """Whether an ADD_ARRAY delta raises any counter (a pending mark is being set)."""
    if len(delta) % 4:
        return False
    return any(v > 0 for v in struct.unpack(f">{len(delta) // 4}i", delta))


class _Serial:
    """One asyncio lock per gfid, alive while someone uses it."""

    def __init__(self) -> None:
        self._locks: dict[Gfid, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def __call__(self, gfid: Gfid) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(gfid, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[gfid]


class IndexTranslator(Translator):
    """Keeps `<index-base>/{xattrop,dirty}/<gfid>` in step with the pending-change counters."""

    type_name = "features/index"
    options = {
        "index-base": Option(
            "path",
            "",
            "directory holding the index (volgen: <brick>/.mortar/indices); "
            "when unset, <directory of the storage translator below>/.mortar/indices. Read at init.",
        ),
        "watched-prefix": Option(
            "str",
            "trusted.afr.",
            "xattrs whose ADD_ARRAY updates feed the index: <prefix>dirty goes to dirty/, others to xattrop/",
        ),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.base = ""
        self.entries: dict[str, set[Gfid]] = {XATTROP: set(), DIRTY: set()}
        self._serial = _Serial()

    # ---- lifecycle --------------------------------------------------------------------------

    def _default_base(self) -> str:
        for xl in self.descendants():
            directory = xl.opts.get("directory")
            if isinstance(directory, str) and directory:
                return os.path.join(directory, ".mortar", "indices")
        raise FopError(errno.EINVAL, f"{self.name}: set option index-base (no storage directory below)")

    async def init(self) -> None:
        self.base = self.opts["index-base"] or self._default_base()
        for kind in (XATTROP, DIRTY):
            self.entries[kind] = await self.offload(self._load, os.path.join(self.base, kind))
        self.log.info(
            "index at %s: %d pending, %d dirty",
            self.base,
            len(self.entries[XATTROP]),
            len(self.entries[DIRTY]),
        )

    def _load(self, path: str) -> set[Gfid]:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._make_link_base()
        found: set[Gfid] = set()
        for name in os.listdir(path):
            try:
                found.add(Gfid(name))
            except ValueError:
                self.log.warning("ignoring %s in the index: not a gfid", os.path.join(path, name))
        return found

    # ---- entries ----------------------------------------------------------------------------

    def _path(self, kind: str, gfid: Gfid) -> str:
        return os.path.join(self.base, kind, gfid.canonical)

    def _make_link_base(self) -> None:
        base = os.path.join(self.base, LINK_BASE)
        os.close(os.open(base, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))

    def _touch(self, path: str) -> None:
        try:
            os.link(os.path.join(self.base, LINK_BASE), path)
            return
        except FileExistsError:
            return
        except FileNotFoundError:  # the base went (an operator cleaned up): make it again
            with contextlib.suppress(OSError):
                self._make_link_base()
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    async def add(self, kind: str, gfid: Gfid) -> None:
        if gfid not in self.entries[kind]:
            await self.offload(self._touch, self._path(kind, gfid))
            self.entries[kind].add(gfid)
            self.log.debug("%s: %s added", kind, gfid)

    async def remove(self, kind: str, gfid: Gfid) -> None:
        if gfid in self.entries[kind]:
            await self.offload(self._remove, self._path(kind, gfid))
            self.entries[kind].discard(gfid)
            self.log.debug("%s: %s removed", kind, gfid)

    def _kinds(self, xattrs: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
        """The watched keys of `xattrs`, by the index they feed."""
        prefix = self.opts["watched-prefix"]
        dirty_key = prefix + "dirty"
        kinds: dict[str, dict[str, bytes]] = {}
        for key, value in xattrs.items():
            if key.startswith(prefix):
                kinds.setdefault(DIRTY if key == dirty_key else XATTROP, {})[key] = value
        return kinds

    # ---- xattrop ----------------------------------------------------------------------------

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        child = self.children[0]
        if optype != XattropFlag.ADD_ARRAY or not self._kinds(xattrs):
            return await child.xattrop(loc, optype, xattrs, xdata)
        gfid = loc.gfid or (await child.lookup(Loc(loc.path, pargfid=loc.pargfid, name=loc.name))).iatt.gfid
        return await self._tracked(
            gfid,
            xattrs,
            lambda: child.xattrop(loc, optype, xattrs, xdata),
            lambda: child.getxattr(Loc(loc.path, gfid=gfid), None),
        )

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        child = self.children[0]
        if optype != XattropFlag.ADD_ARRAY or not self._kinds(xattrs):
            return await child.fxattrop(fd, optype, xattrs, xdata)
        return await self._tracked(
            fd.gfid,
            xattrs,
            lambda: child.fxattrop(fd, optype, xattrs, xdata),
            lambda: child.fgetxattr(fd, None),
        )

    async def _tracked(
        self,
        gfid: Gfid,
        deltas: dict[str, bytes],
        wind: Callable[[], Awaitable[XattrReply]],
        read_all: Callable[[], Awaitable[XattrReply]],
    ) -> XattrReply:
        """Run one xattrop with the index kept in step; xattrops on one gfid go one at a time here
        so that replies are judged in the order the child applied them."""
        async with self._serial(gfid):
            for kind, values in self._kinds(deltas).items():
                if any(_increments(v) for v in values.values()):
                    await self.add(kind, gfid)
            reply = await wind()
            for kind, values in self._kinds(reply.xattrs).items():
                if any(_nonzero(v) for v in values.values()):
                    await self.add(kind, gfid)
                elif gfid in self.entries[kind] and not await self._others_pending(kind, values, read_all):
                    await self.remove(kind, gfid)
            return reply

    async def _others_pending(
        self, kind: str, seen: dict[str, bytes], read_all: Callable[[], Awaitable[XattrReply]]
    ) -> bool:
        """Before dropping an xattrop entry, check the counters this xattrop did not touch."""
        if kind == DIRTY:
            return False  # one key only, and this reply carried it
        try:
            every = (await read_all()).xattrs
        except FopError as exc:
            self.log.warning("keeping index entry: cannot read the other counters: %s", exc)
            return True
        others = self._kinds(every).get(kind, {})
        return any(_nonzero(v) for key, v in others.items() if key not in seen)

    # ---- the virtual directories -----------------------------------------------------------

    async def _virtual_iatt(self, gfid: Gfid) -> Iatt:
        st = await self.offload(os.stat, os.path.join(self.base, _VIRTUAL[gfid]))
        return Iatt.from_stat(gfid, st)

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        if loc.gfid in _VIRTUAL and not loc.name:
            return EntryReply(await self._virtual_iatt(loc.gfid))
        return await self.children[0].lookup(loc, xdata)

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        if loc.gfid in _VIRTUAL:
            return AttrReply(await self._virtual_iatt(loc.gfid))
        return await self.children[0].stat(loc, xdata)

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        if loc.gfid in _VIRTUAL:
            fd.ctx[self] = self._snapshot(loc.gfid)
            return XdataReply()
        return await self.children[0].opendir(loc, fd, xdata)

    def _snapshot(self, gfid: Gfid) -> list[str]:
        """The listing an open virtual directory walks: fixed at opendir, so offsets stay valid."""
        return sorted(g.canonical for g in self.entries[_VIRTUAL[gfid]])

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        if fd.gfid not in _VIRTUAL:
            return await self.children[0].readdirp(fd, size, offset, xdata)
        names: list[str] = fd.ctx.setdefault(self, self._snapshot(fd.gfid))
        count = max(1, size // _DIRENT_COST)
        start = max(0, offset)
        return DirReply([DirEntry(name, i + 1) for i, name in enumerate(names[start : start + count], start)])

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        if fd.gfid in _VIRTUAL:
            fd.ctx.pop(self, None)
            return XdataReply()
        return await self.children[0].releasedir(fd, xdata)

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        if loc.pargfid not in _VIRTUAL:
            return await self.children[0].unlink(loc, flags, xdata)
        kind = _VIRTUAL[loc.pargfid]
        try:
            gfid = Gfid(loc.name)
        except ValueError:
            raise FopError(errno.ENOENT, f"{loc.name!r} is not a gfid in the {kind} index") from None
        async with self._serial(gfid):
            if gfid not in self.entries[kind]:
                raise FopError(errno.ENOENT, f"{gfid} is not in the {kind} index")
            pre = await self._virtual_iatt(loc.pargfid)
            await self.remove(kind, gfid)
        return ChangeReply(pre, await self._virtual_iatt(loc.pargfid))

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        if name == COUNT_KEY:
            return XattrReply({COUNT_KEY: str(len(self.entries[XATTROP])).encode()})
        if name == DIRTY_COUNT_KEY:
            return XattrReply({DIRTY_COUNT_KEY: str(len(self.entries[DIRTY])).encode()})
        return await self.children[0].getxattr(loc, name, xdata)
