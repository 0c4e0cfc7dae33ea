"""A mortard private to the run: mortar's volumes made the way an operator makes them
(`mortar volume create / set group virt / start`), beside the private glusterd.

Like the glusterd (bench/gluster.py) it runs in its own PID and mount namespaces (`unshare -p -m`),
with its state and logs in the run's work directory and its HTTP API on a free loopback port of the
run's network namespace (bench/netns.py: start it, and call `cli`, inside that namespace), so it
never meets a system mortard, and its bricks (which outlive a stopped mortard by design) die with
the PID namespace however the benchmark ends. py-spy reaches the bricks from inside the
namespace (`nsenter`), where the brick pids mortard reports are valid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench import netns, procs
from bench.mortar_side import MortarVolume, minimal_volfile

log = logging.getLogger(__name__)


def _free_port_run(count: int = 3) -> int:
    """A port P with P..P+count-1 free (mortard's API, then etcd's client and peer ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + count > 65535:
            continue
        try:
            for p in range(port + 1, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no run of free ports for mortard")


class Mortard:
    def __init__(self, workdir: Path, host: str) -> None:
        self.workdir = workdir
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.volumes: list[str] = []
        self.profilers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        netns.require("mortard's bricks", self.host)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port_run()
        cmd = [
            str(procs.BIN / "mortard"), "--foreground", "--workdir", str(self.workdir / "state"),
            "--logdir", str(self.workdir / "log"), "--listen", "127.0.0.1", "--port", str(self.port),
            "--hostname", self.host, "--log-level", "WARNING",
            "--no-nbd",  # the benchmark runs its own NBD servers; port 10809 may be another's
        ]  # fmt: skip
        # sh stays PID 1 of the namespace (it reaps); when it exits, mortard and its bricks go too
        ns = ["unshare", "-p", "-f", "-m", "--mount-proc", "--propagation", "private", "--kill-child"]
        out = self.workdir / "mortard.out"
        self.proc = procs.spawn([*ns, "sh", "-c", shlex.join(cmd)], log_path=out)
        procs.wait_for("mortard", self._answers, self.proc, 60, out)
        log.info("private mortard up (API on 127.0.0.1:%d, state in %s)", self.port, self.workdir)

    def _answers(self) -> bool:
        return self.cli("pool", "list", check=False).returncode == 0

    def _ns_root(self) -> int:
        """Host pid of the namespace's first process (the unshare's child)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(procs.BIN / "mortar"), "--remote-host", f"127.0.0.1:{self.port}", *args]
        return procs.run(cmd, check=check, timeout=timeout)

    def create_volume(
        self,
        name: str,
        bricks: list[Path],
        replica: int,
        virt: bool,
        profile_dir: Path | None,
        layout: tuple[str, ...] = (),
    ) -> tuple[MortarVolume, dict[str, str]]:
        """Create, configure and start a volume; returns it and the options mortar refused.
        `layout`: more words for `volume create` before the bricks (e.g. device lv pool-size 8G)."""
        args = ["volume", "create", name, *layout] + (["replica", str(replica)] if replica > 1 else [])
        self.cli(*args, *[f"{self.host}:{b}" for b in bricks], "force")
        self.volumes.append(name)
        refused: dict[str, str] = {}
        wanted = [("group", "virt")] if virt else []
        for key, value in wanted:
            res = self.cli("volume", "set", name, key, value, check=False)
            if res.returncode != 0:
                refused[key] = (res.stderr or res.stdout).strip()
        self.cli("volume", "start", name)
        vdir = self.workdir / "volumes" / name
        vdir.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{self.port}/v1/volumes/{name}/volfile"
        with urllib.request.urlopen(url, timeout=30) as resp:
            text = resp.read().decode()
        volfile, custom = vdir / "client.vol", vdir / "custom.vol"
        volfile.write_text(text)
        custom.write_text(minimal_volfile(text))
        vol = MortarVolume(name, vdir, volfile, custom, replica)
        if profile_dir is not None:
            self._profile_bricks(name, profile_dir)
        return vol, refused

    def _profile_bricks(self, name: str, profile_dir: Path) -> None:
        status = json.loads(self.cli("--json", "volume", "status", name).stdout)
        root = self._ns_root()
        for brick in status["volumes"][0]["bricks"]:
            out = profile_dir / f"{name}-brick{brick['index']}.speedscope.json"
            cmd = [
                "nsenter", "-t", str(root), "-p", "-m", str(procs.BIN / "py-spy"), "record", "--nonblocking",
                "-r", "97", "-f", "speedscope", "-o", str(out), "--pid", str(brick["pid"]),
            ]  # fmt: skip
            self.profilers.append(procs.spawn(cmd, log_path=self.workdir / f"py-spy-{name}.out"))

    def stop(self) -> None:
        for prof in self.profilers:  # SIGINT: py-spy writes its profile and detaches
            procs.stop(prof, signal.SIGINT, timeout=60)
        self.profilers.clear()
        if self.proc is not None and self.proc.poll() is None:
            for name in self.volumes:
                with contextlib.suppress(Exception):
                    self.cli("volume", "stop", name, check=False, timeout=60)
            procs.stop(self.proc, timeout=30)
        self.proc = None


@contextlib.contextmanager
def private_mortard(workdir: Path, host: str) -> Iterator[Mortard]:
    md = Mortard(workdir, host)
    try:
        md.start()
        yield md
    finally:
        md.stop()
