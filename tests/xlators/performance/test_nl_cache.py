"""performance/nl-cache over a real storage/posix brick: absent names answered without a round trip;
other clients' names show up once the cache can no longer prove them absent. (The extension by the
eager entry lock, over replicate, is tested in tests/xlators/cluster/afr/test_entry_lock.py.)"""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Translator
from mortar.graph.registry import translator_class
from mortar.xlators.debug.error_gen import ErrorGenTranslator
from mortar.xlators.performance.nl_cache import NlCacheTranslator
from mortar.xlators.storage.posix import PosixTranslator


@pytest.fixture
async def posix(tmp_path: Path) -> AsyncIterator[PosixTranslator]:
    opts = {"directory": str(tmp_path / "b"), "volume-id": str(uuid.uuid4()), "brick-create": "on"}
    xl = PosixTranslator("posix", {**opts, "health-check-interval": "0"})
    await xl.init()
    yield xl
    await xl.fini()


def client(below: Translator, **opts: Any) -> tuple[NlCacheTranslator, ErrorGenTranslator]:
    gen = ErrorGenTranslator(f"gen-{uuid.uuid4().hex[:6]}", {}, [below])
    return NlCacheTranslator("nl", {k.replace("_", "-"): v for k, v in opts.items()}, [gen]), gen


def named(name: str, parent: Gfid = ROOT_GFID) -> Loc:
    return Loc("/" + name, pargfid=parent, name=name)


async def mkdir(xl: Translator, name: str) -> Gfid:
    gfid = Gfid.random()
    await xl.mkdir(named(name), 0o755, 0, {GFID_REQ: bytes(gfid)})
    return gfid


async def create(xl: Translator, name: str, parent: Gfid) -> Gfid:
    fd = Fd(Gfid.random())
    await xl.create(named(name, parent), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(fd.gfid)})
    await xl.release(fd)
    return fd.gfid


async def absent(xl: Translator, name: str, parent: Gfid) -> bool:
    try:
        await xl.lookup(named(name, parent))
    except FopError as exc:
        assert exc.errno == errno.ENOENT
        return True
    return False


async def test_registered_with_declared_options() -> None:
    assert translator_class("performance/nl-cache") is NlCacheTranslator
    nl = NlCacheTranslator("nl", {"timeout": "3"}, [Translator("t")])
    assert nl.opts["timeout"] == 3.0


async def test_a_new_directory_answers_absent_names_itself(posix: PosixTranslator) -> None:
    nl, gen = client(posix, timeout="60")
    d = await mkdir(nl, "d")
    assert await absent(nl, "f0", d) and await absent(nl, "f1", d)
    assert gen.counts["lookup"] == 0
    gfid = await create(nl, "f0", d)
    assert (await nl.lookup(named("f0", d))).iatt.gfid == gfid  # created here: asked for
    await nl.unlink(named("f0", d), 0)
    assert await absent(nl, "f0", d)
    assert gen.counts["lookup"] == 1


async def test_an_enoent_is_remembered_until_the_timeout(posix: PosixTranslator) -> None:
    nl, gen = client(posix, timeout="0.05")
    assert await absent(nl, "x", ROOT_GFID) and await absent(nl, "x", ROOT_GFID)
    assert gen.counts["lookup"] == 1
    await asyncio.sleep(0.1)
    assert await absent(nl, "x", ROOT_GFID)
    assert gen.counts["lookup"] == 2


async def test_another_clients_name_shows_once_a_change_proves_the_directory_moved(
    posix: PosixTranslator,
) -> None:
    """Client A knows its new directory is empty; B creates x in it; A's next own change there sees
    the directory's mtime is not the one its previous change left, and forgets what it knew."""
    mine, _ = client(posix, timeout="60")
    other, _ = client(posix, timeout="60")
    d = await mkdir(mine, "d")
    await asyncio.sleep(0.02)  # a directory mtime tick apart (coarse kernel clock)
    await create(other, "x", d)
    assert await absent(mine, "x", d)  # not yet provable: within the timeout, as documented
    await asyncio.sleep(0.02)
    await create(mine, "y", d)
    assert not await absent(mine, "x", d)


async def test_a_failed_change_forgets_the_directory(posix: PosixTranslator) -> None:
    nl, gen = client(posix, timeout="60")
    d = await mkdir(nl, "d")
    await create(nl, "a", d)
    with pytest.raises(FopError):
        await nl.mkdir(named("a", d), 0o755, 0, {GFID_REQ: bytes(Gfid.random())})
    assert await absent(nl, "b", d)
    assert gen.counts["lookup"] == 1
