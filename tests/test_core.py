"""Core vocabulary: gfids, options, inode table, pass-through fops."""

import errno

import pytest

from mortar.core import FOPS, ROOT_GFID, Gfid, InodeTable, Option, OptionError, Translator
from mortar.core.errors import FopError
from mortar.core.iatt import Iatt


def test_gfid_forms() -> None:
    g = Gfid.random()
    assert Gfid(g.canonical) == g
    assert str(ROOT_GFID) == "00000000-0000-0000-0000-000000000001"
    with pytest.raises(ValueError):
        Gfid(b"short")


@pytest.mark.parametrize(
    ("opt", "raw", "value"),
    [
        (Option("size", 0, ""), "64KiB", 65536),
        (Option("size", 0, ""), "1MB", 1 << 20),
        (Option("bool", False, ""), "enable", True),
        (Option("time", 42, ""), "500ms", 0.5),
        (Option("int", 16, "", min=1, max=64), "32", 32),
        (Option("enum", "auto", "", choices=("none", "auto", "fixed")), "fixed", "fixed"),
    ],
)
def test_option_parse(opt: Option, raw: str, value: object) -> None:
    assert opt.parse(raw) == value


@pytest.mark.parametrize(
    ("opt", "raw"),
    [
        (Option("int", 16, "", min=1, max=64), "65"),
        (Option("int", 16, "", min=1, max=64), "sixteen"),
        (Option("bool", False, ""), "maybe"),
        (Option("size", 0, ""), "12 parsecs"),
        (Option("enum", "a", "", choices=("a", "b")), "c"),
        (Option("path", "/", ""), "relative/dir"),
    ],
)
def test_option_refusals(opt: Option, raw: str) -> None:
    with pytest.raises(OptionError):
        opt.parse(raw)


def test_inode_table_bounded() -> None:
    table = InodeTable(max_dentries=10)
    for i in range(100):
        table.link(ROOT_GFID, f"f{i}", Iatt(Gfid.random(), 0o100644))
    assert len(table) == 11  # ten dentries plus the root
    assert table.find(ROOT_GFID, "f99") is not None
    assert table.find(ROOT_GFID, "f0") is None


class _Answer(Translator):
    type_name = "test/answer"

    async def flush(self, fd, xdata=None):  # type: ignore[no-untyped-def]
        raise FopError(errno.EROFS, "read-only test child")


class _Middle(Translator):
    type_name = "test/middle"


async def test_default_fops_pass_through() -> None:
    top = _Middle("top", children=[_Answer("leaf")])
    with pytest.raises(FopError) as exc:
        await top.flush(None)  # type: ignore[arg-type]
    assert exc.value.errno == errno.EROFS
    assert all(hasattr(Translator, name) for name in FOPS)


def test_unknown_option_refused() -> None:
    with pytest.raises(OptionError):
        _Middle("x", options={"no-such-option": "1"})
