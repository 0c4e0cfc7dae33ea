"""Pools for `storage/bd` bricks: where their pieces live, creating and opening them on either
backend, and the management operations that the `mortar bd` commands and the node daemon call.

A brick path names a pool. Two layouts:
- a *pool directory* (what `mortar bd pool create HOST:/POOL` makes and volgen uses): `data` is the
  pool's data file, or a symlink to its block device or backing file; `data.meta` the thin pool's
  metadata; `data.meta.bd` the brick's attribute store. With the LVM backend the directory holds
  only the attribute store, `lvm.bd`; the data is the LVM thin pool VG/POOL.
- a data file or block device given directly (thin backend only): metadata beside it or where its
  superblock says, the attribute store beside the metadata (`<metadata>.bd`).

Image operations (`image_*`) work through any client volume with the `os`-like calls of
`mortar.client.Volume`: create + truncate, link (full clone), symlink (snapshot), unlink, stat.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from mortar.core.errors import FopError
from mortar.thinpool.backend import Pool
from mortar.thinpool.lvm import Lvm, LvmPool
from mortar.thinpool.pool import ThinPool

DATA = "data"
THIN_META = "data.meta"
ATTR_SUFFIX = ".bd"
LVM_ATTRS = "lvm.bd"
BACKENDS = ("thin", "lvm")
#: pool volumes a bd brick keeps to itself (images unlinked while open, clone pins): never listed
HIDDEN_PREFIX = ".mortar-"

ORIGIN_XATTR = "user.mortar.bd.origin"
ALLOCATED_XATTR = "user.mortar.bd.allocated"
SHARED_XATTR = "user.mortar.bd.shared"


@dataclass(frozen=True, slots=True)
class Location:
    """Where one bd pool lives."""

    path: str  # the brick path: a pool directory, or the data file/device itself
    backend: str = "thin"
    metadata: str = ""  # thin metadata; "" = from the layout or the superblock
    vg: str = ""
    thinpool: str = ""

    @property
    def is_dir(self) -> bool:
        return os.path.isdir(self.path)

    @property
    def data(self) -> str:
        return os.path.join(self.path, DATA) if self.is_dir else self.path

    @property
    def thin_metadata(self) -> str | None:
        """The thin metadata path when the layout fixes it (None: the superblock says)."""
        if self.metadata:
            return self.metadata
        return os.path.join(self.path, THIN_META) if self.is_dir else None


def check_location(loc: Location) -> None:
    if loc.backend not in BACKENDS:
        raise FopError(errno.EINVAL, f"unknown bd backend {loc.backend!r} (one of {', '.join(BACKENDS)})")
    if not os.path.isabs(loc.path):
        raise FopError(errno.EINVAL, f"pool path {loc.path!r} is not absolute")
    if loc.backend == "lvm" and not (loc.vg and loc.thinpool):
        raise FopError(
            errno.EINVAL, "the lvm backend needs the volume group and thin pool names (vg, thinpool)"
        )


def pool_exists(loc: Location, *, lvm: Lvm | None = None) -> bool:
    """Whether the pool's data is there (it may still fail to open: not a pool, wrong metadata)."""
    check_location(loc)
    if loc.backend == "lvm":
        try:
            LvmPool.open(loc.vg, loc.thinpool, lvm=lvm)
        except FopError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True
    return os.path.exists(loc.data)


def open_pool(
    loc: Location, *, lvm: Lvm | None = None, read_only: bool = False, commit_interval: float = 1.0
) -> Pool:
    check_location(loc)
    if loc.backend == "lvm":
        return LvmPool.open(loc.vg, loc.thinpool, lvm=lvm)
    return ThinPool.open(
        loc.data, metadata_path=loc.thin_metadata, read_only=read_only, commit_interval=commit_interval
    )


def create_pool(
    loc: Location,
    *,
    size: int | None,
    block_size: int = 64 << 10,
    backing: str = "",
    lvm: Lvm | None = None,
    commit_interval: float = 1.0,
) -> Pool:
    """Make the pool. A path that does not exist yet becomes a pool directory; its data is
    `backing` (a file, created with `size`, or a block device) or, without one, `<dir>/data`."""
    check_location(loc)
    made_dir = not os.path.lexists(loc.path)
    if made_dir:
        os.makedirs(loc.path, mode=0o755)
    try:
        return _create(loc, size, block_size, backing, lvm, commit_interval)
    except BaseException:
        if made_dir:
            shutil.rmtree(loc.path, ignore_errors=True)
        raise


def _create(
    loc: Location, size: int | None, block_size: int, backing: str, lvm: Lvm | None, commit_interval: float
) -> Pool:
    if loc.backend == "lvm":
        if size is None:
            raise FopError(errno.EINVAL, "an LVM thin pool needs a size")
        return LvmPool.create(loc.vg, loc.thinpool, size, block_size, lvm=lvm)
    if backing:
        if not loc.is_dir:
            raise FopError(errno.EINVAL, f"{loc.path} is not a pool directory: cannot link it to {backing}")
        backing = os.path.abspath(backing)
        if os.path.lexists(loc.data):
            raise FopError(errno.EEXIST, f"{loc.data} exists")
        os.symlink(backing, loc.data)
    try:
        return ThinPool.create(
            loc.data,
            metadata_path=loc.thin_metadata,
            size=size,
            block_size=block_size,
            commit_interval=commit_interval,
        )
    except BaseException:
        if backing:
            os.unlink(loc.data)
        raise


def attributes_path(loc: Location, pool: Pool) -> str:
    if loc.backend == "lvm":
        if not loc.is_dir:
            raise FopError(
                errno.EINVAL, f"an lvm bd pool needs a pool directory for its attributes: {loc.path}"
            )
        return os.path.join(loc.path, LVM_ATTRS)
    meta = loc.thin_metadata or (pool.metadata_path if isinstance(pool, ThinPool) else loc.data + ".meta")
    return meta + ATTR_SUFFIX


def describe(loc: Location, pool: Pool) -> dict[str, Any]:
    """Pool usage and its volumes, as `bd pool info` prints them."""
    vols = []
    for vol in pool.volumes():
        if vol.name.startswith(HIDDEN_PREFIX):
            continue
        info = vol.info()
        vols.append({k: info.get(k) for k in ("name", "size", "allocated_bytes", "origin", "shared_blocks")})
    where: dict[str, Any] = {"path": loc.path, "backend": loc.backend}
    if loc.backend == "lvm":
        where.update(vg=loc.vg, thinpool=loc.thinpool)
    else:
        where["data"] = os.path.realpath(loc.data)
        where["block_device"] = stat.S_ISBLK(os.stat(loc.data).st_mode)
    return {"pool": {**where, **asdict(pool.stats())}, "volumes": vols}


# ---- image operations through a client volume ---------------------------------------------------


class ClientVolume(Protocol):
    """The part of `mortar.client.Volume` the image operations use."""

    def create(self, path: str, mode: int = 0o644, flags: int = ...) -> Any: ...

    def ftruncate(self, handle: Any, size: int) -> None: ...

    def close(self, handle: Any = None) -> None: ...

    def link(self, src: str, dst: str) -> None: ...

    def symlink(self, target: str, path: str) -> None: ...

    def unlink(self, path: str) -> None: ...

    def stat(self, path: str, *, follow_symlinks: bool = True) -> Any: ...

    def getxattr(self, path: str, name: str, *, follow_symlinks: bool = True) -> bytes: ...


def _image_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise FopError(errno.EINVAL, f"{name!r} is not an image name (one path component)")
    return "/" + name


def image_create(vol: ClientVolume, name: str, size: int, mode: int = 0o644) -> dict[str, Any]:
    """A new thin volume of `size` bytes (nothing allocated)."""
    handle = vol.create(_image_path(name), mode)
    try:
        vol.ftruncate(handle, size)
    finally:
        vol.close(handle)
    return image_info(vol, name)


def image_clone(vol: ClientVolume, name: str, new: str) -> dict[str, Any]:
    """A full, independent copy (a hard link on a bd volume)."""
    vol.link(_image_path(name), _image_path(new))
    return image_info(vol, new)


def image_snapshot(vol: ClientVolume, name: str, new: str) -> dict[str, Any]:
    """A linked clone sharing every block until written (a symlink on a bd volume)."""
    _image_path(name)
    vol.symlink(name, _image_path(new))
    return image_info(vol, new)


def image_delete(vol: ClientVolume, name: str) -> None:
    vol.unlink(_image_path(name))


def image_info(vol: ClientVolume, name: str) -> dict[str, Any]:
    path = _image_path(name)
    st = vol.stat(path)
    info: dict[str, Any] = {"name": name, "size": st.st_size, "allocated_bytes": st.st_blocks * 512}
    virtual = (("origin", ORIGIN_XATTR), ("allocated_bytes", ALLOCATED_XATTR), ("shared_bytes", SHARED_XATTR))
    for key, xattr in virtual:
        try:
            raw = vol.getxattr(path, xattr)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise
            info.setdefault(key, None)
            continue
        text = raw.decode(errors="replace")
        info[key] = int(text) if text.isdigit() else text
    return info
