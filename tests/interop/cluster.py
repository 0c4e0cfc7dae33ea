"""A mortar volume on loopback for tests that drive real clients: bricks as `mortar-brick` processes.

Replica 3 when `cluster/replicate` can be built, one brick until then (`REPLICA`). A brick can be
SIGKILLed and restarted on the same port, as a crashed brick comes back under its supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mortar.graph.registry import UnknownTypeError, translator_class
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile

BIN = Path(sys.executable).parent


def replicate_available() -> bool:
    """cluster/replicate is importable (it is being written alongside these tests)."""
    try:
        translator_class("cluster/replicate")
    except UnknownTypeError:
        return False
    return True


REPLICA = 3 if replicate_available() else 1


@dataclass
class BrickProcess:
    index: int
    volfile: Path
    port_file: Path
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, timeout: float = 30) -> None:
        self.port_file.unlink(missing_ok=True)
        cmd = [str(BIN / "mortar-brick"), "--volfile", str(self.volfile), "--port-file", str(self.port_file)]
        cmd += ["--log-file", str(self.log_file), "--log-level", "WARNING"]
        quiet = subprocess.DEVNULL  # it logs to its file
        self.proc = subprocess.Popen(cmd, start_new_session=True, stdout=quiet, stderr=quiet)

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"brick {self.index} did not start:\n{self.log_text()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())

    def kill(self) -> None:
        """SIGKILL: the brick dies with requests in flight, as on a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_file.read_text()
        except OSError:
            return ""


@dataclass
class Cluster:
    """One volume: its bricks and the client volfile that reaches them."""

    workdir: Path
    desc: VolumeDescription
    bricks: list[BrickProcess] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.desc.name

    @property
    def client_volfile(self) -> Path:
        return self.workdir / f"{self.name}.vol"

    def restart(self, index: int) -> None:
        """Start brick `index` again on the port it had (its volfile now names that port)."""
        brick = self.bricks[index]
        brick.kill()
        brick.start()
        brick.wait_ready()

    def logs(self) -> str:
        return "\n".join(f"--- brick {b.index}\n{b.log_text()}" for b in self.bricks)


@contextlib.contextmanager
def cluster(workdir: Path, name: str = "vol", replica: int = REPLICA) -> Iterator[Cluster]:
    """Start `replica` bricks of a new volume (in parallel) and write its client volfile."""
    workdir.mkdir(parents=True, exist_ok=True)
    bricks = [Brick("127.0.0.1", str(workdir / f"brick{i}")) for i in range(replica)]
    desc = VolumeDescription(name, str(uuid.uuid4()), bricks, replica_count=replica)
    vol = Cluster(workdir, desc)
    try:
        for i in range(replica):
            volfile = workdir / f"brick{i}.vol"
            volfile.write_text(brick_volfile(desc, i, create=True))
            proc = BrickProcess(i, volfile, workdir / f"brick{i}.port", workdir / f"brick{i}.log")
            vol.bricks.append(proc)
            proc.start()
        for i, proc in enumerate(vol.bricks):
            proc.wait_ready()
            desc.bricks[i] = Brick("127.0.0.1", bricks[i].path, proc.port)
        for i, proc in enumerate(vol.bricks):  # a restart reuses the port and the stamped directory
            proc.volfile.write_text(brick_volfile(desc, i))
        text = client_volfile(desc)
        # Notice a dead brick within seconds, not GlusterFS's 42 (a killed process resets its
        # connections at once anyway; this bounds a hung one).
        text = text.replace(
            "    type protocol/client\n", "    type protocol/client\n    option ping-timeout 5\n"
        )
        vol.client_volfile.write_text(text)
        yield vol
    finally:
        for proc in vol.bricks:
            proc.stop()


@dataclass
class NbdServe:
    """A running `mortar nbd serve` (the real CLI, as a process) on a unix socket and a TCP port."""

    socket: str
    port: int
    proc: subprocess.Popen[str]
    log_path: Path

    def uri(self, export: str, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://127.0.0.1:{self.port}/{export}"
        return f"nbd+unix:///{export}?socket={self.socket}"

    def log_text(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def nbd_serve(workdir: Path, *args: str, timeout: float = 30) -> Iterator[NbdServe]:
    """`mortar nbd serve ARGS --socket ... --port 0` until the block ends; it must then stop on
    SIGTERM with status 0, having logged no traceback."""
    sock = str(workdir / "nbd.sock")
    log_path = workdir / "nbd.log"
    cmd = [
        str(BIN / "mortar"),
        "nbd",
        "serve",
        *args,
        "--socket",
        sock,
        "--port",
        "0",
        "--log-file",
        str(log_path),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        port = 0
        deadline = time.monotonic() + timeout
        for line in proc.stdout:  # the server prints these lines, then "ready"
            if line.startswith("listening tcp:"):
                port = int(line.rsplit(":", 1)[1])
            if line.strip() == "ready" or time.monotonic() > deadline:
                break
        if not port:
            said = proc.stdout.read() if proc.poll() is not None else ""
            raise RuntimeError(f"mortar nbd serve did not start: {said}")
        server = NbdServe(sock, port, proc, log_path)
        yield server
        assert proc.poll() is None, "the NBD server died"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)  # the server gives requests in flight 20 s
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    output = log_path.read_text() if log_path.exists() else ""
    assert "Traceback" not in output, output
    assert proc.returncode == 0, output
