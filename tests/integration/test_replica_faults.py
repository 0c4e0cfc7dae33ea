"""Replica 3 on bare brick processes (no mortard): quorum loss and namespace heal.

A brick SIGKILLed during writes, healed by mortard's heal daemon, is in `test_shd.py`; here the
heal is driven from the client so the replication layer is tested without the daemon. Copies are
compared on the bricks' disks, never taken on trust.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from mortar.client import Volume
from tests.integration.afr import heal_until_clean
from tests.integration.brickproc import TestVolume

MIB = 1 << 20
pytestmark = pytest.mark.integration


def _wait_up(vol: Volume, path: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            vol.stat(path)
            return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_two_bricks_down_fail_writes_cleanly_and_reads_work(replica3: TestVolume) -> None:
    volfile = replica3.start()
    with Volume.from_volfile(volfile) as vol:
        h = vol.create("/q")
        vol.pwrite(h, b"kept" * 1024, 0)
        vol.fsync(h)
        replica3.bricks[1].kill()
        replica3.bricks[2].kill()
        time.sleep(0.3)
        with pytest.raises(OSError) as exc:
            vol.pwrite(h, b"lost" * 1024, 0)
        assert exc.value.errno == errno.ENOTCONN
        with pytest.raises(OSError):
            vol.mkdir("/not-made")
        assert vol.pread(h, 4096, 0) == b"kept" * 1024
        vol.close(h)
    # nothing diverged: the only live brick still holds the acknowledged data and no new name
    assert Path(replica3.desc.bricks[0].path, "q").read_bytes() == b"kept" * 1024
    assert not Path(replica3.desc.bricks[0].path, "not-made").exists()
    for b in replica3.bricks[1:]:
        b.start()


def test_namespace_changes_while_a_brick_is_down_are_healed(replica3: TestVolume) -> None:
    volfile = replica3.start()
    with Volume.from_volfile(volfile) as vol:
        vol.makedirs("/a/b")
        vol.close(vol.create("/a/gone"))
        replica3.bricks[0].kill()
        vol.makedirs("/a/b/c")
        with vol.open("/a/b/c/new.txt", "wb") as f:
            f.write(os.urandom(100_000))
        vol.unlink("/a/gone")
        vol.rename("/a/b", "/a/moved")
        vol.chmod("/a", 0o700)
        replica3.bricks[0].start()
        _wait_up(vol, "/a")
        time.sleep(0.5)
        heal_until_clean(vol)
    trees = []
    for b in replica3.desc.bricks:
        root = Path(b.path)
        entries = sorted(
            (str(p.relative_to(root)), p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in root.rglob("*")
            if ".mortar" not in p.parts
        )
        trees.append(entries)
    assert trees[0] == trees[1] == trees[2]
    assert any(name == "a/moved/c/new.txt" for name, _, _ in trees[0])
