"""mortard's side of the self-heal daemon: run one `mortar-shd` on this host while some started
replicated volume has bricks here, restart it if it dies, and talk to it over its unix socket.

Like bricks, the heal daemon outlives a mortard restart: the next mortard adopts it by pid file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp

from mortar.mgmt.hostdaemon import HostDaemon
from mortar.mgmt.model import MgmtError

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


class ShdManager(HostDaemon):
    """Keeps this host's heal daemon running exactly while it has work (`set_wanted`)."""

    what = "self-heal daemon"

    def __init__(self, workdir: Path, logdir: Path, node: str, daemon: str) -> None:
        self.socket = workdir / "run" / "shd.sock"
        super().__init__(MODULE, self.socket, workdir / "run" / "shd.pid", logdir / "shd.log")
        self.node = node
        self.daemon = daemon
        self.state_dir = workdir / "shd"

    def args(self) -> list[str]:
        """The heal daemon's arguments after the interpreter (its socket marks it as ours)."""
        return [
            "-m", MODULE, "--node", self.node, "--daemon", self.daemon,
            "--socket", str(self.socket), "--state-dir", str(self.state_dir),
            "--pid-file", str(self.pid_file), "--log-file", str(self.log_file),
        ]  # fmt: skip

    def set_wanted(self, wanted: bool) -> None:
        """Start (or adopt) the heal daemon, or stop it, as this host's volumes need it."""
        if wanted != self.wanted:
            log.info("self-heal daemon %s", "wanted" if wanted else "no longer wanted")
        super().set_wanted(wanted)

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
