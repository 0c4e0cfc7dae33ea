"""Layout math and format: whole range covered exactly once, rotation, weights, anomalies, placement."""

from __future__ import annotations

import itertools
import struct
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mortar.xlators.cluster.dht_hash import NameHasher, dm_hash
from mortar.xlators.cluster.dht_layout import (
    HASH_SPACE,
    Layout,
    LayoutFormatError,
    LayoutRange,
    check_layout,
    compute_layout,
    decode_linkto,
    decode_range,
    encode_linkto,
    encode_range,
    hashed_subvol,
    layout_from_xattrs,
    rotation_start,
)

SUBVOLS = [f"vol-client-{i}" for i in range(4)]


def _covers_exactly(layout: Layout) -> None:
    owners = layout.owners
    assert owners[0].start == 0
    assert owners[-1].stop == HASH_SPACE - 1
    for a, b in itertools.pairwise(owners):
        assert b.start == a.stop + 1


@given(
    weights=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=12).filter(any),
    start=st.integers(min_value=0, max_value=100),
)
def test_compute_layout_covers_the_range_once(weights: list[int], start: int) -> None:
    names = [f"s{i}" for i in range(len(weights))]
    layout = compute_layout(names, weights, start=start % len(names))
    _covers_exactly(layout)
    assert check_layout(layout).ok
    assert sorted(r.subvol for r in layout.ranges) == sorted(names)  # zero-weight ones get an empty range
    for name, w in zip(names, weights, strict=True):
        r = layout.range_of(name)
        assert r is not None
        if w == 0:
            assert r.empty


def test_even_split_and_rotation() -> None:
    layout = compute_layout(SUBVOLS, start=2)
    sizes = {r.subvol: r.stop - r.start + 1 for r in layout.ranges}
    assert set(sizes.values()) == {HASH_SPACE // 4}
    assert layout.owners[0].subvol == "vol-client-2"  # rotation: the range begins at subvolume 2
    assert [r.subvol for r in layout.owners] == [
        "vol-client-2",
        "vol-client-3",
        "vol-client-0",
        "vol-client-1",
    ]
    # directories start on different subvolumes
    starts = Counter(rotation_start(f"dir-{i}", 4) for i in range(400))
    assert set(starts) == {0, 1, 2, 3}
    assert min(starts.values()) > 60


def test_weighted_split() -> None:
    layout = compute_layout(["big", "small"], [3, 1])
    big, small = layout.range_of("big"), layout.range_of("small")
    assert big is not None and small is not None
    assert big.stop - big.start + 1 == 3 * HASH_SPACE // 4
    assert small.stop == HASH_SPACE - 1


def test_down_subvolumes_get_an_empty_range() -> None:
    layout = compute_layout(SUBVOLS[:3], zero=["vol-client-3"])
    r = layout.range_of("vol-client-3")
    assert r is not None and r.empty
    assert 12345 not in r
    _covers_exactly(layout)


def test_format_round_trip_is_glusterfs_order() -> None:
    r = LayoutRange("x", 0x40000000, 0x7FFFFFFF, commit_hash=7, type=0)
    raw = encode_range(r)
    assert raw == struct.pack(">IIII", 7, 0, 0x40000000, 0x7FFFFFFF)
    assert decode_range("x", raw) == r
    with pytest.raises(LayoutFormatError):
        decode_range("x", raw[:12])
    with pytest.raises(LayoutFormatError):
        decode_range("x", struct.pack(">IIII", 0, 0, 9, 3))
    assert encode_linkto("vol-client-1") == b"vol-client-1\0"
    assert decode_linkto(b"vol-client-1\0") == "vol-client-1"


def test_anomalies() -> None:
    good = compute_layout(SUBVOLS)
    raws: dict[str, bytes | None] = {r.subvol: encode_range(r) for r in good.ranges}
    assert check_layout(layout_from_xattrs(raws)).ok

    hole = dict(raws, **{"vol-client-1": None})
    a = check_layout(layout_from_xattrs(hole))
    assert (a.holes, a.overlaps, a.missing) == (1, 0, 1)

    overlap = dict(raws, **{"vol-client-1": encode_range(LayoutRange("vol-client-1", 0, 0x90000000))})
    assert check_layout(layout_from_xattrs(overlap)).overlaps >= 1

    garbage = dict(raws, **{"vol-client-2": b"\x01\x02"})
    assert layout_from_xattrs(garbage).missing == ["vol-client-2"]

    nothing = check_layout(layout_from_xattrs(dict.fromkeys(SUBVOLS)))
    assert nothing.holes == 1 and nothing.missing == 4


def test_hashed_subvol_follows_the_ranges() -> None:
    layout = compute_layout(SUBVOLS, start=1)
    hasher = NameHasher()
    for name in ("a", "hello world", "disk0.qcow2", "file-ÄÖ.txt"):
        h = dm_hash(name.encode())
        expected = next(r.subvol for r in layout.ranges if r.start <= h <= r.stop)
        assert hashed_subvol(layout, name, hasher) == expected
    hole = Layout([LayoutRange("only", 0, 0x7FFFFFFF)])
    assert hole.owner(0x80000000) is None


def test_ten_thousand_names_spread_evenly() -> None:
    """The hash spreads names: each of 4 even ranges gets 25 % +- 15 % of them."""
    layout = compute_layout(SUBVOLS, start=3)
    counts = Counter(hashed_subvol(layout, f"file-{i:05d}.dat") for i in range(10_000))
    assert set(counts) == set(SUBVOLS)
    for n in counts.values():
        assert 2125 <= n <= 2875, counts
