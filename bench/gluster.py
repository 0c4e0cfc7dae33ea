"""The GlusterFS side of the benchmark: a private glusterd, its volumes and their FUSE mounts.

glusterd runs in its own mount and PID namespaces (`unshare -m -p`): /var/lib/glusterd,
/run/gluster and /var/log/glusterfs are bind mounts of directories under the run's work directory,
and its CLI socket is there too. So a system glusterd's state is never read or written, every
brick and self-heal daemon glusterd spawns lives in that PID namespace, and when the namespace's
first process exits (orderly stop, a crash, or the benchmark being killed) the kernel kills them
all and the bind mounts vanish. The network is the run's own namespace (bench/netns.py): glusterd's
TCP port 24007, which its clients (gfapi in fio and QEMU, FUSE mounts) always ask for volfiles, and
the bricks' ports exist only there, so a system glusterd on the host is neither met nor disturbed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import netns, procs

log = logging.getLogger(__name__)

GLUSTERD_PORT = 24007
_BINDS = {"lib": "/var/lib/glusterd", "run": "/run/gluster", "log": "/var/log/glusterfs"}
_PACKAGES = ("glusterfs-server", "glusterfs-client")


def ensure_installed() -> None:
    """apt-get install GlusterFS 10 (Debian 12's) when glusterd or the FUSE client is missing."""
    if shutil.which("glusterd") and shutil.which("glusterfs") and shutil.which("gluster"):
        return
    if os.geteuid() != 0:
        raise RuntimeError("GlusterFS is not installed and installing it needs root")
    log.info("installing %s", " ".join(_PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with netns.host_network():  # the package mirror is outside the benchmark's namespace
        if procs.run(["apt-get", "install", "-y", *_PACKAGES], check=False, env=env).returncode != 0:
            procs.run(["apt-get", "update", "-qq"], env=env)
            procs.run(["apt-get", "install", "-y", *_PACKAGES], env=env)


def version() -> str:
    return procs.run(["glusterfs", "--version"]).stdout.splitlines()[0].strip()


def host_address() -> str:
    """The address for bricks (glusterd refuses 127.x): that of the benchmark's network namespace the
    calling thread is in (bench/netns.py); outside one there is none to use (the host's is not)."""
    net = netns.current()
    if net is None:
        raise RuntimeError(
            "GlusterFS needs a non-loopback address and the benchmark uses only its own network "
            "namespace's: call this inside `with bench.netns.bench_network() as net:` (or use net.addr)"
        )
    return net.addr


@dataclass
class GlusterVolume:
    name: str
    host: str
    bricks: list[Path]
    replica: int
    #: option -> value that took; option -> reason for each one GlusterFS refused
    options: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return f"replica {self.replica}" if self.replica > 1 else f"{len(self.bricks)} brick"


class Glusterd:
    """A glusterd private to this run (see the module docstring). Use `with private_glusterd(...)`."""

    def __init__(self, workdir: Path, host: str) -> None:
        self.workdir = workdir
        self.host = host
        self.sock = workdir / "glusterd.socket"
        self.logdir = workdir / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.volumes: dict[str, GlusterVolume] = {}
        self.mounts: list[tuple[Path, subprocess.Popen[bytes]]] = []

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for sub in _BINDS:
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        groups = Path(_BINDS["lib"]) / "groups"
        if groups.is_dir():  # the option groups (virt, ...) ship in the package's state directory
            shutil.copytree(groups, self.workdir / "lib" / "groups", dirs_exist_ok=True)
        vol = self.workdir / "glusterd.vol"
        vol.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            "    option working-directory /var/lib/glusterd\n"
            f"    option glusterd-sockfile {self.sock}\n"
            "    option transport-type socket\n"
            f"    option transport.socket.listen-port {GLUSTERD_PORT}\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "    option max-port 60999\n"
            "end-volume\n"
        )
        binds = " && ".join(
            f"mkdir -p {target} && mount --bind {self.workdir / sub} {target}"
            for sub, target in _BINDS.items()
        )
        # sh stays PID 1 of the namespace and reaps the daemonised bricks; when it exits, all go.
        script = (
            f"set -e; {binds}; glusterd -N -f {vol} -p {self.workdir / 'glusterd.pid'} "
            f"-l {self.logdir / 'glusterd.log'} -L WARNING"
        )
        cmd = [
            "unshare",
            "-m",
            "-p",
            "-f",
            "--mount-proc",
            "--propagation",
            "private",
            "--kill-child",
            "sh",
            "-c",
            script,
        ]
        self.proc = procs.spawn(cmd, log_path=self.workdir / "glusterd.out")
        procs.wait_for("glusterd", self._answers, self.proc, 60, self.workdir / "glusterd.out")
        log.info("private glusterd up (state in %s)", self.workdir)

    def _answers(self) -> bool:
        if not self.sock.exists():
            return False
        return self.cli("volume", "list", check=False).returncode == 0

    def stop(self) -> None:
        """Unmount, stop volumes, stop glusterd; the namespace takes whatever is left with it."""
        for mountpoint, proc in reversed(self.mounts):
            procs.unmount(mountpoint)
            procs.stop(proc, timeout=15)
        self.mounts.clear()
        if self.proc is not None and self.proc.poll() is None:
            for name in list(self.volumes):
                with contextlib.suppress(Exception):
                    self.cli("volume", "stop", name, "force", timeout=60, check=False)
            procs.stop(self.proc, timeout=30)
        self.proc = None

    # ---- commands ----------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [
            "gluster",
            "--mode=script",
            f"--glusterd-sock={self.sock}",
            f"--log-file={self.logdir / 'cli.log'}",
            *args,
        ]
        return procs.run(cmd, check=check, timeout=timeout)

    def create_volume(
        self,
        name: str,
        bricks: list[Path],
        replica: int = 1,
        group: str | None = None,
        options: dict[str, str] | None = None,
    ) -> GlusterVolume:
        """Create and start a volume; `group` (e.g. "virt") is applied option by option, and the
        options GlusterFS refuses for this shape (e.g. cluster.* on one brick) are recorded."""
        args = ["volume", "create", name]
        if replica > 1:
            args += ["replica", str(replica)]
        for b in bricks:
            b.mkdir(parents=True, exist_ok=True)
        args += [f"{self.host}:{b}" for b in bricks] + ["force"]
        self.cli(*args)
        vol = GlusterVolume(name, self.host, bricks, replica)
        self.volumes[name] = vol
        wanted: dict[str, str] = {}
        if group:
            wanted.update(self._group(group))
        wanted.update(options or {})
        for key, value in wanted.items():
            res = self.cli("volume", "set", name, key, value, check=False)
            if res.returncode == 0:
                vol.options[key] = value
            else:
                vol.refused[key] = (res.stderr or res.stdout).strip().splitlines()[-1]
        if vol.refused:
            log.info("%s (%s): GlusterFS refused %s", name, vol.shape, ", ".join(vol.refused))
        self.cli("volume", "start", name)
        return vol

    def _group(self, group: str) -> dict[str, str]:
        path = self.workdir / "lib" / "groups" / group
        out: dict[str, str] = {}
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
        return out

    def mount(self, name: str, mountpoint: Path, profile_dir: Path | None = None) -> Path:
        """FUSE-mount `name` with the GlusterFS client (its default options), foreground process."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        logfile = self.logdir / f"mount-{name}.log"
        cmd = [
            "glusterfs",
            "-N",
            f"--volfile-server={self.host}",
            f"--volfile-id={name}",
            f"--log-file={logfile}",
            "--log-level=WARNING",
            str(mountpoint),
        ]
        proc = procs.spawn(cmd, log_path=self.logdir / f"mount-{name}.out")
        self.mounts.append((mountpoint, proc))
        procs.wait_for(f"glusterfs mount of {name}", lambda: os.path.ismount(mountpoint), proc, 60, logfile)
        return mountpoint


@contextlib.contextmanager
def private_glusterd(workdir: Path, host: str | None = None) -> Iterator[Glusterd]:
    """A started private glusterd with bricks on `host` (default: host_address()); stopped, and its
    state removed, however the block exits. Start it inside the run's network namespace."""
    ensure_installed()
    workdir.mkdir(parents=True, exist_ok=True)
    netns.require("glusterd (port 24007 and its bricks' ports)")
    gd = Glusterd(workdir, host or host_address())
    fio_log = Path("/tmp/fio_gfapi.log")  # fio's gfapi engine always logs here
    fio_log_existed = fio_log.exists()
    try:
        gd.start()
        yield gd
    finally:
        gd.stop()
        if not fio_log_existed:
            fio_log.unlink(missing_ok=True)
