"""Real `mortard` processes for tests: started in their own process group, driven through the HTTP
API and the CLI (in-process), and killed for sure at teardown: every process whose command line
mentions the test's base directory (daemon, etcd member, bricks) gets SIGKILL."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mortar.cli.main import main as cli_main
from mortar.mgmt.model import MgmtError
from mortar.mgmt.rest import call_sync


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        port: int = s.getsockname()[1]
        return port


def processes_mentioning(text: str) -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_all_under(base: Path) -> None:
    """SIGKILL every process started for this test (they all carry `base` in their arguments)."""
    for _ in range(5):
        pids = processes_mentioning(str(base))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@dataclass
class CliRun:
    status: int
    out: str
    err: str


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (MgmtError, OSError, KeyError, IndexError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Mortard:
    """One node daemon under `base/name`, listening on `addr:port` (optionally in a netns)."""

    def __init__(
        self,
        base: Path,
        name: str,
        addr: str = "127.0.0.1",
        port: int = 0,
        netns: str = "",
        nbd: bool = False,
    ) -> None:
        self.base = base
        self.name = name
        self.addr = addr
        self.port = port or free_port(addr if not netns else "127.0.0.1")
        self.netns = netns
        self.workdir = base / name / "work"
        self.logdir = base / name / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []
        #: the NBD server's TCP port (its socket is WORKDIR/run/nbd.sock); without `nbd` it is off, so
        #: the many daemons of the suite neither run one each nor fight over port 10809
        self.nbd_port = free_port(addr if not netns else "127.0.0.1") if nbd else 0

    @property
    def remote(self) -> str:
        return f"{self.addr}:{self.port}"

    def start(self, timeout: float = 30.0, store: bool = True) -> Mortard:
        """Start and wait until the API answers (and, with `store`, until the pool's store is)."""
        args = [
            sys.executable, "-m", "mortar.mgmt.daemon", "--foreground",
            "--workdir", str(self.workdir), "--logdir", str(self.logdir),
            "--listen", self.addr, "--port", str(self.port), *self.extra,
            *(["--nbd-port", str(self.nbd_port)] if self.nbd_port else ["--no-nbd"]),
        ]  # fmt: skip
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.logdir / "stderr.txt", "ab") as err:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        wait_for(self._ready, timeout, what=f"mortard {self.name} to answer")
        if store:
            self.wait_store(timeout)
        return self

    def wait_store(self, timeout: float = 60.0) -> None:
        wait_for(
            lambda: self.api("GET", "/v1/node", timeout=5)["store_ready"],
            timeout,
            what=f"{self.name}'s store",
        )

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"mortard {self.name} exited: {(self.logdir / 'stderr.txt').read_text()[-2000:]}"
            )
        return bool(self.api("GET", "/v1/node", timeout=2)["uuid"])

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 120
    ) -> dict[str, Any]:
        return call_sync(self.addr, self.port, method, path, body, timeout=timeout)

    def cli(self, *args: str) -> CliRun:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli_main(["--remote-host", self.remote, *args])
        return CliRun(status, out.getvalue(), err.getvalue())

    def ok(self, *args: str) -> str:
        """Run a CLI command that must succeed; its stdout."""
        run = self.cli(*args)
        assert run.status == 0, f"mortar {' '.join(args)} failed ({run.status}): {run.err}"
        return run.out

    def fails(self, *args: str) -> str:
        """Run a CLI command that must fail with one line on stderr; that line."""
        run = self.cli(*args)
        assert run.status != 0, f"mortar {' '.join(args)} succeeded: {run.out}"
        lines = run.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mortar: "), run.err
        return lines[0]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def daemon_pids(self) -> list[int]:
        return [p for p in processes_mentioning(str(self.workdir)) if b"mortar.mgmt.daemon" in _cmdline(p)]

    def etcd_pids(self) -> list[int]:
        return [p for p in processes_mentioning(str(self.workdir / "etcd")) if b"--data-dir" in _cmdline(p)]

    def brick_pids(self) -> list[int]:
        return [p for p in processes_mentioning(str(self.workdir)) if b"mortar.mgmt.brick" in _cmdline(p)]

    def kill(self, with_etcd: bool = True) -> None:
        """SIGKILL the daemon (and its etcd member): a crash; its bricks keep running."""
        for pid in self.daemon_pids() + (self.etcd_pids() if with_etcd else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        wait_for(lambda: not self.etcd_pids() or not with_etcd, 10, what="etcd to exit")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
