"""Iatt (stat plus gfid) and StatVfs: the attribute records that fops return."""

from __future__ import annotations

import os
import stat as _stat
from dataclasses import dataclass

from mortar.core.gfid import Gfid


@dataclass(slots=True)
class Iatt:
    """An inode's attributes as a brick saw them; `mode` includes the file type bits (S_IFMT)."""

    gfid: Gfid
    mode: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blksize: int = 4096
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    ino: int = 0
    dev: int = 0

    @classmethod
    def from_stat(cls, gfid: Gfid, st: os.stat_result) -> Iatt:
        return cls(
            gfid,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blksize,
            st.st_blocks,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
            # inode numbers seen by clients come from the gfid, so every replica reports the same one
            int.from_bytes(gfid[8:], "big") or 1,
            0,
        )

    def to_tuple(self) -> tuple[object, ...]:
        return (
            bytes(self.gfid),
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.size,
            self.blksize,
            self.blocks,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.ino,
            self.dev,
        )

    @classmethod
    def from_tuple(cls, t: list[object] | tuple[object, ...]) -> Iatt:
        if len(t) != 14:
            raise ValueError("iatt must have 14 fields")
        gfid, *rest = t
        if not isinstance(gfid, bytes) or not all(isinstance(v, int) for v in rest):
            raise ValueError("malformed iatt")
        return cls(Gfid(gfid), *rest)  # type: ignore[arg-type]

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_lnk(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def type_bits(self) -> int:
        return _stat.S_IFMT(self.mode)


@dataclass(slots=True)
class StatVfs:
    """statvfs(2) of a brick or, summed, of a volume."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int

    @classmethod
    def from_os(cls, st: os.statvfs_result) -> StatVfs:
        return cls(
            st.f_bsize,
            st.f_frsize,
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_favail,
            st.f_fsid,
            st.f_flag,
            st.f_namemax,
        )

    def to_tuple(self) -> tuple[int, ...]:
        return (
            self.bsize,
            self.frsize,
            self.blocks,
            self.bfree,
            self.bavail,
            self.files,
            self.ffree,
            self.favail,
            self.fsid,
            self.flag,
            self.namemax,
        )

    @classmethod
    def from_tuple(cls, t: list[object] | tuple[object, ...]) -> StatVfs:
        if len(t) != 11 or not all(isinstance(v, int) for v in t):
            raise ValueError("malformed statvfs")
        return cls(*t)
