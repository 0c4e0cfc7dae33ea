"""Operations on one object named by a Loc: attributes, access, readlink, truncate, open, xattrs.

Objects are resolved as root; the syscall a permission applies to runs with the caller's identity.
"""

from __future__ import annotations

import errno
import os
import stat

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import (
    AttrReply,
    AttrSet,
    ChangeReply,
    Loc,
    ReadlinkReply,
    SetAttrValid,
    StatfsReply,
    XattrReply,
)
from mortar.core.iatt import StatVfs
from mortar.xlators.storage import posix_xattr
from mortar.xlators.storage.posix_entry import open_data
from mortar.xlators.storage.posix_handles import Brick, Obj, PosixFd, make_iatt, translate_errors
from mortar.xlators.storage.posix_sys import caller_identity

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _chmod_nofollow(path: str, mode: int) -> None:
    """chmod that cannot be redirected by a symlink swapped in (Linux has no lchmod)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def apply_attr(ref: int | str, attr: AttrSet, st: os.stat_result) -> None:
    """Owner, then mode (chown may clear set-id bits), then times; on a symlink, the link itself."""
    valid = attr.valid
    if valid & SetAttrValid.SIZE:
        raise FopError(errno.EINVAL, "setattr does not change the size: use truncate")
    uid = attr.uid if valid & SetAttrValid.UID else -1
    gid = attr.gid if valid & SetAttrValid.GID else -1
    if uid != -1 or gid != -1:
        if isinstance(ref, int):
            os.chown(ref, uid, gid)
        else:
            os.chown(ref, uid, gid, follow_symlinks=False)
    if valid & SetAttrValid.MODE and not stat.S_ISLNK(st.st_mode):
        if isinstance(ref, int):
            os.chmod(ref, attr.mode & 0o7777)
        else:
            _chmod_nofollow(ref, attr.mode & 0o7777)
    if valid & (SetAttrValid.ATIME | SetAttrValid.MTIME):
        atime = attr.atime_ns if valid & SetAttrValid.ATIME else st.st_atime_ns
        mtime = attr.mtime_ns if valid & SetAttrValid.MTIME else st.st_mtime_ns
        if isinstance(ref, int):
            os.utime(ref, ns=(atime, mtime))
        else:
            os.utime(ref, ns=(atime, mtime), follow_symlinks=False)


@translate_errors
def stat_(b: Brick, loc: Loc) -> AttrReply:
    with b.resolve_loc(loc) as obj:
        return AttrReply(make_iatt(obj.gfid, obj.st))


@translate_errors
def setattr_(b: Brick, who: CallContext, loc: Loc, attr: AttrSet) -> ChangeReply:
    with b.resolve_loc(loc) as obj:
        pre = make_iatt(obj.gfid, obj.st)
        with caller_identity(who):
            apply_attr(obj.ref, attr, obj.st)
        return ChangeReply(pre, obj.iatt())


@translate_errors
def access(b: Brick, who: CallContext, loc: Loc, mask: int) -> None:
    if mask & ~(os.R_OK | os.W_OK | os.X_OK):
        raise FopError(errno.EINVAL, f"access mask {mask:#o}")
    with b.resolve_loc(loc) as obj, caller_identity(who):
        # AT_EACCESS: the kernel checks the thread's filesystem identity, not the real uid
        if not os.access(obj.access_path, mask, effective_ids=True, follow_symlinks=obj.fd >= 0):
            raise FopError(errno.EACCES, f"access {mask:#o} denied")


@translate_errors
def readlink(b: Brick, loc: Loc) -> ReadlinkReply:
    with b.resolve_loc(loc) as obj:
        if not obj.is_lnk:
            raise FopError(errno.EINVAL, "not a symbolic link")
        return ReadlinkReply(os.readlink(obj.path), make_iatt(obj.gfid, obj.st))


def _data_file(obj: Obj) -> None:
    if obj.is_dir:
        raise FopError(errno.EISDIR, "is a directory")
    if obj.is_lnk:
        raise FopError(errno.ELOOP, "the brick does not follow symbolic links")
    if not obj.is_reg:
        raise FopError(errno.EINVAL, "not a regular file")


@translate_errors
def truncate(b: Brick, who: CallContext, loc: Loc, offset: int) -> ChangeReply:
    with b.resolve_loc(loc) as obj:
        _data_file(obj)
        with caller_identity(who):
            fd = os.open(obj.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            pre = make_iatt(obj.gfid, os.fstat(fd))
            os.ftruncate(fd, offset)
            return ChangeReply(pre, make_iatt(obj.gfid, os.fstat(fd)))
        finally:
            os.close(fd)


@translate_errors
def open_(b: Brick, who: CallContext, loc: Loc, flags: int) -> PosixFd:
    """Regular files open with the caller's identity; a directory only for reading; nothing else opens
    on the server (a symlink gives ELOOP, devices and fifos EPERM)."""
    with b.resolve_loc(loc) as obj:
        if obj.is_dir:
            if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
                raise FopError(errno.EISDIR, "a directory opens read-only")
            return _open_dir(b, who, obj, flags)
        if obj.is_lnk:
            raise FopError(errno.ELOOP, "the brick does not follow symbolic links")
        if not obj.is_reg:
            raise FopError(errno.EPERM, "the brick opens no device, fifo or socket")
        with caller_identity(who):
            fd, direct = open_data(obj.path, flags & ~(os.O_CREAT | os.O_EXCL), b.o_direct)
        pfd = PosixFd(fd, obj.gfid, flags, direct=direct)
        b.opened(obj.gfid)
        b.fds.add(pfd)
        return pfd


def _open_dir(b: Brick, who: CallContext, obj: Obj, flags: int) -> PosixFd:
    with caller_identity(who):  # reopening the verified directory checks read permission on it alone
        fd = os.open(obj.access_path, _DIR_FLAGS)
    pfd = PosixFd(fd, obj.gfid, flags, is_dir=True)
    b.fds.add(pfd)
    return pfd


@translate_errors
def opendir(b: Brick, who: CallContext, loc: Loc) -> PosixFd:
    with b.resolve_loc(loc) as obj:
        if not obj.is_dir:
            raise FopError(errno.ENOTDIR, "not a directory")
        return _open_dir(b, who, obj, os.O_RDONLY)


@translate_errors
def statfs(b: Brick) -> StatfsReply:
    return StatfsReply(StatVfs.from_os(os.fstatvfs(b.root_fd)))


@translate_errors
def getxattr(b: Brick, who: CallContext, loc: Loc, name: str | None) -> XattrReply:
    with b.resolve_loc(loc) as obj, caller_identity(who):
        return XattrReply(posix_xattr.get_xattrs(obj.ref, name, who.uid))


@translate_errors
def setxattr(b: Brick, who: CallContext, loc: Loc, xattrs: dict[str, bytes], flags: int) -> None:
    with b.resolve_loc(loc) as obj, caller_identity(who):
        posix_xattr.set_xattrs(obj.ref, xattrs, flags, who.uid)


@translate_errors
def removexattr(b: Brick, who: CallContext, loc: Loc, name: str) -> None:
    with b.resolve_loc(loc) as obj, caller_identity(who):
        posix_xattr.remove_xattr(obj.ref, name, who.uid)


@translate_errors
def xattrop(b: Brick, loc: Loc, optype: int, xattrs: dict[str, bytes]) -> XattrReply:
    with b.resolve_loc(loc) as obj, b.lock_for(obj.gfid):
        return XattrReply(posix_xattr.xattrop(obj.ref, optype, xattrs))
