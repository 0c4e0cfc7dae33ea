"""HostDaemon with a real (tiny) child process: start, adopt by pid file, restart after a crash,
stop while unwanted and start again, replace on changed settings, refuse a foreign pid, retry a
failed start. The NBD server and heal daemon built on it run in tests/integration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mortar.mgmt.hostdaemon import HostDaemon, proc_cmdline
from tests.waiting import until

MODULE = "mortar_test_hostdaemon_child"
CHILD = "import sys, time\ntime.sleep(60)  # bounded: a leaked child goes away on its own\n"


class Sleeper(HostDaemon):
    """A host daemon whose process only sleeps; `setting` stands for its configuration."""

    what = "test daemon"
    stop_timeout = 5.0
    poll_interval = 0.05

    def __init__(self, workdir: Path, setting: str = "a") -> None:
        marker = workdir / "run" / "sleeper.sock"
        super().__init__(MODULE, marker, workdir / "run" / "sleeper.pid", workdir / "log" / "sleeper.log")
        self.setting = setting
        self.cleaned = 0

    def args(self) -> list[str]:
        return ["-m", MODULE, str(self.marker), self.setting]

    def replace_reason(self) -> str:
        return "" if self.runs_current_args(self.pid) else "its settings changed"

    def before_start(self) -> None:
        self.cleaned += 1


@contextlib.asynccontextmanager
async def kept(d: Sleeper) -> AsyncIterator[Sleeper]:
    """`d` wanted (so its keeper runs) for the block; stopped after it."""
    d.set_wanted(True)
    try:
        yield d
    finally:
        await d.detach()
        await d.stop()


@pytest.fixture
async def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """A workdir whose children can import MODULE; every child still running at the end is killed."""
    (tmp_path / f"{MODULE}.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    yield tmp_path
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        cmdline = proc_cmdline(pid)
        if cmdline and MODULE.encode() in cmdline and os.fsencode(tmp_path) in b" ".join(cmdline):
            os.kill(pid, signal.SIGKILL)


async def test_start_detach_adopt_stop(workdir: Path) -> None:
    first = Sleeper(workdir)
    first.set_wanted(True)
    await until(first.is_running, "the first start")
    pid = first.pid
    assert first.pid_file.read_text().strip() == str(pid) and first.is_ours(pid) and first.cleaned == 1
    await first.detach()
    assert proc_cmdline(pid) is not None  # mortard going away leaves it running

    async with kept(Sleeper(workdir)) as second:
        await until(lambda: second.pid == pid, "the adoption")
        await asyncio.sleep(0.2)  # a few polls: still the adopted process, nothing started
        assert second.pid == pid and second.cleaned == 0 and second.restarts == 0
    assert second.pid == 0 and not second.is_ours(pid)


async def test_crash_restarts_with_backoff(workdir: Path) -> None:
    async with kept(Sleeper(workdir)) as d:
        await until(d.is_running, "the start")
        old = d.pid
        os.kill(old, signal.SIGKILL)
        await until(lambda: d.restarts == 1, "the crash noticed")
        assert d.error.startswith("exited; restarting in 1s")
        await until(lambda: d.is_running() and d.pid != old, "the restart")
        assert d.error == "" and d.cleaned == 2


async def test_unwanted_stops_and_wanted_starts_again(workdir: Path) -> None:
    async with kept(Sleeper(workdir)) as d:
        await until(d.is_running, "the start")
        old = d.pid
        d.set_wanted(False)
        await until(lambda: d.pid == 0 and not d.is_ours(old), "the stop")
        await asyncio.sleep(0.2)  # idle while unwanted: nothing restarts it
        assert d.pid == 0 and d.restarts == 0
        d.set_wanted(True)  # the keeper sleeps without a timeout now: only the wake-up starts it
        await until(d.is_running, "the start after the wake-up", timeout=5.0)
        assert d.pid != old and d.restarts == 0


async def test_changed_settings_replace_the_adopted_process(workdir: Path) -> None:
    first = Sleeper(workdir, "a")
    first.set_wanted(True)
    await until(first.is_running, "the first start")
    old = first.pid
    await first.detach()

    async with kept(Sleeper(workdir, "b")) as second:
        # a process just forked shows its parent's command line until its exec is done
        await until(
            lambda: second.is_running() and second.pid != old and second.runs_current_args(second.pid),
            "the replacement, running the new settings",
        )
        assert not second.is_ours(old)
        assert not second.runs_current_args(old)


async def test_a_pid_file_naming_another_process_is_not_adopted(workdir: Path) -> None:
    d = Sleeper(workdir)
    d.pid_file.parent.mkdir(parents=True)
    d.pid_file.write_text(f"{os.getpid()}\n")  # pids get reused: this one is the test runner
    assert not d.is_ours(os.getpid())
    async with kept(d):
        await until(d.is_running, "a start of its own")
        assert d.pid != os.getpid() and d.cleaned == 1


async def test_a_failed_start_is_retried(workdir: Path) -> None:
    d = Sleeper(workdir)
    d.log_file.parent.parent.mkdir(parents=True, exist_ok=True)
    d.log_file.parent.write_text("a file where the log directory goes")
    async with kept(d):
        await until(lambda: d.error.startswith("cannot start"), "the failed start")
        assert d.pid == 0 and not d.is_running()
        d.log_file.parent.unlink()
        await until(d.is_running, "the retry")
        assert d.error == ""
