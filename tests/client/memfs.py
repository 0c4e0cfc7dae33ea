"""An in-memory brick for client tests: the fop semantics storage/posix has (gfid-req, ESTALE for a
gone gfid, ENOENT for a missing name, POSIX rename rules, readdirp offset cookies), no disk."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any, ClassVar

from mortar.core.errors import FopError
from mortar.core.fops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GFID_REQ,
    AttrReply,
    AttrSet,
    Buffer,
    ChangeReply,
    DirEntry,
    DirReply,
    EntryReply,
    Fd,
    Loc,
    ReadlinkReply,
    ReadReply,
    RenameReply,
    SeekReply,
    SeekWhat,
    SetAttrValid,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt, StatVfs
from mortar.core.options import Option
from mortar.core.translator import Translator


class Node:
    def __init__(self, gfid: Gfid, mode: int, target: str = "") -> None:
        now = time.time_ns()
        self.gfid = gfid
        self.mode = mode
        self.uid = self.gid = 0
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.data = bytearray()
        self.target = target
        self.entries: dict[str, Gfid] = {}
        self.xattrs: dict[str, bytes] = {}
        self.atime = self.mtime = self.ctime = now

    def iatt(self) -> Iatt:
        size = len(self.target) if stat.S_ISLNK(self.mode) else len(self.data)
        return Iatt(
            self.gfid, self.mode, self.nlink, self.uid, self.gid, 0, size, 4096, (size + 511) // 512,
            self.atime, self.mtime, self.ctime, int.from_bytes(self.gfid[8:], "big") or 1,
        )  # fmt: skip

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class MemFs(Translator):
    type_name = "test/memfs"
    options: ClassVar[dict[str, Option]] = {"name-max": Option("int", 255, "longest name")}

    def __init__(self, name: str, options: Any = None, children: Any = ()) -> None:
        super().__init__(name, options, children)
        self.nodes: dict[Gfid, Node] = {ROOT_GFID: Node(ROOT_GFID, stat.S_IFDIR | 0o755)}
        self.calls: dict[str, int] = {}

    # ---- helpers -------------------------------------------------------------------------------

    def _count(self, fop: str) -> None:
        self.calls[fop] = self.calls.get(fop, 0) + 1

    def _node(self, gfid: Gfid) -> Node:
        node = self.nodes.get(gfid)
        if node is None:
            raise FopError(errno.ESTALE, f"gfid {gfid} is gone")
        return node

    def _check_name(self, name: str) -> None:
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise FopError(errno.EINVAL, f"bad name {name!r}")
        if len(name) > self.opts["name-max"]:
            raise FopError(errno.ENAMETOOLONG)

    def _parent(self, loc: Loc) -> Node:
        if loc.pargfid is None:
            raise FopError(errno.EINVAL, "no parent")
        parent = self._node(loc.pargfid)
        if not parent.is_dir:
            raise FopError(errno.ENOTDIR)
        self._check_name(loc.name)
        return parent

    def _resolve(self, loc: Loc) -> Node:
        if loc.gfid is not None:
            return self._node(loc.gfid)
        parent = self._parent(loc)
        gfid = parent.entries.get(loc.name)
        if gfid is None:
            raise FopError(errno.ENOENT, f"{loc.path}")
        return self._node(gfid)

    def _fd(self, fd: Fd) -> Node:
        node = fd.ctx.get(self)
        if node is None:
            raise FopError(errno.EBADF)
        assert isinstance(node, Node)
        return node

    def _new(self, loc: Loc, mode: int, xdata: Xdata, target: str = "") -> tuple[Node, Node, Iatt]:
        parent = self._parent(loc)
        if loc.name in parent.entries:
            raise FopError(errno.EEXIST, loc.path)
        raw = (xdata or {}).get(GFID_REQ)
        if not isinstance(raw, bytes) or len(raw) != 16:
            raise FopError(errno.EINVAL, "gfid-req missing")
        gfid = Gfid(raw)
        if gfid in self.nodes:
            raise FopError(errno.EEXIST, "gfid in use")
        pre = parent.iatt()
        node = self.nodes[gfid] = Node(gfid, mode, target)
        parent.entries[loc.name] = gfid
        if node.is_dir:
            parent.nlink += 1
        parent.mtime = parent.ctime = time.time_ns()
        return node, parent, pre

    def _drop_link(self, node: Node) -> None:
        node.nlink -= 1
        if node.nlink <= (1 if node.is_dir else 0):
            self.nodes.pop(node.gfid, None)  # open fds keep the Node object itself

    # ---- fops ------------------------------------------------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        self._count("lookup")
        if loc.gfid is not None and not loc.name:
            return EntryReply(self._node(loc.gfid).iatt())
        parent = self._parent(loc)
        node = self._resolve(Loc(loc.path, None, loc.pargfid, loc.name))
        return EntryReply(node.iatt(), None, parent.iatt())

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        return AttrReply(self._resolve(loc).iatt())

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return AttrReply(self._fd(fd).iatt())

    def _setattr(self, node: Node, attr: AttrSet) -> ChangeReply:
        pre = node.iatt()
        if attr.valid & SetAttrValid.MODE:
            node.mode = stat.S_IFMT(node.mode) | (attr.mode & 0o7777)
        if attr.valid & SetAttrValid.UID and attr.uid != -1:
            node.uid = attr.uid
        if attr.valid & SetAttrValid.GID and attr.gid != -1:
            node.gid = attr.gid
        if attr.valid & SetAttrValid.ATIME:
            node.atime = attr.atime_ns
        if attr.valid & SetAttrValid.MTIME:
            node.mtime = attr.mtime_ns
        node.ctime = time.time_ns()
        return ChangeReply(pre, node.iatt())

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return self._setattr(self._resolve(loc), attr)

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return self._setattr(self._fd(fd), attr)

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        self._resolve(loc)
        return XdataReply()

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        node = self._resolve(loc)
        if not stat.S_ISLNK(node.mode):
            raise FopError(errno.EINVAL)
        return ReadlinkReply(node.target, node.iatt())

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        node, parent, pre = self._new(loc, stat.S_IFDIR | (mode & ~umask & 0o7777), xdata)
        return EntryReply(node.iatt(), pre, parent.iatt())

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        node, parent, pre = self._new(loc, stat.S_IFLNK | 0o777, xdata, target)
        return EntryReply(node.iatt(), pre, parent.iatt())

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        self._count("create")
        node, parent, pre = self._new(loc, stat.S_IFREG | (mode & ~umask & 0o7777), xdata)
        fd.ctx[self] = node
        return EntryReply(node.iatt(), pre, parent.iatt())

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        node = self._resolve(loc)
        if node.is_dir and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FopError(errno.EISDIR)
        if flags & os.O_TRUNC and not node.is_dir:
            del node.data[:]
        fd.ctx[self] = node
        return XdataReply()

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        parent = self._parent(loc)
        node = self._resolve(loc)
        if node.is_dir:
            raise FopError(errno.EISDIR)
        pre = parent.iatt()
        del parent.entries[loc.name]
        self._drop_link(node)
        return ChangeReply(pre, parent.iatt())

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        parent = self._parent(loc)
        node = self._resolve(loc)
        if not node.is_dir:
            raise FopError(errno.ENOTDIR)
        if node.entries:
            raise FopError(errno.ENOTEMPTY)
        pre = parent.iatt()
        del parent.entries[loc.name]
        parent.nlink -= 1
        self.nodes.pop(node.gfid, None)
        return ChangeReply(pre, parent.iatt())

    def _is_ancestor(self, ancestor: Node, node: Node) -> bool:
        """Is `node` inside `ancestor`'s subtree (rename of a directory into itself)?"""
        stack = [ancestor]
        while stack:
            cur = stack.pop()
            if cur is node:
                return True
            stack.extend(self.nodes[g] for g in cur.entries.values() if self.nodes[g].is_dir)
        return False

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        oldparent, newparent = self._parent(oldloc), self._parent(newloc)
        node = self._resolve(oldloc)
        existing_gfid = newparent.entries.get(newloc.name)
        if existing_gfid == node.gfid:
            return RenameReply(node.iatt())
        if node.is_dir and self._is_ancestor(node, newparent):
            raise FopError(errno.EINVAL, "cannot move a directory into itself")
        if existing_gfid is not None:
            existing = self._node(existing_gfid)
            if existing.is_dir and not node.is_dir:
                raise FopError(errno.EISDIR)
            if node.is_dir and not existing.is_dir:
                raise FopError(errno.ENOTDIR)
            if existing.is_dir and existing.entries:
                raise FopError(errno.ENOTEMPTY)
            if existing.is_dir:
                newparent.nlink -= 1
                self.nodes.pop(existing.gfid, None)
            else:
                self._drop_link(existing)
        del oldparent.entries[oldloc.name]
        newparent.entries[newloc.name] = node.gfid
        if node.is_dir:
            oldparent.nlink -= 1
            newparent.nlink += 1
        return RenameReply(node.iatt(), None, oldparent.iatt(), None, newparent.iatt())

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        node = self._resolve(oldloc)
        if node.is_dir:
            raise FopError(errno.EPERM)
        parent = self._parent(newloc)
        if newloc.name in parent.entries:
            raise FopError(errno.EEXIST)
        parent.entries[newloc.name] = node.gfid
        node.nlink += 1
        return EntryReply(node.iatt(), None, parent.iatt())

    def _truncate(self, node: Node, size: int) -> ChangeReply:
        if node.is_dir:
            raise FopError(errno.EISDIR)
        if size < 0:
            raise FopError(errno.EINVAL)
        pre = node.iatt()
        node.data[size:] = b""
        node.data.extend(bytes(size - len(node.data)))
        return ChangeReply(pre, node.iatt())

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        return self._truncate(self._resolve(loc), offset)

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return self._truncate(self._fd(fd), offset)

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        self._count("readv")
        node = self._fd(fd)
        if node.is_dir:
            raise FopError(errno.EISDIR)
        return ReadReply(bytes(node.data[offset : offset + size]), node.iatt())

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        self._count("writev")
        node = self._fd(fd)
        if fd.flags & os.O_ACCMODE == os.O_RDONLY:
            raise FopError(errno.EBADF, "not open for writing")
        pre = node.iatt()
        if fd.flags & os.O_APPEND:
            offset = len(node.data)
        if data and offset > len(node.data):
            node.data.extend(bytes(offset - len(node.data)))
        node.data[offset : offset + len(data)] = data
        node.mtime = time.time_ns()
        return ChangeReply(pre, node.iatt())

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return XdataReply()

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        node = self._fd(fd)
        return ChangeReply(node.iatt(), node.iatt())

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        node = self._resolve(loc)
        if not node.is_dir:
            raise FopError(errno.ENOTDIR)
        fd.ctx[self] = (node, list(node.entries.items()))
        return XdataReply()

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        """`size` is a byte budget (about 64 bytes plus the name per entry), at least one entry."""
        self._count("readdirp")
        snap = fd.ctx.get(self)
        if snap is None:
            raise FopError(errno.EBADF)
        _, listing = snap
        out: list[DirEntry] = []
        used = 0
        for index in range(offset, len(listing)):
            name, gfid = listing[index]
            node = self.nodes.get(gfid)
            if node is None:
                continue
            used += 64 + len(name)
            if out and used > size:
                break
            out.append(DirEntry(name, index + 1, node.iatt()))
        return DirReply(out)

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        self._resolve(loc)
        return StatfsReply(
            StatVfs(4096, 4096, 1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 1 << 15, 7, 0, 255)
        )

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        node = self._resolve(loc)
        if name is None:
            return XattrReply(dict(node.xattrs))
        if name not in node.xattrs:
            raise FopError(errno.ENODATA)
        return XattrReply({name: node.xattrs[name]})

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        node = self._resolve(loc)
        for key, value in xattrs.items():
            if flags & os.XATTR_CREATE and key in node.xattrs:
                raise FopError(errno.EEXIST)
            if flags & os.XATTR_REPLACE and key not in node.xattrs:
                raise FopError(errno.ENODATA)
            node.xattrs[key] = bytes(value)
        return XdataReply()

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        node = self._resolve(loc)
        if node.xattrs.pop(name, None) is None:
            raise FopError(errno.ENODATA)
        return XdataReply()

    def _zero(self, node: Node, offset: int, length: int, keep_size: bool) -> ChangeReply:
        pre = node.iatt()
        end = offset + length
        if not keep_size and end > len(node.data):
            node.data.extend(bytes(end - len(node.data)))
        stop = min(end, len(node.data))
        if stop > offset:
            node.data[offset:stop] = bytes(stop - offset)
        return ChangeReply(pre, node.iatt())

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        node = self._fd(fd)
        if mode & FALLOC_FL_PUNCH_HOLE:
            return self._zero(node, offset, length, keep_size=True)
        pre = node.iatt()
        if not mode & FALLOC_FL_KEEP_SIZE and offset + length > len(node.data):
            node.data.extend(bytes(offset + length - len(node.data)))
        return ChangeReply(pre, node.iatt())

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return self._zero(self._fd(fd), offset, length, keep_size=True)

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return self._zero(self._fd(fd), offset, length, keep_size=False)

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        size = len(self._fd(fd).data)
        if offset >= size:
            raise FopError(errno.ENXIO)
        return SeekReply(offset if what == SeekWhat.DATA else size)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        fd.ctx.pop(self, None)
        return XdataReply()

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        fd.ctx.pop(self, None)
        return XdataReply()
