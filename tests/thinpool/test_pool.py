"""Thin pool behaviour: volumes, snapshots, clones, space, sparseness, persistence, errors."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.thinpool import PoolStats, ThinPool

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BS = 64 * KiB

MakePool = Callable[..., ThinPool]


def _errno(exc: pytest.ExceptionInfo[FopError]) -> int:
    return exc.value.errno


def test_unmapped_reads_are_zero_and_touch_no_data(make_pool: MakePool) -> None:
    pool = make_pool()
    vol = pool.create_volume("v", 10 * MiB)
    assert vol.read(0, 3 * MiB) == bytes(3 * MiB)
    assert vol.read(10 * MiB - 5, 100) == bytes(5)  # short read at the end
    assert vol.read(10 * MiB, 10) == b""
    assert pool.stats().used_blocks == 0 and vol.allocated_bytes == 0


def test_write_allocates_whole_blocks_with_zero_padding(make_pool: MakePool) -> None:
    pool = make_pool()
    vol = pool.create_volume("v", 4 * MiB)
    vol.write(b"a" * 100, BS - 50)  # straddles two blocks
    assert vol.allocated_bytes == 2 * BS
    assert vol.read(0, 2 * BS) == bytes(BS - 50) + b"a" * 100 + bytes(BS - 50)
    with pytest.raises(FopError) as exc:
        vol.write(b"x", 4 * MiB)
    assert _errno(exc) == errno.EFBIG
    assert pool.check() == []


def test_snapshot_copy_on_write_both_ways(make_pool: MakePool) -> None:
    pool = make_pool()
    vol = pool.create_volume("base", 2 * MiB)
    vol.write(b"1" * (2 * MiB), 0)
    snap = pool.snapshot("base", "snap")
    assert snap.origin == "base" and snap.read(0, 2 * MiB) == b"1" * (2 * MiB)
    assert snap.info()["shared_blocks"] == 32 and vol.info()["exclusive_blocks"] == 0
    vol.write(b"2" * 10, 5)
    snap.write(b"3" * 10, BS + 5)
    assert vol.read(0, 20) == b"1" * 5 + b"2" * 10 + b"1" * 5
    assert snap.read(0, 20) == b"1" * 20
    assert snap.read(BS, 20) == b"1" * 5 + b"3" * 10 + b"1" * 5
    assert vol.read(BS, 20) == b"1" * 20
    # each side now owns its copy and the block the other side copied away from
    assert vol.info()["exclusive_blocks"] == 2 == snap.info()["exclusive_blocks"]
    assert vol.info()["shared_blocks"] == 30
    assert pool.stats().used_blocks == 34
    pool.delete_volume("base")
    assert snap.origin is None and snap.read(0, 20) == b"1" * 20
    pool.commit()
    assert pool.stats().used_blocks == 32 and pool.check() == []


def test_snapshot_of_64gib_volume_shares_the_mapping(make_pool: MakePool) -> None:
    pool = make_pool(size=96 * MiB)
    vol = pool.create_volume("big", 64 * GiB)
    for off in range(0, 64 * GiB, 64 * MiB):  # one block in each of 1024 leaves
        vol.write(b"x", off)
    nodes = pool.stats().mapping_nodes
    assert nodes == 1 + 1024
    snap = pool.snapshot("big", "snap")
    assert pool.stats().mapping_nodes == nodes  # nothing was copied
    assert pool.stats().used_blocks == 1024
    assert snap.info()["shared_blocks"] == 1024
    snap.write(b"y", 0)  # copies one top and one leaf, not the 1024 leaves
    assert pool.stats().mapping_nodes == nodes + 2
    assert vol.read(0, 2) == b"x\0" and snap.read(0, 2) == b"y\0"
    assert pool.check() == []


def test_clone_is_independent(make_pool: MakePool) -> None:
    pool = make_pool()
    vol = pool.create_volume("src", 8 * MiB)
    data = os.urandom(3 * MiB)
    vol.write(data, 1 * MiB + 7)
    copy = pool.clone("src", "copy")
    assert copy.origin is None and copy.info()["shared_blocks"] == 0
    assert copy.read(0, 8 * MiB) == vol.read(0, 8 * MiB)
    assert copy.allocated_bytes == vol.allocated_bytes
    vol.write(b"z" * 100, 1 * MiB)
    assert copy.read(1 * MiB + 7, 93) == data[:93]
    pool.delete_volume("src")
    assert copy.read(1 * MiB + 7, len(data)) == data
    assert pool.check() == []


def test_discard_write_zeroes_and_resize_free_space(make_pool: MakePool) -> None:
    pool = make_pool()
    vol = pool.create_volume("v", 4 * MiB)
    vol.write(b"q" * (4 * MiB), 0)
    vol.discard(100, 2 * BS)  # partial, whole, partial
    assert vol.read(0, 2 * BS + 200) == b"q" * 100 + bytes(2 * BS) + b"q" * 100
    assert vol.allocated_bytes == 4 * MiB - BS
    vol.write_zeroes(BS * 10, BS * 2, unmap=False)
    assert vol.allocated_bytes == 4 * MiB - BS and vol.read(BS * 10, BS * 2) == bytes(2 * BS)
    vol.write_zeroes(BS * 10, BS * 2)
    assert vol.allocated_bytes == 4 * MiB - 3 * BS
    vol.resize(3 * BS + 10)  # shrink into a block: its tail is zeroed
    assert vol.allocated_bytes == 3 * BS  # blocks 0, 2 and the cut block 3 (1 was discarded)
    vol.resize(4 * MiB)
    assert vol.read(3 * BS, BS) == b"q" * 10 + bytes(BS - 10)
    assert vol.read(4 * BS, MiB) == bytes(MiB)
    pool.commit()
    assert pool.stats().used_blocks == 3 and pool.check() == []


def test_seek_data_and_hole(make_pool: MakePool) -> None:
    pool = make_pool()
    vol = pool.create_volume("v", 64 * MiB + 100)
    vol.write(b"d", 40 * MiB + 3)
    vol.write(b"e" * BS, 64 * MiB - BS)
    assert vol.seek_data(0) == 40 * MiB
    assert vol.seek_data(40 * MiB + 5) == 40 * MiB + 5
    assert vol.seek_hole(40 * MiB + 5) == 40 * MiB + BS
    assert vol.seek_data(40 * MiB + BS) == 64 * MiB - BS
    assert vol.seek_hole(64 * MiB - BS) == 64 * MiB
    with pytest.raises(FopError) as exc:
        vol.seek_data(64 * MiB)
    assert _errno(exc) == errno.ENXIO
    with pytest.raises(FopError) as exc:
        vol.seek_hole(64 * MiB + 100)
    assert _errno(exc) == errno.ENXIO


def test_pool_full_gives_enospc_and_recovers(make_pool: MakePool) -> None:
    events: list[PoolStats] = []
    pool = make_pool(size=BS + 32 * BS, low_water=8)
    pool.on_low_water(events.append)
    keep = pool.create_volume("keep", 1 * MiB)
    keep.write(b"k" * (8 * BS), 0)
    hog = pool.create_volume("hog", 16 * MiB)
    hog.write(b"h" * (20 * BS), 0)
    assert len(events) == 1 and events[0].free_blocks < 8
    with pytest.raises(FopError) as exc:
        hog.write(b"H" * (8 * BS), 20 * BS)  # needs 8 blocks, 4 are free: nothing may be written
    assert _errno(exc) == errno.ENOSPC
    assert hog.read(20 * BS, 8 * BS) == bytes(8 * BS) and hog.allocated_bytes == 20 * BS
    hog.write(b"H" * (4 * BS), 20 * BS)  # exactly what is left
    with pytest.raises(FopError) as exc:
        hog.write(b"!", 30 * BS)
    assert _errno(exc) == errno.ENOSPC
    snap = pool.snapshot("keep", "keep-snap")  # sharing needs no space, but copy-on-write does
    with pytest.raises(FopError) as exc:
        snap.write(b"s", 0)
    assert _errno(exc) == errno.ENOSPC
    assert keep.read(0, 8 * BS) == b"k" * (8 * BS) == snap.read(0, 8 * BS)
    assert pool.check() == []
    pool.delete_volume("hog")  # freed blocks come back through the commit the writer triggers
    snap.write(b"s", 0)
    keep.write(b"K" * (9 * BS), 0)
    assert snap.read(0, 2) == b"sk" and keep.read(8 * BS, 2) == b"KK"
    assert pool.stats().free_blocks == 32 - 8 - 9 - 1 and pool.check() == []


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    with ThinPool.create(path, size=32 * MiB, block_size=16 * KiB, commit_interval=0) as pool:
        a = pool.create_volume("a", 5 * MiB)
        a.write(b"A" * 100_000, 12345)
        pool.snapshot("a", "a-snap").write(b"S", 0)
        pool.rename_volume("a", "b")
        pool.clone("b", "c")
        uuid = pool.uuid
    with ThinPool.open(path, commit_interval=0) as pool:
        assert pool.uuid == uuid and pool.block_size == 16 * KiB
        assert [v.name for v in pool.volumes()] == ["a-snap", "b", "c"]
        assert pool.volume("a-snap").origin == "b"
        assert (
            pool.volume("b").read(12345, 100_000) == b"A" * 100_000 == pool.volume("c").read(12345, 100_000)
        )
        assert pool.volume("a-snap").read(0, 1) == b"S"
        assert pool.check() == []


def test_interrupted_clone_is_dropped_on_open(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    with ThinPool.create(path, size=32 * MiB, commit_interval=0) as pool:
        pool.create_volume("src", MiB).write(b"x" * MiB, 0)
        # the state a crash in the middle of clone() leaves behind: a pin and a half-built copy
        with pool._lock:
            src = pool._visible("src")
            src.top.rc += 1
            pool._add_volume("\0pin-9", MiB, src.top, src.id, 2)
            pool._add_volume("half", MiB, pool._map.new_top(), None, 1)
    with ThinPool.open(path, commit_interval=0) as pool:
        assert [v.name for v in pool.volumes()] == ["src"] and pool.check() == []
        pool.create_volume("half", 1)
        pool.commit()
        assert pool.stats().used_blocks == MiB // BS


def test_names_and_errors(make_pool: MakePool) -> None:
    pool = make_pool()
    for bad in ("", "a/b", "a\0b", "x" * 256):
        with pytest.raises(FopError) as exc:
            pool.create_volume(bad, 1)
        assert _errno(exc) == errno.EINVAL
    pool.create_volume("é" * 127, 1)  # 254 bytes of UTF-8
    pool.create_volume("v", 1)
    with pytest.raises(FopError) as exc:
        pool.create_volume("v", 1)
    assert _errno(exc) == errno.EEXIST
    with pytest.raises(FopError) as exc:
        pool.snapshot("nope", "w")
    assert _errno(exc) == errno.ENOENT
    with pytest.raises(FopError) as exc:
        pool.rename_volume("v", "é" * 127)
    assert _errno(exc) == errno.EEXIST
    with pytest.raises(FopError) as exc:
        pool.create_volume("neg", -1)
    assert _errno(exc) == errno.EINVAL


def test_create_open_guards(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    for bs in (2048, 3 * 4096, 16 * MiB):
        with pytest.raises(FopError) as exc:
            ThinPool.create(path, size=32 * MiB, block_size=bs)
        assert _errno(exc) == errno.EINVAL
    with pytest.raises(FopError) as exc:
        ThinPool.open(tmp_path / "missing.img")
    assert _errno(exc) == errno.ENOENT
    pool = ThinPool.create(path, size=32 * MiB, commit_interval=0)
    with pytest.raises(FopError) as exc:
        ThinPool.open(path)  # one process, one opener
    assert _errno(exc) == errno.EBUSY
    pool.create_volume("v", MiB).write(b"v", 0)
    pool.close()
    with pytest.raises(FopError) as exc:
        ThinPool.create(path, size=32 * MiB)
    assert _errno(exc) == errno.EEXIST
    with ThinPool.open(path, read_only=True) as ro:
        assert ro.volume("v").read(0, 1) == b"v"
        with pytest.raises(FopError) as exc:
            ro.volume("v").write(b"w", 0)
        assert _errno(exc) == errno.EROFS
    other = tmp_path / "other.img"
    ThinPool.create(other, size=8 * MiB).close()
    with pytest.raises(FopError) as exc:
        ThinPool.open(path, metadata_path=f"{other}.meta")
    assert _errno(exc) == errno.EINVAL
    ThinPool.create(path, size=32 * MiB, force=True).close()
    with ThinPool.open(path) as pool:
        assert pool.volumes() == []


def test_periodic_commit_makes_metadata_durable(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    pool = ThinPool.create(path, size=8 * MiB, commit_interval=0.02)
    try:
        pool.create_volume("v", MiB).write(b"t", 0)
        done = threading.Event()
        for _ in range(250):
            if pool.stats().transaction > 0:
                done.set()
                break
            done.wait(0.02)
        assert done.is_set(), "the background commit never ran"
    finally:
        pool.close()


def test_concurrent_writers_and_snapshots(make_pool: MakePool) -> None:
    pool = make_pool(size=256 * MiB)
    vols = [pool.create_volume(f"v{i}", 8 * MiB) for i in range(3)]
    for v in vols:
        v.write(b"\0" * (8 * MiB), 0)  # allocated: most writes take the unlocked path
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for rnd in range(30):
                for k in range(8):
                    vols[i].write(bytes([rnd + 1]) * MiB, k * MiB)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    snaps = []
    for n in range(6):
        snap = pool.snapshot(f"v{n % 3}", f"snap{n}")
        snaps.append((snap, snap.read(0, 8 * MiB)))
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    for v in vols:
        assert v.read(0, 8 * MiB) == bytes([30]) * (8 * MiB)
    for snap, seen in snaps:  # no write in flight at snapshot time landed in it afterwards
        assert snap.read(0, 8 * MiB) == seen
        assert all(len(set(seen[k * MiB : (k + 1) * MiB])) == 1 for k in range(8))
    assert pool.check() == []


def test_create_refuses_a_device_that_already_holds_a_pool(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ThinPool.create(str(data), size=16 << 20).close()
    meta = str(data) + ".meta"
    os.rename(meta, str(tmp_path / "elsewhere.meta"))  # the superblock alone must stop a re-create
    with pytest.raises(FopError) as exc:
        ThinPool.create(str(data), size=16 << 20)
    assert exc.value.errno == errno.EEXIST
