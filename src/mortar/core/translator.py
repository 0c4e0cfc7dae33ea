"""The Translator base class: options, children, events, lifecycle and pass-through fops.

A translator implements only the fops it changes; every other fop goes to its first child
unchanged, as GlusterFS's default fops do. Events from children travel up through `notify`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from enum import Enum
from typing import Any, ClassVar, Protocol, TypeVar

from mortar.core.fops import (
    AttrReply,
    AttrSet,
    Buffer,
    ChangeReply,
    ChecksumReply,
    CopyReply,
    DirReply,
    EntryReply,
    Fd,
    Flock,
    LkReply,
    Loc,
    ReadlinkReply,
    ReadReply,
    RenameReply,
    SeekReply,
    StatfsReply,
    XattrReply,
    Xdata,
    XdataReply,
)
from mortar.core.options import Option, OptionError

_T = TypeVar("_T")


class Event(Enum):
    PARENT_UP = "parent-up"  # travels down: the graph above is ready, start connecting
    PARENT_DOWN = "parent-down"  # travels down: the graph is being torn down
    CHILD_CONNECTING = "child-connecting"
    CHILD_UP = "child-up"  # travels up: a subvolume can serve fops
    CHILD_DOWN = "child-down"  # travels up: a subvolume is gone
    GRAPH_SWITCH = "graph-switch"  # a new graph replaced this one
    UPCALL = "upcall"  # a brick tells clients something changed (invalidation, lock contention)
    CLIENT_DISCONNECT = "client-disconnect"  # travels down on a brick: data is the client id whose
    #                                          locks and open fds must be released


_DOWNWARD = frozenset({Event.PARENT_UP, Event.PARENT_DOWN, Event.CLIENT_DISCONNECT})


class Listener(Protocol):
    """Anything that receives events from below: a parent translator or the graph's owner."""

    def notify(self, event: Event, source: Any, data: Any = None) -> None: ...


def find_option(declared: Mapping[str, Option], key: str) -> Option | None:
    """The declaration for `key`; keys may be patterns such as `auth.addr.*.allow`."""
    opt = declared.get(key)
    if opt is not None:
        return opt
    for pattern, candidate in declared.items():
        if "*" in pattern and fnmatch.fnmatchcase(key, pattern):
            return candidate
    return None


class Translator:
    """One node of a graph. Subclasses set `type_name` (e.g. "storage/posix") and `options`."""

    type_name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    #: thread pool for blocking calls; performance/io-threads installs its pool on every descendant
    executor: Executor | None = None

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        self.name = name
        self.children: list[Translator] = list(children)
        self.parents: list[Listener] = []
        for child in self.children:
            child.parents.append(self)
        self.log = logging.LoggerAdapter(logging.getLogger(type(self).__module__), {"xlator": name})
        self.opts: dict[str, Any] = self.resolve_options(options or {})

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `given`, each parsed by its declaration; unknown keys are refused."""
        resolved = {k: o.default for k, o in cls.options.items() if "*" not in k}
        for key, raw in given.items():
            opt = find_option(cls.options, key)
            if opt is None:
                raise OptionError(f"{cls.type_name or cls.__name__} has no option {key!r}")
            try:
                resolved[key] = opt.parse(raw)
            except OptionError as exc:
                raise OptionError(f"option {key}: {exc}") from None
        return resolved

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        """Apply new option values in place (live graph switch with the same topology)."""
        self.opts = self.resolve_options(options)

    # ---- lifecycle and events ---------------------------------------------------------------

    async def init(self) -> None:
        """Called once, children before parents, before any fop."""

    async def fini(self) -> None:
        """Called once, parents before children; release resources."""

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        """Default: PARENT_* and CLIENT_DISCONNECT go down to children, everything else goes up."""
        if event in _DOWNWARD:
            for child in self.children:
                child.notify(event, self, data)
        else:
            for parent in self.parents:
                parent.notify(event, self, data)

    async def offload(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a blocking call (disk I/O) in `executor`, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def descendants(self) -> list[Translator]:
        """Every translator below this one, each once."""
        seen: dict[int, Translator] = {}
        stack = list(self.children)
        while stack:
            xl = stack.pop()
            if id(xl) not in seen:
                seen[id(xl)] = xl
                stack.extend(xl.children)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"<{self.type_name or type(self).__name__} {self.name}>"

    # ---- fops: pass through to the first child ---------------------------------------------

    async def lookup(self, loc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self.children[0].lookup(loc, xdata)

    async def stat(self, loc: Loc, xdata: Xdata = None) -> AttrReply:
        return await self.children[0].stat(loc, xdata)

    async def fstat(self, fd: Fd, xdata: Xdata = None) -> AttrReply:
        return await self.children[0].fstat(fd, xdata)

    async def setattr(self, loc: Loc, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].setattr(loc, attr, xdata)

    async def fsetattr(self, fd: Fd, attr: AttrSet, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].fsetattr(fd, attr, xdata)

    async def access(self, loc: Loc, mask: int, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].access(loc, mask, xdata)

    async def readlink(self, loc: Loc, xdata: Xdata = None) -> ReadlinkReply:
        return await self.children[0].readlink(loc, xdata)

    async def mknod(self, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self.children[0].mknod(loc, mode, rdev, umask, xdata)

    async def mkdir(self, loc: Loc, mode: int, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self.children[0].mkdir(loc, mode, umask, xdata)

    async def unlink(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].unlink(loc, flags, xdata)

    async def rmdir(self, loc: Loc, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].rmdir(loc, flags, xdata)

    async def symlink(self, target: str, loc: Loc, umask: int, xdata: Xdata = None) -> EntryReply:
        return await self.children[0].symlink(target, loc, umask, xdata)

    async def rename(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> RenameReply:
        return await self.children[0].rename(oldloc, newloc, xdata)

    async def link(self, oldloc: Loc, newloc: Loc, xdata: Xdata = None) -> EntryReply:
        return await self.children[0].link(oldloc, newloc, xdata)

    async def truncate(self, loc: Loc, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].truncate(loc, offset, xdata)

    async def ftruncate(self, fd: Fd, offset: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].ftruncate(fd, offset, xdata)

    async def create(
        self, loc: Loc, flags: int, mode: int, umask: int, fd: Fd, xdata: Xdata = None
    ) -> EntryReply:
        return await self.children[0].create(loc, flags, mode, umask, fd, xdata)

    async def open(self, loc: Loc, flags: int, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].open(loc, flags, fd, xdata)

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        return await self.children[0].readv(fd, size, offset, flags, xdata)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].writev(fd, data, offset, flags, xdata)

    async def flush(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].flush(fd, xdata)

    async def fsync(self, fd: Fd, datasync: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].fsync(fd, datasync, xdata)

    async def opendir(self, loc: Loc, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].opendir(loc, fd, xdata)

    async def readdirp(self, fd: Fd, size: int, offset: int, xdata: Xdata = None) -> DirReply:
        return await self.children[0].readdirp(fd, size, offset, xdata)

    async def fsyncdir(self, fd: Fd, datasync: int, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].fsyncdir(fd, datasync, xdata)

    async def statfs(self, loc: Loc, xdata: Xdata = None) -> StatfsReply:
        return await self.children[0].statfs(loc, xdata)

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        return await self.children[0].getxattr(loc, name, xdata)

    async def fgetxattr(self, fd: Fd, name: str | None, xdata: Xdata = None) -> XattrReply:
        return await self.children[0].fgetxattr(fd, name, xdata)

    async def setxattr(
        self, loc: Loc, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self.children[0].setxattr(loc, xattrs, flags, xdata)

    async def fsetxattr(
        self, fd: Fd, xattrs: dict[str, bytes], flags: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self.children[0].fsetxattr(fd, xattrs, flags, xdata)

    async def removexattr(self, loc: Loc, name: str, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].removexattr(loc, name, xdata)

    async def fremovexattr(self, fd: Fd, name: str, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].fremovexattr(fd, name, xdata)

    async def xattrop(
        self, loc: Loc, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await self.children[0].xattrop(loc, optype, xattrs, xdata)

    async def fxattrop(
        self, fd: Fd, optype: int, xattrs: dict[str, bytes], xdata: Xdata = None
    ) -> XattrReply:
        return await self.children[0].fxattrop(fd, optype, xattrs, xdata)

    async def inodelk(self, domain: str, loc: Loc, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].inodelk(domain, loc, cmd, flock, xdata)

    async def finodelk(self, domain: str, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].finodelk(domain, fd, cmd, flock, xdata)

    async def entrylk(
        self, domain: str, loc: Loc, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self.children[0].entrylk(domain, loc, basename, cmd, lktype, xdata)

    async def fentrylk(
        self, domain: str, fd: Fd, basename: str | None, cmd: int, lktype: int, xdata: Xdata = None
    ) -> XdataReply:
        return await self.children[0].fentrylk(domain, fd, basename, cmd, lktype, xdata)

    async def lk(self, fd: Fd, cmd: int, flock: Flock, xdata: Xdata = None) -> LkReply:
        return await self.children[0].lk(fd, cmd, flock, xdata)

    async def fallocate(
        self, fd: Fd, mode: int, offset: int, length: int, xdata: Xdata = None
    ) -> ChangeReply:
        return await self.children[0].fallocate(fd, mode, offset, length, xdata)

    async def discard(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].discard(fd, offset, length, xdata)

    async def zerofill(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChangeReply:
        return await self.children[0].zerofill(fd, offset, length, xdata)

    async def seek(self, fd: Fd, offset: int, what: int, xdata: Xdata = None) -> SeekReply:
        return await self.children[0].seek(fd, offset, what, xdata)

    async def copy_file_range(
        self, fd_in: Fd, off_in: int, fd_out: Fd, off_out: int, length: int, flags: int, xdata: Xdata = None
    ) -> CopyReply:
        return await self.children[0].copy_file_range(fd_in, off_in, fd_out, off_out, length, flags, xdata)

    async def rchecksum(self, fd: Fd, offset: int, length: int, xdata: Xdata = None) -> ChecksumReply:
        return await self.children[0].rchecksum(fd, offset, length, xdata)

    async def release(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].release(fd, xdata)

    async def releasedir(self, fd: Fd, xdata: Xdata = None) -> XdataReply:
        return await self.children[0].releasedir(fd, xdata)
