"""The pool interface `storage/bd` programs against, met by `ThinPool` and by `LvmPool`.

Only what the block device translator and the management commands use is here: volumes by name,
O(1) snapshots, full clones, resize, byte I/O, sparseness queries and space accounting. Both
implementations are synchronous and thread-safe and raise `FopError`; callers on an event loop
run them in an executor.

Each volume has an `id` that never changes while it exists and is never reused by the pool (a
`ThinPool` volume row id, an LVM LV UUID): the translator keys its per-volume attributes by it, so
renames touch only the pool.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from mortar.core.fops import Buffer
from mortar.thinpool.pool import PoolStats


class Volume(Protocol):
    """One thin volume (an image file on a `storage/bd` brick)."""

    @property
    def id(self) -> int | str: ...

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def origin(self) -> str | None:
        """Name of the volume this one is a snapshot of, while that volume exists."""

    @property
    def allocated_bytes(self) -> int: ...

    def info(self) -> dict[str, Any]: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, buf: Buffer, offset: int) -> int: ...

    def write(self, data: Buffer, offset: int) -> int: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None: ...

    def resize(self, size: int) -> None: ...

    def flush(self) -> None: ...

    def seek_data(self, offset: int) -> int: ...

    def seek_hole(self, offset: int) -> int: ...


class Pool(Protocol):
    """A pool of thin volumes: `ThinPool` (user space, the default) or `LvmPool` (LVM2 thin pool)."""

    @property
    def uuid(self) -> uuid.UUID: ...

    @property
    def block_size(self) -> int: ...

    def create_volume(self, name: str, size: int) -> Volume: ...

    def volume(self, name: str) -> Volume: ...

    def volumes(self) -> list[Any]:
        """Every visible volume, by name (list[Volume]; `Any` so `list[ThinVolume]` conforms)."""

    def snapshot(self, origin_name: str, new_name: str) -> Volume: ...

    def clone(self, src_name: str, new_name: str) -> Volume: ...

    def delete_volume(self, name: str) -> None: ...

    def rename_volume(self, old: str, new: str) -> None: ...

    def stats(self) -> PoolStats: ...

    def check(self) -> list[str]: ...

    def commit(self) -> None:
        """Make every completed change durable (data, then the mapping metadata)."""

    def close(self) -> None: ...
