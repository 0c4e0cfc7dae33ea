"""DHT layouts: which hash range of a directory each subvolume owns, and the on-disk form of it.

Kept free of fops so that the translator, fix-layout and rebalance share one implementation:
`compute_layout` makes a new layout, `check_layout` says what is wrong with one read from disk,
`hashed_subvol` places a name, and `encode_range`/`decode_range` are the xattr format.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mortar.xlators.cluster.dht_hash import DEFAULT_HASHER, NameHasher, dm_hash

#: per directory, per subvolume: 4 big-endian u32 [commit_hash, type, start, stop], stop inclusive
LAYOUT_XATTR = "trusted.mortar.dht"
#: on a link file: the name of the subvolume that holds the data (NUL-terminated, as GlusterFS writes it)
LINKTO_XATTR = "trusted.mortar.dht.linkto"

HASH_TYPE_DM = 0  # ranges computed by DHT
HASH_TYPE_USER = 1  # ranges set by an administrator

#: the commit hash of a layout a directory was created with: every file in it is on its hashed
#: subvolume (or has a link file there). Heal and fix-layout write another value, which tells
#: `lookup-unhashed auto` that files may sit elsewhere until rebalance has run.
COMMIT_FRESH = 0

HASH_SPACE = 1 << 32
_FMT = struct.Struct(">IIII")


class LayoutFormatError(ValueError):
    """A layout xattr that is not 16 bytes or whose range is reversed."""


@dataclass(frozen=True, slots=True)
class LayoutRange:
    """The hash range one subvolume owns in one directory; `start == stop == 0` means none."""

    subvol: str
    start: int
    stop: int
    commit_hash: int = COMMIT_FRESH
    type: int = HASH_TYPE_DM

    @property
    def empty(self) -> bool:
        return self.start == 0 and self.stop == 0

    def __contains__(self, hashval: object) -> bool:
        return isinstance(hashval, int) and not self.empty and self.start <= hashval <= self.stop


def encode_range(r: LayoutRange) -> bytes:
    return _FMT.pack(r.commit_hash, r.type, r.start, r.stop)


def decode_range(subvol: str, raw: bytes) -> LayoutRange:
    if len(raw) != _FMT.size:
        raise LayoutFormatError(f"layout of {subvol} is {len(raw)} bytes, expected {_FMT.size}")
    commit, typ, start, stop = _FMT.unpack(raw)
    if start > stop:
        raise LayoutFormatError(f"layout of {subvol} has start {start:#x} > stop {stop:#x}")
    return LayoutRange(subvol, start, stop, commit, typ)


def encode_linkto(subvol: str) -> bytes:
    return subvol.encode() + b"\0"


def decode_linkto(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


@dataclass(slots=True)
class Layout:
    """A directory's layout: one range per subvolume that has one; `missing` lists subvolumes
    whose copy of the directory has no layout xattr (or no directory)."""

    ranges: list[LayoutRange]
    missing: list[str] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list, init=False, repr=False)
    _owners: list[LayoutRange] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._owners = sorted((r for r in self.ranges if not r.empty), key=lambda r: r.start)
        self._starts = [r.start for r in self._owners]

    def owner(self, hashval: int) -> str | None:
        """The subvolume whose range holds `hashval`, or None in a hole."""
        i = bisect.bisect_right(self._starts, hashval) - 1
        if i >= 0 and hashval <= self._owners[i].stop:
            return self._owners[i].subvol
        return None

    @property
    def owners(self) -> list[LayoutRange]:
        """The non-empty ranges, by start."""
        return self._owners

    def range_of(self, subvol: str) -> LayoutRange | None:
        return next((r for r in self.ranges if r.subvol == subvol), None)

    @property
    def fresh(self) -> bool:
        """True when every range still has the commit hash the directory was created with."""
        return (
            bool(self.ranges) and not self.missing and all(r.commit_hash == COMMIT_FRESH for r in self.ranges)
        )

    @property
    def commit_hash(self) -> int:
        return max((r.commit_hash for r in self.ranges), default=COMMIT_FRESH)


@dataclass(frozen=True, slots=True)
class Anomalies:
    holes: int
    overlaps: int
    missing: int

    @property
    def ok(self) -> bool:
        """A layout anyone can hash with: the whole range covered exactly once."""
        return self.holes == 0 and self.overlaps == 0


def check_layout(layout: Layout) -> Anomalies:
    """Count holes and overlaps in the ranges, and subvolumes without a layout."""
    owners = layout.owners
    holes = overlaps = 0
    expect = 0  # next hash value that must be covered
    for r in owners:
        if r.start > expect:
            holes += 1
        elif r.start < expect:
            overlaps += 1
        expect = max(expect, r.stop + 1)
    if expect < HASH_SPACE:
        holes += 1
    return Anomalies(holes, overlaps, len(layout.missing))


def rotation_start(key: str, count: int) -> int:
    """Where a new directory's layout starts, so directories do not all begin on subvolume 0."""
    return dm_hash(key.encode()) % count if count else 0


def compute_layout(
    subvols: Sequence[str],
    weights: Sequence[int] | None = None,
    *,
    start: int = 0,
    commit_hash: int = COMMIT_FRESH,
    zero: Iterable[str] = (),
) -> Layout:
    """A new layout splitting 0..0xffffffff among `subvols` (evenly, or in proportion to `weights`),
    beginning at `subvols[start]` and rotating. Subvolumes with weight 0 and those in `zero`
    (down or decommissioned) get an empty range, written so that they do not count as missing."""
    weights = list(weights) if weights is not None else [1] * len(subvols)
    if len(weights) != len(subvols):
        raise ValueError("one weight per subvolume")
    if any(w < 0 for w in weights):
        raise ValueError("weights must not be negative")
    n = len(subvols)
    order = [(start + i) % n for i in range(n)] if n else []
    total = sum(weights)
    ranges: list[LayoutRange] = []
    cum = 0
    lower = 0
    for idx in order:
        cum += weights[idx]
        upper = HASH_SPACE * cum // total if total else 0
        if upper > lower:
            ranges.append(LayoutRange(subvols[idx], lower, upper - 1, commit_hash))
            lower = upper
        else:
            ranges.append(LayoutRange(subvols[idx], 0, 0, commit_hash))
    ranges.extend(LayoutRange(z, 0, 0, commit_hash) for z in zero if z not in subvols)
    return Layout(ranges)


def layout_from_xattrs(values: Mapping[str, bytes | None]) -> Layout:
    """Build a layout from each subvolume's raw xattr (None: absent). Malformed values count as
    missing, so that heal rewrites them."""
    ranges: list[LayoutRange] = []
    missing: list[str] = []
    for subvol, raw in values.items():
        if raw is None:
            missing.append(subvol)
            continue
        try:
            ranges.append(decode_range(subvol, raw))
        except LayoutFormatError:
            missing.append(subvol)
    return Layout(ranges, missing)


def hashed_subvol(layout: Layout, name: str, hasher: NameHasher = DEFAULT_HASHER) -> str | None:
    """The subvolume `name` hashes to in a directory with `layout` (None if it falls in a hole)."""
    return layout.owner(hasher(name))
