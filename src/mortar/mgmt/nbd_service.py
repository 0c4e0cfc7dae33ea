"""mortard's side of the NBD service: one `mortar-nbdd` per host, serving every started volume of the
pool on TCP (10809 by default) and a unix socket, restarted with backoff if it dies.

Like bricks and the heal daemon, the NBD server outlives a mortard restart and the next mortard
adopts it by pid file: it carries running VMs' disks, and QEMU's NBD client turns a server restart
into guest I/O errors. A server started with other settings (port, address, socket) than the
daemon now has is replaced; with the service turned off (`--no-nbd`) it is stopped.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mortar.mgmt.hostdaemon import HostDaemon

MODULE = "mortar.mgmt.nbdd"
DEFAULT_PORT = 10809  # IANA's NBD port, qemu-nbd's and nbd-server's
DEFAULT_SOCKET = "/run/mortar/nbd.sock"
SYSTEM_WORKDIR = Path("/var/lib/mortar")
STOP_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class NbdConfig:
    """Where this host's NBD server listens; an empty config means the service is off."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0: no TCP listener
    socket: str = ""  # "": no unix socket

    @property
    def enabled(self) -> bool:
        return bool(self.port or self.socket)


def default_socket(workdir: Path) -> str:
    """`/run/mortar/nbd.sock` for the system daemon (workdir /var/lib/mortar), else under the
    workdir's `run/` as the daemon's other sockets are, so daemons on one host never collide."""
    if workdir.resolve() == SYSTEM_WORKDIR:
        return DEFAULT_SOCKET
    return str(workdir.resolve() / "run" / "nbd.sock")


class NbdService(HostDaemon):
    """Keeps this host's NBD server running with `config` (or none when it is off)."""

    what = "NBD server"
    stop_timeout = STOP_TIMEOUT
    poll_interval = 0.5

    def __init__(self, workdir: Path, logdir: Path, daemon: str, config: NbdConfig) -> None:
        self.state_file = workdir / "run" / "nbd.json"
        super().__init__(MODULE, self.state_file, workdir / "run" / "nbd.pid", logdir / "nbd.log")
        self.daemon = daemon
        self.config = config

    def args(self) -> list[str]:
        """The server's arguments after the interpreter (what an adopted process must match)."""
        c = self.config
        out = ["-m", MODULE, "--daemon", self.daemon, "--state-file", str(self.state_file)]
        if c.socket:
            out += ["--socket", c.socket]
        if c.port:
            out += ["--port", str(c.port), "--host", c.host]
        return [*out, "--log-file", str(self.log_file)]

    def replace_reason(self) -> str:
        """A server started with other settings, or while the service is now off, goes."""
        if not self.config.enabled:
            return "the NBD service is off"
        return "" if self.runs_current_args(self.pid) else "its settings changed"

    def before_start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()  # a dead server's state must not read as online

    def where(self) -> str:
        c = self.config
        return ", ".join(
            ([f"tcp {c.host}:{c.port}"] if c.port else []) + ([f"unix {c.socket}"] if c.socket else [])
        )

    def start(self) -> None:
        """Adopt or start the server (and stop a leftover one when the service is off)."""
        self.set_wanted(self.config.enabled)

    # ---- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This host's NBD service as `volume status` shows it. Online: the process runs and has
        said it listens (its state file names its pid)."""
        c = self.config
        out: dict[str, Any] = {
            "enabled": c.enabled,
            "listen": c.host if c.port else "",
            "port": c.port,
            "socket": c.socket,
            "pid": 0,
            "online": False,
            "volumes": [],
            "restarts": self.restarts,
            "error": "" if c.enabled else "the NBD service is off on this host",
        }
        if not c.enabled:
            return out
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            state = {}
        running = self.is_running()
        out["pid"] = self.pid if running else 0
        out["online"] = running and state.get("pid") == self.pid
        if out["online"]:
            out["volumes"] = list(state.get("volumes", []))
        out["error"] = self.error if not out["online"] else ""
        if running and not out["online"] and not self.error:
            out["error"] = "starting"
        return out
