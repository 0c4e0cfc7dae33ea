"""Scenario `thin` (issue 7): thin volumes of mortar's user-space pool against a raw file.

Two levels, each comparing a thin volume with a raw file *through the same path*:

- engine: `ThinVolume.write/readinto` on a pool whose backing file is on the bench disk, against
  `os.pwrite/os.preadv` on a raw file in the same directory (the pool's own backing store);
- NBD: fio's nbd engine through mortar's NBD server on a `device lv` volume (storage/bd, the image
  a thin volume) against the same on a posix volume whose brick is on the same file system
  (mortard, its bricks, the NBD servers and fio in the run's network namespace, bench/netns.py).

Jobs: 1 MiB sequential first write (allocating; a fresh image each run) and overwrite (allocated
blocks: target >= 0.8x the raw file), sequential read (page cache dropped), 4 KiB random write
with requests in flight. Then snapshot creation time of a 1 GiB (fully written) and a 64 GiB volume
(one 64 KiB block written every 4 MiB, so as many blocks mapped, spread over 64x the space): engine
`ThinPool.snapshot`, the translator (a symlink through the native client) and `mortar bd snapshot`
(wall time, process start included); target < 10 ms at any size. Last, clone throughput (engine
`ThinPool.clone` + commit, a hard link through the translator + fsync) against `cp` + fsync of a
raw file of the same bytes. Every figure is the median of several runs, min and max kept.

Both pools' backing files are preallocated (fallocate), as the disk or LV under a real pool is, so
a thin volume's first write measures the pool's allocation; the raw file's first write goes to a
new sparse file (what `qemu-img create -f raw` makes), i.e. the file system's allocation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import fio, mortar_side, netns
from bench.common import Cell, bench_dir, drop_caches, save_results
from bench.mortard import Mortard, private_mortard
from mortar.client import Volume
from mortar.thinpool import bdpool
from mortar.thinpool.pool import ThinPool
from mortar.thinpool.volume import ThinVolume

log = logging.getLogger(__name__)
MIB = 1 << 20
GIB = 1 << 30
STRIDE = 4 * MIB  # the big volume gets one block written per stride
BLOCK = 64 << 10

RAW_ENGINE = "raw file (os.pwrite/os.preadv)"
THIN_ENGINE = "thin volume (engine API)"
RAW_NBD = "posix volume, fio over mortar NBD"
THIN_NBD = "device lv volume, fio over mortar NBD"
IO_JOBS = [("first write", "MiB/s"), ("overwrite", "MiB/s"), ("seq read", "MiB/s"), ("rand write 4K", "IOPS")]
SNAP_ROWS = [
    "engine (ThinPool.snapshot)",
    "translator (symlink, native client)",
    "mortar bd snapshot (CLI wall)",
]
CLONE_ROWS = ["cp + fsync (raw file)", "engine (ThinPool.clone + commit)", "translator (hard link + fsync)"]
OVERWRITE_TARGET = 0.8
#: a volume's native client and the nbd:// URI of an image on it by name
Client = tuple[Volume, Callable[[str], str]]
SNAPSHOT_TARGET_MS = 10.0


@dataclass
class Settings:
    size_mib: int = 1024  # the sequential image, also the "1 GiB" snapshot and clone source
    big_gib: int = 64  # the large volume of the snapshot test
    reps: int = 3
    snaps: int = 9  # snapshot timings per size and level
    seconds: float = 5.0  # each random-write run
    depth: int = 16  # random writes in flight (threads on the engine, fio iodepth on NBD)
    keep: bool = False


@dataclass
class Outcome:
    cells: list[Cell]
    setup: dict[str, object] = field(default_factory=dict)


class Cells:
    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], Cell] = {}

    def add(self, row: str, job: str, unit: str, value: float) -> None:
        self.cells.setdefault((row, job), Cell(row, job, unit)).runs.append(value)

    def get(self, row: str, job: str) -> Cell | None:
        return self.cells.get((row, job))


# ---- the engine level -----------------------------------------------------------------------------


class RawFile:
    """The raw backing file's path: os.pwrite / os.preadv on a file beside the pool's backing file."""

    def __init__(self, path: Path, size: int, fresh: bool) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o644)
        if fresh:
            os.ftruncate(self.fd, size)

    def write(self, buf: memoryview | bytes, off: int) -> None:
        os.pwrite(self.fd, buf, off)

    def readinto(self, buf: bytearray, off: int) -> None:
        os.preadv(self.fd, [buf], off)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class ThinFile:
    """The same calls on a thin volume; sync = flush (fsync of the data, metadata committed)."""

    def __init__(self, vol: ThinVolume) -> None:
        self.vol = vol

    def write(self, buf: memoryview | bytes, off: int) -> None:
        self.vol.write(buf, off)

    def readinto(self, buf: bytearray, off: int) -> None:
        self.vol.readinto(buf, off)

    def sync(self) -> None:
        self.vol.flush()

    def close(self) -> None:
        pass


def seq_write(f: RawFile | ThinFile, size: int, buf: bytes) -> float:
    t = time.perf_counter()
    for off in range(0, size, MIB):
        f.write(buf, off)
    f.sync()
    return size / MIB / (time.perf_counter() - t)


def seq_read(f: RawFile | ThinFile, size: int) -> float:
    drop_caches()
    buf = bytearray(MIB)
    t = time.perf_counter()
    for off in range(0, size, MIB):
        f.readinto(buf, off)
    return size / MIB / (time.perf_counter() - t)


def rand_write(f: RawFile | ThinFile, size: int, seconds: float, depth: int) -> float:
    """4 KiB writes at random aligned offsets from `depth` threads for `seconds`, then one sync."""
    blocks = size // 4096
    stop = time.perf_counter() + seconds
    counts = [0] * depth

    def worker(i: int) -> None:
        rng, buf = random.Random(i), os.urandom(4096)
        while time.perf_counter() < stop:
            f.write(buf, rng.randrange(blocks) * 4096)
            counts[i] += 1

    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    f.sync()
    return sum(counts) / (time.perf_counter() - t)


def sparse_fill(write: Callable[[bytes, int], object], size: int) -> int:
    """One 64 KiB block every STRIDE bytes; returns the bytes written."""
    buf = os.urandom(BLOCK)
    n = 0
    for off in range(0, size, STRIDE):
        write(buf, off)
        n += BLOCK
    return n


def engine_io(s: Settings, work: Path, pool: ThinPool, cells: Cells) -> tuple[Path, ThinVolume]:
    """The I/O jobs on both engine rows; returns the full raw file and thin volume they leave."""
    size = s.size_mib * MIB
    buf = os.urandom(MIB)
    raw_path, thin_vol = work / "raw.img", None
    for rep in range(s.reps):  # first write: a fresh, empty file or volume each run
        log.info("engine first write (run %d/%d)", rep + 1, s.reps)
        raw = RawFile(raw_path, size, fresh=True)
        cells.add(RAW_ENGINE, "first write", "MiB/s", seq_write(raw, size, buf))
        raw.close()
        if thin_vol is not None:
            pool.delete_volume(thin_vol.name)
            pool.commit()
        thin_vol = pool.create_volume(f"img{rep}", size)
        cells.add(THIN_ENGINE, "first write", "MiB/s", seq_write(ThinFile(thin_vol), size, buf))
    assert thin_vol is not None
    raw, thin = RawFile(raw_path, size, fresh=False), ThinFile(thin_vol)
    try:
        for rep in range(s.reps):
            log.info("engine overwrite, read, random write (run %d/%d)", rep + 1, s.reps)
            for row, f in ((RAW_ENGINE, raw), (THIN_ENGINE, thin)):
                cells.add(row, "overwrite", "MiB/s", seq_write(f, size, buf))
            for row, f in ((RAW_ENGINE, raw), (THIN_ENGINE, thin)):
                cells.add(row, "seq read", "MiB/s", seq_read(f, size))
            for row, f in ((RAW_ENGINE, raw), (THIN_ENGINE, thin)):
                cells.add(row, "rand write 4K", "IOPS", rand_write(f, size, s.seconds, s.depth))
    finally:
        raw.close()
    return raw_path, thin_vol


def engine_snapshots(s: Settings, pool: ThinPool, small: ThinVolume, cells: Cells) -> dict[str, int]:
    """Snapshot creation of the full small volume and of a big sparse one, through the engine."""
    big = pool.create_volume("big", s.big_gib * GIB)
    written = sparse_fill(big.write, big.size)
    big.flush()
    for label, vol in (("small", small), ("big", big)):
        job = _snap_job(s, label)
        for i in range(s.snaps):
            t = time.perf_counter()
            pool.snapshot(vol.name, f"{vol.name}-s{i}")
            cells.add(SNAP_ROWS[0], job, "ms", (time.perf_counter() - t) * 1000)
        for i in range(s.snaps):
            pool.delete_volume(f"{vol.name}-s{i}")
        pool.commit()
    pool.delete_volume("big")
    pool.commit()
    return {"big_volume_bytes_written": written}


def engine_clones(s: Settings, pool: ThinPool, raw_path: Path, vol: ThinVolume, cells: Cells) -> None:
    size = vol.size
    for rep in range(s.reps):
        log.info("clones against cp (run %d/%d)", rep + 1, s.reps)
        dst = raw_path.with_name("raw-copy.img")
        drop_caches()
        cells.add(CLONE_ROWS[0], "clone", "MiB/s", size / MIB / _cp_fsync(raw_path, dst))
        dst.unlink()
        drop_caches()
        t = time.perf_counter()
        pool.clone(vol.name, "clone")
        pool.commit()
        cells.add(CLONE_ROWS[1], "clone", "MiB/s", size / MIB / (time.perf_counter() - t))
        pool.delete_volume("clone")
        pool.commit()


def _cp_fsync(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", "--sparse=never", "--reflink=never", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def _snap_job(s: Settings, which: str) -> str:
    if which == "small":
        return f"snapshot {_size(s.size_mib * MIB)}"
    return f"snapshot {_size(s.big_gib * GIB)}"


def _size(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB and n % GIB == 0 else f"{n // MIB} MiB"


# ---- through mortar: NBD, the translator, the CLI -------------------------------------------------


def _make_image(client: Volume, name: str, size: int) -> None:
    """The same calls on both volumes: create (bd: a new thin volume), then grow to `size`."""
    with contextlib.suppress(FileNotFoundError):
        client.unlink(f"/{name}")
    h = client.open_fd(f"/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        client.ftruncate(h, size)
    finally:
        client.close(h)


def nbd_io(s: Settings, work: Path, vols: dict[str, Client], cells: Cells) -> None:
    size = s.size_mib * MIB
    for rep in range(s.reps):
        for row, (client, uri) in vols.items():
            log.info("NBD first write and overwrite on %s (run %d/%d)", row, rep + 1, s.reps)
            _make_image(client, "img", size)
            target = fio.Target("nbd", uri=uri)
            cells.add(row, "first write", "MiB/s", _seq(target, "write", size, work))
            cells.add(row, "overwrite", "MiB/s", _seq(target, "write", size, work))
    for rep in range(s.reps):
        for row, (_client, uri) in vols.items():
            log.info("NBD read and random write on %s (run %d/%d)", row, rep + 1, s.reps)
            target = fio.Target("nbd", uri=uri)
            drop_caches()
            cells.add(row, "seq read", "MiB/s", _seq(target, "read", size, work))
            r = fio.run(target, "randwrite", ["img"], size, 4096, s.depth, work, runtime=s.seconds)
            cells.add(row, "rand write 4K", "IOPS", r.iops)


def _seq(target: fio.Target, rw: str, size: int, work: Path) -> float:
    return fio.run(target, rw, ["img"], size, MIB, 1, work).aggregate


def translator_snapshots(s: Settings, md: Mortard, client: Volume, cells: Cells) -> None:
    """Snapshots of the NBD-written image and of a big sparse image, as a symlink and by the CLI."""
    _make_image(client, "big", s.big_gib * GIB)
    h = client.open_fd("/big", os.O_RDWR)
    try:
        sparse_fill(lambda buf, off: client.pwrite(h, buf, off), s.big_gib * GIB)
        client.fsync(h)
    finally:
        client.close(h)
    for label, name in (("small", "img"), ("big", "big")):
        job = _snap_job(s, label)
        for i in range(s.snaps):
            t = time.perf_counter()
            client.symlink(name, f"/{name}-s{i}")
            cells.add(SNAP_ROWS[1], job, "ms", (time.perf_counter() - t) * 1000)
            client.unlink(f"/{name}-s{i}")
        for i in range(min(3, s.snaps)):
            t = time.perf_counter()
            md.cli("bd", "snapshot", f"mt:/pool/{name}", f"{name}-c{i}")
            cells.add(SNAP_ROWS[2], job, "ms", (time.perf_counter() - t) * 1000)
            md.cli("bd", "delete", f"mt:/pool/{name}-c{i}")
    client.unlink("/big")


def translator_clones(s: Settings, client: Volume, cells: Cells) -> None:
    size = s.size_mib * MIB
    for rep in range(s.reps):
        drop_caches()
        t = time.perf_counter()
        client.link("/img", "/clone")
        h = client.open_fd("/clone", os.O_RDWR)
        client.fsync(h)
        client.close(h)
        cells.add(CLONE_ROWS[2], "clone", "MiB/s", size / MIB / (time.perf_counter() - t))
        log.info("translator clone (run %d/%d) done", rep + 1, s.reps)
        client.unlink("/clone")


def pool_mib(s: Settings) -> int:
    """Room for the image, its clone and the big volume's blocks, plus metadata headroom."""
    return 3 * s.size_mib + max(1024, s.big_gib * GIB // STRIDE * BLOCK // MIB)


def preallocate(path: Path) -> None:
    """Allocate every block of a pool's backing file, as the disk or LV under a real pool is: thin
    allocation is then the pool's own work, not the file system's (reads of it still see zeroes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _clients(md: Mortard, work: Path, s: Settings) -> Iterator[dict[str, Client]]:
    """A posix and a device lv volume (bricks on the bench disk), each with a client and NBD server."""
    posix, _ = md.create_volume("mp", [work / "posix-brick"], 1, False, None)
    layout = ("device", "lv", "pool-size", f"{pool_mib(s)}M")
    bd, _ = md.create_volume("mt", [work / "pool"], 1, False, None, layout=layout)
    preallocate(work / "pool" / bdpool.DATA)
    with contextlib.ExitStack() as stack:
        out = {}
        for row, vol in ((RAW_NBD, posix), (THIN_NBD, bd)):
            uri = stack.enter_context(mortar_side.nbd_server(vol))
            client = Volume.from_volfile(vol.volfile, timeout=30)
            stack.callback(client.close)
            out[row] = (client, uri)
        yield out


def run(s: Settings) -> Outcome:
    started = time.monotonic()
    work = bench_dir()
    cells = Cells()
    setup: dict[str, object] = {"bench_dir": str(work), "block_size": BLOCK, "stride_big": STRIDE}
    try:
        engine = work / "engine"
        engine.mkdir()
        backing = engine / "pool.data"
        with open(backing, "wb") as f:
            f.truncate(pool_mib(s) * MIB)
        preallocate(backing)
        pool = ThinPool.create(backing, size=pool_mib(s) * MIB, block_size=BLOCK)
        try:
            raw_path, vol = engine_io(s, engine, pool, cells)
            setup.update(engine_snapshots(s, pool, vol, cells))
            engine_clones(s, pool, raw_path, vol, cells)
        finally:
            pool.close()
        shutil.rmtree(engine, ignore_errors=True)
        nbd_note = mortar_side.nbd_available()
        if nbd_note:
            setup["nbd"] = nbd_note
        else:
            with (
                netns.bench_network(unmount_under=[work]),
                private_mortard(work / "mortard", "127.0.0.1") as md,
                _clients(md, work, s) as vols,
            ):
                nbd_io(s, work, vols, cells)
                thin_client = vols[THIN_NBD][0]
                translator_snapshots(s, md, thin_client, cells)
                translator_clones(s, thin_client, cells)
    finally:
        if s.keep:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    setup["elapsed_s"] = round(time.monotonic() - started, 1)
    return Outcome(list(cells.cells.values()), setup)


# ---- the report ----------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.3g}"


def _cell_text(c: Cell | None) -> str:
    if c is None or not c.runs:
        return c.note if c is not None and c.note else "n/a"
    return f"{_fmt(c.median)} ({_fmt(min(c.runs))}-{_fmt(max(c.runs))})"


def _ratio(a: Cell | None, b: Cell | None) -> float | None:
    if a is None or b is None or not a.runs or not b.runs or not b.median:
        return None
    return a.median / b.median


def targets(outcome: Outcome, s: Settings) -> list[tuple[str, str, bool]]:
    """(what, figure, met) for each target of issue 7."""
    idx = {(c.row, c.job): c for c in outcome.cells}
    out: list[tuple[str, str, bool]] = []
    for thin, raw, level in ((THIN_ENGINE, RAW_ENGINE, "engine"), (THIN_NBD, RAW_NBD, "NBD")):
        r = _ratio(idx.get((thin, "overwrite")), idx.get((raw, "overwrite")))
        if r is not None:
            what = f"overwrite >= {OVERWRITE_TARGET}x raw ({level})"
            out.append((what, f"{r:.2f}x", r >= OVERWRITE_TARGET))
    for row in SNAP_ROWS[:2]:
        for which in ("small", "big"):
            c = idx.get((row, _snap_job(s, which)))
            if c is not None and c.runs:
                out.append(
                    (
                        f"{_snap_job(s, which)} < {SNAPSHOT_TARGET_MS:g} ms ({row.split(' ')[0]})",
                        f"{c.median:.2f} ms",
                        c.median < SNAPSHOT_TARGET_MS,
                    )
                )
    return out


def markdown(outcome: Outcome, s: Settings, header: str) -> str:
    idx = {(c.row, c.job): c for c in outcome.cells}
    lines = [header, ""]
    lines += [
        f"**I/O, {_size(s.size_mib * MIB)} image, 1 MiB sequential, 4 KiB random with {s.depth} in flight** "
        "(median (min-max); ratio = thin / raw on the same path)",
        "",
        "| row | " + " | ".join(f"{j} ({u})" for j, u in IO_JOBS) + " |",
        "| --- |" + " ---: |" * len(IO_JOBS),
    ]
    for raw, thin in ((RAW_ENGINE, THIN_ENGINE), (RAW_NBD, THIN_NBD)):
        for row in (raw, thin):
            parts = []
            for job, _unit in IO_JOBS:
                text = _cell_text(idx.get((row, job)))
                r = _ratio(idx.get((row, job)), idx.get((raw, job))) if row == thin else None
                parts.append(text + (f" **{r:.2f}x**" if r is not None else ""))
            lines.append(f"| {row} | " + " | ".join(parts) + " |")
    snap_jobs = [_snap_job(s, "small"), _snap_job(s, "big")]
    lines += [
        "",
        f"**Snapshot creation (ms)**: {_size(s.size_mib * MIB)} volume fully written; {s.big_gib} GiB volume "
        f"with one 64 KiB block written every {STRIDE // MIB} MiB",
        "",
        "| level | " + " | ".join(snap_jobs) + " | big / small |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in SNAP_ROWS:
        a, b = idx.get((row, snap_jobs[0])), idx.get((row, snap_jobs[1]))
        r = _ratio(b, a)
        lines.append(
            f"| {row} | {_cell_text(a)} | {_cell_text(b)} | {f'{r:.2f}x' if r is not None else 'n/a'} |"
        )
    lines += [
        "",
        f"**Clone of the {_size(s.size_mib * MIB)} image (MiB/s; page cache dropped before each)**",
        "",
        "| how | throughput (MiB/s) | vs cp |",
        "| --- | ---: | ---: |",
    ]
    cp = idx.get((CLONE_ROWS[0], "clone"))
    for row in CLONE_ROWS:
        c = idx.get((row, "clone"))
        r = _ratio(c, cp) if row != CLONE_ROWS[0] else None
        lines.append(f"| {row} | {_cell_text(c)} | {f'{r:.2f}x' if r is not None else ''} |")
    checks = targets(outcome, s)
    lines += ["", "**Targets (issue 7)**", "", "| target | figure | |", "| --- | ---: | --- |"]
    lines += [f"| {what} | {fig} | {'met' if ok else 'MISS'} |" for what, fig, ok in checks]
    missed = [what for what, _f, ok in checks if not ok]
    lines += ["", f"Targets missed: {', '.join(missed) if missed else 'none'}."]
    return "\n".join(lines)


QUICK = Settings(size_mib=64, big_gib=4, reps=1, snaps=5, seconds=1.0)


def main(results: Path, quick: bool = False, reps: int | None = None, keep: bool = False) -> int:
    """Run the scenario, print the tables, write results/thin(.quick).{json,md}."""
    s = dataclasses.replace(QUICK if quick else Settings(), keep=keep)
    if reps is not None and not quick:
        s.reps = reps
    outcome = run(s)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    header = (
        f"mortar thin volumes (issue 7) on {os.uname().nodename} ({os.cpu_count()} CPUs, kernel "
        f"{os.uname().release}), {stamp}; {s.reps} run(s) per cell, {s.snaps} snapshots per size; "
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; run took "
        f"{outcome.setup.get('elapsed_s', '?')}s."
    )
    md = markdown(outcome, s, header)
    name = "thin-quick" if quick else "thin"
    doc = {
        "scenario": "thin",
        "when": stamp,
        "settings": dataclasses.asdict(s),
        "setup": outcome.setup,
        "load_avg": load,
        "targets": [{"target": w, "figure": f, "met": ok} for w, f, ok in targets(outcome, s)],
        "cells": [c.as_dict() for c in outcome.cells],
    }
    save_results(results, name, md, doc)
    return 0
