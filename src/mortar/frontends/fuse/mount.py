"""The mount process: `mortar mount [-o OPTIONS] HOST:/VOLUME|--volfile FILE MOUNTPOINT`.

Without `--foreground` the command starts itself again as a daemon (a new session, cwd /, output to
the log file) and waits until the daemon reports the mount live, or says in one line why it could
not mount. The daemon builds the client graph, waits for the volume to come up, mounts, and serves
until the mount goes away: `umount`, `fusermount3 -u` or `mortar umount` end it with status 0, and so
does SIGTERM (or SIGINT), which unmounts lazily first. Either way the graph is stopped before exit.

Where the volfile comes from is one function, `load_volfile`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import NoReturn

import pyfuse3
import pyfuse3.asyncio
import uvloop

from mortar.core.log import setup_logging
from mortar.core.options import OptionError
from mortar.core.translator import Event
from mortar.frontends.fuse.ops import MortarOperations
from mortar.frontends.fuse.options import MountOptionError, MountOptions, parse_options
from mortar.graph.builder import Graph, VolfileError, from_text
from mortar.graph.registry import UnknownTypeError

log = logging.LoggerAdapter(logging.getLogger(__name__), {"xlator": "fuse"})

LOG_DIR = "/var/log/mortar"
RUN_DIR = "/run/mortar"
FSTYPE = "fuse.mortar"
SYNOPSIS = "mount [-o OPTIONS] HOST:/VOLUME|--volfile FILE MOUNTPOINT"


class MountError(Exception):
    """Why a mount or unmount could not be done, in one line for the user."""


@dataclass(slots=True)
class MountRequest:
    mountpoint: str
    options: MountOptions
    source: str | None = None  # HOST:/VOLUME
    volfile: str | None = None
    foreground: bool = False
    timeout: float = 30.0
    ready_fd: int | None = None
    pid_file: str = ""

    @property
    def daemon(self) -> bool:
        """Started by `spawn`: reports on `ready_fd` and always logs to a file."""
        return self.ready_fd is not None

    @property
    def log_file(self) -> str | None:
        if self.options.log_file:
            return self.options.log_file
        return default_path(LOG_DIR, self.mountpoint, ".log") if self.daemon or not self.foreground else None


def canonical(path: str) -> str:
    """An absolute path with the parent's symlinks resolved, never touching `path` itself (a dead
    FUSE mount answers every call on it with ENOTCONN)."""
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def default_path(directory: str, mountpoint: str, suffix: str) -> str:
    """`/var/log/mortar/mnt-<mountpoint-dashed>.log`, and the pid file likewise under /run/mortar."""
    dashed = mountpoint.strip("/").replace("/", "-") or "root"
    return os.path.join(directory, f"mnt-{dashed}{suffix}")


# ---- arguments ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise MountError(f"{message} (usage: mortar {SYNOPSIS})")


def _parser() -> _Parser:
    ap = _Parser(prog="mortar mount", description="Mount a mortar volume with FUSE.", add_help=False)
    ap.add_argument("-o", dest="options", action="append", default=[], help="comma separated options")
    ap.add_argument("--volfile", help="client volfile to build the graph from")
    ap.add_argument("-f", "--foreground", action="store_true", help="serve in this process")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the volume")
    ap.add_argument("--pid-file", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("paths", nargs="+", metavar="[HOST:/VOLUME] MOUNTPOINT")
    return ap


def parse_request(argv: list[str]) -> MountRequest:
    """Arguments and options, checked; raises MountError naming what is wrong."""
    args = _parser().parse_args(argv)
    if len(args.paths) > 2:
        raise MountError(f"too many arguments: {' '.join(args.paths)} (usage: mortar {SYNOPSIS})")
    source = args.paths[0] if len(args.paths) == 2 else None
    if source is None and args.volfile is None:
        raise MountError(f"give HOST:/VOLUME or --volfile FILE (usage: mortar {SYNOPSIS})")
    if source is not None and args.volfile is None:
        host, _, volume = source.rpartition(":")
        if not host or not volume.strip("/"):
            raise MountError(f"{source!r} is not HOST:/VOLUME")
    if args.timeout <= 0:
        raise MountError("--timeout must be a positive number of seconds")
    try:
        options = parse_options(args.options)
    except MountOptionError as exc:
        raise MountError(str(exc)) from None
    if options.log_file:
        options.log_file = os.path.abspath(options.log_file)
    mountpoint = canonical(args.paths[-1])
    return MountRequest(
        mountpoint,
        options,
        source,
        os.path.abspath(args.volfile) if args.volfile else None,
        args.foreground,
        args.timeout,
        args.ready_fd,
        args.pid_file or default_path(RUN_DIR, mountpoint, ".pid"),
    )


# ---- /proc/self/mountinfo ------------------------------------------------------------------------


@dataclass(slots=True)
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    device: str  # MAJOR:MINOR


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def find_mount(mountpoint: str) -> MountInfo | None:
    """The mount on `mountpoint` (the last, if stacked), from /proc/self/mountinfo."""
    found = None
    with open("/proc/self/mountinfo") as table:
        for line in table:
            head, _, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if len(fields) >= 5 and len(rest) >= 2 and _unescape(fields[4]) == mountpoint:
                found = MountInfo(mountpoint, rest[0], _unescape(rest[1]), fields[2])
    return found


def check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        hint = " (a dead mount? try: mortar umount)" if exc.errno == errno.ENOTCONN else ""
        raise MountError(f"mountpoint {mountpoint}: {exc.strerror}{hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    info = find_mount(mountpoint)
    if info is not None and info.fstype == FSTYPE:
        raise MountError(f"{mountpoint} is already a mortar mount (of {info.source})")


# ---- starting the daemon -------------------------------------------------------------------------


def spawn(req: MountRequest, argv: list[str]) -> int:
    """Start the daemon for `argv` and wait for its report; returns its pid once the mount is live."""
    check_mountpoint(req.mountpoint)
    log_file = req.log_file
    assert log_file is not None
    try:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        output = open(log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
    except OSError as exc:
        raise MountError(f"log file {log_file}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    try:
        cmd = [sys.executable, "-m", "mortar.frontends.fuse", "--foreground", "--ready-fd", str(write_end)]
        proc = subprocess.Popen(
            [*cmd, *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=(write_end,),
            start_new_session=True,  # the daemon goes to / itself, once it has made its paths absolute
        )
    finally:
        os.close(write_end)
        output.close()
    try:
        report = _read_report(read_end, req.timeout + 30)
    finally:
        os.close(read_end)
    if report == "ready":
        return proc.pid
    if report is None:
        proc.terminate()
        proc.wait(10)
        raise MountError(f"the mount was not live within {req.timeout + 30:g}s; see {log_file}")
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if report:
        raise MountError(report.removeprefix("error "))
    raise MountError(f"the mount process exited with status {proc.returncode}; see {log_file}")


def _read_report(fd: int, timeout: float) -> str | None:
    """The daemon's one line ("ready" or "error ..."), "" if it died silently, None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace").strip()
        data += chunk


class Reporter:
    """The daemon's side of the pipe `spawn` waits on (nothing when run by hand)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line.replace("\n", " ") + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass  # the waiting command is gone; the log has the story
        self.fd = None


# ---- serving -------------------------------------------------------------------------------------


async def load_volfile(req: MountRequest) -> tuple[str, str]:
    """The client volfile's text and the name to report it by: the one place that knows where
    volfiles come from (a file, or the node daemons named by HOST[,HOST2...][:PORT]:/VOLUME).

    The graph is built once: a volfile changed later on the daemon (`volume set`) takes effect at
    the next mount, not by a live switch under the mounted file system."""
    if req.volfile is not None:
        try:
            with open(req.volfile) as f:
                return f.read(), req.volfile
        except OSError as exc:
            raise MountError(f"volfile {req.volfile}: {exc.strerror}") from None
    from mortar.client.uri import VolfileSource, VolfileUnavailable, parse_uri

    assert req.source is not None
    servers, _, volume = req.source.rpartition(":")
    try:
        uri = parse_uri(f"mortar://{servers}/{volume.strip('/')}")
    except ValueError as exc:
        raise MountError(str(exc)) from None
    source = VolfileSource(uri)
    try:
        got = await source.fetch(None, req.timeout)
    except VolfileUnavailable as exc:
        raise MountError(f"cannot fetch the volfile: {exc}") from None
    finally:
        await source.close()
    if got is None:
        raise MountError(f"{uri}: the daemon sent no volfile")
    return got[0], str(uri)


def _mount_fuse(ops: pyfuse3.Operations, mountpoint: str, options: set[str]) -> None:
    """pyfuse3.init, with libfuse's complaint (it writes to fd 2) turned into the error message."""
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, mountpoint, options)
            return
        except RuntimeError as exc:
            failure = str(exc)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = captured.read().decode(errors="replace").strip()
    if said:
        log.error("libfuse: %s", said)
    raise MountError(f"mounting {mountpoint} failed: {said.splitlines()[-1] if said else failure}")


async def serve(req: MountRequest, reporter: Reporter) -> int:
    text, name = await load_volfile(req)
    try:
        graph = from_text(text, name)
    except (VolfileError, OptionError, UnknownTypeError) as exc:
        raise MountError(str(exc)) from None
    await graph.start(req.timeout)
    try:
        if not await graph.wait_up(req.timeout):
            raise MountError(f"volume {graph.top.name} is not reachable: no answer within {req.timeout:g}s")
        ops = MortarOperations(graph.top, req.options)
        unsubscribe = graph.subscribe(_on_event)
        pyfuse3.asyncio.enable()
        _mount_fuse(ops, req.mountpoint, req.options.fuse_options(req.source or graph.top.name))
        try:
            return await _run(req, reporter, ops, graph)
        finally:
            unsubscribe()
            # still mounted here after SIGTERM; not after umount (nor when only a copy in another
            # mount namespace kept the session alive: closing /dev/fuse ends that copy)
            pyfuse3.close(unmount=find_mount(req.mountpoint) is not None)
            await ops.release_all()
    finally:
        await graph.stop()


async def _run(req: MountRequest, reporter: Reporter, ops: MortarOperations, graph: Graph) -> int:
    loop = asyncio.get_running_loop()
    running = True

    def terminate(sig: int) -> None:
        if running:  # pyfuse3.terminate() needs the session it ends
            log.info("%s: unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
        else:
            log.info("%s: already stopping", signal.Signals(sig).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, terminate, sig)
    loop.add_signal_handler(signal.SIGUSR1, _statedump, ops)
    loop.add_signal_handler(signal.SIGHUP, _reopen_log, req)
    session = asyncio.create_task(pyfuse3.main(), name="fuse-session")
    live = asyncio.create_task(ops.initialized.wait())
    await asyncio.wait({session, live}, timeout=req.timeout, return_when=asyncio.FIRST_COMPLETED)
    if not live.done():
        live.cancel()
        pyfuse3.terminate()
        await session
        raise MountError(f"the kernel did not start the FUSE session on {req.mountpoint}")
    _set_read_ahead(req.mountpoint, req.options.read_ahead_kb)
    _write_pid_file(req.pid_file)
    log.info("mounted %s on %s (pid %d)", req.source or graph.filename, req.mountpoint, os.getpid())
    reporter.send("ready")
    try:
        await session
    finally:
        running = False
        with contextlib.suppress(OSError):
            os.unlink(req.pid_file)
    log.info("%s unmounted: stopping", req.mountpoint)
    return 0


def _set_read_ahead(mountpoint: str, kib: int) -> None:
    """Raise the mount's read-ahead (its backing device info in sysfs; root only)."""
    info = find_mount(mountpoint) if kib else None
    if info is None:
        return
    try:
        with open(f"/sys/class/bdi/{info.device}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        log.info("read-ahead of %s left as the kernel set it: %s", mountpoint, exc.strerror)


def _statedump(ops: MortarOperations) -> None:
    """SIGUSR1 (GlusterFS's statedump signal): what the mount holds and what every task waits on."""
    lines = [f"statedump: {len(ops.inodes)} inodes, {ops.open_handles} open handles"]
    for task in asyncio.all_tasks():
        lines.append(f"  task {task.get_name()}: {' -> '.join(_awaiting(task.get_coro()))}")
    readers = getattr(pyfuse3.asyncio, "_read_futures", {})  # pyfuse3's own, for a hang's post-mortem
    lines.append(f"  tasks waiting for /dev/fuse: {sum(len(f) for f in readers.values())}")
    log.info("\n".join(lines))


def _awaiting(coro: object) -> list[str]:
    """The chain of awaits a coroutine is suspended in, outermost first."""
    chain = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        name = getattr(coro, "__qualname__", type(coro).__name__)
        chain.append(f"{name}:{frame.f_lineno if frame is not None else '?'}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return chain


def _on_event(event: Event, data: object) -> None:
    if event is Event.CHILD_DOWN:
        log.warning("volume went down (%s): calls fail with ENOTCONN until it is back", data)
    elif event is Event.CHILD_UP:
        log.info("volume is up")


def _write_pid_file(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("pid file %s: %s", path, exc)


def _open_log(req: MountRequest) -> None:
    """mortar's logs, and pyfuse3's and asyncio's complaints, to the log file (again on SIGHUP, so
    logrotate can move the file away)."""
    setup_logging(req.options.log_level, req.log_file)
    handlers = logging.getLogger("mortar").handlers
    for name in ("pyfuse3", "asyncio"):
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = False


def _reopen_log(req: MountRequest) -> None:
    old = list(logging.getLogger("mortar").handlers)
    try:
        _open_log(req)
    except OSError as exc:
        log.error("reopening log file %s: %s", req.log_file, exc.strerror)
        return
    for handler in old:
        handler.close()
    log.info("log file reopened (SIGHUP)")


def run(req: MountRequest) -> int:
    """Serve `req` in this process until unmounted; 0 on a clean end, 1 (with the reason) otherwise."""
    reporter = Reporter(req.ready_fd)
    try:
        _open_log(req)
    except OSError as exc:
        reporter.send(f"error log file {req.log_file}: {exc.strerror}")
        print(f"mortar mount: log file {req.log_file}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        if req.daemon:
            os.chdir("/")
        check_mountpoint(req.mountpoint)
        status = uvloop.run(serve(req, reporter))
    except MountError as exc:
        log.error("%s", exc)
        reporter.send(f"error {exc}")
        if not req.daemon:
            print(f"mortar mount: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        log.exception("mount failed")
        reporter.send(f"error {exc}")
        return 1
    log.info("exiting with status %d", status)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        req = parse_request(argv)
        if req.foreground:
            return run(req)
        pid = spawn(req, argv)
    except MountError as exc:
        print(f"mortar mount: {exc}", file=sys.stderr)
        return 1
    print(f"mounted on {req.mountpoint} (pid {pid}, log {req.log_file})")
    return 0


# ---- unmounting ----------------------------------------------------------------------------------


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0, grace: float = 2.0) -> int | None:
    """Unmount a mortar mount and wait for its process to exit; returns that process's pid if known.

    A mount namespace made while the mount existed (`unshare -m`, a container) holds a copy of it
    that keeps the FUSE session, and so the process, alive after the umount here; a process still
    running after `grace` seconds gets SIGTERM, which ends the session for those copies too."""
    mountpoint = canonical(mountpoint)
    info = find_mount(mountpoint)
    if info is None:
        raise MountError(f"{mountpoint} is not mounted")
    if info.fstype != FSTYPE:
        raise MountError(f"{mountpoint} is not a mortar mount (it is {info.fstype})")
    pid = _daemon_pid(default_path(RUN_DIR, mountpoint, ".pid"))
    if os.geteuid() == 0:
        cmd = ["umount", *(["-l"] if lazy else []), mountpoint]
    else:
        cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MountError(f"{cmd[0]} {mountpoint}: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise MountError(said[-1] if said else f"{cmd[0]} exited with status {done.returncode}")
    if pid is not None:
        start = time.monotonic()
        signalled = False
        while alive(pid):
            if not signalled and time.monotonic() > start + grace:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                signalled = True
            if time.monotonic() > start + timeout:
                raise MountError(f"{mountpoint} is unmounted but its process {pid} has not exited")
            time.sleep(0.02)
    return pid


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has exited: its parent, init by now, just has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _daemon_pid(pid_file: str) -> int | None:
    """The mount process named by its pid file, if that process is still a mortar mount."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    return pid if b"mortar.frontends.fuse" in cmdline else None
