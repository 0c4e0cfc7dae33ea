"""The brick on disk: GFID handle index, name confinement and resolution of Locs to objects.

Layout under the brick root:
- `.mortar/handles/<b0>/<b1>/<gfid>`: a hard link for every non-directory, a relative symlink
  `../../<p0>/<p1>/<parent-gfid>/<name>` for every directory (so renaming a directory rewrites one
  symlink), and for the root a symlink to the brick root. A gfid resolves without any path.
- `.mortar/unlink/<gfid>`: the last link of a file unlinked while still open, removed at release.

Resolution never follows a symlink a client made: a non-directory is reached through its hard-link
handle and acted on with no-follow calls; a directory is opened (as root) through the handle chain and
accepted only if it carries the gfid asked for, then used by file descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import Loc
from mortar.core.gfid import NULL_GFID, ROOT_GFID, Gfid
from mortar.core.iatt import Iatt

GFID_XATTR = "trusted.mortar.gfid"
VOLUME_ID_XATTR = "trusted.mortar.volume-id"
#: xattrs the brick owns: no fop may set or remove them, and listings hide them. Other
#: `trusted.mortar.*` names (DHT's layout, for one) belong to translators above and pass through.
PROTECTED_XATTRS = frozenset({GFID_XATTR, VOLUME_ID_XATTR})
PRIVATE_DIR = ".mortar"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_ROOT_TARGET = "../../../.."
_HANDLE_TARGET = re.compile(r"^\.\./\.\./[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f-]{36})/([^/]+)$")
_MAX_DEPTH = 4096
_P = ParamSpec("_P")
_R = TypeVar("_R")


def check_name(name: str) -> bytes:
    """A single path component from the network, refused (EINVAL) if it could escape its directory."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FopError(errno.EINVAL, f"invalid name {name!r}")
    try:
        raw = os.fsencode(name)
    except UnicodeError:
        raise FopError(errno.EINVAL, f"name {name!r} is not encodable") from None
    if len(raw) > 255:
        raise FopError(errno.ENAMETOOLONG, f"name of {len(raw)} bytes is too long")
    return raw


def make_iatt(gfid: Gfid, st: os.stat_result) -> Iatt:
    """Attributes as clients see them: the handle link and the private directory are not counted."""
    ia = Iatt.from_stat(gfid, st)
    if stat.S_ISDIR(st.st_mode):
        if gfid == ROOT_GFID:
            ia.nlink -= 1
    elif gfid != NULL_GFID and ia.nlink > 0:
        ia.nlink -= 1
    return ia


class Obj:
    """A resolved brick object: a directory held by an fd opened as root, or anything else by a path
    (its handle, or `/proc/self/fd/<parent>/<name>`) that only no-follow calls touch."""

    __slots__ = ("fd", "gfid", "keep", "path", "st")

    def __init__(self, gfid: Gfid, st: os.stat_result, path: str = "", fd: int = -1, keep: int = -1) -> None:
        self.gfid = gfid
        self.st = st
        self.path = path
        self.fd = fd
        self.keep = keep  # a parent directory fd that `path` goes through

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)

    @property
    def access_path(self) -> str:
        """A path naming exactly this object, for calls that take no fd (follow only if a directory)."""
        return f"/proc/self/fd/{self.fd}" if self.fd >= 0 else self.path

    def close(self) -> None:
        for fd in (self.fd, self.keep):
            if fd >= 0:
                os.close(fd)
        self.fd = self.keep = -1

    def __enter__(self) -> Obj:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lstat(self) -> os.stat_result:
        self.st = os.fstat(self.fd) if self.fd >= 0 else os.lstat(self.path)
        return self.st

    def iatt(self) -> Iatt:
        return make_iatt(self.gfid, self.lstat())

    @property
    def ref(self) -> int | str:
        """What the x* helpers below take: the fd of a directory, else the no-follow path."""
        return self.fd if self.fd >= 0 else self.path


def xget(ref: int | str, name: str) -> bytes:
    return os.getxattr(ref, name) if isinstance(ref, int) else os.getxattr(ref, name, follow_symlinks=False)


def xset(ref: int | str, name: str, value: bytes, flags: int = 0) -> None:
    if isinstance(ref, int):
        os.setxattr(ref, name, value, flags)
    else:
        os.setxattr(ref, name, value, flags, follow_symlinks=False)


def xremove(ref: int | str, name: str) -> None:
    if isinstance(ref, int):
        os.removexattr(ref, name)
    else:
        os.removexattr(ref, name, follow_symlinks=False)


def xlist(ref: int | str) -> list[str]:
    return os.listxattr(ref) if isinstance(ref, int) else os.listxattr(ref, follow_symlinks=False)


@dataclass(eq=False, slots=True)
class PosixFd:
    """What the brick keeps for an open Fd: the OS fd and, for a directory, its listing snapshot."""

    fd: int
    gfid: Gfid
    flags: int = 0
    is_dir: bool = False
    direct: bool = False
    listing: list[str] | None = None


def translate_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Every failure of a brick operation leaves as FopError: OSError keeps its errno, malformed input
    (embedded NUL, unencodable text, out-of-range numbers) becomes EINVAL."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except FopError:
            raise
        except OSError as exc:
            raise FopError.from_oserror(exc) from None
        except (ValueError, UnicodeError, OverflowError) as exc:
            raise FopError(errno.EINVAL, str(exc)) from None

    return wrapper


class Brick:
    """State of one brick shared by the worker threads: paths, the root fd, open-file and lock tables."""

    def __init__(self, root: str, reserve_pct: float = 1.0, o_direct: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.reserve_pct = reserve_pct
        self.o_direct = o_direct
        self.private = os.path.join(self.root, PRIVATE_DIR)
        self.handles = os.path.join(self.private, "handles")
        self.unlinked_dir = os.path.join(self.private, "unlink")
        self.root_fd = -1
        self.handles_fd = -1
        self._locks = [threading.Lock() for _ in range(128)]
        self._open_lock = threading.Lock()
        self._open: dict[Gfid, int] = {}
        self._unlinked: set[Gfid] = set()
        self.fds: set[PosixFd] = set()
        self._space_free = 0
        self._space_keep = 0.0
        self._space_at = -1e9

    # ---- setup -------------------------------------------------------------------------------

    def open_root(self) -> None:
        """Create the private tree. The handle tree is search-only for others: a caller's identity
        reaches a handle by its exact name (through `handles_fd`) and cannot list them."""
        os.makedirs(self.handles, mode=0o711, exist_ok=True)
        os.chmod(self.private, 0o700)
        os.chmod(self.handles, 0o711)
        os.makedirs(self.unlinked_dir, mode=0o700, exist_ok=True)
        for leftover in os.listdir(self.unlinked_dir):  # files still open when the brick last stopped
            os.unlink(os.path.join(self.unlinked_dir, leftover))
        self.root_fd = os.open(self.root, _DIR_FLAGS)
        self.handles_fd = os.open(self.handles, _DIR_FLAGS)
        root_handle = self.handle_path(ROOT_GFID)
        if not os.path.islink(root_handle):
            os.makedirs(os.path.dirname(root_handle), mode=0o711, exist_ok=True)
            os.symlink(_ROOT_TARGET, root_handle)

    def close(self) -> None:
        for fd in (self.root_fd, self.handles_fd):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.handles_fd = -1

    def reserve(self, nbytes: int) -> None:
        """ENOSPC when `nbytes` more would eat into the reserved share of the brick's filesystem.

        statvfs is asked again once a second, or at every call when free space nears the reserve."""
        if self.reserve_pct <= 0:
            return
        now = time.monotonic()
        if now - self._space_at > 1.0 or self._space_free - nbytes < self._space_keep + (64 << 20):
            st = os.fstatvfs(self.root_fd)
            self._space_free = st.f_bavail * st.f_frsize
            self._space_keep = st.f_blocks * st.f_frsize * self.reserve_pct / 100
            self._space_at = now
        if self._space_free - nbytes < self._space_keep:
            raise FopError(errno.ENOSPC, f"brick keeps {self.reserve_pct:g}% of its filesystem in reserve")
        self._space_free -= nbytes

    # ---- paths and locks ---------------------------------------------------------------------

    def handle_path(self, gfid: Gfid) -> str:
        """Anchored at an fd, not at the brick's absolute path: a caller's identity needs search
        permission on the handle tree only, never on the directories above the brick."""
        hexed = gfid.hex()
        return f"/proc/self/fd/{self.handles_fd}/{hexed[0:2]}/{hexed[2:4]}/{gfid.canonical}"

    def lock_for(self, gfid: Gfid) -> threading.Lock:
        """The lock serialising handle maintenance and xattrop for one gfid (striped)."""
        return self._locks[hash(gfid) % len(self._locks)]

    # ---- open files --------------------------------------------------------------------------

    def opened(self, gfid: Gfid) -> None:
        with self._open_lock:
            self._open[gfid] = self._open.get(gfid, 0) + 1

    def closed(self, gfid: Gfid) -> None:
        """Last close of a file unlinked while open frees its parked link."""
        with self._open_lock:
            left = self._open.get(gfid, 0) - 1
            if left > 0:
                self._open[gfid] = left
                return
            self._open.pop(gfid, None)
            if gfid not in self._unlinked:
                return
            self._unlinked.discard(gfid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.unlinked_dir, gfid.canonical))

    # ---- resolution --------------------------------------------------------------------------

    def resolve(self, gfid: Gfid) -> Obj:
        """The object with this gfid; ESTALE when the brick no longer has it."""
        if gfid == NULL_GFID:
            raise FopError(errno.EINVAL, "null gfid")
        if gfid == ROOT_GFID:
            fd = os.dup(self.root_fd)
            return Obj(gfid, os.fstat(fd), fd=fd)
        hp = self.handle_path(gfid)
        try:
            st = os.lstat(hp)
        except FileNotFoundError:
            raise FopError(errno.ESTALE, f"gfid {gfid} not found on this brick") from None
        if not stat.S_ISLNK(st.st_mode):
            return Obj(gfid, st, path=hp)
        try:
            if os.getxattr(hp, GFID_XATTR, follow_symlinks=False) == gfid:
                return Obj(gfid, st, path=hp)  # a client's symlink, reached through its hard link
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise
        fd = self._open_dir(gfid)
        try:
            if os.getxattr(fd, GFID_XATTR) != gfid:
                raise FopError(errno.ESTALE, f"handle of {gfid} leads to another directory")
            return Obj(gfid, os.fstat(fd), fd=fd)
        except BaseException:
            os.close(fd)
            raise

    def _open_dir(self, gfid: Gfid) -> int:
        try:
            return os.open(self.handle_path(gfid), _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise FopError(errno.ESTALE, f"directory {gfid} is gone") from None
            if exc.errno != errno.ELOOP:
                raise
        # deeper than the kernel's symlink limit: climb the chain by hand, then open down by name
        names: list[str] = []
        cur = gfid
        base = -1
        while base < 0:
            if len(names) > _MAX_DEPTH:
                raise FopError(errno.ELOOP, f"directory {gfid} is nested too deeply")
            parsed = self._read_dir_handle(cur)
            if parsed is None:
                base = os.dup(self.root_fd)
                break
            cur, name = parsed
            names.append(name)
            if len(names) % 32 == 0:
                try:
                    base = os.open(self.handle_path(cur), _DIR_FLAGS)
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
        try:
            for name in reversed(names):
                nxt = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=base)
                os.close(base)
                base = nxt
        except OSError:
            os.close(base)
            raise FopError(errno.ESTALE, f"directory {gfid} is gone") from None
        return base

    def _read_dir_handle(self, gfid: Gfid) -> tuple[Gfid, str] | None:
        """(parent gfid, name) from a directory handle; None for the root."""
        try:
            target = os.readlink(self.handle_path(gfid))
        except OSError:
            raise FopError(errno.ESTALE, f"directory {gfid} has no handle") from None
        if target == _ROOT_TARGET:
            return None
        m = _HANDLE_TARGET.match(target)
        if m is None:
            raise FopError(errno.ESTALE, f"handle of {gfid} is malformed")
        return Gfid(uuid.UUID(m.group(1)).bytes), m.group(2)

    def resolve_dir(self, gfid: Gfid | None) -> Obj:
        if gfid is None:
            raise FopError(errno.EINVAL, "no parent gfid")
        obj = self.resolve(gfid)
        if not obj.is_dir:
            obj.close()
            raise FopError(errno.ENOTDIR, f"{gfid} is not a directory")
        return obj

    def parent_and_name(self, loc: Loc, creating: bool = False) -> tuple[Obj, str]:
        """The parent directory of an entry fop and its validated name; `.mortar` at the root is
        hidden (ENOENT) and reserved (EPERM when creating)."""
        check_name(loc.name)
        if loc.pargfid == ROOT_GFID and loc.name == PRIVATE_DIR:
            if creating:
                raise FopError(errno.EPERM, f"{PRIVATE_DIR} is reserved at the brick root")
            raise FopError(errno.ENOENT, loc.name)
        return self.resolve_dir(loc.pargfid), loc.name

    def resolve_loc(self, loc: Loc) -> Obj:
        """By gfid when set, else by (parent gfid, name)."""
        if loc.gfid is not None and loc.gfid != NULL_GFID:
            return self.resolve(loc.gfid)
        parent, name = self.parent_and_name(loc)
        pfd, parent.fd = parent.fd, -1
        return self.entry(pfd, name)

    def entry(self, pfd: int, name: str, st: os.stat_result | None = None) -> Obj:
        """The object `name` in the directory `pfd`; takes ownership of `pfd`."""
        try:
            if st is None:
                st = os.lstat(name, dir_fd=pfd)
            gfid = self.gfid_at(pfd, name)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
                os.close(pfd)
                return Obj(gfid, os.fstat(fd), fd=fd)
            return Obj(gfid, st, path=f"/proc/self/fd/{pfd}/{name}", keep=pfd)
        except BaseException:
            os.close(pfd)
            raise

    def gfid_at(self, pfd: int, name: str) -> Gfid:
        """The gfid stamped on `name` in directory `pfd` (NULL_GFID when it has none)."""
        try:
            raw = os.getxattr(f"/proc/self/fd/{pfd}/{name}", GFID_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return NULL_GFID
            raise
        return Gfid(raw) if len(raw) == 16 else NULL_GFID

    # ---- handle maintenance ------------------------------------------------------------------

    def gfid_in_use(self, gfid: Gfid) -> bool:
        """Whether `gfid` already names an object here; clears stale handles on the way."""
        if gfid == ROOT_GFID:
            return True
        hp = self.handle_path(gfid)
        try:
            st = os.lstat(hp)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode) and not _has_gfid(hp):
            try:
                os.stat(hp)
                return True
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    return True
        elif st.st_nlink > 1:
            return True
        with self._open_lock:
            if gfid in self._open:
                return True
        os.unlink(hp)  # the handle of an object deleted behind the brick's back
        return False

    def _ensure_parent(self, hp: str) -> None:
        os.makedirs(os.path.dirname(hp), mode=0o711, exist_ok=True)

    def link_dir_handle(self, gfid: Gfid, pargfid: Gfid, name: str, replace: bool = False) -> None:
        """Point the handle of directory `gfid` at `name` in `pargfid`."""
        hp = self.handle_path(gfid)
        target = f"../../{pargfid.hex()[0:2]}/{pargfid.hex()[2:4]}/{pargfid.canonical}/{name}"
        tmp = f"{hp}.{os.getpid()}.{threading.get_ident()}" if replace else hp
        try:
            os.symlink(target, tmp)
        except FileNotFoundError:
            self._ensure_parent(hp)
            os.symlink(target, tmp)
        if replace:
            os.replace(tmp, hp)

    def link_file_handle(self, src: str, gfid: Gfid, src_dir_fd: int | None = None) -> None:
        """Hard-link `src` (a name in `src_dir_fd`, never followed) as the handle of `gfid`."""
        hp = self.handle_path(gfid)
        for attempt in (0, 1):
            try:
                os.link(src, hp, src_dir_fd=src_dir_fd, follow_symlinks=False)
                return
            except FileNotFoundError:
                if attempt:
                    raise
                self._ensure_parent(hp)

    def drop_dir_handle(self, gfid: Gfid) -> None:
        if gfid in (NULL_GFID, ROOT_GFID):
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.handle_path(gfid))

    def drop_file_handle_if_last(self, gfid: Gfid) -> None:
        """After a name went away: if only the handle is left, remove it (or park it while open)."""
        if gfid == NULL_GFID:
            return
        hp = self.handle_path(gfid)
        try:
            st = os.lstat(hp)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) and not _has_gfid(hp):
            return  # a directory handle: not ours to drop here
        if st.st_nlink > 1:
            return
        with self._open_lock:
            if gfid in self._open:
                self._unlinked.add(gfid)
                os.replace(hp, os.path.join(self.unlinked_dir, gfid.canonical))
                return
        os.unlink(hp)


def _has_gfid(path: str) -> bool:
    try:
        os.getxattr(path, GFID_XATTR, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return False
        raise
