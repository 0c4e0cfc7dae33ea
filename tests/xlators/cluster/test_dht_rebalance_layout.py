"""fix-layout's range reuse (`plan_layout`): how much of the hash space keeps its subvolume when
subvolumes come and go, and that every plan covers the space exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mortar.xlators.cluster.dht_common import plan_layout
from mortar.xlators.cluster.dht_layout import HASH_SPACE, Layout, check_layout, compute_layout


def kept(old: Layout, new: Layout) -> float:
    """Share of the hash space owned by the same subvolume in both layouts."""
    total = 0
    for r in new.owners:
        o = old.range_of(r.subvol)
        if o is not None and not o.empty:
            total += max(0, min(r.stop, o.stop) - max(r.start, o.start) + 1)
    return total / HASH_SPACE


def names(n: int, first: int = 0) -> list[str]:
    return [f"s{i}" for i in range(first, first + n)]


@pytest.mark.parametrize("start", [0, 1])
def test_two_added_to_two_move_only_what_they_must(start: int) -> None:
    old = compute_layout(names(2), start=start)
    new = plan_layout(old, names(4), commit_hash=7)
    assert check_layout(new).ok and {r.commit_hash for r in new.ranges} == {7}
    assert kept(old, new) == pytest.approx(0.5)  # the new two must take half; nothing else moves


def test_one_added_to_four_keeps_more_than_a_fresh_layout() -> None:
    old = compute_layout(names(4), start=2)
    new = plan_layout(old, names(5), commit_hash=1)
    assert check_layout(new).ok
    assert kept(old, new) >= 0.69  # 0.2 must move; contiguous ranges cost another 0.1
    fresh = [kept(old, compute_layout(names(5), start=k)) for k in range(5)]
    assert sum(fresh) / len(fresh) < 0.5  # a new layout rotated by the gfid, as mkdir makes
    assert all(r.stop - r.start + 1 in (HASH_SPACE // 5, HASH_SPACE // 5 + 1) for r in new.owners)


@pytest.mark.parametrize(("gone", "share"), [("s1", 1 / 2), ("s2", 2 / 3), ("s0", 1 / 2)])
def test_a_decommissioned_subvolume_owns_nothing(gone: str, share: float) -> None:
    """Ranges run s1, s2, s0: the middle one goes with only its own third, an end one with a sixth
    more (ranges stay contiguous and equal)."""
    old = compute_layout(names(3), start=1)
    new = plan_layout(old, [s for s in names(3) if s != gone], commit_hash=3, zero=[gone])
    assert check_layout(new).ok
    removed = new.range_of(gone)
    assert removed is not None and removed.empty  # written, so not "missing"
    assert kept(old, new) == pytest.approx(share, abs=1e-6)


def test_weights_size_the_ranges() -> None:
    old = compute_layout(names(2))
    new = plan_layout(old, names(3), [1, 1, 2], commit_hash=1)
    sizes = {r.subvol: r.stop - r.start + 1 for r in new.owners}
    assert sizes["s2"] == pytest.approx(HASH_SPACE / 2, rel=1e-6)


def test_a_broken_layout_is_replaced_by_a_fresh_one() -> None:
    holes = Layout([r for r in compute_layout(names(3)).ranges if r.subvol != "s1"])
    new = plan_layout(holes, names(3), commit_hash=5, start=1)
    assert new.owners == compute_layout(names(3), start=1, commit_hash=5).owners


def test_the_same_subvolumes_keep_the_same_ranges() -> None:
    old = plan_layout(compute_layout(names(3), start=2), names(5), commit_hash=4)
    again = plan_layout(old, names(5), commit_hash=9)
    assert [(r.subvol, r.start, r.stop) for r in again.owners] == [
        (r.subvol, r.start, r.stop) for r in old.owners
    ]


@settings(max_examples=200, deadline=None)
@given(
    before=st.integers(1, 8),
    start=st.integers(0, 7),
    added=st.integers(0, 5),
    removed=st.sets(st.integers(0, 7), max_size=3),
)
def test_every_plan_covers_the_space_once(before: int, start: int, added: int, removed: set[int]) -> None:
    old = compute_layout(names(before), start=start % before)
    gone = sorted(f"s{i}" for i in removed if i < before)
    target = [s for s in names(before + added) if s not in gone]
    if not target:
        return
    new = plan_layout(old, target, commit_hash=1, zero=gone)
    assert check_layout(new).ok and not new.missing
    assert {r.subvol for r in new.owners} == set(target)
    assert all(new.range_of(s).empty for s in gone)  # type: ignore[union-attr]
    share = HASH_SPACE / len(target)
    assert all(abs(r.stop - r.start + 1 - share) <= 1 for r in new.owners)
    if not added and not gone:
        assert kept(old, new) == pytest.approx(1.0)
    # never worse than laying the same subvolumes out afresh in their old order
    fresh = compute_layout([r.subvol for r in old.owners if r.subvol in target] + names(added, before))
    assert kept(old, new) >= kept(old, fresh) - 1e-9
