"""Processes the benchmark starts: they die with it, and FUSE mounts it makes are always unmounted.

Every child gets PR_SET_PDEATHSIG(SIGKILL), so a benchmark killed with SIGKILL still takes its
brick servers, mount processes and private glusterd down with it (the kernel does it). Orderly
teardown on success, errors and Ctrl-C is the job of the context managers that use these helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(cmd: Sequence[str], *, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `cmd` in its own session (Ctrl-C reaches only the benchmark, which tears down in order)."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the process group, wait, and SIGKILL it if it lingers; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored signal %d for %gs; killing it", proc.pid, sig, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def wait_for(
    what: str,
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = 60,
    log_path: Path | None = None,
) -> None:
    """Poll `ready` until true; fail early (quoting the log tail) if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:g}s{_tail(log_path)}")
        time.sleep(0.05)


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {path}:\n  " + "\n  ".join(text)


def run(
    cmd: Sequence[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (it also dies with the benchmark)."""
    res = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=die_with_parent,
        stdin=subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {(res.stderr or res.stdout).strip()}")
    return res


def unmount(mountpoint: Path) -> None:
    """Unmount a FUSE mount; a lazy unmount when the file system is busy or its process is gone."""
    if not os.path.ismount(mountpoint):
        return
    if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def profiled(cmd: list[str], profile: Path | None) -> list[str]:
    """`cmd`, wrapped in `py-spy record` (speedscope output to `profile`) when profiling. The
    process group gets SIGINT at the end: py-spy writes the profile, the program exits cleanly."""
    if profile is None:
        return cmd
    profile.parent.mkdir(parents=True, exist_ok=True)
    spy = [str(BIN / "py-spy"), "record", "--nonblocking", "-r", "97", "-f", "speedscope", "-o", str(profile)]
    return [*spy, "--", *cmd]


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` (unmounts, glusterd stop) runs."""

    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
