"""Volfile grammar: canonical round trips, comments and quoting, and every refusal with its line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mortar.graph.volfile import VolfileError, VolumeSpec, dump, parse

CANONICAL = """\
volume vol-posix
    type storage/posix
    option directory /bricks/b1
    option volume-id 4f4bd3c4-4fd1-4be6-8a3a-3b1f0e9c5d7e
end-volume

volume vol-io-threads
    type performance/io-threads
    option thread-count 16
    subvolumes vol-posix
end-volume

volume vol-server
    type protocol/server
    option auth.addr./bricks/b1.allow *
    option auth.login.secret.password "pass # word"
    subvolumes vol-io-threads
end-volume
"""


def test_canonical_text_round_trips_exactly() -> None:
    specs = parse(CANONICAL, "vol.vol")
    assert [s.name for s in specs] == ["vol-posix", "vol-io-threads", "vol-server"]
    assert [s.line for s in specs] == [1, 7, 13]
    assert specs[2].options["auth.login.secret.password"] == "pass # word"
    assert specs[1].subvolumes == ["vol-posix"]
    assert dump(specs) == CANONICAL


def test_hand_written_layout_comments_and_quotes() -> None:
    text = (
        "# a client volfile written by hand\n"
        "\n"
        "volume brick   # the bottom\n"
        "\ttype storage/posix\n"
        "  option directory /tmp/b1   # trailing comment\n"
        '  option note "  spaced \\"quoted\\" \\\\ value  "\n'
        "  option glob a#b\n"
        "  option words several words  here\n"
        "end-volume # done\r\n"
        "volume top\n"
        "    type debug/io-stats\n"
        "    subvolumes brick\n"
        "end-volume"
    )
    brick, top = parse(text)
    assert brick.line == 3 and top.line == 10
    assert brick.options == {
        "directory": "/tmp/b1",
        "note": '  spaced "quoted" \\ value  ',
        "glob": "a#b",
        "words": "several words  here",
    }
    assert top.subvolumes == ["brick"]
    again = parse(dump([brick, top]))
    assert again == [brick, top]
    assert dump(again) == dump([brick, top])


def test_empty_text_is_no_volumes() -> None:
    assert parse("# nothing\n\n") == []
    assert dump([]) == ""


REFUSALS = [
    ("volume a\n    type storage/posix\n    colour blue\nend-volume\n", 3, "unknown keyword 'colour'"),
    ("option x y\n", 1, "outside a volume block"),
    ("volume a\n    option k v\nend-volume\n", 2, "'type' missing"),
    ("volume a\nend-volume\n", 1, "'type' missing"),
    ("volume a\n    type storage/posix\n    option k v\n    type storage/posix\nend-volume\n", 4, "twice"),
    ("volume a\n    type x/y\n    subvolumes\nend-volume\n", 3, "empty 'subvolumes'"),
    (
        "volume a\n    type x/y\nend-volume\n\nvolume a\n    type x/y\nend-volume\n",
        5,
        "duplicate volume name 'a'",
    ),
    ("volume a\n    type x/y\n    option k 1\n    option k 2\nend-volume\n", 4, "duplicate option 'k'"),
    ("volume a\n    type x/y\n    option k\nend-volume\n", 3, "option 'k' has no value"),
    ("volume a\n    type x/y\n    option k   # only a comment\nend-volume\n", 3, "has no value"),
    ("volume a\n    type x/y\n    subvolumes b\nend-volume\n", 3, "'b' of 'a' is not defined earlier"),
    (
        "volume top\n    type x/y\n    subvolumes leaf\nend-volume\nvolume leaf\n    type x/y\nend-volume\n",
        3,
        "not defined earlier",
    ),
    ("volume a\n    type x/y\n    subvolumes a\nend-volume\n", 3, "lists itself"),
    ("volume a\n    type x/y\n", 1, "missing end-volume"),
    ("volume a\n    type x/y\nvolume b\n    type x/y\nend-volume\n", 3, "missing end-volume"),
    ("volume a\n    type x/y\nend-volume trailing\n", 3, "after end-volume"),
    ("volume a b\n    type x/y\nend-volume\n", 1, "exactly one name"),
    ("volume a\n    type posix\nend-volume\n", 2, "CATEGORY/NAME"),
    ('volume a\n    type x/y\n    option k "open\nend-volume\n', 3, "unterminated"),
    ('volume a\n    type x/y\n    option k "v" extra\nend-volume\n', 3, "after the quoted value"),
    ("volume a\n    type x/y\n    subvolumes\tb b\nend-volume\n", 3, "not defined earlier"),
]


@pytest.mark.parametrize(("text", "line", "reason"), REFUSALS)
def test_refusals_name_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(VolfileError) as info:
        parse(text, "bad.vol")
    err = info.value
    assert (err.filename, err.line) == ("bad.vol", line)
    assert str(err).startswith(f"bad.vol:{line}: ")
    assert reason in err.reason


def test_subvolume_listed_twice_refused() -> None:
    text = "volume a\n    type x/y\nend-volume\nvolume b\n    type x/y\n    subvolumes a a\nend-volume\n"
    with pytest.raises(VolfileError, match="listed twice") as info:
        parse(text)
    assert info.value.line == 6


def test_dump_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError):
        dump([VolumeSpec("has space", "x/y")])
    with pytest.raises(ValueError):
        dump([VolumeSpec("a", "x/y", {"k": "line\nbreak"})])
    with pytest.raises(ValueError):
        dump([VolumeSpec("a", "no-slash")])


# ---- property: any specs survive dump -> parse ------------------------------------------------

_name = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_.:/"), min_size=1, max_size=12)
_type = st.tuples(
    st.text(st.sampled_from("abcdefghij"), min_size=1, max_size=8),
    st.text(st.sampled_from("abcdefghij-_"), min_size=1, max_size=8),
).map(lambda t: f"{t[0]}/{t[1]}")
_value = st.text(st.characters(codec="utf-8", blacklist_characters="\n"), max_size=30)


@st.composite
def _volfiles(draw: st.DrawFn) -> list[VolumeSpec]:
    names = draw(st.lists(_name, min_size=1, max_size=6, unique=True))
    specs: list[VolumeSpec] = []
    for i, name in enumerate(names):
        options = draw(st.dictionaries(_name, _value, max_size=4))
        subs = draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=3)) if i else []
        specs.append(VolumeSpec(name, draw(_type), options, subs))
    return specs


@settings(max_examples=300, deadline=None)
@given(_volfiles())
def test_dump_parse_round_trip(specs: list[VolumeSpec]) -> None:
    text = dump(specs)
    parsed = parse(text)
    assert parsed == specs
    assert [list(s.options) for s in parsed] == [list(s.options) for s in specs]
    assert dump(parsed) == text
