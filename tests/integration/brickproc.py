"""Real `mortar-brick` processes for integration tests: start, SIGKILL, restart on the same port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile

BIN = Path(sys.executable).parent


class BrickProcess:
    """One brick of a test volume, served by its own `mortar-brick` process."""

    def __init__(self, workdir: Path, desc: VolumeDescription, index: int) -> None:
        self.workdir, self.desc, self.index = workdir, desc, index
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"brick-{index}.log"

    @property
    def port(self) -> int:
        return self.desc.bricks[self.index].port

    def start(self, timeout: float = 30) -> None:
        """Start (or restart on the same port) and wait until it listens."""
        brick = self.desc.bricks[self.index]
        volfile = self.workdir / f"brick-{self.index}.vol"
        volfile.write_text(brick_volfile(self.desc, self.index, create=True))
        port_file = self.workdir / f"brick-{self.index}.port"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                str(BIN / "mortar-brick"),
                "--volfile",
                str(volfile),
                "--port-file",
                str(port_file),
                "--log-file",
                str(self.log),
            ],
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"brick exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"brick did not listen within {timeout} s")
            time.sleep(0.02)
        port = int(port_file.read_text())
        self.desc.bricks[self.index] = Brick(brick.host, brick.path, port)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class TestVolume:
    """A volume of real brick processes on loopback, and the client volfile to reach it."""

    __test__ = False  # not a pytest class

    def __init__(self, workdir: Path, bricks: int = 1, replica: int = 1, **opts: str) -> None:
        self.workdir = workdir
        self.desc = VolumeDescription(
            "itest",
            str(uuid.uuid4()),
            [Brick("127.0.0.1", str(workdir / f"b{i}")) for i in range(bricks)],
            replica_count=replica,
        )
        if opts:
            self.desc.xlator_options = {"protocol/client": dict(opts)}
        self.bricks = [BrickProcess(workdir, self.desc, i) for i in range(bricks)]

    def start(self) -> Path:
        for b in self.bricks:
            b.start()
        return self.write_client_volfile()

    def write_client_volfile(self) -> Path:
        path = self.workdir / "client.vol"
        path.write_text(client_volfile(self.desc))
        return path

    def stop(self) -> None:
        for b in self.bricks:
            b.kill()
