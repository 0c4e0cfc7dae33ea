"""What the client API hands back: stat and statvfs results shaped like `os`'s, directory entries,
and the translation of fop errors into `OSError` with the path the caller used."""

from __future__ import annotations

import os
import stat as _stat
from dataclasses import dataclass

from mortar.core.errors import FopError
from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt, StatVfs


@dataclass(frozen=True, slots=True)
class StatResult:
    """`os.stat_result`'s attribute names, plus the object's gfid."""

    st_mode: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_blksize: int
    st_blocks: int
    st_rdev: int
    gfid: Gfid

    @classmethod
    def from_iatt(cls, iatt: Iatt) -> StatResult:
        return cls(
            iatt.mode,
            iatt.ino,
            iatt.dev,
            iatt.nlink,
            iatt.uid,
            iatt.gid,
            iatt.size,
            iatt.atime_ns,
            iatt.mtime_ns,
            iatt.ctime_ns,
            iatt.blksize,
            iatt.blocks,
            iatt.rdev,
            iatt.gfid,
        )

    @property
    def st_atime(self) -> float:
        return self.st_atime_ns / 1e9

    @property
    def st_mtime(self) -> float:
        return self.st_mtime_ns / 1e9

    @property
    def st_ctime(self) -> float:
        return self.st_ctime_ns / 1e9


@dataclass(frozen=True, slots=True)
class StatVfsResult:
    """`os.statvfs_result`'s attribute names."""

    f_bsize: int
    f_frsize: int
    f_blocks: int
    f_bfree: int
    f_bavail: int
    f_files: int
    f_ffree: int
    f_favail: int
    f_flag: int
    f_namemax: int
    f_fsid: int

    @classmethod
    def from_statvfs(cls, sv: StatVfs) -> StatVfsResult:
        return cls(
            sv.bsize,
            sv.frsize,
            sv.blocks,
            sv.bfree,
            sv.bavail,
            sv.files,
            sv.ffree,
            sv.favail,
            sv.flag,
            sv.namemax,
            sv.fsid,
        )


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One scandir entry. Attributes come with the listing (readdirp), so no call is made later;
    for a symlink the target's attributes were fetched while listing (None when it dangles)."""

    name: str
    path: str
    iatt: Iatt
    target: Iatt | None = None

    @property
    def gfid(self) -> Gfid:
        return self.iatt.gfid

    def inode(self) -> int:
        return self.iatt.ino

    def _attrs(self, follow_symlinks: bool) -> Iatt | None:
        if follow_symlinks and self.iatt.is_lnk:
            return self.target
        return self.iatt

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        attrs = self._attrs(follow_symlinks)
        return attrs is not None and attrs.is_dir

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        attrs = self._attrs(follow_symlinks)
        return attrs is not None and attrs.is_reg

    def is_symlink(self) -> bool:
        return self.iatt.is_lnk

    def stat(self, *, follow_symlinks: bool = True) -> StatResult:
        attrs = self._attrs(follow_symlinks)
        if attrs is None:
            raise FileNotFoundError(2, os.strerror(2), self.path)
        return StatResult.from_iatt(attrs)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r} {_stat.filemode(self.iatt.mode)}>"


def oserror(exc: FopError, path: str | None = None, path2: str | None = None) -> OSError:
    """The OSError subclass `os` would raise for this errno (FileNotFoundError, ...), naming the path."""
    message = os.strerror(exc.errno)
    if path2 is not None:
        return OSError(exc.errno, message, path, None, path2)
    if path is not None:
        return OSError(exc.errno, message, path)
    return OSError(exc.errno, message)
