"""The foundation's figures: the native client through one brick on loopback against the local disk.
The brick and the client run in the benchmark's own network namespace (bench/netns.py).

Jobs: 1 MiB sequential write (then fsync) and read of one file, and 4 KiB random reads with 32 in
flight. The local rows use `os.pwrite`/`os.pread` on the same file system with the same pattern
(a pool of 32 threads for the random reads). Reads are measured twice: after dropping the page
cache ("cold", the disk) and straight after writing ("warm", the software path).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

from bench import netns
from bench.common import Cell, bench_dir, brick_process, drop_caches, repeat
from mortar.client import AsyncVolume

MIB = 1 << 20


def _local_write(path: Path, size: int) -> float:
    buf = os.urandom(MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t = time.perf_counter()
    for off in range(0, size, MIB):
        os.pwrite(fd, buf, off)
    os.fsync(fd)
    elapsed = time.perf_counter() - t
    os.close(fd)
    return size / MIB / elapsed


def _local_read(path: Path, size: int, cold: bool) -> float:
    if cold:
        drop_caches()
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(MIB)
    t = time.perf_counter()
    for off in range(0, size, MIB):
        os.preadv(fd, [buf], off)
    elapsed = time.perf_counter() - t
    os.close(fd)
    return size / MIB / elapsed


def _local_randread(path: Path, size: int, seconds: float, depth: int = 32) -> float:
    fd = os.open(path, os.O_RDONLY)
    blocks = size // 4096
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> int:
        rng, n = random.Random(seed), 0
        while time.perf_counter() < stop:
            os.pread(fd, 4096, rng.randrange(blocks) * 4096)
            n += 1
        return n

    t = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        total = sum(pool.map(worker, range(depth)))
    elapsed = time.perf_counter() - t
    os.close(fd)
    return total / elapsed


async def _mortar_jobs(volfile: Path, size: int, reps: int, seconds: float) -> list[Cell]:
    vol = await AsyncVolume.from_volfile(volfile)
    row = "mortar native, 1 brick"
    cells: list[Cell] = []
    try:
        buf = os.urandom(MIB)

        async def write() -> float:
            h = await vol.open_fd("/seq.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            t = time.perf_counter()
            for off in range(0, size, 8 * MIB):  # 8 requests in flight, in order of offset
                await asyncio.gather(
                    *(vol.pwrite(h, buf, o) for o in range(off, min(off + 8 * MIB, size), MIB))
                )
            await vol.fsync(h)
            elapsed = time.perf_counter() - t
            await vol.close(h)
            return size / MIB / elapsed

        async def read(cold: bool) -> float:
            if cold:
                drop_caches()
            h = await vol.open_fd("/seq.bin", os.O_RDONLY)
            t = time.perf_counter()
            for off in range(0, size, 8 * MIB):
                await asyncio.gather(
                    *(vol.pread(h, MIB, o) for o in range(off, min(off + 8 * MIB, size), MIB))
                )
            elapsed = time.perf_counter() - t
            await vol.close(h)
            return size / MIB / elapsed

        async def randread(depth: int = 32) -> float:
            h = await vol.open_fd("/seq.bin", os.O_RDONLY)
            blocks = size // 4096
            stop = time.perf_counter() + seconds

            async def worker(seed: int) -> int:
                rng, n = random.Random(seed), 0
                while time.perf_counter() < stop:
                    await vol.pread(h, 4096, rng.randrange(blocks) * 4096)
                    n += 1
                return n

            t = time.perf_counter()
            total = sum(await asyncio.gather(*(worker(i) for i in range(depth))))
            elapsed = time.perf_counter() - t
            await vol.close(h)
            return total / elapsed

        for job, unit, fn in (
            ("seq write 1M", "MiB/s", write),
            ("seq read 1M cold", "MiB/s", lambda: read(True)),
            ("seq read 1M warm", "MiB/s", lambda: read(False)),
            ("rand read 4K QD32", "IOPS", randread),
        ):
            cell = Cell(row, job, unit)
            for _ in range(reps):
                cell.runs.append(await fn())
            cells.append(cell)
    finally:
        await vol.aclose()
    return cells


def run(size_mib: int = 1024, reps: int = 3, seconds: float = 5.0, profile: str | None = None) -> list[Cell]:
    size = size_mib * MIB
    work = bench_dir()
    try:
        local = work / "local.bin"
        row = "local disk (os.pwrite/os.pread)"
        cells = [
            repeat(row, "seq write 1M", "MiB/s", reps, lambda: _local_write(local, size)),
            repeat(row, "seq read 1M cold", "MiB/s", reps, lambda: _local_read(local, size, True)),
            repeat(row, "seq read 1M warm", "MiB/s", reps, lambda: _local_read(local, size, False)),
            repeat(row, "rand read 4K QD32", "IOPS", reps, lambda: _local_randread(local, size, seconds)),
        ]
        local.unlink()
        # the brick (on loopback) and the client (this process's loop) in the run's own namespace
        with netns.bench_network(), brick_process(work, profile) as volfile:
            cells += uvloop.run(_mortar_jobs(volfile, size, reps, seconds))
        return cells
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the brick's data: nothing to keep
