"""An in-memory brick: a small but real file system translator to put under protocol/server in tests.

Besides the fops it keeps `calls` (some fop names in completion order), the caller identity of the
last fop (`last_ctx`), how many fops waited at once (`max_waiting`), and two test knobs:
`xdata["test-delay"]` (seconds to wait before answering) and `gate` (an asyncio.Event every fop
waits on while it is cleared), so tests can make replies arrive out of order or not at all.
"""

from __future__ import annotations

import asyncio
import errno
import stat
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from mortar.core.context import current
from mortar.core.errors import FopError
from mortar.core.fops import (
    GFID_REQ,
    AttrReply,
    AttrSet,
    Buffer,
    ChangeReply,
    ChecksumReply,
    DirEntry,
    DirReply,
    EntryReply,
    Fd,
    Flock,
    LkReply,
    Loc,
    ReadlinkReply,
    ReadReply,
    SetAttrValid,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.core.translator import Event, Translator


@dataclass
class Node:
    gfid: Gfid
    mode: int
    data: bytearray = field(default_factory=bytearray)
    entries: dict[str, Gfid] = field(default_factory=dict)
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mtime_ns: int = field(default_factory=time.time_ns)

    def iatt(self) -> Iatt:
        size = len(self.target) if stat.S_ISLNK(self.mode) else len(self.data)
        return Iatt(
            self.gfid,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            size=size,
            blocks=(size + 511) // 512,
            atime_ns=self.mtime_ns,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.mtime_ns,
            ino=int.from_bytes(self.gfid[8:], "big"),
        )


class MemFs(Translator):
    type_name = "test/memfs"

    def __init__(self, name: str = "memfs") -> None:
        super().__init__(name)
        self.nodes: dict[Gfid, Node] = {ROOT_GFID: Node(ROOT_GFID, stat.S_IFDIR | 0o755, nlink=2)}
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.open_fds: set[int] = set()  # id() of fds opened and not yet released
        self.disconnected: list[str] = []
        self.last_ctx = current()
        self.waiting = 0  # fops inside _enter now, and the most seen at once
        self.max_waiting = 0

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        if event is Event.CLIENT_DISCONNECT:
            self.disconnected.append(data)
        super().notify(event, source, data)

    async def _enter(self, xdata: Xdata) -> None:
        self.last_ctx = current()
        self.waiting += 1
        self.max_waiting = max(self.max_waiting, self.waiting)
        try:
            await self.gate.wait()
            if xdata and "test-delay" in xdata:
                await asyncio.sleep(float(xdata["test-delay"]))
        finally:
            self.waiting -= 1

    def _node(self, loc: Loc) -> Node:
        if loc.pargfid is not None and loc.name:
            parent = self._dir(loc.pargfid)
            gfid = parent.entries.get(loc.name)
            if gfid is None:
                raise FopError(errno.ENOENT, f"{loc.path or loc.name}: no such entry")
            return self.nodes[gfid]
        node = self.nodes.get(loc.gfid) if loc.gfid is not None else None
        if node is None:
            raise FopError(errno.ESTALE, f"{loc.path}: no such gfid")
        return node

    def _dir(self, gfid: Gfid) -> Node:
        node = self.nodes.get(gfid)
        if node is None:
            raise FopError(errno.ESTALE, "parent gone")
        if not stat.S_ISDIR(node.mode):
            raise FopError(errno.ENOTDIR, "parent is not a directory")
        return node

    def _fdnode(self, fd: Fd) -> Node:
        node = self.nodes.get(fd.gfid)
        if node is None:
            raise FopError(errno.EBADF, "file gone")
        return node

    def _new_entry(self, loc: Loc, mode: int, xdata: Xdata) -> tuple[Node, Node, Iatt]:
        if loc.pargfid is None or not loc.name:
            raise FopError(errno.EINVAL, "entry fops need a parent and a name")
        parent = self._dir(loc.pargfid)
        if loc.name in parent.entries:
            raise FopError(errno.EEXIST, f"{loc.name} exists")
        raw = (xdata or {}).get(GFID_REQ)
        gfid = Gfid(raw) if raw else Gfid.random()
        pre = parent.iatt()
        node = Node(gfid, mode)
        self.nodes[gfid] = node
        parent.entries[loc.name] = gfid
        parent.mtime_ns = time.time_ns()
        return node, parent, pre

    def _done(self, name: str) -> None:
        self.calls.append(name)

    # ---- fops -------------------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        await self._enter(xdata)
        node = self._node(loc)
        self._done("lookup")
        return EntryReply(node.iatt(), xdata={"echo": xdata} if xdata else None)

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        await self._enter(xdata)
        node = self._node(loc)
        self._done("stat")
        return AttrReply(node.iatt())

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        await self._enter(xdata)
        return AttrReply(self._fdnode(fd).iatt())

    def _setattr(self, node: Node, attr: AttrSet) -> ChangeReply:
        pre = node.iatt()
        if attr.valid & SetAttrValid.MODE:
            node.mode = stat.S_IFMT(node.mode) | (attr.mode & 0o7777)
        if attr.valid & SetAttrValid.UID:
            node.uid = attr.uid
        if attr.valid & SetAttrValid.GID:
            node.gid = attr.gid
        if attr.valid & SetAttrValid.MTIME:
            node.mtime_ns = attr.mtime_ns
        return ChangeReply(pre, node.iatt())

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        return self._setattr(self._node(loc), attr)

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        return self._setattr(self._fdnode(fd), attr)

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        await self._enter(xdata)
        self._node(loc)
        return XdataReply()

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        await self._enter(xdata)
        node = self._node(loc)
        if not stat.S_ISLNK(node.mode):
            raise FopError(errno.EINVAL, "not a symlink")
        return ReadlinkReply(node.target, node.iatt())

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        await self._enter(xdata)
        node, parent, pre = self._new_entry(loc, stat.S_IFDIR | (mode & ~umask & 0o7777), xdata)
        node.nlink = 2
        return EntryReply(node.iatt(), pre, parent.iatt())

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        await self._enter(xdata)
        node, parent, pre = self._new_entry(loc, mode & ~umask, xdata)
        return EntryReply(node.iatt(), pre, parent.iatt())

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        await self._enter(xdata)
        node, parent, pre = self._new_entry(loc, stat.S_IFLNK | 0o777, xdata)
        node.target = target
        return EntryReply(node.iatt(), pre, parent.iatt())

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        await self._enter(xdata)
        node, parent, pre = self._new_entry(loc, stat.S_IFREG | (mode & ~umask & 0o7777), xdata)
        fd.gfid = node.gfid
        self.open_fds.add(id(fd))
        self._done("create")
        return EntryReply(node.iatt(), pre, parent.iatt())

    def _remove(self, loc: Loc, want_dir: bool) -> ChangeReply:
        if loc.pargfid is None:
            raise FopError(errno.EINVAL, "need a parent")
        parent = self._dir(loc.pargfid)
        node = self._node(loc)
        if stat.S_ISDIR(node.mode) != want_dir:
            raise FopError(errno.EISDIR if node.mode & stat.S_IFDIR else errno.ENOTDIR, loc.name)
        if want_dir and node.entries:
            raise FopError(errno.ENOTEMPTY, loc.name)
        pre = parent.iatt()
        del parent.entries[loc.name]
        node.nlink -= 1
        if node.nlink <= 0 or want_dir:
            self.nodes.pop(node.gfid, None)
        return ChangeReply(pre, parent.iatt())

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        return self._remove(loc, want_dir=False)

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        return self._remove(loc, want_dir=True)

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        await self._enter(xdata)
        node = self._node(loc)
        if stat.S_ISDIR(node.mode):
            raise FopError(errno.EISDIR, loc.path)
        fd.gfid = node.gfid
        self.open_fds.add(id(fd))
        return XdataReply()

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        await self._enter(xdata)
        node = self._node(loc)
        if not stat.S_ISDIR(node.mode):
            raise FopError(errno.ENOTDIR, loc.path)
        fd.gfid = node.gfid
        self.open_fds.add(id(fd))
        return XdataReply()

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        await self._enter(xdata)
        node = self._fdnode(fd)
        self._done("readv")
        return ReadReply(bytes(node.data[offset : offset + size]), node.iatt())

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        node = self._fdnode(fd)
        pre = node.iatt()
        end = offset + len(data)
        if end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
        node.data[offset:end] = data
        self._done("writev")
        return ChangeReply(pre, node.iatt())

    def _truncate(self, node: Node, offset: int) -> ChangeReply:
        pre = node.iatt()
        if offset < len(node.data):
            del node.data[offset:]
        else:
            node.data.extend(bytes(offset - len(node.data)))
        return ChangeReply(pre, node.iatt())

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        return self._truncate(self._node(loc), offset)

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        return self._truncate(self._fdnode(fd), offset)

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        await self._enter(xdata)
        return XdataReply()

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        await self._enter(xdata)
        iatt = self._fdnode(fd).iatt()
        return ChangeReply(iatt, iatt)

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        await self._enter(xdata)
        node = self._fdnode(fd)
        names = sorted(node.entries)[offset:]
        entries = [
            DirEntry(n, offset + i + 1, self.nodes[node.entries[n]].iatt()) for i, n in enumerate(names)
        ]
        return DirReply(entries)

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        await self._enter(xdata)
        used = sum(len(n.data) for n in self.nodes.values()) // 4096
        free = (1 << 20) - used
        return StatfsReply(StatVfs(4096, 4096, 1 << 20, free, free, 1 << 16, 1 << 15, 1 << 15, 7, 0, 255))

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        await self._enter(xdata)
        return self._getx(self._node(loc), name)

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        await self._enter(xdata)
        return self._getx(self._fdnode(fd), name)

    def _getx(self, node: Node, name: str | None) -> XattrReply:
        if name is None:
            return XattrReply(dict(node.xattrs))
        if name not in node.xattrs:
            raise FopError(errno.ENODATA, name)
        return XattrReply({name: node.xattrs[name]})

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        await self._enter(xdata)
        self._node(loc).xattrs.update(xattrs)
        return XdataReply()

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        await self._enter(xdata)
        self._fdnode(fd).xattrs.update(xattrs)
        return XdataReply()

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        await self._enter(xdata)
        if self._node(loc).xattrs.pop(name, None) is None:
            raise FopError(errno.ENODATA, name)
        return XdataReply()

    async def lk(self, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> LkReply:
        await self._enter(xdata)
        self._fdnode(fd)
        return LkReply(flock)

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        await self._enter(xdata)
        chunk = bytes(self._fdnode(fd).data[offset : offset + length])
        return ChecksumReply(zlib.adler32(chunk), zlib.crc32(chunk).to_bytes(4, "big"))

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self.open_fds.discard(id(fd))
        return XdataReply()

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        self.open_fds.discard(id(fd))
        return XdataReply()


def make_loc(parent: Gfid | None = None, name: str = "", gfid: Gfid | None = None) -> Loc:
    return Loc(f"/{name}" if name else "/", gfid, parent, name)
