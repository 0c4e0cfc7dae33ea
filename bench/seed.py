"""The seed's table, measured in one run: the local disk, GlusterFS 10 (FUSE mount and native
gfapi/QEMU access) and mortar (FUSE, NBD, native client, native with a hand-written volfile), on
volumes of 1 brick and of replica 3 on this host, side by side.

Everything is set up and torn down here: GlusterFS is installed if missing and runs from a private
glusterd (bench/gluster.py); mortar's volumes come from a private mortard (bench/mortard.py) or
bricks started from volgen's volfiles (bench/mortar_side.py). Both systems' servers and all their
clients run in the run's own network namespace (bench/netns.py), bricks on its one address.
VM-image jobs (sequential, random, qemu-img convert) run on volumes with
`group virt` (GlusterFS) or its mortar equivalent; the small-file job runs on volumes with defaults.
Each cell is the median of `reps` runs with min and max kept; runs of different rows interleave,
so slow drift of the machine spreads over all rows instead of biasing one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import gluster, mortar_side, netns, procs
from bench.common import Cell, bench_dir, drop_caches
from bench.mortard import private_mortard
from bench.targets import DirTarget, GfapiTarget, NativeTarget, NbdTarget, Target, Unsupported

log = logging.getLogger(__name__)
MIB = 1 << 20

ROWS: dict[str, str] = {
    "base": "Base (local disk)",
    "gluster-fuse": "GlusterFS FUSE mount",
    "gluster-native": "GlusterFS native (gfapi; qemu gluster://)",
    "mortar-fuse": "mortar FUSE mount",
    "mortar-nbd": "mortar NBD (fio nbd; qemu nbd://)",
    "mortar-native": "mortar native client",
    "mortar-custom": "mortar native, custom volfile",
}
#: GlusterFS row each mortar row is held against (small files: always the FUSE mount)
COUNTERPART = {
    "mortar-fuse": "gluster-fuse",
    "mortar-nbd": "gluster-native",
    "mortar-native": "gluster-native",
    "mortar-custom": "gluster-native",
}
SHAPES = {"1": "1 brick", "3": "replica 3"}
#: --jobs key -> the table's job columns (name, unit)
JOBS: dict[str, list[tuple[str, str]]] = {
    "seqread": [("seq read", "MiB/s")],
    "seqwrite": [("seq write", "MiB/s")],
    "randread": [("rand read 4K", "IOPS")],
    "randwrite": [("rand write 4K", "IOPS")],
    "convert": [("convert in", "MiB/s"), ("convert out", "MiB/s")],
    "smallfiles": [("create", "files/s"), ("stat", "files/s"), ("delete", "files/s")],
}
IMAGE_JOBS = ("seqwrite", "seqread", "randwrite", "randread", "convert")
SEQ_FILES = [f"seq.{i}" for i in range(4)]


@dataclass
class Settings:
    rows: list[str]
    shapes: list[str]
    jobs: list[str]
    file_mib: int = 256
    rand_mib: int = 256
    seconds: float = 5.0
    convert_mib: int = 1024
    files: int = 10000
    files_budget: float = 30.0
    reps: int = 3
    profile_dir: Path | None = None
    keep: bool = False
    mortar_via: str = "mortard"  # or "bricks": mortar-brick processes without a node daemon


@dataclass
class RowInfo:
    label: str
    key: str
    shape: str


@dataclass
class Outcome:
    cells: list[Cell]
    rows: list[RowInfo]
    setup: dict[str, object] = field(default_factory=dict)


def row_label(key: str, shape: str) -> str:
    return ROWS[key] if key == "base" else f"{ROWS[key]}, {shape}"


def _seed_image(path: Path, size: int) -> None:
    """A raw image of non-zero, non-repeating data (qemu-img skips zero blocks)."""
    block = bytearray(os.urandom(MIB))
    with open(path, "wb") as f:
        for i in range(size // MIB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)


class Run:
    """One benchmark run: the targets it built, and the cells it fills."""

    def __init__(
        self, s: Settings, stack: contextlib.ExitStack, workdir: Path, host: str = "127.0.0.1"
    ) -> None:
        self.s = s
        self.stack = stack
        self.workdir = workdir
        self.host = host  # where bricks of both systems listen (the network namespace's address)
        self.targets: dict[str, list[Target]] = {}  # "virt" / "default" -> targets, in row order
        self.pending: dict[tuple[str, str], str] = {}  # (row key, shape) -> why there is no target
        self.cells: dict[tuple[str, str], Cell] = {}
        self.rows: dict[str, RowInfo] = {}
        self.setup: dict[str, object] = {}

    # ---- building the targets ----------------------------------------------------------------

    def _add(self, kind: str, target: Target) -> None:
        self.targets.setdefault(kind, []).append(target)
        self.rows.setdefault(target.label, RowInfo(target.label, target.key, target.shape))

    def build(self) -> None:
        s, w = self.s, self.workdir
        kinds = [k for k in ("virt", "default") if any((j in IMAGE_JOBS) == (k == "virt") for j in s.jobs)]
        if "base" in s.rows:
            local = w / "local"
            local.mkdir()
            for kind in kinds:
                self._add(kind, DirTarget("base", "base", ROWS["base"], "local", w, local))
        if any(r.startswith("gluster") for r in s.rows):
            self._build_gluster(kinds)
        if any(r.startswith("mortar") for r in s.rows):
            self._build_mortar(kinds)

    def _build_gluster(self, kinds: list[str]) -> None:
        s, w = self.s, self.workdir
        gd = self.stack.enter_context(gluster.private_glusterd(w / "gluster", self.host))
        self.setup["glusterfs"] = gluster.version()
        self.setup["host"] = gd.host
        refused: dict[str, object] = {}
        for shape_key in s.shapes:
            shape = SHAPES[shape_key]
            for kind in kinds:
                name = f"g{kind[0]}{shape_key}"
                n = int(shape_key)
                bricks = [w / "gluster-bricks" / f"{name}-{i}" for i in range(n)]
                vol = gd.create_volume(name, bricks, replica=n, group="virt" if kind == "virt" else None)
                if vol.refused:
                    refused[name] = vol.refused
                if "gluster-fuse" in s.rows:
                    mnt = gd.mount(name, w / "mnt" / name)
                    self._add(
                        kind,
                        DirTarget("gluster-fuse", "gluster", row_label("gluster-fuse", shape), shape, w, mnt),
                    )
                if "gluster-native" in s.rows:
                    self._add(kind, GfapiTarget(row_label("gluster-native", shape), shape, w, name, gd.host))
        self.setup["glusterfs_refused_options"] = refused

    def _build_mortar(self, kinds: list[str]) -> None:
        s, w = self.s, self.workdir
        host = self.host
        fuse_note = mortar_side.fuse_available()
        nbd_note = mortar_side.nbd_available() if "mortar-nbd" in s.rows else ""
        md = None
        if s.mortar_via == "mortard":
            md = self.stack.enter_context(private_mortard(w / "mortard", host))
            self.setup["mortar_setup"] = "mortard: volume create / set group virt / start"
        else:
            taken, refused = mortar_side.virt_options()
            self.setup["mortar_setup"] = "mortar-brick processes from volgen's volfiles (no node daemon)"
            self.setup["mortar_virt_options"] = taken
            self.setup["mortar_virt_refused"] = refused
        for shape_key in s.shapes:
            shape = SHAPES[shape_key]
            n = int(shape_key)
            if n > 1 and not mortar_side.replicate_available():
                for key in (r for r in s.rows if r.startswith("mortar")):
                    self._pend(key, shape, "pending: cluster/replicate not landed")
                continue
            for kind in kinds:
                name = f"m{kind[0]}{shape_key}"
                virt = kind == "virt"
                if md is not None:
                    bricks = [w / "mortar-bricks" / f"{name}-{i}" for i in range(n)]
                    vol, refused = md.create_volume(name, bricks, n, virt, s.profile_dir)
                    if refused:
                        self.setup.setdefault("mortar_refused_options", {})[name] = refused  # type: ignore[index]
                else:
                    vol = self.stack.enter_context(
                        mortar_side.brick_volume(
                            w / "mortar" / name, name, n, n, virt, host=host, profile_dir=s.profile_dir
                        )
                    )
                native = NativeTarget(
                    "mortar-native", row_label("mortar-native", shape), shape, w, vol.volfile, s.profile_dir
                )
                if "mortar-native" in s.rows:
                    self._add(kind, native)
                if "mortar-custom" in s.rows:
                    self._add(
                        kind,
                        NativeTarget(
                            "mortar-custom",
                            row_label("mortar-custom", shape),
                            shape,
                            w,
                            vol.custom_volfile,
                            s.profile_dir,
                        ),
                    )
                if "mortar-fuse" in s.rows:
                    if fuse_note:
                        self._pend("mortar-fuse", shape, fuse_note)
                    else:
                        mnt = self.stack.enter_context(
                            mortar_side.fuse_mount(vol, w / "mnt" / name, s.profile_dir)
                        )
                        self._add(
                            kind,
                            DirTarget(
                                "mortar-fuse", "mortar", row_label("mortar-fuse", shape), shape, w, mnt
                            ),
                        )
                if "mortar-nbd" in s.rows:
                    if nbd_note:
                        self._pend("mortar-nbd", shape, nbd_note)
                    else:
                        uri = self.stack.enter_context(mortar_side.nbd_server(vol, s.profile_dir))
                        self._add(kind, NbdTarget(row_label("mortar-nbd", shape), shape, w, uri, native))

    def _pend(self, key: str, shape: str, note: str) -> None:
        label = row_label(key, shape)
        self.rows.setdefault(label, RowInfo(label, key, shape))
        self.pending[(key, shape)] = note

    # ---- running the jobs --------------------------------------------------------------------

    def cell(self, target_label: str, job: str, unit: str) -> Cell:
        return self.cells.setdefault((target_label, job), Cell(target_label, job, unit))

    def each(self, kind: str, fn: Callable[[Target, int], None], what: str) -> None:
        """fn(target, rep) for every rep and target, reps outermost (rows interleave)."""
        targets = self.targets.get(kind, [])
        failed: set[str] = set()
        for rep in range(self.s.reps):
            for t in targets:
                if t.label in failed:
                    continue
                log.info("%s: %s (run %d/%d)", what, t.label, rep + 1, self.s.reps)
                try:
                    fn(t, rep)
                except Unsupported as exc:
                    failed.add(t.label)
                    for job, unit in JOBS[what]:
                        self.cell(t.label, job, unit).note = str(exc)
                except Exception as exc:
                    log.exception("%s on %s failed", what, t.label)
                    failed.add(t.label)
                    for job, unit in JOBS[what]:
                        self.cell(t.label, job, unit).note = f"failed: {str(exc).splitlines()[0][:120]}"

    def prepare(self, kind: str, files: dict[str, int]) -> None:
        for t in self.targets.get(kind, []):
            log.info("preparing %s on %s", ", ".join(files), t.label)
            try:
                t.prepare(files)
            except Exception as exc:  # the jobs that follow fail and note it
                log.warning("preparing %s on %s failed: %s", list(files), t.label, exc)

    def run_jobs(self) -> None:
        s = self.s
        size, rsize = s.file_mib * MIB, s.rand_mib * MIB
        files = dict.fromkeys(SEQ_FILES, size) if {"seqwrite", "seqread"} & set(s.jobs) else {}
        if {"randwrite", "randread"} & set(s.jobs):
            files["rand.0"] = rsize
        if files:  # images exist at full size before any timed run, as a VM's disk does
            self.prepare("virt", files)
        for rw, key in (("write", "seqwrite"), ("read", "seqread")):
            if key in s.jobs:
                self.each("virt", self._seq_job(rw, key, size), key)
        for rw in ("randwrite", "randread"):
            if rw in s.jobs:
                self.each("virt", self._rand_job(rw, rsize), rw)
        if "convert" in s.jobs:
            src = self.workdir / "source.img"
            _seed_image(src, s.convert_mib * MIB)
            self.each("virt", lambda t, _rep: self._convert(t, src, s.convert_mib * MIB), "convert")
            src.unlink()
        if "smallfiles" in s.jobs:
            self.each("default", lambda t, rep: self._small(t, rep), "smallfiles")

    def _seq_job(self, rw: str, key: str, size: int) -> Callable[[Target, int], None]:
        def job(t: Target, _rep: int) -> None:
            if rw == "read":
                drop_caches()
            r = t.seq(rw, SEQ_FILES, size)
            c = self.cell(t.label, JOBS[key][0][0], "MiB/s")
            c.runs.append(r.aggregate)
            c.job_min.append(r.job_min)
            c.job_max.append(r.job_max)

        return job

    def _rand_job(self, rw: str, size: int) -> Callable[[Target, int], None]:
        def job(t: Target, _rep: int) -> None:
            if rw == "randread":
                drop_caches()
            r = t.rand(rw, "rand.0", size, self.s.seconds)
            self.cell(t.label, JOBS[rw][0][0], "IOPS").runs.append(r.iops)

        return job

    def _convert(self, t: Target, src: Path, size: int) -> None:
        out = self.workdir / "convert-out.img"
        try:
            for direction, local in (("in", src), ("out", out)):
                if direction == "out":
                    drop_caches()
                copy, wall = t.convert(direction, local, size)
                c = self.cell(t.label, f"convert {direction}", "MiB/s")
                c.runs.append(copy)
                c.extra.setdefault("wall", []).append(wall)
        finally:
            out.unlink(missing_ok=True)

    def _small(self, t: Target, rep: int) -> None:
        res = t.smallfiles(self.s.files, 4096, f"r{rep}", self.s.files_budget)
        for job, unit in JOBS["smallfiles"]:
            c = self.cell(t.label, job, unit)
            c.runs.append(res[job])
            c.extra.setdefault("files", []).append(res["files"])

    def outcome(self) -> Outcome:
        cells = list(self.cells.values())
        for (key, shape), note in self.pending.items():
            for j in self.s.jobs:
                for job, unit in JOBS[j]:
                    cells.append(Cell(row_label(key, shape), job, unit, note=note))
        order = {k: i for i, k in enumerate(ROWS)}
        rows = sorted(self.rows.values(), key=lambda r: (r.shape != "local", r.shape, order[r.key]))
        jorder = {job: i for i, (job, _u) in enumerate(j for k in JOBS for j in JOBS[k])}
        rindex = {r.label: i for i, r in enumerate(rows)}
        cells.sort(key=lambda c: (rindex.get(c.row, 99), jorder.get(c.job, 99)))
        return Outcome(cells, rows, self.setup)


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    w = bench_dir()
    try:
        yield w
    finally:
        if keep:
            log.info("work directory kept: %s", w)
        else:
            shutil.rmtree(w, ignore_errors=True)


def run(s: Settings) -> Outcome:
    procs.install_signal_handlers()
    started = time.monotonic()
    if any(r.startswith("gluster") for r in s.rows):
        gluster.ensure_installed()  # apt-get needs the host's network: before entering the namespace
    with _workdir(s.keep) as w, contextlib.ExitStack() as stack:
        net = None
        if any(r != "base" for r in s.rows):  # the local disk needs no network
            net = stack.enter_context(netns.bench_network(unmount_under=[w]))
        r = Run(s, stack, w, net.addr if net else "127.0.0.1")
        r.setup["netns"] = {"name": net.name, "address": net.addr} if net else None
        r.build()
        r.setup["settings"] = {k: str(v) for k, v in vars(s).items()}
        r.run_jobs()
        r.setup["elapsed_s"] = round(time.monotonic() - started, 1)
        return r.outcome()
