"""debug/error-gen over a real brick: injected failures, the down switch (ENOTCONN, events, locks
released, stale fds) and the counters."""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, Fd, Flock, Loc, LockCmd, LockType
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.options import OptionError
from mortar.core.translator import Event, Translator
from mortar.graph.builder import from_text
from mortar.xlators.debug.error_gen import DOWN_KEY, STATS_KEY, ErrorGenTranslator, parse_errno
from mortar.xlators.features.locks import LocksTranslator
from mortar.xlators.storage.posix import PosixTranslator

VOLUME_ID = str(uuid.UUID(int=0xE66))


@pytest.fixture
async def brick(tmp_path: Path) -> AsyncIterator[LocksTranslator]:
    posix = PosixTranslator(
        "posix",
        {
            "directory": str(tmp_path / "b"),
            "volume-id": VOLUME_ID,
            "brick-create": "on",
            "health-check-interval": "0",
        },
    )
    locks = LocksTranslator("locks", {}, [posix])
    await posix.init()
    await locks.init()
    yield locks
    await locks.fini()
    await posix.fini()


async def _create(xl: ErrorGenTranslator, name: str) -> Fd:
    gfid = Gfid.random()
    fd = Fd(gfid)
    loc = Loc("/" + name, pargfid=ROOT_GFID, name=name)
    await xl.create(loc, os.O_RDWR, 0o644, 0, fd, {GFID_REQ: bytes(gfid)})
    return fd


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def notify(self, event: Event, source: object, data: object = None) -> None:
        self.events.append(event)


async def test_passes_everything_by_default(brick: LocksTranslator) -> None:
    eg = ErrorGenTranslator("eg", {}, [brick])
    fd = await _create(eg, "f")
    await eg.writev(fd, b"hello", 0, 0)
    assert bytes((await eg.readv(fd, 5, 0, 0)).data) == b"hello"
    await eg.release(fd)
    assert eg.counts["writev"] == 1 and eg.counts["create"] == 1 and eg.bytes_written == 5
    stats = json.loads((await eg.getxattr(Loc("/", gfid=ROOT_GFID), STATS_KEY)).xattrs[STATS_KEY])
    assert stats["counts"]["readv"] == 1 and stats["down"] is False


async def test_failure_rate_and_enabled_fops(brick: LocksTranslator) -> None:
    eg = ErrorGenTranslator("eg", {"failure": "50", "error-no": "ENOSPC", "enable": "writev"}, [brick])
    fd = await _create(eg, "f")
    outcomes = []
    for i in range(6):
        try:
            await eg.writev(fd, b"x", i, 0)
            outcomes.append("ok")
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            outcomes.append("fail")
    assert outcomes == ["ok", "fail"] * 3  # deterministic: one call in two
    for _ in range(4):
        await eg.fstat(fd)  # not enabled: never fails
    assert eg.injected == {"writev": 3}
    await eg.release(fd)


async def test_random_failures_follow_the_seed(brick: LocksTranslator) -> None:
    async def run() -> list[bool]:
        eg = ErrorGenTranslator("eg", {"failure": "30", "random-failure": "on", "random-seed": "7"}, [brick])
        seen = []
        for _ in range(40):
            try:
                await eg.statfs(Loc("/", gfid=ROOT_GFID))
                seen.append(True)
            except FopError as exc:
                assert exc.errno == errno.EIO
                seen.append(False)
        return seen

    first = await run()
    assert first == await run() and True in first and False in first


async def test_down_switch(brick: LocksTranslator) -> None:
    eg = ErrorGenTranslator("eg", {}, [brick])
    listener = Recorder()
    eg.parents.append(listener)
    fd = await _create(eg, "f")
    token = call_context.set(CallContext(client="c1", lk_owner=b"o1"))
    try:
        await eg.inodelk("dom", Loc("/f", gfid=fd.gfid), LockCmd.SETLK, Flock(LockType.WRLCK))
    finally:
        call_context.reset(token)
    eg.set_down(True)
    assert listener.events == [Event.CHILD_DOWN]
    with pytest.raises(FopError) as exc:
        await eg.fstat(fd)
    assert exc.value.errno == errno.ENOTCONN
    # the brick released the locks of the client whose "connection" died
    other = call_context.set(CallContext(client="c2", lk_owner=b"o2"))
    try:
        await brick.inodelk("dom", Loc("/f", gfid=fd.gfid), LockCmd.SETLK, Flock(LockType.WRLCK))
    finally:
        call_context.reset(other)
    await eg.setxattr(Loc("/", gfid=ROOT_GFID), {DOWN_KEY: b"0"}, 0)
    assert listener.events == [Event.CHILD_DOWN, Event.CHILD_UP] and not eg.down
    with pytest.raises(FopError) as exc:
        await eg.fstat(fd)  # opened before the child went down: stale, as after a reconnect
    assert exc.value.errno == errno.EBADF
    await eg.open(Loc("/f", gfid=fd.gfid), os.O_RDWR, fd)  # a reopen makes it usable again
    assert (await eg.fstat(fd)).iatt.gfid == fd.gfid
    await eg.release(fd)


def test_options_are_checked() -> None:
    assert parse_errno("EIO") == errno.EIO and parse_errno("28") == 28
    with pytest.raises(OptionError):
        parse_errno("EWHATEVER")
    with pytest.raises(OptionError):
        ErrorGenTranslator("eg", {"enable": "writev,nonsense"}, [Translator("child")])
    with pytest.raises(OptionError):
        ErrorGenTranslator("eg", {"error-no": "EBOGUS"}, [Translator("child")])
    with pytest.raises(ValueError):
        ErrorGenTranslator("eg", {}, [])


async def test_built_from_a_volfile(tmp_path: Path) -> None:
    graph = from_text(
        f"""
volume p
    type storage/posix
    option directory {tmp_path / "b"}
    option volume-id {VOLUME_ID}
    option brick-create on
    option health-check-interval 0
end-volume

volume eg
    type debug/error-gen
    option failure 100
    option error-no EROFS
    option enable mkdir
    subvolumes p
end-volume
"""
    )
    await graph.start()
    try:
        top = graph.top
        assert isinstance(top, ErrorGenTranslator)
        with pytest.raises(FopError) as exc:
            await top.mkdir(Loc("/d", pargfid=ROOT_GFID, name="d"), 0o755, 0, {GFID_REQ: os.urandom(16)})
        assert exc.value.errno == errno.EROFS
        assert not (tmp_path / "b" / "d").exists()
    finally:
        await graph.stop()
