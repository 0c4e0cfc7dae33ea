"""The benchmark's own network namespace: every server of a run, and every client of it, lives there.

glusterd refuses bricks on 127.x, so GlusterFS needs a non-loopback address; rather than the host's
(which would put glusterd, its bricks and mortar's on the host's network), a run makes a namespace
`mortar-bench-<pid>` with `lo` up and a veth pair kept whole inside it, one end holding ADDRESS
(198.18.0.1, RFC 2544's benchmarking range; nothing is routed anywhere). A veth pair rather than a
`dummy` link because some kernels (this sandbox's) have no dummy driver; either way the kernel sends
traffic to a local address through its loopback path, so both systems are on equal terms.

`bench_network()` makes it and, by default, moves the calling (main) thread into it for the block
with setns(2): every process started inside the block (glusterd, mortard, bricks, fio, qemu-img, FUSE
mounts, the NBD server, native jobs) inherits it, while the mount namespace stays the host's, so FUSE
mounts made there are visible to the benchmark. `BenchNet.cmd()` wraps one command with
`nsenter --net` instead, for callers that stay outside; `host_network()` steps back out for a block
(apt-get). `current()` names the namespace the thread is in, and `require()` is what the server
helpers (bench/gluster.py, bench/mortard.py, bench/mortar_side.py) call to refuse a non-loopback
server outside one.

Removal: on exit of the block (success, error, Ctrl-C); on SIGKILL of the benchmark a guardian
process (PR_SET_PDEATHSIG = SIGTERM) deletes the namespace and lazily unmounts what the run mounted;
and `sweep_stale()`, called by every new run, deletes `mortar-bench-<pid>` namespaces whose pid is
dead (a live pid, whoever it is now, is left alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "mortar-bench-"
NETNS_DIR = Path("/run/netns")
ADDRESS = "198.18.0.1"
PREFIXLEN = 24
LINK, PEER = "mb0", "mb1"
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {(res.stderr or res.stdout).strip()}")
    return res


#: per entered() block, a descriptor of the namespace the thread came from (for host_network())
_homes: list[int] = []


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


def _here() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bench_namespaces() -> list[str]:
    """Names of the `mortar-bench-<pid>` namespaces that exist now."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name))


def sweep_stale() -> list[str]:
    """Delete the namespaces left by benchmarks that died (owner pid gone); returns their names.
    Processes still inside one (there should be none: they die with the benchmark) are named in
    the log, not killed."""
    removed = []
    for name in bench_namespaces():
        pid = int(name[len(PREFIX) :])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        if pids:
            log.warning("stale namespace %s still has processes %s (left running)", name, " ".join(pids))
        if _ip("netns", "del", name, check=False).returncode == 0:
            log.info("removed network namespace %s left by a dead benchmark (pid %d)", name, pid)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class BenchNet:
    """A made namespace: `addr` is the non-loopback address servers and clients use inside it."""

    name: str
    addr: str = ADDRESS

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in this namespace's network only (mounts, PIDs and files stay the host's)."""
        return ["nsenter", f"--net={self.path}", *argv]

    @contextlib.contextmanager
    def entered(self) -> Iterator[BenchNet]:
        """Move the calling thread into the namespace for the block, and back; processes it starts
        meanwhile stay in it. Sockets made by other threads are not affected: use it on the main
        thread before starting any thread that talks to the servers."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("entering %s from a thread other than the main one", self.name)
        home = _here()
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target, str(self.path))
            finally:
                os.close(target)
            _homes.append(home)
            try:
                yield self
            finally:
                _homes.remove(home)
                _setns(home, "the namespace it came from")
        finally:
            os.close(home)


@contextlib.contextmanager
def host_network() -> Iterator[None]:
    """For the block, the calling thread is back in the namespace the innermost `entered()` came
    from (the host's): for what needs the outside network, such as apt-get. A no-op outside one."""
    if not _homes:
        yield
        return
    here = _here()
    try:
        _setns(_homes[-1], "the host's network namespace")
        try:
            yield
        finally:
            _setns(here, "the benchmark's network namespace")
    finally:
        os.close(here)


def current() -> BenchNet | None:
    """The benchmark namespace the calling thread is in, or None (e.g. the host's)."""
    here = os.stat("/proc/thread-self/ns/net")
    for name in bench_namespaces():
        with contextlib.suppress(OSError):
            there = os.stat(NETNS_DIR / name)
            if (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
                return BenchNet(name)
    return None


def require(what: str, host: str | None = None) -> None:
    """Refuse to start a server outside a benchmark namespace unless it listens only on a loopback
    `host` (None: it listens on every address): the project's servers listen on loopback or in
    namespaces its code made, never on the host's network."""
    loopback = host is not None and (host.startswith("127.") or host in ("localhost", "::1"))
    if loopback or current() is not None:
        return
    raise RuntimeError(
        f"{what} on {host or 'every address'}: outside the benchmark's network namespace that is the "
        "host's network; "
        "run it inside `with bench.netns.bench_network() as net:` and use `net.addr`"
    )


def available() -> str:
    """'' when this host can make the namespace, else why not."""
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install iproute2 util-linux)"
    return ""


def guard(name: str, owner: int, roots: Sequence[str]) -> None:
    """The guardian's body (`python bench/netns.py guard NAME OWNER [ROOT...]`): wait for SIGTERM (sent
    by the kernel when the benchmark dies, or by the benchmark when done), then delete the namespace
    and lazily unmount every mount under the ROOTs (FUSE mounts whose processes the kernel killed)."""
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    print("ready", flush=True)
    if os.getppid() == owner:  # else the owner died before PR_SET_PDEATHSIG took: clean up now
        signal.sigwait(sigs)
    _ip("netns", "del", name, check=False)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # \040 for a space...
            if any(point == r or point.startswith(r.rstrip("/") + "/") for r in roots):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _guardian(name: str, unmount_under: Sequence[Path]) -> subprocess.Popen[str]:
    owner = os.getpid()

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    script = str(Path(__file__).resolve())
    proc = subprocess.Popen(
        [sys.executable, "-I", script, "guard", name, str(owner), *(str(p) for p in unmount_under)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # Ctrl-C at the terminal must not fire it before the orderly teardown
        preexec_fn=preexec,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.wait(10)
        raise RuntimeError("the namespace's guardian process did not start")
    return proc


def _make(name: str, addr: str) -> None:
    try:
        _ip("netns", "add", name)
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot create the benchmark's network namespace {name} ({exc}); the benchmark runs "
            "glusterd, mortard, their bricks and every client in a namespace of its own and will "
            "not use the host's network: run it as root on a kernel with network namespaces"
        ) from None
    _ip("-n", name, "link", "set", "lo", "up")
    _ip("-n", name, "link", "add", LINK, "type", "veth", "peer", "name", PEER)
    _ip("-n", name, "addr", "add", f"{addr}/{PREFIXLEN}", "dev", LINK)
    _ip("-n", name, "link", "set", PEER, "up")
    _ip("-n", name, "link", "set", LINK, "up")


@contextlib.contextmanager
def bench_network(
    *, enter: bool = True, unmount_under: Sequence[Path] = (), addr: str = ADDRESS
) -> Iterator[BenchNet]:
    """A new namespace `mortar-bench-<pid>` (stale ones swept first), entered for the block unless
    `enter=False`, removed however the block ends; called inside this process's own one, that one.
    If the benchmark is SIGKILLed, its guardian deletes the namespace and lazily unmounts any mount
    under `unmount_under` (the run's FUSE mounts, whose processes the kernel kills)."""
    name = f"{PREFIX}{os.getpid()}"
    outer = current()
    if outer is not None and outer.name == name:  # nested in this process's own: that one serves
        yield outer
        return
    why = available()
    if why:
        raise RuntimeError(f"cannot create the benchmark's network namespace: {why}")
    sweep_stale()
    net = BenchNet(name, addr)
    if net.path.exists():  # a pid of ours reused from a dead run (e.g. in another PID namespace)
        _ip("netns", "del", net.name, check=False)
    guardian: subprocess.Popen[str] | None = None
    try:
        _make(net.name, addr)
        guardian = _guardian(net.name, unmount_under)
        log.info("network namespace %s (address %s)", net.name, addr)
        with net.entered() if enter else contextlib.nullcontext(net):
            yield net
    finally:
        _ip("netns", "del", net.name, check=False)
        if guardian is not None:
            guardian.terminate()  # it finds the namespace gone; the run's own teardown did the unmounts
            if guardian.stdout is not None:
                guardian.stdout.close()
            try:
                guardian.wait(10)
            except subprocess.TimeoutExpired:
                guardian.kill()
                guardian.wait()


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "guard":
        sys.exit("usage: netns.py guard NAME OWNER_PID [UNMOUNT_UNDER...]  (started by bench_network)")
    guard(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
