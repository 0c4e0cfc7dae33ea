"""AFR's changelog: the pending counters every brick keeps about its peers, and what they imply.

On brick X, `trusted.afr.<vol>-client-<N>` holds three big-endian int32 [data, metadata, entry]:
changes that brick N missed and X has. `trusted.afr.dirty` (same layout) means "an operation may
be in flight here". From the counters of every brick that answered, `judge` decides per kind who
is a source (nobody accuses it), who is a sink (someone does) and whether the replicas are in
split-brain (every brick that has the object is accused).

An accusation is written only in a post-op, after the outcome of the fop is known and in the same
atomic xattrop as the dirty decrement, so it is always believed, even from a brick that is dirty.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

DATA, METADATA, ENTRY = 0, 1, 2
KINDS = (DATA, METADATA, ENTRY)
KIND_NAMES = {DATA: "data", METADATA: "metadata", ENTRY: "entry"}

PREFIX = "trusted.afr."
DIRTY_KEY = PREFIX + "dirty"
_FMT = ">3i"
SIZE = 12
ZERO = bytes(SIZE)

Counters = tuple[int, int, int]


def pending_key(name: str) -> str:
    """The xattr holding what the brick whose pending name is `name` missed (`vol-client-2`)."""
    return PREFIX + name


def encode(data: int = 0, metadata: int = 0, entry: int = 0) -> bytes:
    return struct.pack(_FMT, data, metadata, entry)


def one(kind: int, count: int = 1) -> bytes:
    """A delta of `count` on one kind."""
    values = [0, 0, 0]
    values[kind] = count
    return encode(*values)


def decode(raw: bytes | bytearray | memoryview | None) -> Counters:
    """Counters from an xattr value; absent or short values count as zeros, extra bytes are ignored
    (GlusterFS has written longer arrays in some versions)."""
    if not raw:
        return (0, 0, 0)
    buf = bytes(raw[:SIZE]).ljust(SIZE, b"\0")
    data, metadata, entry = struct.unpack(_FMT, buf)
    return (data, metadata, entry)


def negate(values: Counters) -> bytes:
    return encode(-values[0], -values[1], -values[2])


def is_zero(raw: bytes | None) -> bool:
    return decode(raw) == (0, 0, 0)


@dataclass(slots=True)
class Matrix:
    """pending[i][j]: what brick i says brick j missed; dirty[i]: brick i's own in-flight marks.
    Rows of bricks that did not answer are all zeros."""

    pending: list[list[Counters]]
    dirty: list[Counters]

    @classmethod
    def build(cls, keys: Sequence[str], xattrs: Mapping[int, Mapping[str, bytes]]) -> Matrix:
        """From each answering brick's xattrs (index -> name -> value); `keys[j]` is brick j's key."""
        n = len(keys)
        pending = [[(0, 0, 0)] * n for _ in range(n)]
        dirty: list[Counters] = [(0, 0, 0)] * n
        for i, values in xattrs.items():
            pending[i] = [decode(values.get(key)) for key in keys]
            dirty[i] = decode(values.get(DIRTY_KEY))
        return cls(pending, dirty)

    def accusers(self, j: int, kind: int, among: Iterable[int]) -> list[int]:
        return [i for i in among if i != j and self.pending[i][j][kind] > 0]

    def has_pending(self, among: Iterable[int]) -> bool:
        """Whether any brick in `among` accuses anyone (itself excluded) of anything."""
        for i in among:
            for j, values in enumerate(self.pending[i]):
                if j != i and any(v > 0 for v in values):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the counters say about one kind of one object, among the bricks that have it."""

    kind: int
    present: frozenset[int]
    #: unaccused bricks that may serve as the copy to read or heal from
    sources: frozenset[int]
    #: present bricks some present brick accuses
    sinks: frozenset[int]
    #: present bricks with the dirty counter of this kind set (an operation was in flight)
    dirty: frozenset[int]
    #: every present brick is accused: no copy can be trusted over another
    split_brain: bool

    @property
    def needs_heal(self) -> bool:
        return bool(self.sinks or self.dirty or self.split_brain)

    def describe(self) -> str:
        state = (
            "split-brain"
            if self.split_brain
            else f"sources {sorted(self.sources)} sinks {sorted(self.sinks)}"
        )
        return f"{KIND_NAMES[self.kind]}: {state}, dirty {sorted(self.dirty)}"


def judge(matrix: Matrix, kind: int, present: Iterable[int], never_source: Iterable[int] = ()) -> Verdict:
    """Sources, sinks and split-brain for `kind` among the `present` bricks. Bricks in
    `never_source` (the arbiter, for data) are never sources but still accuse and can be accused."""
    here = frozenset(present)
    accused = frozenset(j for j in here if matrix.accusers(j, kind, here))
    unaccused = here - accused
    sources = unaccused - frozenset(never_source)
    dirty = frozenset(i for i in here if matrix.dirty[i][kind] > 0)
    return Verdict(kind, here, sources, accused, dirty, split_brain=bool(accused) and not unaccused)


def blame(keys: Sequence[str], kind: int, failed: Iterable[int]) -> dict[str, bytes]:
    """The xattrop deltas that record `failed` bricks as having missed one change of `kind`."""
    return {keys[j]: one(kind) for j in sorted(set(failed))}
