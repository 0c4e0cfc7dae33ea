"""Brick processes: one `mortar-brick` per local brick, started, watched, restarted, stopped.

Each brick gets a task that starts its process (or adopts one a previous incarnation of the daemon
left running, found by its pid file), waits for it to listen, reports where (the port map), and
waits for it to exit. A brick that dies is started again after 1 s, 2 s, 4 s... (capped), and
reported offline meanwhile with its last error. Bricks run in the daemon's process group but
survive the daemon: a restarted daemon adopts them instead of cutting clients off.

Exit is noticed through a pidfd, which works for children and for adopted processes alike.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from mortar.mgmt.volgen import dashed

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a brick that ran this long restarts with the first backoff again


@dataclass(frozen=True, slots=True)
class BrickRun:
    """A local brick that should be running, and the volfile it should run with."""

    volume: str
    index: int
    host: str
    path: str
    volfile: str
    volfile_name: str
    #: set at the brick's first start: the brick directory gets created and stamped
    creating: bool = False
    #: the unix socket it listens on (transport unix), else it picks a TCP port
    socket: str = ""


@dataclass(slots=True)
class BrickStatus:
    volume: str
    index: int
    host: str
    path: str
    pid: int = 0
    port: int = 0
    online: bool = False
    error: str = ""
    restarts: int = 0
    since: float = field(default_factory=time.time)


class BrickStartError(RuntimeError):
    pass


Publish = Callable[["BrickProcess"], None]


def _alive_brick(pid: int, volfile: Path) -> bool:
    """`pid` is a mortar-brick serving `volfile` (pid files outlive their processes)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"mortar.mgmt.brick" in cmdline and os.fsencode(volfile) in cmdline


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _pidfd_exit(pidfd: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


class BrickProcess:
    """One brick's process and the task that keeps it running."""

    def __init__(self, sup: Supervisor, run: BrickRun) -> None:
        self.sup = sup
        self.run = run
        ident = f"{run.volume}-{dashed(run.path)}"
        self.volfile_path = sup.workdir / "vols" / run.volume / run.volfile_name
        self.pid_file = sup.workdir / "run" / f"{ident}.pid"
        self.port_file = sup.workdir / "run" / f"{ident}.port"
        self.err_file = sup.workdir / "run" / f"{ident}.err"
        self.log_file = sup.logdir / "bricks" / f"{dashed(run.path)}.log"
        self.status = BrickStatus(run.volume, run.index, run.host, run.path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self._exit: asyncio.Task[None] | None = None  # done when the process has exited
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.run.volume, self.run.path

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"brick {self.run.path}")

    # ---- the run loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        backoff = BACKOFF_FIRST
        first = True
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                await self._start_or_adopt(adopt=first)
            except (BrickStartError, OSError) as exc:  # OSError: cannot spawn or watch it
                self._set_offline(str(exc))
                log.error(
                    "brick %s:%s of %s did not start: %s", self.run.host, self.run.path, self.run.volume, exc
                )
            else:
                self._set_online()
                code = await self._wait_exit()
                if self._stopping.is_set():
                    break
                self.status.restarts += 1
                self._set_offline(f"exited ({code})" + self._last_error())
                log.warning(
                    "brick %s of %s exited (%s); restarting in %gs",
                    self.run.path,
                    self.run.volume,
                    code,
                    backoff,
                )
            first = False
            if time.monotonic() - began > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stopping.wait()
            backoff = min(backoff * 2, BACKOFF_MAX)
        self._set_offline("")

    async def _start_or_adopt(self, adopt: bool) -> None:
        started_with = self.run.volfile
        await self._launch(adopt)
        if self.run.volfile != started_with:  # changed while it was starting: it read the old one
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.status.pid, signal.SIGHUP)

    async def _launch(self, adopt: bool) -> None:
        _write_atomically(self.volfile_path, self.run.volfile)
        pid = _read_int(self.pid_file)
        if adopt and pid and _alive_brick(pid, self.volfile_path):
            self._watch_exit(pid)
            self.proc = None
            self.status.pid, self.status.port = pid, _read_int(self.port_file)
            log.info(
                "adopted brick %s of %s (pid %d, port %d)",
                self.run.path,
                self.run.volume,
                pid,
                self.status.port,
            )
            with contextlib.suppress(ProcessLookupError):  # its volfile may have changed meanwhile
                os.kill(pid, signal.SIGHUP)
            return
        for f in (self.pid_file, self.port_file):
            f.unlink(missing_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "mortar.mgmt.brick",
            "--volfile", str(self.volfile_path),
            "--log-file", str(self.log_file),
            "--port-file", str(self.port_file),
            "--pid-file", str(self.pid_file),
        ]  # fmt: skip
        with open(self.err_file, "wb") as err:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=True
            )
        self._watch_exit(self.proc.pid)
        self.status.pid = self.proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while not self.pid_file.exists():
            if self.proc.poll() is not None:
                await self._wait_exit()
                raise BrickStartError(f"exited ({self.proc.returncode})" + self._last_error())
            if time.monotonic() > deadline or self._stopping.is_set():
                await self._terminate()
                raise BrickStartError(f"not serving after {START_TIMEOUT:g}s" + self._last_error())
            await asyncio.sleep(0.05)
        self.status.port = _read_int(self.port_file)
        log.info(
            "brick %s of %s serving on port %d (pid %d)",
            self.run.path,
            self.run.volume,
            self.status.port,
            self.proc.pid,
        )
        if self.run.creating:
            self.sup.on_created(self.run)

    def _watch_exit(self, pid: int) -> None:
        self.pidfd = os.pidfd_open(pid)
        self._exit = asyncio.get_running_loop().create_task(_pidfd_exit(self.pidfd))

    async def _wait_exit(self) -> str:
        if self._exit is not None:
            await asyncio.shield(self._exit)
        self._close_pidfd()
        if self.proc is not None:
            code = self.proc.wait()
            return f"signal {-code}" if code < 0 else f"status {code}"
        return "not a child: status unknown"

    def _close_pidfd(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _last_error(self) -> str:
        """The brick's one-line reason: its last words on stderr, else its log's last error."""
        try:
            lines = [ln for ln in self.err_file.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            lines = []
        if not lines:
            try:
                text = self.log_file.read_text(errors="replace")
            except OSError:
                text = ""
            lines = [ln for ln in text.splitlines()[-50:] if " ERROR " in ln or " CRITICAL " in ln]
        return ": " + lines[-1].removeprefix("mortar-brick: ")[-300:] if lines else ""

    def _set_online(self) -> None:
        st = self.status
        st.online, st.error, st.since = True, "", time.time()
        self.sup.publish(self)

    def _set_offline(self, error: str) -> None:
        st = self.status
        st.online, st.pid, st.error, st.since = False, 0, error, time.time()
        self.sup.publish(self)

    # ---- control ---------------------------------------------------------------------------------

    def reload(self, run: BrickRun) -> None:
        """New volfile for the same brick: write it and tell the process to re-read it."""
        self.run = run
        _write_atomically(self.volfile_path, run.volfile)
        pid = self.status.pid
        if pid and self.status.online:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
            log.info("brick %s of %s: volfile changed, reloading", run.path, run.volume)

    async def _terminate(self) -> None:
        pid, exited = self.status.pid, self._exit
        if not pid or exited is None or exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.shield(exited)
        except TimeoutError:
            log.warning("brick %s ignored SIGTERM for %gs; killing it", self.run.path, STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await asyncio.shield(exited)

    async def stop(self) -> None:
        self._stopping.set()
        await self._terminate()
        if self._task is not None:
            await self._task

    async def detach(self) -> None:
        """Stop watching without stopping the process (the daemon exits; a successor adopts it)."""
        self._stopping.set()
        for task in (self._task, self._exit):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._close_pidfd()


class Supervisor:
    """The local bricks: `ensure()` makes the running set match the wanted one."""

    def __init__(
        self,
        workdir: Path,
        logdir: Path,
        publish: Publish,
        on_created: Callable[[BrickRun], None],
    ) -> None:
        self.workdir = workdir
        self.logdir = logdir
        self.publish = publish
        self.on_created = on_created
        self.bricks: dict[tuple[str, str], BrickProcess] = {}
        #: detached with the bricks when mortard stops (the self-heal daemon's keeper)
        self.companions: list[Callable[[], Awaitable[None]]] = []
        self._lock = asyncio.Lock()

    async def ensure(self, wanted: list[BrickRun]) -> None:
        async with self._lock:
            want = {(r.volume, r.path): r for r in wanted}
            stopping = [p for key, p in self.bricks.items() if key not in want]
            for p in stopping:
                del self.bricks[p.key]
            await asyncio.gather(*(p.stop() for p in stopping))
            for key, run in want.items():
                current = self.bricks.get(key)
                if current is not None and current.run.index != run.index:
                    # the brick moved in the volume (remove-brick commit): its server name changed
                    del self.bricks[key]
                    await current.stop()
                    current = None
                if current is None:
                    self.bricks[key] = p = BrickProcess(self, run)
                    p.start()
                elif current.run.volfile != run.volfile:
                    current.reload(run)

    def status(self, volume: str) -> list[BrickStatus]:
        return [p.status for (vol, _), p in self.bricks.items() if vol == volume]

    def find(self, volume: str, path: str) -> BrickProcess | None:
        return self.bricks.get((volume, path))

    async def stop_all(self) -> None:
        await self.ensure([])

    async def detach_all(self) -> None:
        async with self._lock:
            await asyncio.gather(*(p.detach() for p in self.bricks.values()), *(c() for c in self.companions))
            self.bricks.clear()
