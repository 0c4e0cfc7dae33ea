"""Scenario `heal` (issue 4): replica-3 self-heal throughput, mortar beside GlusterFS.

For each system: a replica-3 volume with `group virt` (mortar: plus storage.o-direct, as in the
seed scenario), its three bricks on this host's bench disk. One brick process is killed with
SIGKILL, a VM image is written through the native client (fio's gfapi engine; mortar's native
client in bench/native_job.py, the same shape: 1 MiB sequential, O_DIRECT), then the brick comes
back with `volume start VOL force` and `volume heal VOL`. The heal time runs from that restart until
`volume heal VOL info` lists nothing on any brick, all three bricks connected, and the brick files
are byte-identical (sha256 of every file outside `.glusterfs` / `.mortar`, GlusterFS's shards under
`.shard` included, adding up to the bytes written; the checksumming is not counted). The figure is
MiB of image healed per second.

Then the same with `cluster.data-self-heal-algorithm` full and diff: the brick is killed again and
10 % of the healed image (1 MiB pieces at random offsets, the same on both systems) is rewritten
before it returns: `full` copies the whole file again, `diff` only the blocks that differ.

mortard restarts a dead brick on its own (1 s, 2 s, 4 s... later); glusterd does not. To keep
mortar's brick down while the image is written, as GlusterFS's stays down, the private mortard is
paused (SIGSTOP) before the brick is killed and resumed (SIGCONT) just before `volume start force`.
Clients, bricks and the heal daemon run on without it; mortar's figure includes the 1 s its restart
back-off then takes (each kill waits until the brick has run 31 s, so the back-off does not double
as it would for a brick that keeps dying).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import fio, gluster, netns, procs
from bench.common import bench_dir, save_results
from bench.gluster import Glusterd
from bench.mortard import Mortard, private_mortard
from mortar.client import Volume
from mortar.mgmt.supervisor import STABLE_AFTER

log = logging.getLogger(__name__)
MIB = 1 << 20
IMAGE = "vm.img"
SKIP_DIRS = {".glusterfs", ".mortar"}
DOWN_BRICK = 2  # the brick that is killed (the third)


@dataclass
class Settings:
    size_mib: int = 1024
    rewrite_fraction: float = 0.1
    algorithms: tuple[str, ...] = ("full", "diff")
    timeout: float = 900.0  # per heal
    #: seconds mortar's brick must have run before each kill (0: back-off doubles; --quick)
    brick_uptime: float = STABLE_AFTER + 1.0
    keep: bool = False


@dataclass
class HealRun:
    system: str
    case: str  # "1 GiB written while down" / "10% rewritten, diff" ...
    algorithm: str
    written_mib: float  # what the client wrote while the brick was down
    image_mib: float
    heal_s: float = float("nan")
    restart_s: float = float("nan")  # of heal_s: `volume start force` until it returned
    verified: bool = False
    note: str = ""

    @property
    def rate(self) -> float:
        """MiB of image healed per second (the image's size over the heal time)."""
        return self.image_mib / self.heal_s if self.heal_s > 0 else float("nan")


@dataclass
class Outcome:
    runs: list[HealRun]
    setup: dict[str, object] = field(default_factory=dict)


# ---- the two systems behind one interface ------------------------------------------------------------


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> Iterator[str]:
    return (p for p in os.listdir("/proc") if p.isdigit())


class System:
    """One replica-3 volume of one system, with the handful of verbs the scenario needs."""

    name = ""
    volume = ""
    #: seconds a brick must have run before it is killed (see MortarSystem)
    up_before_kill = 0.0

    def __init__(self, bricks: list[Path], work: Path) -> None:
        self.bricks = bricks
        self.work = work
        self.up_since = time.monotonic()

    def cli(self, *args: str, check: bool = True) -> str:
        raise NotImplementedError

    def kill_brick(self, index: int) -> None:
        raise NotImplementedError

    def resume(self) -> None:
        """Undo whatever kill_brick did to keep the brick down (mortar: resume mortard)."""

    def write_image(self, size: int) -> None:
        raise NotImplementedError

    def rewrite(self, offsets: list[int]) -> None:
        raise NotImplementedError

    def heal_info(self) -> tuple[int, int]:
        """(entries pending over all bricks, bricks connected) from `volume heal VOL info`."""
        return _parse_info(self.cli("volume", "heal", self.volume, "info", check=False))

    def set_algorithm(self, algorithm: str) -> None:
        self.cli("volume", "set", self.volume, "cluster.data-self-heal-algorithm", algorithm)


def _parse_info(text: str) -> tuple[int, int]:
    pending = sum(int(n) for n in re.findall(r"^Number of entries: (\d+)", text, re.M))
    dashes = len(re.findall(r"^Number of entries: -", text, re.M))
    connected = len(re.findall(r"^Status: Connected", text, re.M))
    return pending + dashes, connected


def _glfsheal() -> str:
    for path in [*sorted(Path("/usr/lib").glob("*/glusterfs/glfsheal")), Path("/usr/sbin/glfsheal")]:
        if path.exists():
            return str(path)
    raise RuntimeError("glfsheal (GlusterFS's heal info helper) not found")


class GlusterSystem(System):
    name = "GlusterFS"

    def __init__(self, gd: Glusterd, volume: str, bricks: list[Path], work: Path) -> None:
        super().__init__(bricks, work)
        self.gd = gd
        self.volume = volume

    def cli(self, *args: str, check: bool = True) -> str:
        res = self.gd.cli(*args, check=check)
        return res.stdout + res.stderr

    def kill_brick(self, index: int) -> None:
        brick = str(self.bricks[index])
        for pid in _pids():
            argv = _cmdline(pid)
            if argv and argv[0].endswith("glusterfsd") and brick in argv:
                os.kill(int(pid), signal.SIGKILL)
                return
        raise RuntimeError(f"no glusterfsd process serves {brick}")

    def heal_info(self) -> tuple[int, int]:
        """`gluster volume heal VOL info` runs glfsheal, which asks /var/run/glusterd.socket for the
        volfile; the private glusterd's socket is elsewhere, so glfsheal is run directly with it,
        inside glusterd's mount and PID namespaces (its /proc; its log goes to the run's log dir)."""
        assert self.gd.proc is not None
        root = Path(f"/proc/{self.gd.proc.pid}/task/{self.gd.proc.pid}/children").read_text().split()[0]
        cmd = ["nsenter", "-t", root, "-m", "-p", _glfsheal(), self.volume]
        cmd += ["glusterd-sock", str(self.gd.sock)]
        res = procs.run(cmd, check=False, timeout=120)
        return _parse_info(res.stdout)

    def write_image(self, size: int) -> None:
        target = fio.Target("gfapi", volume=self.volume, host=self.gd.host)
        fio.run(target, "write", [IMAGE], size, MIB, 1, self.work)

    def rewrite(self, offsets: list[int]) -> None:
        """qemu-io through QEMU's gluster driver (gfapi): one 1 MiB write per offset, then flush."""
        cmds = [a for off in offsets for a in ("-c", f"write -P 0x{(off // MIB) % 251 + 1:02x} {off} 1M")]
        uri = f"gluster://{self.gd.host}/{self.volume}/{IMAGE}"
        procs.run(["qemu-io", "-f", "raw", "-t", "none", *cmds, "-c", "flush", uri], timeout=600)


class MortarSystem(System):
    name = "mortar"
    # mortard's restart back-off doubles for a brick that dies again within STABLE_AFTER (30 s) of
    # its start; a brick that ran longer restarts after the first delay (1 s), as in real life;
    # run() sets `up_before_kill` from Settings.brick_uptime

    def __init__(self, md: Mortard, volume: str, volfile: Path, bricks: list[Path], work: Path) -> None:
        super().__init__(bricks, work)
        self.md = md
        self.volume = volume
        self.volfile = volfile
        self.paused: int | None = None

    def cli(self, *args: str, check: bool = True) -> str:
        res = self.md.cli(*args, check=check)
        return res.stdout + res.stderr

    def _members(self) -> Iterator[tuple[str, list[str]]]:
        """(host pid, argv) of every process in mortard's PID namespace."""
        assert self.md.proc is not None
        children = Path(f"/proc/{self.md.proc.pid}/task/{self.md.proc.pid}/children").read_text().split()
        ns = os.readlink(f"/proc/{children[0]}/ns/pid")
        for pid in _pids():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                    yield pid, _cmdline(pid)

    def _host_pid(self, ns_pid: int) -> int:
        for pid, _argv in self._members():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) == ns_pid:
                        return int(pid)
        raise RuntimeError(f"no process {ns_pid} in mortard's namespace")

    def kill_brick(self, index: int) -> None:
        status = json.loads(self.cli("--json", "volume", "status", self.volume))
        brick = next(b for b in status["volumes"][0]["bricks"] if b["index"] == index)
        target = self._host_pid(int(brick["pid"]))
        mortard = next(
            int(pid) for pid, argv in self._members() if len(argv) > 1 and argv[1].endswith("/mortard")
        )
        os.kill(mortard, signal.SIGSTOP)  # it would restart the brick within a second
        self.paused = mortard
        os.kill(target, signal.SIGKILL)

    def resume(self) -> None:
        if self.paused is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.paused, signal.SIGCONT)
            self.paused = None

    def write_image(self, size: int) -> None:
        job = Path(__file__).resolve().parent / "native_job.py"
        cmd = [str(procs.BIN / "python"), str(job), str(self.volfile), "seq", "--rw", "write"]
        procs.run([*cmd, "--files", IMAGE, "--size", str(size), "--bs", str(MIB)], timeout=1800)

    def rewrite(self, offsets: list[int]) -> None:
        vol = Volume.from_volfile(self.volfile, timeout=30)
        try:
            h = vol.open_fd(f"/{IMAGE}", os.O_WRONLY | os.O_DIRECT)
            for off in offsets:
                vol.pwrite(h, bytes([(off // MIB) % 251 + 1]) * MIB, off)
            vol.fsync(h)
            vol.close(h)
        finally:
            vol.close()


# ---- the measurement ------------------------------------------------------------------------------


def brick_digests(brick: Path) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, sha256) of every regular file outside the systems' own directories
    (GlusterFS's group virt shards images: the pieces under `.shard` are data and are included)."""
    out: dict[str, tuple[int, str]] = {}
    for root, dirs, files in os.walk(brick):
        if Path(root) == brick:
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".glusterfs")]
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            out[str(path.relative_to(brick))] = (path.stat().st_size, digest)
    return out


def identical(bricks: list[Path], size: int | None = None) -> bool:
    """The copies hold the same files with the same bytes, the image among them, and (with `size`)
    as many bytes as were written: a heal that stopped short cannot pass for a finished one."""
    digests = [brick_digests(b) for b in bricks]
    if IMAGE not in digests[0] or any(d != digests[0] for d in digests[1:]):
        return False
    return size is None or sum(n for n, _ in digests[0].values()) == size


def wait_healed(sys_: System, started: float, timeout: float, size: int) -> tuple[float, bool]:
    """Seconds from `started` until heal info is empty with all bricks up and the copies match."""
    deadline = started + timeout
    last_kick = time.monotonic()
    while time.monotonic() < deadline:
        pending, connected = sys_.heal_info()
        seen = time.monotonic()
        if pending == 0 and connected == len(sys_.bricks):
            if identical(sys_.bricks, size):
                return seen - started, True
            log.info("%s: heal info is empty but the copies differ; waiting", sys_.name)
        if seen - last_kick > 30:  # a heal daemon that missed the brick's return is asked again
            sys_.cli("volume", "heal", sys_.volume, check=False)
            last_kick = seen
        time.sleep(0.5)
    return time.monotonic() - started, False


def heal_once(sys_: System, run: HealRun, s: Settings, offsets: list[int] | None) -> HealRun:
    """Kill the brick, write (the image, or the rewrite), bring it back, time the heal."""
    time.sleep(max(0.0, sys_.up_since + sys_.up_before_kill - time.monotonic()))
    log.info("%s: %s: killing brick %d", sys_.name, run.case, DOWN_BRICK)
    sys_.kill_brick(DOWN_BRICK)
    try:
        time.sleep(1.0)  # let the clients see the brick go
        if offsets is None:
            sys_.write_image(s.size_mib * MIB)
        else:
            sys_.rewrite(offsets)
    finally:
        sys_.resume()
    log.info("%s: %s: written; restarting the brick", sys_.name, run.case)
    started = time.monotonic()
    sys_.cli("volume", "start", sys_.volume, "force")
    run.restart_s = time.monotonic() - started
    sys_.up_since = time.monotonic()
    sys_.cli("volume", "heal", sys_.volume, check=False)
    run.heal_s, run.verified = wait_healed(sys_, started, s.timeout, s.size_mib * MIB)
    if not run.verified:
        run.note = f"not healed within {s.timeout:g}s"
    log.info("%s: %s: healed in %.1fs (verified %s)", sys_.name, run.case, run.heal_s, run.verified)
    return run


def scenario(sys_: System, s: Settings, offsets: list[int]) -> list[HealRun]:
    size = s.size_mib * MIB
    runs = []
    first = HealRun(sys_.name, f"{_mib(size)} image written while down", "full", s.size_mib, s.size_mib)
    runs.append(heal_once(sys_, first, s, None))
    if not first.verified:
        return runs
    for algorithm in s.algorithms:
        sys_.set_algorithm(algorithm)
        case = f"{s.rewrite_fraction:.0%} rewritten while down"
        r = HealRun(sys_.name, case, algorithm, len(offsets) * 1.0, s.size_mib)
        runs.append(heal_once(sys_, r, s, offsets))
        if not r.verified:
            break
    return runs


def _mib(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n // MIB} MiB"


def _settle(sys_: System, timeout: float = 60) -> None:
    """Wait until heal info answers with every brick connected and nothing pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending, connected = sys_.heal_info()
        if connected == len(sys_.bricks) and pending == 0:
            sys_.up_since = time.monotonic()
            return
        time.sleep(0.5)
    raise RuntimeError(f"{sys_.name}: volume {sys_.volume} did not come up with all bricks")


def run(s: Settings) -> Outcome:
    started = time.monotonic()
    work = bench_dir()
    out: list[HealRun] = []
    blocks = s.size_mib
    rng = random.Random(4)
    offsets = sorted(b * MIB for b in rng.sample(range(blocks), max(1, int(blocks * s.rewrite_fraction))))
    setup: dict[str, object] = {"bench_dir": str(work), "rewrite_offsets": len(offsets)}
    try:
        with netns.bench_network(unmount_under=[work]) as net:
            setup["netns"] = {"name": net.name, "address": net.addr}
            with gluster.private_glusterd(work / "gluster", net.addr) as gd:
                setup["glusterfs"] = gluster.version()
                bricks = [work / "gluster-bricks" / f"gheal-{i}" for i in range(3)]
                vol = gd.create_volume("gheal", bricks, replica=3, group="virt")
                setup["glusterfs_refused_options"] = vol.refused
                g = GlusterSystem(gd, "gheal", bricks, work)
                _settle(g)
                out += scenario(g, s, offsets)
            with private_mortard(work / "mortard", net.addr) as md:
                bricks = [work / "mortar-bricks" / f"mheal-{i}" for i in range(3)]
                mvol, refused = md.create_volume("mheal", bricks, 3, True, None)
                setup["mortar_refused_options"] = refused
                m = MortarSystem(md, "mheal", mvol.volfile, bricks, work)
                m.up_before_kill = s.brick_uptime
                try:
                    _settle(m)
                    out += scenario(m, s, offsets)
                finally:
                    m.resume()
    finally:
        if s.keep:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    setup["elapsed_s"] = round(time.monotonic() - started, 1)
    return Outcome(out, setup)


# ---- the report -------------------------------------------------------------------------------------


def markdown(outcome: Outcome, header: str) -> str:
    lines = [
        header,
        "",
        "| system | case | data-self-heal-algorithm | written while down (MiB) | heal time (s) | "
        "of which restart (s) | healed (MiB/s of image) | mortar / GlusterFS | copies identical |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    by_key = {(r.system, r.case, r.algorithm): r for r in outcome.runs}
    for r in outcome.runs:
        other = by_key.get(("GlusterFS", r.case, r.algorithm)) if r.system == "mortar" else None
        ratio = f"{r.rate / other.rate:.2f}x" if other is not None and other.rate > 0 and r.verified else ""
        lines.append(
            f"| {r.system} | {r.case} | {r.algorithm} | {r.written_mib:,.0f} | {r.heal_s:.1f} | "
            f"{r.restart_s:.1f} | {r.rate:,.1f} | {ratio} | {'yes' if r.verified else 'NO: ' + r.note} |"
        )
    return "\n".join(lines)


QUICK = Settings(size_mib=64, algorithms=("diff",), timeout=120.0, brick_uptime=0.0)


def main(results: Path, quick: bool = False, keep: bool = False) -> int:
    """Run the scenario, print the table, write results/heal(-quick).{json,md}."""
    s = dataclasses.replace(QUICK if quick else Settings(), keep=keep)
    outcome = run(s)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    header = (
        f"replica-3 self-heal, mortar vs {outcome.setup.get('glusterfs', 'GlusterFS')} on "
        f"{os.uname().nodename} ({os.cpu_count()} CPUs), {stamp}; image {_mib(s.size_mib * MIB)}, group "
        f"virt on both; heal time = `volume start force` until heal info is empty and the copies are "
        f"identical; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; run took "
        f"{outcome.setup.get('elapsed_s', '?')}s."
    )
    md = markdown(outcome, header)
    name = "heal-quick" if quick else "heal"
    doc = {
        "scenario": "heal",
        "when": stamp,
        "settings": dataclasses.asdict(s),
        "setup": outcome.setup,
        "load_avg": load,
        "runs": [{**dataclasses.asdict(r), "rate_mib_s": r.rate} for r in outcome.runs],
    }
    save_results(results, name, md, doc)
    return 0  # a heal that did not finish is a figure too (the table says so); the bench reports
