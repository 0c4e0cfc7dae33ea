"""Fop vocabulary: how objects are named (Loc, Fd), argument records, and the reply of every fop.

Conventions every translator and the wire follow:
- A `Loc` names an object by `gfid` when set, otherwise by (`pargfid`, `name`). `lookup` with a name
  resolves (pargfid, name); without one it revalidates `gfid`. `path` is for messages only.
- Entry-creating fops (mknod, mkdir, symlink, create) carry the new object's gfid in
  `xdata["gfid-req"]` (16 bytes), chosen by the client so all replicas agree.
- Every fop takes and returns an optional `xdata` dict (str keys, msgpack-able values).
- Modifying fops return pre/post attributes so caches and replication need no extra round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Any

from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt, StatVfs

if TYPE_CHECKING:
    from mortar.core.inode import Inode

Xdata = dict[str, Any] | None
Buffer = bytes | bytearray | memoryview

GFID_REQ = "gfid-req"


@dataclass(slots=True)
class Loc:
    """Where an object is: by gfid, or by parent gfid and name."""

    path: str
    gfid: Gfid | None = None
    pargfid: Gfid | None = None
    name: str = ""
    inode: Inode | None = field(default=None, compare=False, repr=False)
    parent: Inode | None = field(default=None, compare=False, repr=False)


class Fd:
    """An open file or directory. Each translator keeps its own state in `ctx[translator]`."""

    __slots__ = ("__weakref__", "ctx", "flags", "gfid", "inode", "is_dir")

    def __init__(self, gfid: Gfid, flags: int = 0, is_dir: bool = False, inode: Inode | None = None) -> None:
        self.gfid = gfid
        self.flags = flags
        self.is_dir = is_dir
        self.inode = inode
        self.ctx: dict[object, Any] = {}

    def __repr__(self) -> str:
        return f"Fd({self.gfid}, flags={self.flags:#o}, dir={self.is_dir})"


class SetAttrValid(IntFlag):
    """Which fields of an `AttrSet` apply (GlusterFS's GF_SET_ATTR_* values)."""

    MODE = 0x1
    UID = 0x2
    GID = 0x4
    SIZE = 0x8
    ATIME = 0x10
    MTIME = 0x20
    CTIME = 0x40


@dataclass(slots=True)
class AttrSet:
    """Arguments of setattr/fsetattr; times in nanoseconds since the epoch."""

    valid: int
    mode: int = 0
    uid: int = -1
    gid: int = -1
    atime_ns: int = 0
    mtime_ns: int = 0


class LockType(IntEnum):
    RDLCK = 0  # values of F_RDLCK, F_WRLCK, F_UNLCK on Linux
    WRLCK = 1
    UNLCK = 2


class LockCmd(IntEnum):
    GETLK = 5  # F_GETLK, F_SETLK, F_SETLKW on Linux
    SETLK = 6
    SETLKW = 7


class EntrylkCmd(IntEnum):
    LOCK = 0  # blocking
    LOCK_NB = 1
    UNLOCK = 2


@dataclass(slots=True)
class Flock:
    """A byte-range lock; `length` 0 means to the end of the file; `owner` identifies the holder."""

    type: int
    start: int = 0
    length: int = 0
    pid: int = 0
    owner: bytes = b""
    whence: int = 0


class XattropFlag(IntEnum):
    """Atomic xattr arithmetic (GlusterFS's GF_XATTROP_*); arrays are big-endian integers."""

    ADD_ARRAY = 0
    ADD_ARRAY64 = 1
    OR_ARRAY = 2
    AND_ARRAY = 3
    GET_AND_SET = 4
    ADD_ARRAY_WITH_DEFAULT = 5


class SeekWhat(IntEnum):
    DATA = 3  # SEEK_DATA
    HOLE = 4  # SEEK_HOLE


# fallocate mode bits (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


# ---- replies -------------------------------------------------------------------------------


@dataclass(slots=True)
class XdataReply:
    """Reply of fops that return nothing but the side channel."""

    xdata: Xdata = None


@dataclass(slots=True)
class EntryReply:
    """lookup, mknod, mkdir, symlink, link, create: the object and its parent before/after."""

    iatt: Iatt
    parent_pre: Iatt | None = None
    parent_post: Iatt | None = None
    xdata: Xdata = None


@dataclass(slots=True)
class AttrReply:
    """stat, fstat."""

    iatt: Iatt
    xdata: Xdata = None


@dataclass(slots=True)
class ChangeReply:
    """Modifying fops: attributes before and after. For unlink/rmdir they are the parent's."""

    pre: Iatt | None
    post: Iatt | None
    xdata: Xdata = None


@dataclass(slots=True)
class RenameReply:
    iatt: Iatt
    oldparent_pre: Iatt | None = None
    oldparent_post: Iatt | None = None
    newparent_pre: Iatt | None = None
    newparent_post: Iatt | None = None
    xdata: Xdata = None


@dataclass(slots=True)
class ReadReply:
    """readv: the bytes read (short at end of file) and the file's attributes."""

    data: Buffer
    iatt: Iatt | None = None
    xdata: Xdata = None


@dataclass(slots=True)
class ReadlinkReply:
    target: str
    iatt: Iatt | None = None
    xdata: Xdata = None


@dataclass(slots=True)
class DirEntry:
    """One readdirp entry; `offset` is the cookie that continues the listing after this entry."""

    name: str
    offset: int
    iatt: Iatt | None = None


@dataclass(slots=True)
class DirReply:
    """readdirp: entries after the given offset; an empty list means end of directory."""

    entries: list[DirEntry]
    xdata: Xdata = None


@dataclass(slots=True)
class StatfsReply:
    statvfs: StatVfs
    xdata: Xdata = None


@dataclass(slots=True)
class XattrReply:
    """getxattr/xattrop: name -> raw value."""

    xattrs: dict[str, bytes]
    xdata: Xdata = None


@dataclass(slots=True)
class LkReply:
    flock: Flock
    xdata: Xdata = None


@dataclass(slots=True)
class SeekReply:
    offset: int
    xdata: Xdata = None


@dataclass(slots=True)
class CopyReply:
    """copy_file_range: bytes copied and the destination's attributes after."""

    length: int
    post: Iatt | None = None
    xdata: Xdata = None


@dataclass(slots=True)
class ChecksumReply:
    """rchecksum: a weak (adler32) and a strong checksum of a byte range, for diff self-heal."""

    weak: int
    strong: bytes
    xdata: Xdata = None


# ---- the fop table ------------------------------------------------------------------------
# name -> (wire op number, argument kinds, reply type). The order of arguments is the order of the
# Translator method's parameters (xdata is always last and not listed). Kinds the codec knows:
# loc, fd, int, str, optstr, payload, xattrs (dict[str, bytes]), attrset, flock.


@dataclass(frozen=True, slots=True)
class FopSpec:
    name: str
    op: int
    args: tuple[tuple[str, str], ...]
    reply: type


def _spec(name: str, op: int, reply: type, *args: str) -> FopSpec:
    parsed = tuple((a.split(":")[0], a.split(":")[1]) for a in args)
    return FopSpec(name, op, parsed, reply)


FOPS: dict[str, FopSpec] = {
    s.name: s
    for s in (
        _spec("lookup", 1, EntryReply, "loc:loc"),
        _spec("stat", 2, AttrReply, "loc:loc"),
        _spec("fstat", 3, AttrReply, "fd:fd"),
        _spec("setattr", 4, ChangeReply, "loc:loc", "attr:attrset"),
        _spec("fsetattr", 5, ChangeReply, "fd:fd", "attr:attrset"),
        _spec("access", 6, XdataReply, "loc:loc", "mask:int"),
        _spec("readlink", 7, ReadlinkReply, "loc:loc"),
        _spec("mknod", 8, EntryReply, "loc:loc", "mode:int", "rdev:int", "umask:int"),
        _spec("mkdir", 9, EntryReply, "loc:loc", "mode:int", "umask:int"),
        _spec("unlink", 10, ChangeReply, "loc:loc", "flags:int"),
        _spec("rmdir", 11, ChangeReply, "loc:loc", "flags:int"),
        _spec("symlink", 12, EntryReply, "target:str", "loc:loc", "umask:int"),
        _spec("rename", 13, RenameReply, "oldloc:loc", "newloc:loc"),
        _spec("link", 14, EntryReply, "oldloc:loc", "newloc:loc"),
        _spec("truncate", 15, ChangeReply, "loc:loc", "offset:int"),
        _spec("ftruncate", 16, ChangeReply, "fd:fd", "offset:int"),
        _spec("create", 17, EntryReply, "loc:loc", "flags:int", "mode:int", "umask:int", "fd:newfd"),
        _spec("open", 18, XdataReply, "loc:loc", "flags:int", "fd:newfd"),
        _spec("readv", 19, ReadReply, "fd:fd", "size:int", "offset:int", "flags:int"),
        _spec("writev", 20, ChangeReply, "fd:fd", "data:payload", "offset:int", "flags:int"),
        _spec("flush", 21, XdataReply, "fd:fd"),
        _spec("fsync", 22, ChangeReply, "fd:fd", "datasync:int"),
        _spec("opendir", 23, XdataReply, "loc:loc", "fd:newfd"),
        _spec("readdirp", 24, DirReply, "fd:fd", "size:int", "offset:int"),
        _spec("fsyncdir", 25, XdataReply, "fd:fd", "datasync:int"),
        _spec("statfs", 26, StatfsReply, "loc:loc"),
        _spec("getxattr", 27, XattrReply, "loc:loc", "name:optstr"),
        _spec("fgetxattr", 28, XattrReply, "fd:fd", "name:optstr"),
        _spec("setxattr", 29, XdataReply, "loc:loc", "xattrs:xattrs", "flags:int"),
        _spec("fsetxattr", 30, XdataReply, "fd:fd", "xattrs:xattrs", "flags:int"),
        _spec("removexattr", 31, XdataReply, "loc:loc", "name:str"),
        _spec("fremovexattr", 32, XdataReply, "fd:fd", "name:str"),
        _spec("xattrop", 33, XattrReply, "loc:loc", "optype:int", "xattrs:xattrs"),
        _spec("fxattrop", 34, XattrReply, "fd:fd", "optype:int", "xattrs:xattrs"),
        _spec("inodelk", 35, XdataReply, "domain:str", "loc:loc", "cmd:int", "flock:flock"),
        _spec("finodelk", 36, XdataReply, "domain:str", "fd:fd", "cmd:int", "flock:flock"),
        _spec("entrylk", 37, XdataReply, "domain:str", "loc:loc", "basename:optstr", "cmd:int", "lktype:int"),
        _spec("fentrylk", 38, XdataReply, "domain:str", "fd:fd", "basename:optstr", "cmd:int", "lktype:int"),
        _spec("lk", 39, LkReply, "fd:fd", "cmd:int", "flock:flock"),
        _spec("fallocate", 40, ChangeReply, "fd:fd", "mode:int", "offset:int", "length:int"),
        _spec("discard", 41, ChangeReply, "fd:fd", "offset:int", "length:int"),
        _spec("zerofill", 42, ChangeReply, "fd:fd", "offset:int", "length:int"),
        _spec("seek", 43, SeekReply, "fd:fd", "offset:int", "what:int"),
        _spec(
            "copy_file_range",
            44,
            CopyReply,
            "fd_in:fd",
            "off_in:int",
            "fd_out:fd",
            "off_out:int",
            "length:int",
            "flags:int",
        ),
        _spec("rchecksum", 45, ChecksumReply, "fd:fd", "offset:int", "length:int"),
        _spec("release", 46, XdataReply, "fd:fd"),
        _spec("releasedir", 47, XdataReply, "fd:fd"),
    )
}

FOPS_BY_OP: dict[int, FopSpec] = {s.op: s for s in FOPS.values()}
