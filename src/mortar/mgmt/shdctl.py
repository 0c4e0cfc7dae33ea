"""mortard's side of the self-heal daemon: run one `mortar-shd` on this host while some started
replicated volume has bricks here, restart it if it dies, and talk to it over its unix socket.

Like bricks, the heal daemon outlives a mortard restart: the next mortard adopts it by pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from mortar.mgmt.model import MgmtError
from mortar.mgmt.supervisor import BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER

log = logging.getLogger(__name__)

MODULE = "mortar.mgmt.shd"


def option(info: dict[str, Any], key: str, default: str) -> str:
    return str(info.get("options", {}).get(key, default)).strip().lower()


def wants_shd(info: dict[str, Any], node: str) -> bool:
    """A volume this host's heal daemon looks after (with `cluster.self-heal-daemon off` it still
    answers `heal info` and split-brain resolutions; it only stops crawling on its own)."""
    return (
        info.get("status") == "Started"
        and int(info.get("replica_count", 1)) > 1
        and any(b.get("peer") == node for b in info.get("bricks", []))
    )


def heal_enabled(info: dict[str, Any]) -> bool:
    return option(info, "cluster.self-heal-daemon", "on") in ("on", "true", "yes", "enable", "1")


def _alive_shd(pid: int, socket: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and MODULE.encode() in cmdline and os.fsencode(socket) in cmdline


class ShdManager:
    """Keeps this host's heal daemon running exactly while it has work (`set_wanted`)."""

    def __init__(self, workdir: Path, logdir: Path, node: str, daemon: str) -> None:
        self.node = node
        self.daemon = daemon
        self.socket = workdir / "run" / "shd.sock"
        self.pid_file = workdir / "run" / "shd.pid"
        self.state_dir = workdir / "shd"
        self.log_file = logdir / "shd.log"
        self.wanted = False
        self.pid = 0
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def set_wanted(self, wanted: bool) -> None:
        if wanted != self.wanted:
            log.info("self-heal daemon %s", "wanted" if wanted else "no longer wanted")
        self.wanted = wanted
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep(), name="shd keeper")
        self._wake.set()

    def _adopt(self) -> int:
        try:
            pid = int(self.pid_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0
        return pid if pid and _alive_shd(pid, self.socket) else 0

    def _spawn(self) -> int:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", MODULE, "--node", self.node, "--daemon", self.daemon,
            "--socket", str(self.socket), "--state-dir", str(self.state_dir),
            "--pid-file", str(self.pid_file), "--log-file", str(self.log_file),
        ]  # fmt: skip
        with open(self.log_file, "ab") as err:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        log.info("started the self-heal daemon (pid %d)", self._proc.pid)
        return self._proc.pid

    def _running(self) -> bool:
        if self._proc is not None and self._proc.pid == self.pid:
            return self._proc.poll() is None
        return bool(self.pid) and _alive_shd(self.pid, self.socket)

    async def _keep(self) -> None:
        backoff = BACKOFF_FIRST
        started = 0.0
        self.pid = self._adopt()
        if self.pid:
            log.info("adopted the running self-heal daemon (pid %d)", self.pid)
            started = time.monotonic()
        while True:
            if self.wanted and not self._running():
                if self.pid:  # it died: back off before the next start
                    self.restarts += 1
                    log.warning("the self-heal daemon (pid %d) exited; restarting in %gs", self.pid, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    if not self.wanted:
                        continue
                try:
                    self.pid = self._spawn()
                    started = time.monotonic()
                except OSError as exc:
                    log.error("cannot start the self-heal daemon: %s", exc)
                    self.pid = 0
            elif not self.wanted and self.pid:
                await self.stop()
            if self.pid and time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()

    async def stop(self) -> None:
        """SIGTERM the heal daemon and wait for it (mortard keeps it running otherwise)."""
        pid, self.pid = self.pid, 0
        if not pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive_shd(pid, self.socket) and time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid and self._proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        if _alive_shd(pid, self.socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None and self._proc.pid == pid:
            await asyncio.to_thread(self._proc.wait)
        log.info("stopped the self-heal daemon (pid %d)", pid)

    async def detach(self) -> None:
        """mortard stops: leave the heal daemon running (the next mortard adopts it)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float = 60.0,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """One request to this host's heal daemon; MgmtError when it is not there or refuses."""
        if not self.wanted:
            raise MgmtError("the self-heal daemon does not run on this host (no started replicated volume "
                            "has bricks here, or cluster.self-heal-daemon is off)", 409)  # fmt: skip
        deadline = time.monotonic() + min(timeout, 15.0)
        while True:
            try:
                connector = aiohttp.UnixConnector(path=str(self.socket))
                async with (
                    aiohttp.ClientSession(connector=connector) as s,
                    s.request(
                        method, f"http://shd{path}", json=body, params=params,
                        timeout=aiohttp.ClientTimeout(total=timeout),
                    ) as resp,
                ):  # fmt: skip
                    raw = await resp.read()
                    data: dict[str, Any] = json.loads(raw) if raw else {}
                if resp.status in (404, 503) and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)  # it has not picked the volume up, or connected, yet
                    continue
                if resp.status >= 400:
                    raise MgmtError(str(data.get("error", raw[:200])), resp.status)
                return data
            except (aiohttp.ClientError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise MgmtError(f"the self-heal daemon here does not answer ({exc})", 503) from None
                await asyncio.sleep(0.3)
