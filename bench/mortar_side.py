"""The mortar side of the benchmark: volumes of 1 brick or replica 3 on this host, their client
volfiles (the one mortar generates and a hand-written minimal one), and the frontends.

Volumes normally come from a private mortard (bench/mortard.py): `volume create`, `volume set
group virt`, `volume start`, the client volfile fetched from its API. `brick_volume` is the way
without a node daemon: `mortar-brick` processes started from volgen's brick volfiles. VM-image
volumes get mortar's `group virt` (whose `storage.o-direct on` gives the durability GlusterFS's
group virt gives with strict-o-direct on and remote-dio disable). With `--profile` the FUSE mount and NBD
server processes run under py-spy (and the bricks: directly here, through nsenter with mortard).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import logging
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import netns, procs
from mortar.graph.volfile import VolumeSpec, dump, parse
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile

log = logging.getLogger(__name__)


def virt_options() -> tuple[dict[str, str], dict[str, str]]:
    """`volume set` keys for VM-image volumes: mortar's group virt, key by key (as the GlusterFS side
    does), and the keys this build refuses with the reason."""
    from mortar.mgmt import volopts

    text = importlib.resources.files("mortar.mgmt").joinpath("groups", "virt").read_text()
    wanted: dict[str, str] = {}
    for raw in text.splitlines():
        key, sep, value = raw.split("#", 1)[0].partition("=")
        if sep:
            wanted[key.strip()] = value.strip()
    taken: dict[str, str] = {}
    refused: dict[str, str] = {}
    for key, value in wanted.items():
        try:
            taken[key] = volopts.validate(key, value)
        except volopts.OptionKeyError as exc:
            refused[key] = str(exc)
    return taken, refused


def replicate_available() -> bool:
    """cluster/replicate (AFR) is being written; replica rows run once it imports."""
    try:
        module = importlib.import_module("mortar.xlators.cluster.afr")
    except Exception:
        return False
    return hasattr(module, "ReplicateTranslator")


def fuse_available() -> str:
    """'' when `mortar mount` can run, else why the mortar FUSE rows are pending."""
    if importlib.util.find_spec("mortar.frontends.fuse") is None:
        return "pending: mortar.frontends.fuse (mortar mount) not landed"
    return ""


def nbd_available() -> str:
    """'' when the NBD server can serve a mortar volume (`--volfile`), else why the row is pending."""
    res = procs.run([str(procs.BIN / "python"), "-m", "mortar.frontends.nbd", "--help"], check=False)
    if "--volfile" not in res.stdout:
        return "pending: NBD server has no export provider over a mortar volume yet"
    return ""


@dataclass
class MortarVolume:
    name: str
    workdir: Path  # where its frontends keep their logs
    volfile: Path  # the client volfile as volgen (or mortard) makes it
    custom_volfile: Path  # the minimal hand-written graph (the seed's "custom client side volfile")
    replica: int = 1

    @property
    def shape(self) -> str:
        return f"replica {self.replica}" if self.replica > 1 else "1 brick"


def minimal_volfile(text: str) -> str:
    """The client volfile cut to what the data needs: performance/* and debug/* translators
    removed (io-stats, client io-threads), their parents wired to their children; protocol/client
    and cluster/* stay with their options (logins, group virt's AFR options)."""
    specs = parse(text, "client.vol")
    dropped = {s.name: s.subvolumes for s in specs if s.type.split("/")[0] in ("performance", "debug")}

    def through(name: str) -> list[str]:
        return [n for sub in dropped[name] for n in through(sub)] if name in dropped else [name]

    kept = [
        VolumeSpec(s.name, s.type, dict(s.options), [n for sub in s.subvolumes for n in through(sub)])
        for s in specs
        if s.name not in dropped
    ]
    return dump(kept)


@contextlib.contextmanager
def brick_volume(
    workdir: Path,
    name: str,
    bricks: int = 1,
    replica: int = 1,
    virt: bool = False,
    host: str = "127.0.0.1",
    profile_dir: Path | None = None,
) -> Iterator[MortarVolume]:
    """Without a node daemon: start the bricks of a new volume from volgen's brick volfiles (with
    mortar's group virt applied through volopts); yields the volume; stops them."""
    from mortar.mgmt import volopts

    netns.require("mortar's bricks", host)
    workdir.mkdir(parents=True, exist_ok=True)
    desc = VolumeDescription(
        name,
        str(uuid.uuid4()),
        [Brick(host, str(workdir / f"brick{i}")) for i in range(bricks)],
        replica_count=replica,
    )
    if virt:
        volopts.apply(desc, virt_options()[0])
    started: list[subprocess.Popen[bytes]] = []
    try:
        ports: list[int] = []
        for i in range(bricks):
            vol = workdir / f"brick{i}.vol"
            vol.write_text(brick_volfile(desc, i, create=True))
            port_file = workdir / f"brick{i}.port"
            logfile = workdir / f"brick{i}.log"
            cmd = [
                str(procs.BIN / "mortar-brick"),
                "--volfile",
                str(vol),
                "--port-file",
                str(port_file),
                "--log-file",
                str(logfile),
                "--log-level",
                "WARNING",
            ]
            profile = profile_dir / f"{name}-brick{i}.speedscope.json" if profile_dir else None
            full = procs.profiled(cmd, profile)
            proc = procs.spawn(full, log_path=workdir / f"brick{i}.out")
            started.append(proc)
            procs.wait_for(f"mortar brick {name}/{i}", port_file.exists, proc, 30, logfile)
            ports.append(int(port_file.read_text()))
        desc.bricks = [Brick(b.host, b.path, p) for b, p in zip(desc.bricks, ports, strict=True)]
        volfile = workdir / "client.vol"
        volfile.write_text(client_volfile(desc))
        custom = workdir / "custom.vol"
        custom.write_text(minimal_volfile(volfile.read_text()))
        yield MortarVolume(name, workdir, volfile, custom, replica)
    finally:
        # SIGINT: py-spy writes its profile and the brick exits cleanly on it too
        for proc in started:
            procs.stop(proc, signal.SIGINT if profile_dir else signal.SIGTERM)


@contextlib.contextmanager
def fuse_mount(vol: MortarVolume, mountpoint: Path, profile_dir: Path | None = None) -> Iterator[Path]:
    """`mortar mount --volfile` in the foreground (its default options); unmounted on exit."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    logfile = vol.workdir / "mount.log"
    cmd = [
        str(procs.BIN / "python"),
        "-m",
        "mortar.frontends.fuse",
        "-f",
        "--volfile",
        str(vol.volfile),
        "-o",
        f"log-file={logfile},log-level=WARNING",
        str(mountpoint),
    ]
    profile = profile_dir / f"{vol.name}-fuse.speedscope.json" if profile_dir else None
    full = procs.profiled(cmd, profile)
    proc = procs.spawn(full, log_path=vol.workdir / "mount.out")
    try:
        procs.wait_for(
            f"mortar mount of {vol.name}",
            lambda: os.path.ismount(mountpoint),
            proc,
            60,
            vol.workdir / "mount.out",
        )
        yield mountpoint
    finally:
        procs.unmount(mountpoint)
        procs.stop(proc, signal.SIGINT if profile_dir else signal.SIGTERM)


@contextlib.contextmanager
def nbd_server(vol: MortarVolume, profile_dir: Path | None = None) -> Iterator[Callable[[str], str]]:
    """mortar's NBD server on a volume (TCP, loopback); yields name -> nbd:// URI of that image."""
    out = vol.workdir / "nbd.out"
    cmd = [
        str(procs.BIN / "python"),
        "-m",
        "mortar.frontends.nbd",
        "--volfile",
        str(vol.volfile),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        # images opened O_DIRECT on the bricks, as gfapi with direct=1 and the virt group's
        # strict-o-direct do on the GlusterFS rows (the NBD protocol itself carries no such flag)
        "--cache",
        "none",
        "--log-level",
        "WARNING",
    ]
    profile = profile_dir / f"{vol.name}-nbd.speedscope.json" if profile_dir else None
    full = procs.profiled(cmd, profile)
    proc = procs.spawn(full, log_path=out)
    try:
        procs.wait_for(f"mortar NBD server on {vol.name}", lambda: "ready" in out.read_text(), proc, 60, out)
        port = int(re.search(r"listening tcp:[^\s]*:(\d+)", out.read_text()).group(1))  # type: ignore[union-attr]
        yield lambda name: f"nbd://127.0.0.1:{port}/{vol.name}/{name}"
    finally:
        procs.stop(proc, signal.SIGINT if profile_dir else signal.SIGTERM)
