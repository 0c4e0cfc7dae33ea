"""Brick supervision with real `mortar-brick` processes: start, report, restart after a crash
(with backoff, reported offline meanwhile), reload on a new volfile, adopt after the daemon
restarts, stop."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mortar.mgmt.supervisor import BrickProcess, BrickRun, Supervisor
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile
from tests.integration.harness import alive, kill_all_under

pytestmark = pytest.mark.timeout(90)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[bool, int, int, str]] = []
        self.created: list[BrickRun] = []
        self.changed = asyncio.Event()

    def publish(self, proc: BrickProcess) -> None:
        st = proc.status
        self.events.append((st.online, st.pid, st.port, st.error))
        self.changed.set()

    async def until(self, predicate: object, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()


def _run(tmp_path: Path, desc: VolumeDescription, create: bool = True) -> BrickRun:
    return BrickRun("vol", 0, "127.0.0.1", desc.bricks[0].path, brick_volfile(desc, 0, create=create),
                    desc.brick_volfile_name(0), creating=create)  # fmt: skip


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[Supervisor, Recorder, VolumeDescription]]:
    rec = Recorder()
    sup = Supervisor(tmp_path / "work", tmp_path / "log", rec.publish, rec.created.append)
    desc = VolumeDescription("vol", str(uuid.uuid4()), [Brick("127.0.0.1", str(tmp_path / "brick"))])
    try:
        yield sup, rec, desc
    finally:
        await sup.stop_all()
        kill_all_under(tmp_path)


async def test_start_crash_restart_reload_stop(
    setup: tuple[Supervisor, Recorder, VolumeDescription], tmp_path: Path
) -> None:
    sup, rec, desc = setup
    run = _run(tmp_path, desc)
    await sup.ensure([run])
    await rec.until(lambda: rec.events and rec.events[-1][0])
    _, pid, port, _ = rec.events[-1]
    assert pid > 0 and port > 0
    assert [r.path for r in rec.created] == [run.path]
    assert os.getxattr(run.path, "trusted.mortar.volume-id") == uuid.UUID(desc.volume_id).bytes
    proc = sup.find("vol", run.path)
    assert (
        proc is not None
        and proc.log_file == tmp_path / "log" / "bricks" / f"{run.path.strip('/').replace('/', '-')}.log"
    )

    os.kill(pid, signal.SIGKILL)
    await rec.until(lambda: not rec.events[-1][0])
    offline = rec.events[-1]
    assert offline[1] == 0 and "signal 9" in offline[3]
    assert sup.status("vol")[0].online is False and sup.status("vol")[0].restarts == 1
    await rec.until(lambda: rec.events[-1][0])
    assert rec.events[-1][1] not in (0, pid)

    # a new volfile for the same brick: SIGHUP, same process, options applied in place
    desc.xlator_options = {"storage/posix": {"reserve": "4"}}
    new_pid = rec.events[-1][1]
    await sup.ensure([_run(tmp_path, desc, create=False)])
    text = proc.volfile_path.read_text()
    assert "reserve 4" in text and "brick-create" not in text
    async with asyncio.timeout(10):
        while "reloaded" not in proc.log_file.read_text():
            await asyncio.sleep(0.05)
    assert sup.status("vol")[0].pid == new_pid

    await sup.ensure([])
    assert sup.status("vol") == []
    assert rec.events[-1][0] is False
    assert not alive(new_pid)


async def test_a_brick_that_cannot_start_is_retried_and_reported(
    setup: tuple[Supervisor, Recorder, VolumeDescription], tmp_path: Path
) -> None:
    sup, rec, desc = setup
    (tmp_path / "brick").mkdir()
    (tmp_path / "brick" / "someone-elses-file").write_text("x")  # not empty, no marker: refused
    await sup.ensure([_run(tmp_path, desc)])
    await rec.until(lambda: len(rec.events) >= 2, timeout=30)  # first attempt, then the retry after 1 s
    assert all(not online for online, *_ in rec.events)
    assert "not empty" in rec.events[0][3]
    assert rec.created == []


async def test_adopts_bricks_left_running(
    setup: tuple[Supervisor, Recorder, VolumeDescription], tmp_path: Path
) -> None:
    sup, rec, desc = setup
    run = _run(tmp_path, desc)
    await sup.ensure([run])
    await rec.until(lambda: rec.events and rec.events[-1][0])
    _, pid, port, _ = rec.events[-1]
    await sup.detach_all()  # the daemon goes away; the brick stays
    os.kill(pid, 0)

    rec2 = Recorder()
    sup2 = Supervisor(tmp_path / "work", tmp_path / "log", rec2.publish, rec2.created.append)
    try:
        await sup2.ensure([_run(tmp_path, desc, create=False)])
        await rec2.until(lambda: rec2.events and rec2.events[-1][0])
        assert rec2.events[-1][1:3] == (pid, port)
        os.kill(pid, signal.SIGKILL)  # an adopted brick that dies is noticed and restarted too
        await rec2.until(lambda: not rec2.events[-1][0])
        await rec2.until(lambda: rec2.events[-1][0])
        assert rec2.events[-1][1] != pid
    finally:
        await sup2.stop_all()
