"""User-space thin provisioning with dm-thin's semantics: the engine under `storage/bd`.

A pool on a backing file or block device holds thin volumes (sparse, allocated per block on first
write), O(1) writable snapshots sharing blocks copy-on-write, full clones, discard, resize, space
accounting with a low-water event, and transactional metadata in SQLite beside the data.
"""

from mortar.thinpool.pool import PoolStats, ThinPool
from mortar.thinpool.volume import MAX_VOLUME_SIZE, ThinVolume

__all__ = ["MAX_VOLUME_SIZE", "PoolStats", "ThinPool", "ThinVolume"]
