"""The eager entry lock on real processes (replica 3, bare bricks): a client SIGKILLed while it holds
a directory's batch does not wedge the others and leaves the directory for heal; a brick SIGKILLed
mid-loop is healed back to the same names. Copies are compared on the bricks' disks."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mortar.client import Volume
from tests.integration.afr import heal_until_clean
from tests.integration.brickproc import TestVolume

pytestmark = pytest.mark.integration

CREATOR = """
import os, sys
from mortar.client import Volume
with Volume.from_volfile(sys.argv[1]) as vol:
    vol.makedirs("/d", exist_ok=True)
    i = 0
    while True:
        vol.close(vol.create(f"/d/killed{i}"))
        i += 1
        if i == 20:
            print("creating", flush=True)
"""


def _listings(tv: TestVolume, rel: str) -> list[set[str]]:
    return [set(os.listdir(Path(b.path, rel))) for b in tv.desc.bricks]


def test_client_killed_holding_a_directory_batch(replica3: TestVolume) -> None:
    volfile = replica3.start()
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR, str(volfile)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert creator.stdout is not None
        ready, _, _ = select.select([creator.stdout], [], [], 60)
        assert ready and creator.stdout.readline().strip() == b"creating"
        os.killpg(creator.pid, signal.SIGKILL)  # mid-batch: the directory lock and its dirty mark held
        creator.wait(10)
        with Volume.from_volfile(volfile) as vol:
            start = time.monotonic()
            for i in range(10):  # the bricks dropped the dead client's lock: nobody waits for it
                vol.close(vol.create(f"/d/after{i}"))
            assert time.monotonic() - start < 30
            time.sleep(1.5)  # this client's own batch ends (post-op-delay idle)
            heal_until_clean(vol)
            names = vol.listdir("/d")
        lists = _listings(replica3, "d")
        assert lists[0] == lists[1] == lists[2] == set(names)
        assert {f"after{i}" for i in range(10)} <= lists[0]
    finally:
        if creator.poll() is None:
            os.killpg(creator.pid, signal.SIGKILL)
        creator.wait(10)


def test_brick_killed_during_a_create_loop(replica3: TestVolume) -> None:
    volfile = replica3.start()
    with Volume.from_volfile(volfile) as vol:
        vol.makedirs("/d")
        for i in range(30):
            if i == 10:
                replica3.bricks[2].kill()
            if i == 20:
                for j in range(0, 10, 2):
                    vol.unlink(f"/d/f{j}")
            vol.close(vol.create(f"/d/f{i}"))
        replica3.bricks[2].start()
        afr = vol.avolume.graph.xlators["itest-replicate-0"]
        deadline = time.monotonic() + 30
        while not afr.child_up[2]:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "brick 2 did not come back"
            time.sleep(0.1)
        time.sleep(1.5)
        heal_until_clean(vol)
        names = set(vol.listdir("/d"))
    assert names == {f"f{i}" for i in range(30)} - {f"f{j}" for j in range(0, 10, 2)}
    lists = _listings(replica3, "d")
    assert lists[0] == lists[1] == lists[2] == names
