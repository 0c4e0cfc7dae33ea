"""Crash workload: a deterministic stream of pool operations, run by a writer the test SIGKILLs.

Run as a script: `crash_workload.py POOL SEED START`. The writer opens the pool (committing on a
short timer too), prints `ready`, then applies `ops(SEED, volumes, START)` forever, calling
`pool.commit()` after every FLUSH_EVERY operations and printing `flushed IDX` once that commit
returned. The test regenerates the same stream to know what each reported flush covers.

Every written 4 KiB sector is self-describing (magic, volume tag, op index, sector number, then
bytes derived from those), so after a crash a sector that is not exactly known can still be
proven to be legitimate: zeros, the flushed content, or a later write of this volume's lineage,
never another volume's data.
"""

from __future__ import annotations

import random
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

SECTOR = 4096
VOL_SECTORS = 512
VOL_BYTES = SECTOR * VOL_SECTORS
BLOCK = 16 << 10
FLUSH_EVERY = 12
MAGIC = b"TPCW"
_HEAD = struct.Struct("<4sIII")


@dataclass(frozen=True)
class Op:
    idx: int
    kind: str  # write | discard | snapshot | delete
    vol: str
    sector: int = 0
    count: int = 0
    new: str = ""


def tag(name: str) -> int:
    return zlib.crc32(name.encode())


def sector_payload(op_idx: int, vol_tag: int, sector: int) -> bytes:
    body = random.Random(op_idx * 1_000_003 + sector).randbytes(SECTOR - _HEAD.size)
    return _HEAD.pack(MAGIC, vol_tag, op_idx, sector) + body


def parse_head(sector: bytes) -> tuple[bytes, int, int, int]:
    magic, vol_tag, op_idx, num = _HEAD.unpack_from(sector)
    return magic, vol_tag, op_idx, num


def write_payload(op: Op) -> bytes:
    return b"".join(sector_payload(op.idx, tag(op.vol), s) for s in range(op.sector, op.sector + op.count))


def ops(seed: int, names: list[str], start: int) -> Iterator[Op]:
    """The operation stream; depends only on its arguments."""
    rng = random.Random(seed)
    vols = sorted(names)
    i = start
    while True:
        r = rng.random()
        if r < 0.10 and len(vols) < 5:
            new = f"s{i}"
            yield Op(i, "snapshot", rng.choice(vols), new=new)
            vols.append(new)
        elif r < 0.18 and len(vols) > 2:
            victim = rng.choice(vols)
            vols.remove(victim)
            yield Op(i, "delete", victim)
        else:
            sector = rng.randrange(VOL_SECTORS)
            count = rng.randint(1, min(24, VOL_SECTORS - sector))
            yield Op(i, "discard" if r < 0.30 else "write", rng.choice(vols), sector, count)
        i += 1


def main(argv: list[str]) -> None:
    from mortar.thinpool import ThinPool

    path, seed, start = argv[0], int(argv[1]), int(argv[2])
    pool = ThinPool.open(path, commit_interval=0.05)
    print("ready", flush=True)
    for n, op in enumerate(ops(seed, [v.name for v in pool.volumes()], start), 1):
        if op.kind == "write":
            pool.volume(op.vol).write(write_payload(op), op.sector * SECTOR)
        elif op.kind == "discard":
            pool.volume(op.vol).discard(op.sector * SECTOR, op.count * SECTOR)
        elif op.kind == "snapshot":
            pool.snapshot(op.vol, op.new)
        else:
            pool.delete_volume(op.vol)
        if n % FLUSH_EVERY == 0:
            pool.commit()
            print(f"flushed {op.idx}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
