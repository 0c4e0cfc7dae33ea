"""Space map: one reference count per data block, the allocator, and when a freed block may return.

The count of a block is the number of mapping leaves that point at it (not of volumes: a leaf
shared by two volumes counts once, see `mapping`). Counts are kept in an `array('I')` and stored
in 1024-block chunks (4 KiB blobs), so a commit writes only the chunks that changed.

A separate `busy` byte per block drives allocation: `bytearray.find` locates a run of free blocks
at C speed, so sequential writes get contiguous blocks and coalesce into single syscalls. A block
whose count falls to zero stays busy until (1) the transaction that freed it is committed, else a
crash would bring back the old mapping pointing at another volume's new data, and (2) every data
I/O that resolved its mapping before then has finished (`retire`/`reclaim` with I/O epochs).
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from collections.abc import Iterable

CHUNK = 1024
_NONZERO = bytes([0] + [1] * 255)


def _le(a: array[int]) -> array[int]:
    """Stored blobs are little-endian whatever the host."""
    if sys.byteorder != "little":
        a.byteswap()
    return a


class SpaceMap:
    def __init__(self, nblocks: int, counts: array[int] | None = None) -> None:
        self.nblocks = nblocks
        self.rc: array[int] = counts if counts is not None else array("I", bytes(4 * nblocks))
        assert self.rc.itemsize == 4 and len(self.rc) == nblocks
        nz = _le(array("I", self.rc)).tobytes().translate(_NONZERO)
        acc = 0
        for lane in range(4):
            acc |= int.from_bytes(nz[lane::4], "little")
        self.busy = bytearray(acc.to_bytes(nblocks, "little"))
        self.nfree = self.busy.count(0)
        self.cursor = 0
        self.dirty: set[int] = set()
        self.pending: list[int] = []
        self.sealed: list[int] = []
        self.quarantine: deque[tuple[int, list[int]]] = deque()

    @classmethod
    def load(cls, nblocks: int, chunks: Iterable[tuple[int, bytes]]) -> tuple[SpaceMap, list[str]]:
        rc = array("I", bytes(4 * nblocks))
        problems = []
        for idx, blob in chunks:
            part = _le(array("I", blob))
            start = idx * CHUNK
            if start + len(part) > nblocks or len(part) > CHUNK:
                problems.append(f"space map chunk {idx} lies beyond the data device")
                part = part[: max(0, nblocks - start)]
            rc[start : start + len(part)] = part
        return cls(nblocks, rc), problems

    def chunk_blob(self, idx: int) -> bytes:
        return _le(self.rc[idx * CHUNK : (idx + 1) * CHUNK]).tobytes()

    def used(self) -> int:
        return self.nblocks - self.nfree

    def alloc(self, n: int) -> list[int]:
        """`n` blocks with count 1, contiguous when such a run exists; the caller checked `nfree`."""
        assert 0 < n <= self.nfree
        busy = self.busy
        pos = busy.find(bytes(n), self.cursor)
        if pos < 0:
            pos = busy.find(bytes(n), 0)
        if pos >= 0:
            busy[pos : pos + n] = b"\x01" * n
            self.rc[pos : pos + n] = array("I", [1]) * n
            blocks = list(range(pos, pos + n))
            self.dirty.update(range(pos // CHUNK, (pos + n - 1) // CHUNK + 1))
        else:
            blocks = []
            pos = self.cursor
            while len(blocks) < n:
                pos = busy.find(b"\0", pos)
                if pos < 0:
                    pos = busy.find(b"\0", 0)
                busy[pos] = 1
                self.rc[pos] = 1
                blocks.append(pos)
                self.dirty.add(pos // CHUNK)
        self.nfree -= n
        self.cursor = (blocks[-1] + 1) % self.nblocks
        return blocks

    def unalloc(self, blocks: Iterable[int]) -> None:
        """Give back blocks allocated in this call but never mapped (their I/O failed)."""
        for b in blocks:
            self.rc[b] = 0
            self.busy[b] = 0
            self.nfree += 1
            self.dirty.add(b // CHUNK)

    def incref(self, b: int) -> None:
        self.rc[b] += 1
        self.dirty.add(b // CHUNK)

    def decref(self, b: int) -> int:
        n = self.rc[b] - 1
        self.rc[b] = n
        self.dirty.add(b // CHUNK)
        if n == 0:
            self.pending.append(b)
        return n

    def seal(self) -> None:
        """The open transaction is being committed: its freed blocks wait for that commit."""
        self.sealed, self.pending = self.pending, []

    def retire(self, epoch: int) -> None:
        """The sealed transaction is durable: its freed blocks wait only for I/O older than `epoch`.

        Allocation restarts from the device start (as dm-thin's space map does after a commit), so
        space freed by committed transactions is reused before the untouched tail.
        """
        self.cursor = 0
        if self.sealed:
            self.quarantine.append((epoch, self.sealed))
            self.sealed = []

    def reclaim(self, oldest_io_epoch: int | None) -> int:
        """Free retired blocks that no running I/O can still address; returns how many."""
        freed = 0
        while self.quarantine and (oldest_io_epoch is None or self.quarantine[0][0] < oldest_io_epoch):
            _, blocks = self.quarantine.popleft()
            for b in blocks:
                self.busy[b] = 0
            freed += len(blocks)
        self.nfree += freed
        return freed

    def withheld(self) -> int:
        """Blocks with no references that are not yet reusable."""
        return len(self.pending) + len(self.sealed) + sum(len(b) for _, b in self.quarantine)
