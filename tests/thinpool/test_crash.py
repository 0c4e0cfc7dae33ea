"""Crash safety: SIGKILL a writer at random moments; flushed writes survive, nothing leaks.

Each round starts `crash_workload.py` on the same pool, kills it after a random delay, reopens
the pool and checks: `check()` is clean; every volume that must exist does, and no other; every
sector not touched after the last reported flush reads back exactly; every other sector is zeros,
its flushed content, or a sector written after the flush by this volume or an ancestor (proved by
its self-describing header). The pool's actual content then becomes the model for the next round.
"""

from __future__ import annotations

import random
import selectors
import subprocess
import sys
import time
from pathlib import Path

from mortar.thinpool import ThinPool
from tests.thinpool.crash_workload import (
    BLOCK,
    FLUSH_EVERY,
    MAGIC,
    SECTOR,
    VOL_BYTES,
    VOL_SECTORS,
    Op,
    ops,
    parse_head,
    sector_payload,
    tag,
    write_payload,
)

ROUNDS = 15
WORKLOAD = Path(__file__).with_name("crash_workload.py")
ZERO = bytes(SECTOR)


def _apply(model: dict[str, bytearray], lineage: dict[str, set[int]], op: Op) -> None:
    lo, hi = op.sector * SECTOR, (op.sector + op.count) * SECTOR
    if op.kind == "write":
        model[op.vol][lo:hi] = write_payload(op)
    elif op.kind == "discard":
        model[op.vol][lo:hi] = bytes(hi - lo)
    elif op.kind == "snapshot":
        model[op.new] = bytearray(model[op.vol])
        lineage[op.new] = lineage[op.vol] | {tag(op.new)}
    else:
        del model[op.vol]
        del lineage[op.vol]


def _run_writer(path: Path, seed: int, start: int, delay: float) -> list[str]:
    """Run the writer until `delay` after it is ready, SIGKILL it, return its stdout lines."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKLOAD), str(path), str(seed), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=60), "writer did not start"
        first = proc.stdout.readline()
        assert first == "ready\n", first
        time.sleep(delay)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    return out.splitlines()


def _valid(got: bytes, sector: int, known: bytes | None, lin: set[int], window: dict[int, Op]) -> bool:
    if got in (ZERO, known):
        return True
    magic, vol_tag, op_idx, num = parse_head(got)
    op = window.get(op_idx)
    return (
        magic == MAGIC
        and num == sector
        and vol_tag in lin
        and op is not None
        and op.kind == "write"
        and tag(op.vol) == vol_tag
        and op.sector <= sector < op.sector + op.count
        and got == sector_payload(op_idx, vol_tag, sector)
    )


def _verify(
    pool: ThinPool, model: dict[str, bytearray], lineage: dict[str, set[int]], window: list[Op]
) -> dict[str, set[int]]:
    """Check the reopened pool against the model at the last flush; returns the lineage now."""
    touched: dict[str, set[int]] = {}
    created: dict[str, str] = {}
    deleted: set[str] = set()
    for op in window:
        if op.kind in ("write", "discard"):
            touched.setdefault(op.vol, set()).update(range(op.sector, op.sector + op.count))
        elif op.kind == "snapshot":
            created[op.new] = op.vol
        else:
            deleted.add(op.vol)
    by_idx = {op.idx: op for op in window}
    existing = {v.name: v for v in pool.volumes()}
    assert set(existing) <= set(model) | set(created), set(existing)
    assert set(model) - deleted <= set(existing), set(model) - set(existing)
    new_lineage: dict[str, set[int]] = {}
    for name, vol in existing.items():
        root, lin = name, {tag(name)}
        while root in created:  # a volume snapshotted after the flush: every sector is uncertain
            root = created[root]
            lin |= {tag(root)}
        lin |= lineage.get(root, set())
        new_lineage[name] = lin
        base = model.get(root)
        certain = name in model
        assert vol.size == VOL_BYTES
        data = vol.read(0, VOL_BYTES)
        for s in range(VOL_SECTORS):
            got = data[s * SECTOR : (s + 1) * SECTOR]
            known = bytes(base[s * SECTOR : (s + 1) * SECTOR]) if base is not None else None
            if certain and s not in touched.get(name, ()):
                assert got == known, f"flushed sector {s} of {name} lost"
            else:
                assert _valid(got, s, known, lin, by_idx), f"sector {s} of {name} holds foreign data"
    return new_lineage


def test_sigkill_rounds(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    rng = random.Random(20240611)
    # small enough that the allocator wraps and reuses freed blocks, big enough never to be full:
    # five volumes of 128 blocks at most
    with ThinPool.create(
        path, size=BLOCK + 5 * VOL_BYTES + (1 << 20), block_size=BLOCK, commit_interval=0
    ) as pool:
        for name in ("v0", "v1"):
            pool.create_volume(name, VOL_BYTES)
    model = {name: bytearray(VOL_BYTES) for name in ("v0", "v1")}
    lineage = {name: {tag(name)} for name in model}
    next_op, flushes, verified = 0, 0, 0
    for _ in range(ROUNDS):
        seed, start, names = rng.randrange(2**32), next_op, sorted(model)
        lines = _run_writer(path, seed, start, rng.uniform(0.02, 0.5))
        reported = [int(line.split()[1]) for line in lines if line.startswith("flushed ")]
        last = reported[-1] if reported else start - 1
        flushes += len(reported)
        stream = ops(seed, names, start)
        for _ in range(last - start + 1):
            _apply(model, lineage, next(stream))
        window = [next(stream) for _ in range(FLUSH_EVERY)]
        with ThinPool.open(path, commit_interval=0) as pool:
            assert pool.check() == []
            lineage = _verify(pool, model, lineage, window)
            verified += sum(1 for name in model if name in lineage)
            model = {v.name: bytearray(v.read(0, VOL_BYTES)) for v in pool.volumes()}
        next_op = last + FLUSH_EVERY + 1
    assert flushes > ROUNDS, "the writer hardly ever completed a flush: the test proved little"
    assert verified >= ROUNDS
