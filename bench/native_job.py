"""fio-like jobs through mortar's native client (asyncio, uvloop), run as a separate process the way
fio is, so the benchmark's own work never shares its loop and py-spy can profile it alone.

    python bench/native_job.py VOLFILE JOB [options]   -> one JSON object on stdout

Jobs mirror bench/fio.py: `seq` (one task per file, one 1 MiB request in flight each, O_DIRECT),
`rand` (one file, 4 KiB, `--depth` requests in flight, time-based), `smallfiles` (create + 4 KiB
write + close, then stat, then unlink, one call at a time, like the loop on a mount),
`copy-in`/`copy-out` (qemu-img convert's shape: 2 MiB requests, 8 in flight, O_DIRECT on the local
side), and `prepare` (a file at full size, for NBD exports).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import random
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mortar.client import AsyncVolume

MIB = 1 << 20
COPY_CHUNK = 2 * MIB
COPY_INFLIGHT = 8


async def seq(vol: AsyncVolume, rw: str, files: list[str], size: int, bs: int) -> dict[str, float]:
    flags = (os.O_WRONLY | os.O_CREAT if rw == "write" else os.O_RDONLY) | os.O_DIRECT
    buf = os.urandom(bs)
    handles = [await vol.open_fd(f"/{name}", flags, 0o644) for name in files]

    async def job(h: object) -> tuple[float, float]:
        start = time.perf_counter()
        for off in range(0, size, bs):
            if rw == "write":
                await vol.pwrite(h, buf, off)  # type: ignore[arg-type]
            else:
                await vol.pread(h, bs, off)  # type: ignore[arg-type]
        return start, time.perf_counter()

    spans = await asyncio.gather(*(job(h) for h in handles))
    for h in handles:
        await vol.close(h)
    per_job = [size / MIB / (end - start) for start, end in spans]
    longest = max(end - start for start, end in spans)
    return {
        "aggregate": size * len(files) / MIB / longest,
        "job_min": min(per_job),
        "job_max": max(per_job),
        "iops": size * len(files) / bs / longest,
    }


async def rand(
    vol: AsyncVolume, rw: str, name: str, size: int, bs: int, depth: int, seconds: float
) -> dict[str, float]:
    flags = (os.O_RDWR if rw == "randwrite" else os.O_RDONLY) | os.O_DIRECT
    h = await vol.open_fd(f"/{name}", flags)
    blocks = size // bs
    buf = os.urandom(bs)
    stop = time.perf_counter() + seconds

    async def worker(seed: int) -> int:
        rng, n = random.Random(seed), 0
        while time.perf_counter() < stop:
            off = rng.randrange(blocks) * bs
            if rw == "randwrite":
                await vol.pwrite(h, buf, off)
            else:
                await vol.pread(h, bs, off)
            n += 1
        return n

    start = time.perf_counter()
    total = sum(await asyncio.gather(*(worker(i) for i in range(depth))))
    elapsed = time.perf_counter() - start
    await vol.close(h)
    return {"iops": total / elapsed, "aggregate": total * bs / MIB / elapsed}


async def smallfiles(
    vol: AsyncVolume, directory: str, count: int, size: int, budget: float
) -> dict[str, float]:
    await vol.makedirs(directory, exist_ok=True)
    payload = os.urandom(size)
    paths = [f"{directory}/f{i:06d}" for i in range(count)]
    out: dict[str, float] = {}
    start = time.perf_counter()
    deadline = start + budget
    for made, p in enumerate(paths):
        if made % 64 == 0 and made and time.perf_counter() > deadline:
            del paths[made:]
            break
        h = await vol.open_fd(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        await vol.pwrite(h, payload, 0)
        await vol.close(h)
    out["create"] = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for p in paths:
        await vol.stat(p)
    out["stat"] = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    for p in paths:
        await vol.unlink(p)
    out["delete"] = len(paths) / (time.perf_counter() - start)
    out["files"] = len(paths)
    await vol.rmdir(directory)
    return out


async def copy(vol: AsyncVolume, direction: str, local: str, remote: str, size: int) -> dict[str, float]:
    """Copy `size` bytes between a local file and the volume: 2 MiB pieces, 8 in flight."""
    loop = asyncio.get_running_loop()
    if direction == "in":
        lfd = os.open(local, os.O_RDONLY | os.O_DIRECT)
        h = await vol.open_fd(remote, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)  # like qemu-img -n
    else:
        lfd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        h = await vol.open_fd(remote, os.O_RDONLY | os.O_DIRECT)
    offsets = iter(range(0, size, COPY_CHUNK))
    start = time.perf_counter()

    async def worker() -> None:
        buf = mmap.mmap(-1, COPY_CHUNK)  # page-aligned, as O_DIRECT needs
        for off in offsets:
            n = min(COPY_CHUNK, size - off)
            view = memoryview(buf)[:n]
            if direction == "in":
                await loop.run_in_executor(None, os.preadv, lfd, [view], off)
                await vol.pwrite(h, view, off)
            else:
                await vol.preadinto(h, view, off)
                await loop.run_in_executor(None, os.pwritev, lfd, [view], off)
            view.release()

    await asyncio.gather(*(worker() for _ in range(COPY_INFLIGHT)))
    if direction == "in":
        await vol.fsync(h)
    else:
        await loop.run_in_executor(None, os.fsync, lfd)
    elapsed = time.perf_counter() - start
    await vol.close(h)
    os.close(lfd)
    return {"aggregate": size / MIB / elapsed}


async def prepare(vol: AsyncVolume, names: list[str], sizes: list[int]) -> dict[str, float]:
    """Files written full of data (an NBD export cannot create or grow its image)."""
    buf = os.urandom(MIB)
    for name, size in zip(names, sizes, strict=True):
        h = await vol.open_fd(f"/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for base in range(0, size, 16 * MIB):
            ends = range(base, min(base + 16 * MIB, size), MIB)
            await asyncio.gather(*(vol.pwrite(h, buf, off) for off in ends))
        await vol.close(h)
    return {}


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    vol = await AsyncVolume.from_volfile(args.volfile)
    try:
        if args.job == "seq":
            return await seq(vol, args.rw, args.files.split(","), args.size, args.bs)
        if args.job == "rand":
            return await rand(vol, args.rw, args.files, args.size, args.bs, args.depth, args.seconds)
        if args.job == "smallfiles":
            return await smallfiles(vol, args.dir, args.count, args.bs, args.budget)
        if args.job in ("copy-in", "copy-out"):
            return await copy(vol, args.job[5:], args.local, args.files, args.size)
        if args.job == "prepare":
            return await prepare(vol, args.files.split(","), [int(n) for n in args.sizes.split(",")])
        raise SystemExit(f"unknown job {args.job}")
    finally:
        await vol.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("volfile")
    ap.add_argument("job", choices=["seq", "rand", "smallfiles", "copy-in", "copy-out", "prepare"])
    ap.add_argument("--rw", default="read", choices=["read", "write", "randread", "randwrite"])
    ap.add_argument("--files", default="seq.0", help="comma-separated names (one for rand/copy)")
    ap.add_argument("--size", type=int, default=64 * MIB, help="bytes per file")
    ap.add_argument("--sizes", default="", help="bytes per file, comma-separated (prepare)")
    ap.add_argument("--bs", type=int, default=MIB, help="request size (file size for smallfiles)")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which creating stops")
    ap.add_argument("--dir", default="/small")
    ap.add_argument("--local", default="", help="local file for copy-in/copy-out")
    args = ap.parse_args()
    result = uvloop.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
