"""`make stop`: stop what `make run` started: the node daemon, then the bricks, NBD server and heal daemon.

The daemon leaves bricks running when it stops (so clients keep their data path through a daemon
restart); this script stops those too, found through the pid files under $MORTAR_HOME.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

HOME = Path(os.environ.get("MORTAR_HOME", Path(__file__).resolve().parent.parent / ".mortar-home"))
#: mortard's own servers, which outlive it as bricks do: pid file under state/run, command marker
HELPERS = {
    "NBD server": ("nbd.pid", b"mortar.mgmt.nbdd"),
    "self-heal daemon": ("shd.pid", b"mortar.mgmt.shd"),
}


def _is(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent (init) to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pids: list[int], timeout: float = 20.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def stop_all(quiet: bool = False) -> str:
    """Stop the daemon, then its bricks (all at once); says what was stopped."""
    stopped: list[str] = []
    daemon = _pid(HOME / "mortard.pid")
    if daemon and _is(daemon, b"mortar.mgmt.daemon"):
        _terminate([daemon])
        stopped.append(f"mortard {daemon}")
    bricks = [_pid(f) for f in sorted((HOME / "state" / "run").glob("*.pid"))]
    bricks = [pid for pid in bricks if pid and _is(pid, b"mortar.mgmt.brick")]
    helpers = {what: _pid(HOME / "state" / "run" / f) for what, (f, _) in HELPERS.items()}
    helpers = {what: pid for what, pid in helpers.items() if pid and _is(pid, HELPERS[what][1])}
    _terminate(bricks + list(helpers.values()))
    stopped += [f"brick {pid}" for pid in bricks] + [f"{what} {pid}" for what, pid in helpers.items()]
    if not quiet:
        print("stopped " + ", ".join(stopped) if stopped else f"nothing of {HOME} was running")
    return ", ".join(stopped)


if __name__ == "__main__":
    stop_all()
