"""Long-running volume tasks (rebalance, fix-layout, remove-brick drain) with progress in the store.

A task is one `mortar-rebalance` process on the host that took the request; that host's mortard
copies the process's progress into `/volumes/NAME/task` (a `VolumeTask`), so `status` answers from
any host and after a daemon restart. A restarted mortard adopts its still-running process, or,
when it died with the daemon, starts it again (a run resumes: moved files are left alone).
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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mortar.mgmt.model import VOLUMES, MgmtError, Record, VolumeInfo
from mortar.mgmt.store import StoreError

if TYPE_CHECKING:
    from mortar.mgmt.daemon import Node

log = logging.getLogger(__name__)

MODULE = "mortar.mgmt.rebalanced"
FINAL = ("completed", "stopped", "failed")


def task_key(volume: str) -> str:
    return f"{VOLUMES}{volume}/task"


@dataclass
class VolumeTask(Record):
    """The volume's current or last long task, as the store keeps it."""

    id: str
    kind: str  # rebalance, fix-layout, remove-brick
    volume: str
    node: str  # uuid of the host running it
    host: str
    state: str = "starting"  # starting, running, completed, stopped, failed
    pid: int = 0
    force: bool = False
    #: remove-brick: the bricks (HOST:/PATH) and the distribute subvolumes being drained
    bricks: list[str] = field(default_factory=list)
    decommission: list[str] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    started: float = 0.0
    updated: float = 0.0

    @property
    def active(self) -> bool:
        return self.state not in FINAL

    @property
    def drained(self) -> bool:
        done = self.kind == "remove-brick" and self.state == "completed"
        return done and bool(self.progress.get("drained"))

    def public(self) -> dict[str, Any]:
        p = self.progress
        return {
            "id": self.id,
            "kind": self.kind,
            "volume": self.volume,
            "host": self.host,
            "state": self.state,
            "error": self.error or p.get("error", ""),
            "bricks": self.bricks,
            "files_scanned": p.get("files_scanned", 0),
            "files_moved": p.get("files_moved", 0),
            "bytes_moved": p.get("bytes_moved", 0),
            "files_skipped": p.get("files_skipped", 0),
            "files_failed": p.get("files_failed", 0),
            "dirs_fixed": p.get("dirs_fixed", 0),
            "skipped": p.get("skipped", {}),
            "failed": p.get("failed", {}),
            "files": p.get("files", []),
            "remaining": p.get("remaining", {}),
            "drained": bool(p.get("drained")),
            "elapsed": p.get("elapsed", 0.0),
            "started": self.started,
        }


def _alive(pid: int, status_file: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and MODULE.encode() in cmdline and os.fsencode(status_file) in cmdline


class Tasks:
    def __init__(self, node: Node, daemon: str) -> None:
        self.node = node
        self.daemon = daemon
        self.dir = node.workdir / "tasks"
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        #: volumes whose task this daemon is starting right now (adopt must not start it twice)
        self._starting: set[str] = set()

    def status_file(self, task: VolumeTask) -> Path:
        return self.dir / f"{task.volume}-{task.id}.json"

    # ---- reading --------------------------------------------------------------------------------

    async def get(self, volume: str) -> VolumeTask | None:
        raw = await self.node.store().get(task_key(volume))
        return VolumeTask.from_json(raw) if raw is not None else None

    async def _put(self, task: VolumeTask) -> None:
        task.updated = time.time()
        await self.node.store().put(task_key(task.volume), task.to_json())

    # ---- starting ---------------------------------------------------------------------------------

    async def start(
        self, info: VolumeInfo, kind: str, *, force: bool = False, bricks: list[str] | None = None,
        decommission: list[str] | None = None,
    ) -> VolumeTask:  # fmt: skip
        """Record a new task for `info` (refused while another runs) and start its process here."""
        if info.status != "Started":
            raise MgmtError(f"volume {info.name} is not started", 409)
        if info.name in self._starting:
            raise MgmtError(f"a task of volume {info.name} is being started", 409)
        self._starting.add(info.name)
        try:
            return await self._start(info, kind, force, bricks, decommission)
        finally:
            self._starting.discard(info.name)

    async def _start(
        self, info: VolumeInfo, kind: str, force: bool, bricks: list[str] | None, drain: list[str] | None
    ) -> VolumeTask:
        async with self.node.volumes._locked() as (_store, _handle):
            old = await self.get(info.name)
            if old is not None and old.active:
                raise MgmtError(f"a {old.kind} of volume {info.name} is in progress (on {old.host})", 409)
            pending = old is not None and old.kind == "remove-brick" and old.state != "stopped"
            if old is not None and pending and kind != "remove-brick":
                raise MgmtError(f"remove-brick of {', '.join(old.bricks)} is waiting for commit or stop", 409)
            task = VolumeTask(
                uuid.uuid4().hex[:12], kind, info.name, self.node.uuid, self.node.hostnames[0],
                force=force, bricks=bricks or [], decommission=drain or [], started=time.time(),
            )  # fmt: skip
            await self._put(task)
        self._spawn(task)
        await self._put(task)
        self._monitor(task)
        return task

    def _spawn(self, task: VolumeTask) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", MODULE, "--daemon", self.daemon, "--volume", task.volume,
            "--status-file", str(self.status_file(task)),
            "--log-file", str(self.node.logdir / f"rebalance-{task.volume}.log"),
        ]  # fmt: skip
        if task.kind == "fix-layout":
            args.append("--fix-layout")
        if task.force:
            args.append("--force")
        for name in task.decommission:
            args += ["--decommission", name]
        null = subprocess.DEVNULL
        proc = subprocess.Popen(args, stdin=null, stdout=null, stderr=null)
        self._procs[proc.pid] = proc
        task.pid, task.state = proc.pid, "running"
        log.info("%s of %s started (pid %d)", task.kind, task.volume, proc.pid)

    # ---- following the process --------------------------------------------------------------------

    def _monitor(self, task: VolumeTask) -> None:
        running = self._monitors.get(task.volume)
        if running is not None and not running.done():
            if running.get_name() == f"task {task.volume} {task.id}":
                return
            running.cancel()  # the previous task's follower, in its last second: this one replaces it
        self._monitors[task.volume] = asyncio.get_running_loop().create_task(
            self._follow(task), name=f"task {task.volume} {task.id}"
        )

    def _exited(self, pid: int, status_file: Path) -> bool:
        proc = self._procs.get(pid)
        if proc is not None:
            return proc.poll() is not None
        return not _alive(pid, status_file)

    async def _follow(self, task: VolumeTask) -> None:
        path = self.status_file(task)
        last: bytes = b""
        recorded = True  # the record as `start`/`adopt` wrote it
        while True:
            exited = self._exited(task.pid, path)
            with contextlib.suppress(OSError):
                raw = path.read_bytes()
                if raw != last:
                    recorded = False
                    last = raw
                    with contextlib.suppress(ValueError):
                        data = json.loads(raw)
                        task.progress = data
                        if data.get("state") in ("running", *FINAL):
                            task.state = data["state"]
                        task.error = str(data.get("error", ""))
            if exited and task.state not in FINAL:
                task.state, task.error = "failed", task.error or "the rebalance process exited unexpectedly"
                recorded = False
            if not recorded:  # every write wakes every daemon's watch: only real progress is written
                try:
                    await self._put(task)
                    recorded = True
                except (StoreError, MgmtError) as exc:
                    log.warning("cannot record the progress of %s yet: %s", task.volume, exc)
            if exited and recorded:
                self._procs.pop(task.pid, None)
                log.info("%s of %s: %s", task.kind, task.volume, task.state)
                return
            await asyncio.sleep(1.0)

    async def adopt(self, raws: dict[str, bytes]) -> None:
        """At reconcile: follow this host's running tasks again (after a daemon restart)."""
        for key, raw in raws.items():
            if not key.endswith("/task"):
                continue
            task = VolumeTask.from_json(raw)
            if task.node != self.node.uuid or not task.active or task.volume in self._starting:
                continue
            monitor = self._monitors.get(task.volume)
            if monitor is not None and not monitor.done():
                continue
            if not _alive(task.pid, self.status_file(task)):
                log.info("%s of %s was interrupted: starting it again", task.kind, task.volume)
                try:
                    self._spawn(task)
                except OSError as exc:
                    task.state, task.error = "failed", f"cannot restart: {exc}"
                await self._put(task)
            self._monitor(task)

    # ---- stopping -----------------------------------------------------------------------------------

    async def stop(self, volume: str, kind: str) -> VolumeTask:
        task = await self.get(volume)
        if task is None or (task.kind != kind and not (kind == "rebalance" and task.kind == "fix-layout")):
            raise MgmtError(f"no {kind} of volume {volume} has been started", 409)
        if task.node != self.node.uuid:
            peers = {p.uuid: p for p in await self.node.pool.peers()}
            peer = peers.get(task.node)
            if peer is None:
                raise MgmtError(f"the host running the {kind} of {volume} left the pool", 409)
            reply = await self.node.rpc.call(
                peer.hostname, peer.port, "POST", f"/v1/internal/tasks/{volume}/stop", {"kind": kind}
            )
            return VolumeTask.from_json(reply["task"])
        if task.active and task.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(task.pid, signal.SIGTERM)
            monitor = self._monitors.get(volume)
            if monitor is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(monitor), 60)
        task = await self.get(volume) or task
        if task.active:  # no process behind it
            task.state = "stopped"
            await self._put(task)
        return task

    async def close(self) -> None:
        """mortard stops: the processes go on (the next mortard adopts them)."""
        for t in self._monitors.values():
            t.cancel()
        await asyncio.gather(*self._monitors.values(), return_exceptions=True)
        self._monitors.clear()
