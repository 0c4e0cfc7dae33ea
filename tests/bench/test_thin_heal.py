"""Smoke tests of the `thin` and `heal` scenarios' own code, tiny sizes, no servers.

Timings are never asserted: only that the jobs run, fill the right cells, leave the data they
should, and that the report and the heal checks read what the systems print.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import heal, thin
from mortar.thinpool.pool import ThinPool

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _keep_page_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping the host's page cache would slow everyone's tests; it changes no result here."""
    monkeypatch.setattr(thin, "drop_caches", lambda: True)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ThinPool]:
    p = ThinPool.create(tmp_path / "pool.data", size=64 * MIB, block_size=64 << 10)
    yield p
    p.close()


def test_engine_jobs_fill_every_io_cell(tmp_path: Path, pool: ThinPool) -> None:
    s = thin.Settings(size_mib=4, big_gib=1, reps=2, snaps=3, seconds=0.05, depth=2)
    cells = thin.Cells()
    raw_path, vol = thin.engine_io(s, tmp_path, pool, cells)
    for row in (thin.RAW_ENGINE, thin.THIN_ENGINE):
        for job, unit in thin.IO_JOBS:
            c = cells.get(row, job)
            assert c is not None and c.unit == unit and len(c.runs) == 2 and all(v > 0 for v in c.runs)
    assert raw_path.stat().st_size == 4 * MIB
    assert vol.allocated_bytes == 4 * MIB  # the overwrite phase runs on a fully written volume
    assert [v.name for v in pool.volumes()] == [vol.name]  # earlier first-write volumes deleted


def test_snapshots_and_clones_clean_up_and_report(tmp_path: Path, pool: ThinPool) -> None:
    s = thin.Settings(size_mib=2, big_gib=1, reps=1, snaps=3, seconds=0.05, depth=2)
    vol = pool.create_volume("img", 2 * MIB)
    data = os.urandom(2 * MIB)
    vol.write(data, 0)
    raw = tmp_path / "raw.img"
    raw.write_bytes(data)
    cells = thin.Cells()
    info = thin.engine_snapshots(s, pool, vol, cells)
    assert info["big_volume_bytes_written"] == (1 << 30) // thin.STRIDE * thin.BLOCK
    thin.engine_clones(s, pool, raw, vol, cells)
    assert [v.name for v in pool.volumes()] == ["img"]
    assert not raw.with_name("raw-copy.img").exists()
    snap = cells.get(thin.SNAP_ROWS[0], "snapshot 2 MiB")
    assert snap is not None and len(snap.runs) == 3
    outcome = thin.Outcome(list(cells.cells.values()))
    text = thin.markdown(outcome, s, "header")
    assert "snapshot 1 GiB" in text and "| cp + fsync (raw file) |" in text
    assert {w for w, _f, _ok in thin.targets(outcome, s)} == {
        "snapshot 2 MiB < 10 ms (engine)",
        "snapshot 1 GiB < 10 ms (engine)",
    }


def test_heal_info_parsing_counts_pending_and_down_bricks() -> None:
    text = (
        "Brick h:/b0\n/vm.img\nStatus: Connected\nNumber of entries: 1\n\n"
        "Brick h:/b1\nStatus: Connected\nNumber of entries: 0\n\n"
        "Brick h:/b2\nStatus: Transport endpoint is not connected\nNumber of entries: -\n"
    )
    assert heal._parse_info(text) == (2, 2)
    healthy = "".join(f"Brick h:/b{i}\nStatus: Connected\nNumber of entries: 0\n\n" for i in range(3))
    assert heal._parse_info(healthy) == (0, 3)


def test_identical_ignores_internal_dirs_and_sees_differences(tmp_path: Path) -> None:
    bricks = [tmp_path / f"b{i}" for i in range(3)]
    for i, b in enumerate(bricks):
        (b / ".mortar").mkdir(parents=True)
        (b / ".mortar" / "index").write_bytes(bytes([i]))  # differs per brick: not compared
        (b / heal.IMAGE).write_bytes(b"x" * 4096)
    assert heal.identical(bricks, 4096)
    assert not heal.identical(bricks, 8192)
    (bricks[2] / heal.IMAGE).write_bytes(b"x" * 4095 + b"y")
    assert not heal.identical(bricks)


def test_heal_report_holds_the_ratio_to_glusterfs() -> None:
    runs = [
        heal.HealRun("GlusterFS", "64 MiB image written while down", "full", 64, 64, 8.0, 1.0, True),
        heal.HealRun("mortar", "64 MiB image written while down", "full", 64, 64, 4.0, 1.5, True),
    ]
    text = heal.markdown(heal.Outcome(runs), "header")
    assert "| 16.0 | 2.00x | yes |" in text
