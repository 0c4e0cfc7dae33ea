"""Namespace operations of the brick (lookup, mknod, mkdir, symlink, create, unlink, rmdir, rename, link).

Each function runs whole in one worker thread. The step that a permission check applies to (creating,
removing or renaming the name) runs with the caller's filesystem identity; the bookkeeping around it
(gfid xattr, handle index) runs as root, under the gfid's lock so concurrent fops keep the index true.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable

from mortar.core.context import CallContext
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, ChangeReply, EntryReply, Loc, RenameReply, Xdata
from mortar.core.gfid import NULL_GFID, ROOT_GFID, Gfid
from mortar.xlators.storage.posix_handles import (
    GFID_XATTR,
    Brick,
    PosixFd,
    make_iatt,
    translate_errors,
    xget,
)
from mortar.xlators.storage.posix_sys import caller_identity
from mortar.xlators.storage.posix_xattr import readable

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: open flags a client may pass through; anything else (O_PATH, O_TMPFILE, O_NOATIME...) is dropped
OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_DIRECT | os.O_SYNC | os.O_DSYNC | os.O_EXCL | os.O_CREAT
)


def gfid_req(xdata: Xdata) -> Gfid:
    raw = (xdata or {}).get(GFID_REQ)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 16:
        raise FopError(errno.EINVAL, "entry creation needs xdata['gfid-req'] (16 bytes)")
    gfid = Gfid(raw)
    if gfid in (NULL_GFID, ROOT_GFID):
        raise FopError(errno.EINVAL, f"gfid-req {gfid} is reserved")
    return gfid


def wanted_xattrs(xdata: Xdata) -> list[str]:
    names = (xdata or {}).get("xattrs")
    if names is None:
        return []
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise FopError(errno.EINVAL, "xdata['xattrs'] must be a list of names")
    return list(names)


def read_xattrs(ref: int | str, names: list[str], uid: int) -> dict[str, bytes]:
    """The requested xattrs that exist and the caller may read."""
    found: dict[str, bytes] = {}
    for name in names:
        if not readable(name, uid):
            continue
        try:
            found[name] = xget(ref, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                raise
    return found


def _undo(what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError as exc:
        log.warning("could not undo %s: %s", what, exc)


def _fix_mode(path_or_fd: int | str, st: os.stat_result, mode: int, umask: int) -> os.stat_result:
    """Restore permission bits the process umask took away (the client's umask is the one that counts)."""
    want = mode & ~umask & 0o777
    if stat.S_ISLNK(st.st_mode) or (st.st_mode & 0o777) == want:
        return st
    os.chmod(path_or_fd, (st.st_mode & 0o7000) | want)
    return os.stat(path_or_fd) if isinstance(path_or_fd, int) else os.lstat(path_or_fd)


def _claim(b: Brick, gfid: Gfid) -> None:
    if b.gfid_in_use(gfid):
        raise FopError(errno.EEXIST, f"gfid {gfid} already exists on this brick")


def _stamp_node(b: Brick, pfd: int, name: str, gfid: Gfid) -> None:
    """Give a fresh non-directory entry its gfid and handle (it may be a client's symlink: no follow)."""
    os.setxattr(f"/proc/self/fd/{pfd}/{name}", GFID_XATTR, gfid, os.XATTR_CREATE, follow_symlinks=False)
    b.link_file_handle(name, gfid, src_dir_fd=pfd)


def _stamp_dir(b: Brick, pfd: int, pargfid: Gfid, name: str, gfid: Gfid, fd: int = -1) -> None:
    own = fd < 0
    if own:
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
    try:
        os.setxattr(fd, GFID_XATTR, gfid, os.XATTR_CREATE)
    finally:
        if own:
            os.close(fd)
    b.link_dir_handle(gfid, pargfid, name)


# ---- lookup ----------------------------------------------------------------------------------


def _heal(
    b: Brick, pfd: int, pargfid: Gfid, name: str, st: os.stat_result, gfid: Gfid, xdata: Xdata
) -> tuple[Gfid, bool]:
    """(gfid, whether anything changed): lookup repairs what a crash or an admin left behind, a missing
    gfid (stamped from gfid-req when the client sent one) or a missing or stale handle."""
    is_dir = stat.S_ISDIR(st.st_mode)
    if gfid == NULL_GFID:
        try:
            new = gfid_req(xdata)
        except FopError:
            return NULL_GFID, False
        with b.lock_for(new):
            if b.gfid_in_use(new):
                return NULL_GFID, False
            (_stamp_dir(b, pfd, pargfid, name, new) if is_dir else _stamp_node(b, pfd, name, new))
        log.info("assigned gfid %s to %r found without one", new, name)
        return new, True
    hp = b.handle_path(gfid)
    if is_dir:
        expect = f"../../{pargfid.hex()[0:2]}/{pargfid.hex()[2:4]}/{pargfid.canonical}/{name}"
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(hp) == expect:
                return gfid, False
        with b.lock_for(gfid):
            b.link_dir_handle(gfid, pargfid, name, replace=True)
    else:
        try:
            os.lstat(hp)
            return gfid, False
        except FileNotFoundError:
            with b.lock_for(gfid):
                b.link_file_handle(name, gfid, src_dir_fd=pfd)
    log.info("repaired the handle of %s (%r)", gfid, name)
    return gfid, True


@translate_errors
def lookup(b: Brick, who: CallContext, loc: Loc, xdata: Xdata) -> EntryReply:
    names = wanted_xattrs(xdata)
    if not loc.name:
        if loc.gfid is None:
            raise FopError(errno.EINVAL, "lookup needs a gfid or a parent and a name")
        with b.resolve(loc.gfid) as obj:
            found = read_xattrs(obj.ref, names, who.uid) if names else None
            return EntryReply(make_iatt(obj.gfid, obj.st), xdata={"xattrs": found} if names else None)
    parent, name = b.parent_and_name(loc)
    with parent:
        with caller_identity(who):  # needs search permission on the parent, as a path walk would
            st = os.lstat(name, dir_fd=parent.fd)
        gfid, healed = _heal(b, parent.fd, parent.gfid, name, st, b.gfid_at(parent.fd, name), xdata)
        if healed:
            st = os.lstat(name, dir_fd=parent.fd)  # the new handle link counts in st_nlink
        found = read_xattrs(f"/proc/self/fd/{parent.fd}/{name}", names, who.uid) if names else None
        return EntryReply(
            make_iatt(gfid, st), parent_post=parent.iatt(), xdata={"xattrs": found} if names else None
        )


# ---- creation --------------------------------------------------------------------------------


@translate_errors
def mkdir(b: Brick, who: CallContext, loc: Loc, mode: int, umask: int, xdata: Xdata) -> EntryReply:
    gfid = gfid_req(xdata)
    parent, name = b.parent_and_name(loc, creating=True)
    with parent, b.lock_for(gfid):
        b.reserve(0)
        _claim(b, gfid)
        pre = parent.iatt()
        with caller_identity(who):
            os.mkdir(name, mode & ~umask & 0o7777, dir_fd=parent.fd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
            try:
                st = _fix_mode(fd, os.fstat(fd), mode, umask)
                _stamp_dir(b, parent.fd, parent.gfid, name, gfid, fd)
            finally:
                os.close(fd)
        except BaseException:
            _undo(f"mkdir {name}", lambda: os.rmdir(name, dir_fd=parent.fd))
            raise
        return EntryReply(make_iatt(gfid, st), pre, parent.iatt())


@translate_errors
def mknod(b: Brick, who: CallContext, loc: Loc, mode: int, rdev: int, umask: int, xdata: Xdata) -> EntryReply:
    gfid = gfid_req(xdata)
    kind = stat.S_IFMT(mode) or stat.S_IFREG
    if kind in (stat.S_IFCHR, stat.S_IFBLK) and who.uid != 0:
        raise FopError(errno.EPERM, "only root may create device files")
    if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        raise FopError(errno.EINVAL, f"mknod cannot create file type {kind:#o}")
    parent, name = b.parent_and_name(loc, creating=True)
    with parent, b.lock_for(gfid):
        b.reserve(0)
        _claim(b, gfid)
        pre = parent.iatt()
        with caller_identity(who):
            os.mknod(name, kind | (mode & ~umask & 0o7777), rdev, dir_fd=parent.fd)
        try:
            st = os.lstat(name, dir_fd=parent.fd)
            if (st.st_mode & 0o777) != (mode & ~umask & 0o777):
                opath = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
                try:
                    st = _fix_mode(f"/proc/self/fd/{opath}", st, mode, umask)
                finally:
                    os.close(opath)
            _stamp_node(b, parent.fd, name, gfid)
        except BaseException:
            _undo(f"mknod {name}", lambda: os.unlink(name, dir_fd=parent.fd))
            raise
        return EntryReply(make_iatt(gfid, os.lstat(name, dir_fd=parent.fd)), pre, parent.iatt())


@translate_errors
def symlink(b: Brick, who: CallContext, target: str, loc: Loc, umask: int, xdata: Xdata) -> EntryReply:
    """The target is stored as given; the brick itself never follows it."""
    gfid = gfid_req(xdata)
    if not target or "\0" in target:
        raise FopError(errno.ENOENT if not target else errno.EINVAL, "invalid symlink target")
    parent, name = b.parent_and_name(loc, creating=True)
    with parent, b.lock_for(gfid):
        b.reserve(0)
        _claim(b, gfid)
        pre = parent.iatt()
        with caller_identity(who):
            os.symlink(target, name, dir_fd=parent.fd)
        try:
            _stamp_node(b, parent.fd, name, gfid)
        except BaseException:
            _undo(f"symlink {name}", lambda: os.unlink(name, dir_fd=parent.fd))
            raise
        return EntryReply(make_iatt(gfid, os.lstat(name, dir_fd=parent.fd)), pre, parent.iatt())


def open_data(
    path: str, flags: int, allow_direct: bool, mode: int = 0, dir_fd: int | None = None
) -> tuple[int, bool]:
    """(fd, whether O_DIRECT is in effect): O_DIRECT is honoured when enabled and the filesystem takes it."""
    flags = (flags & OPEN_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC
    if flags & os.O_DIRECT:
        if allow_direct:
            try:
                return os.open(path, flags, mode, dir_fd=dir_fd), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        flags &= ~os.O_DIRECT
    return os.open(path, flags, mode, dir_fd=dir_fd), False


@translate_errors
def create(
    b: Brick, who: CallContext, loc: Loc, flags: int, mode: int, umask: int, xdata: Xdata
) -> tuple[EntryReply, PosixFd]:
    """O_CREAT open: a new file gets gfid-req; an existing one (without O_EXCL) is opened as it is."""
    gfid = gfid_req(xdata)
    parent, name = b.parent_and_name(loc, creating=True)
    with parent, b.lock_for(gfid):
        b.reserve(0)
        pre = parent.iatt()
        created = True
        with caller_identity(who):
            try:
                fd, direct = open_data(
                    name,
                    (flags | os.O_CREAT | os.O_EXCL) & ~os.O_TRUNC,
                    b.o_direct,
                    mode & ~umask & 0o7777,
                    dir_fd=parent.fd,
                )
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                created = False
                fd, direct = open_data(name, flags & ~os.O_CREAT, b.o_direct, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FopError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EEXIST, name)
            if created:
                try:
                    _claim(b, gfid)
                    st = _fix_mode(fd, st, mode, umask)
                    os.setxattr(fd, GFID_XATTR, gfid, os.XATTR_CREATE)
                    b.link_file_handle(name, gfid, src_dir_fd=parent.fd)
                    if not os.path.samestat(os.lstat(b.handle_path(gfid)), st):  # renamed meanwhile
                        os.unlink(b.handle_path(gfid))
                        raise FopError(errno.EAGAIN, f"{name} changed while being created")
                    st = os.fstat(fd)  # now with the handle link counted
                except BaseException:
                    _undo(f"create {name}", lambda: os.unlink(name, dir_fd=parent.fd))
                    raise
            else:
                try:
                    gfid = Gfid(os.getxattr(fd, GFID_XATTR))
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
                    gfid, _ = _heal(b, parent.fd, parent.gfid, name, st, NULL_GFID, xdata)
                    st = os.fstat(fd)
            iatt = make_iatt(gfid, st)
        except BaseException:
            os.close(fd)
            raise
        post = parent.iatt()
    pfd = PosixFd(fd, gfid, flags, direct=direct)
    b.opened(gfid)
    b.fds.add(pfd)
    return EntryReply(iatt, pre, post), pfd


@translate_errors
def link(b: Brick, who: CallContext, oldloc: Loc, newloc: Loc, xdata: Xdata) -> EntryReply:
    with b.resolve_loc(oldloc) as src:
        if src.is_dir:
            raise FopError(errno.EPERM, "hard links to directories are not allowed")
        parent, name = b.parent_and_name(newloc, creating=True)
        with parent:
            b.reserve(0)
            pre = parent.iatt()
            with b.lock_for(src.gfid), caller_identity(who):
                os.link(src.path, name, dst_dir_fd=parent.fd, follow_symlinks=False)
            return EntryReply(make_iatt(src.gfid, os.lstat(name, dir_fd=parent.fd)), pre, parent.iatt())


# ---- removal and rename ----------------------------------------------------------------------


@translate_errors
def unlink(b: Brick, who: CallContext, loc: Loc, xdata: Xdata) -> ChangeReply:
    parent, name = b.parent_and_name(loc)
    with parent:
        st = os.lstat(name, dir_fd=parent.fd)
        if stat.S_ISDIR(st.st_mode):
            raise FopError(errno.EISDIR, f"{name} is a directory")
        gfid = b.gfid_at(parent.fd, name)
        pre = parent.iatt()
        with b.lock_for(gfid):
            with caller_identity(who):
                os.unlink(name, dir_fd=parent.fd)
            b.drop_file_handle_if_last(gfid)
        return ChangeReply(pre, parent.iatt())


@translate_errors
def rmdir(b: Brick, who: CallContext, loc: Loc, xdata: Xdata) -> ChangeReply:
    parent, name = b.parent_and_name(loc)
    with parent:
        st = os.lstat(name, dir_fd=parent.fd)
        if not stat.S_ISDIR(st.st_mode):
            raise FopError(errno.ENOTDIR, f"{name} is not a directory")
        gfid = b.gfid_at(parent.fd, name)
        pre = parent.iatt()
        with b.lock_for(gfid):
            with caller_identity(who):
                os.rmdir(name, dir_fd=parent.fd)
            b.drop_dir_handle(gfid)
        return ChangeReply(pre, parent.iatt())


@translate_errors
def rename(b: Brick, who: CallContext, oldloc: Loc, newloc: Loc, xdata: Xdata) -> RenameReply:
    """POSIX rename (the kernel judges EISDIR/ENOTDIR/ENOTEMPTY/EINVAL), then the index follows:
    a moved directory's handle is re-pointed, a replaced target loses its handle with its last name."""
    src_parent, src_name = b.parent_and_name(oldloc)
    with src_parent:
        dst_parent, dst_name = b.parent_and_name(newloc, creating=True)
        with dst_parent:
            sst = os.lstat(src_name, dir_fd=src_parent.fd)
            sgfid = b.gfid_at(src_parent.fd, src_name)
            try:
                tst: os.stat_result | None = os.lstat(dst_name, dir_fd=dst_parent.fd)
                tgfid = b.gfid_at(dst_parent.fd, dst_name)
            except FileNotFoundError:
                tst, tgfid = None, NULL_GFID
            locks = sorted({id(lk): lk for lk in (b.lock_for(sgfid), b.lock_for(tgfid))}.items())
            for _, lk in locks:
                lk.acquire()
            try:
                spre, dpre = src_parent.iatt(), dst_parent.iatt()
                with caller_identity(who):
                    os.rename(src_name, dst_name, src_dir_fd=src_parent.fd, dst_dir_fd=dst_parent.fd)
                same = tst is not None and (tst.st_ino, tst.st_dev) == (sst.st_ino, sst.st_dev)
                if not same:
                    if stat.S_ISDIR(sst.st_mode) and sgfid != NULL_GFID:
                        b.link_dir_handle(sgfid, dst_parent.gfid, dst_name, replace=True)
                    if tst is not None and stat.S_ISDIR(tst.st_mode):
                        b.drop_dir_handle(tgfid)
                    elif tst is not None:
                        b.drop_file_handle_if_last(tgfid)
            finally:
                for _, lk in reversed(locks):
                    lk.release()
            st = os.lstat(dst_name, dir_fd=dst_parent.fd)
            return RenameReply(make_iatt(sgfid, st), spre, src_parent.iatt(), dpre, dst_parent.iatt())
