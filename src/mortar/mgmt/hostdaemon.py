"""A process mortard runs once per host (the NBD server, the self-heal daemon): started, adopted
across mortard restarts by pid file, restarted with backoff when it dies, stopped or left running.

Such a process outlives mortard on purpose: it carries clients (VM disks, heals in progress) that a
management restart must not cut off. So mortard finds it again by its pid file and checks, in
/proc, that the pid still names *this* daemon's process (pid files outlive their processes, pids
get reused). Subclasses say what differs: the command line, what marks their process as this
daemon's, and what has to be cleaned before a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mortar.mgmt.supervisor import BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER

log = logging.getLogger(__name__)


def proc_cmdline(pid: int) -> list[bytes] | None:
    """The process's arguments, or None when it is gone (or a zombie)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state == "Z" else cmdline


class HostDaemon:
    """Keeps one Python module running as this host's daemon process while `wanted`.

    `module` runs as `python -m module`; a process is ours when its command line names the module
    and `marker` (a path only this mortard's instance uses: its socket or state file).
    """

    #: what the logs call it ("NBD server")
    what = "host daemon"
    #: seconds a SIGTERMed process gets before SIGKILL
    stop_timeout = 10.0
    #: seconds between checks that the process still runs
    poll_interval = 1.0

    def __init__(self, module: str, marker: Path, pid_file: Path, log_file: Path) -> None:
        self.module = module
        self.marker = marker
        self.pid_file = pid_file
        self.log_file = log_file
        self.wanted = False
        self.pid = 0
        self.restarts = 0
        #: why it is not running, for status ("" while it runs)
        self.error = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ---- hooks ---------------------------------------------------------------------------------

    def args(self) -> list[str]:
        """The process's arguments after the interpreter (`-m MODULE ...`)."""
        raise NotImplementedError

    def replace_reason(self) -> str:
        """Why the adopted process (`self.pid`) must be stopped rather than kept; "" to keep it."""
        return ""

    def before_start(self) -> None:
        """Clean up what a dead process left that would mislead readers of the new one."""

    def where(self) -> str:
        """Where it serves, for the start log line ("" when there is nothing to say)."""
        return ""

    # ---- the process ---------------------------------------------------------------------------

    def is_ours(self, pid: int) -> bool:
        """`pid` is this daemon's process (pid files outlive their processes)."""
        cmdline = proc_cmdline(pid)
        return cmdline is not None and self.module.encode() in cmdline and os.fsencode(self.marker) in cmdline

    def runs_current_args(self, pid: int) -> bool:
        """`pid` was started with the command line `args()` gives now (its settings did not change)."""
        cmdline = proc_cmdline(pid) or []
        return [os.fsdecode(a) for a in cmdline[1:] if a] == self.args()

    def is_running(self) -> bool:
        if self._proc is not None and self._proc.pid == self.pid:
            return self._proc.poll() is None
        return bool(self.pid) and self.is_ours(self.pid)

    def _adopt(self) -> int:
        try:
            pid = int(self.pid_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0
        return pid if pid and self.is_ours(pid) else 0

    def _spawn(self) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.before_start()
        with open(self.log_file, "ab") as err:
            self._proc = subprocess.Popen(
                [sys.executable, *self.args()], stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        where = self.where()
        log.info("started the %s (pid %d)%s", self.what, self._proc.pid, f": {where}" if where else "")
        return self._proc.pid

    # ---- keeping it running --------------------------------------------------------------------

    def set_wanted(self, wanted: bool) -> None:
        """Run (adopt, or start) the process, or stop it, from now on; the keeper task does it."""
        self.wanted = wanted
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"{self.what} keeper")
        self._wake.set()

    async def _idle(self, timeout: float | None) -> None:
        """Wait `timeout` seconds, or until `set_wanted` wakes the keeper."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _keep(self) -> None:
        self.pid = self._adopt()
        if self.pid and (why := self.replace_reason()):
            log.info("stopping the running %s (pid %d): %s", self.what, self.pid, why)
            await self.stop()
        elif self.pid:
            log.info("adopted the running %s (pid %d)", self.what, self.pid)
        backoff = BACKOFF_FIRST
        started = time.monotonic()
        while True:
            self._wake.clear()  # before reading `wanted`: a change from here on ends the next _idle
            if self.wanted and not self.is_running():
                if self.pid:  # it died: back off before the next start
                    self.restarts += 1
                    self.error = f"exited; restarting in {backoff:g}s (see {self.log_file})"
                    log.warning("the %s (pid %d) exited; restarting in %gs", self.what, self.pid, backoff)
                    self.pid = 0
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    if not self.wanted:
                        continue
                try:
                    self.pid = self._spawn()
                    self.error = ""
                    started = time.monotonic()
                except OSError as exc:
                    self.error = f"cannot start: {exc}"
                    log.error("cannot start the %s: %s", self.what, exc)
                    await self._idle(backoff)
                    continue
            elif not self.wanted and self.pid:
                await self.stop()
            if self.pid and time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            # nothing to watch while it is not wanted: sleep until that changes
            await self._idle(self.poll_interval if self.pid or self.wanted else None)

    async def stop(self) -> None:
        """SIGTERM the process and wait for it (SIGKILL after `stop_timeout`)."""
        pid, self.pid = self.pid, 0
        if not pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while self.is_ours(pid) and time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid and self._proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if self.is_ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None and self._proc.pid == pid:
            await asyncio.to_thread(self._proc.wait)
        log.info("stopped the %s (pid %d)", self.what, pid)

    async def detach(self) -> None:
        """mortard stops: leave the process running (the next mortard adopts it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
