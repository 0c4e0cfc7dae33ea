"""The changelog format and the verdicts drawn from it, without bricks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mortar.core.gfid import Gfid
from mortar.core.iatt import Iatt
from mortar.xlators.cluster.afr.changelog import (
    DATA,
    DIRTY_KEY,
    ENTRY,
    METADATA,
    Matrix,
    blame,
    decode,
    encode,
    judge,
    one,
    pending_key,
)
from mortar.xlators.cluster.afr.heal_common import choose_by_policy

KEYS = [pending_key(f"vol-client-{i}") for i in range(3)]
i32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)


@given(i32, i32, i32)
def test_encode_decode_round_trip(d: int, m: int, e: int) -> None:
    raw = encode(d, m, e)
    assert raw == struct.pack(">3i", d, m, e) and len(raw) == 12
    assert decode(raw) == (d, m, e)


def test_decode_tolerates_absent_short_and_long_values() -> None:
    assert decode(None) == decode(b"") == (0, 0, 0)
    assert decode(b"\0\0\0\x05") == (5, 0, 0)
    assert decode(encode(1, 2, 3) + b"\0" * 4) == (1, 2, 3)
    assert one(METADATA, -2) == encode(0, -2, 0)
    assert pending_key("vol-client-2") == "trusted.afr.vol-client-2"


def _matrix(values: dict[int, dict[str, bytes]]) -> Matrix:
    return Matrix.build(KEYS, values)


def test_clean_copies_are_all_sources() -> None:
    v = judge(_matrix({0: {}, 1: {}, 2: {}}), DATA, [0, 1, 2])
    assert v.sources == {0, 1, 2} and not v.sinks and not v.split_brain and not v.needs_heal


def test_accused_copy_is_a_sink() -> None:
    m = _matrix({0: {KEYS[2]: encode(3)}, 1: {KEYS[2]: encode(3)}, 2: {}})
    v = judge(m, DATA, [0, 1, 2])
    assert v.sources == {0, 1} and v.sinks == {2} and not v.split_brain
    assert judge(m, METADATA, [0, 1, 2]).sinks == frozenset()  # kinds are judged apart


def test_mutual_accusation_is_split_brain() -> None:
    m = _matrix({0: {KEYS[1]: encode(1)}, 1: {KEYS[0]: encode(1)}})
    v = judge(m, DATA, [0, 1])
    assert v.split_brain and not v.sources and v.sinks == {0, 1}
    m3 = _matrix({0: {KEYS[1]: encode(1)}, 1: {KEYS[0]: encode(1)}, 2: {}})
    assert judge(m3, DATA, [0, 1, 2]).sources == {2}  # a third, unaccused copy decides


def test_accusations_of_absent_children_do_not_make_sinks() -> None:
    m = _matrix({0: {KEYS[2]: encode(1)}, 1: {KEYS[2]: encode(1)}})
    v = judge(m, DATA, [0, 1])
    assert v.sources == {0, 1} and not v.sinks


def test_arbiter_is_never_a_data_source() -> None:
    m = _matrix({0: {KEYS[1]: encode(1)}, 1: {KEYS[0]: encode(1)}, 2: {KEYS[0]: encode(1)}})
    v = judge(m, DATA, [1, 2], never_source=[2])
    assert v.sources == {1}
    m2 = _matrix({2: {KEYS[1]: encode(1)}, 1: {}})
    v2 = judge(m2, DATA, [1, 2], never_source=[2])
    assert v2.sources == frozenset() and v2.sinks == {1} and not v2.split_brain
    assert 2 in judge(m2, METADATA, [1, 2]).sources  # the arbiter is a metadata source


def test_dirty_marks() -> None:
    m = _matrix({0: {DIRTY_KEY: encode(1)}, 1: {}})
    v = judge(m, DATA, [0, 1])
    assert v.dirty == {0} and v.sources == {0, 1} and v.needs_heal
    assert not judge(m, ENTRY, [0, 1]).needs_heal


def test_blame_deltas() -> None:
    assert blame(KEYS, ENTRY, [2, 0]) == {KEYS[0]: encode(0, 0, 1), KEYS[2]: encode(0, 0, 1)}


def _iatt(size: int, mtime: int, mode: int = 0o100644) -> Iatt:
    return Iatt(Gfid.random(), mode, size=size, mtime_ns=mtime, ctime_ns=mtime)


@pytest.mark.parametrize(
    ("policy", "winner"), [("size", 0), ("bigger-file", 0), ("mtime", 1), ("latest-mtime", 1), ("ctime", 1)]
)
def test_policies(policy: str, winner: int) -> None:
    iatts = {0: _iatt(100, 1), 1: _iatt(10, 2)}
    assert choose_by_policy(policy, [0, 1], iatts, 2) == winner


def test_policies_that_cannot_decide() -> None:
    tie = {0: _iatt(5, 1), 1: _iatt(5, 1)}
    assert choose_by_policy("size", [0, 1], tie, 2) is None
    assert choose_by_policy("none", [0, 1], tie, 2) is None
    three = {0: _iatt(5, 1), 1: _iatt(5, 1), 2: _iatt(9, 3)}
    assert choose_by_policy("majority", [0, 1, 2], three, 3) == 0
    assert choose_by_policy("majority", [0, 2], {0: three[0], 2: three[2]}, 3) is None
