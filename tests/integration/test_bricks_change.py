"""Bricks changing under a writing client, through mortard: distribute 2 -> 4 with add-brick and a
rebalance run by mortard to completion, remove-brick with migration (nothing lost, checksums),
refused and forced commits, replace-brick and raising the replica count (heal fills the new
brick, byte-identical to the others)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from mortar.client import Volume
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class Writer:
    """Writes new files and rewrites old ones, checking random earlier files against its model."""

    def __init__(self, vol: Volume, seed: int = 3, reads: bool = True) -> None:
        self.vol = vol
        self.reads = reads
        self.model: dict[str, bytes] = {}
        self.errors: list[BaseException] = []
        self.rng = random.Random(seed)
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self.rounds = 0
        self._thread = threading.Thread(target=self._run)

    def _one(self) -> None:
        rng = self.rng
        if self.reads and self.model and rng.random() < 0.3:
            name = rng.choice(list(self.model))
            with self.vol.open(name, "rb") as f:
                got = f.read()
            if got != self.model[name]:
                raise AssertionError(f"{name}: {len(got)} bytes read, not {len(self.model[name])}")
            return
        if rng.random() < 0.7:
            name = f"/w/f{rng.randrange(400):03}"
        else:
            name = f"/w/d{rng.randrange(8)}/g{rng.randrange(50)}"
        data = os.urandom(rng.choice((100, 4096, 65536, 200_000)))
        with self.vol.open(name, "wb") as f:
            f.write(data)
        self.model[name] = data

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._go.wait(0.1):
                    continue
                self._one()
                self.rounds += 1
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def start(self) -> Writer:
        self.vol.makedirs("/w", exist_ok=True)
        for d in range(8):
            self.vol.makedirs(f"/w/d{d}", exist_ok=True)
        self._thread.start()
        return self

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def wait_rounds(self, n: int, timeout: float = 30) -> None:
        target = self.rounds + n
        wait_for(lambda: self.rounds >= target or self.errors, timeout, what=f"{n} more writes")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()
        assert not self.errors, f"the writer saw {self.errors[0]!r}"

    def verify(self, vol: Volume) -> None:
        for name, data in self.model.items():
            with vol.open(name, "rb") as f:
                assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest(), name


def _task(node: Mortard, volume: str, *words: str) -> dict[str, Any]:
    return dict(json.loads(node.ok("--json", "volume", *words))["task"])


FINAL = ("completed", "failed")


def drain_done(node: Mortard, name: str, *bricks: str) -> None:
    wait_for(
        lambda: _task(node, name, "remove-brick", name, *bricks, "status")["state"] in FINAL,
        120,
        0.5,
        what="the drain to finish",
    )


def _clean(node: Mortard, volume: str) -> bool:
    rows = json.loads(node.ok("--json", "volume", "heal", volume, "info", "summary"))["bricks"]
    return all(r["status"] == "Connected" and r["count"] == 0 for r in rows)


def _files_on(brick: Path) -> list[str]:
    out = []
    for p in brick.rglob("*"):
        if ".mortar" in p.parts or not p.is_file():
            continue
        st = p.stat()
        if st.st_mode & 0o1000 and st.st_size == 0:  # a link file
            continue
        out.append(str(p.relative_to(brick)))
    return out


@pytest.mark.xfail(
    strict=False,
    reason="about one run in fifteen the writer sees one EIO while files migrate between processes; "
    "open issue in dht migration under real bricks",
)
def test_distribute_grows_rebalances_and_shrinks_under_writes(node: Mortard, tmp_path: Path) -> None:
    name = "grow"
    b = [f"127.0.0.1:{tmp_path}/g{i}" for i in range(4)]
    node.ok("volume", "create", name, b[0], b[1], "force")
    node.ok("volume", "start", name)
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        writer = Writer(vol).start()
        writer.wait_rounds(100)
        assert node.fails("volume", "rebalance", name, "status")  # none has run yet
        out = node.ok("volume", "add-brick", name, b[2], b[3], "force")
        assert "success" in out
        writer.wait_rounds(50)
        out = node.ok("volume", "rebalance", name, "start")
        assert "has been started successfully" in out
        done = wait_for(
            lambda: _task(node, name, "rebalance", name, "status")["state"] in ("completed", "failed"),
            120,
            0.5,
            what="the rebalance to finish",
        )
        assert done
        writer.wait_rounds(50)
        writer.stop()
        task = _task(node, name, "rebalance", name, "status")
        assert task["state"] == "completed", task
        assert task["files_scanned"] > 0 and task["files_moved"] > 0 and task["bytes_moved"] > 0
        assert "completed" in node.ok("volume", "rebalance", name, "status")
        writer.verify(vol)
        assert _files_on(tmp_path / "g2") or _files_on(tmp_path / "g3")  # the new bricks got files

        # remove-brick: commit refused before start, then drain two bricks and commit
        err = node.fails("volume", "remove-brick", name, b[2], b[3], "commit")
        assert "was not run" in err
        first, writer = writer, Writer(vol, seed=5)
        writer.model = dict(first.model)  # a second writer, over the same files and new ones
        writer.start()
        node.ok("volume", "remove-brick", name, b[2], b[3], "start")
        drain_done(node, name, b[2], b[3])
        writer.wait_rounds(30)
        writer.stop()
        task = _task(node, name, "remove-brick", name, b[2], b[3], "status")
        assert task["state"] == "completed", task
        if not task["drained"]:
            # cluster/distribute still creates a file on a drained subvolume when the parent's
            # cached layout hashes it there (reported): a second start moves what was left
            assert "force" in node.fails("volume", "remove-brick", name, b[2], b[3], "commit")
            node.ok("volume", "remove-brick", name, b[2], b[3], "start")
            drain_done(node, name, b[2], b[3])
            task = _task(node, name, "remove-brick", name, b[2], b[3], "status")
        assert task["state"] == "completed" and task["drained"], task
        out = node.ok("volume", "remove-brick", name, b[2], b[3], "commit")
        assert "success" in out
        info = json.loads(node.ok("--json", "volume", "info", name))
        vols = info.get("volumes") or [info.get("volume")]
        assert [x["name"] for x in vols[0]["bricks"]] == [b[0], b[1]]
    assert not _files_on(tmp_path / "g2") and not _files_on(tmp_path / "g3")  # drained
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        writer.verify(vol)  # every file, after the commit, through a new client
    node.ok("volume", "stop", name)


def test_commit_force_reports_what_is_lost(node: Mortard, tmp_path: Path) -> None:
    name = "lossy"
    b = [f"127.0.0.1:{tmp_path}/l{i}" for i in range(2)]
    node.ok("volume", "create", name, *b, "force")
    node.ok("volume", "start", name)
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        for i in range(40):
            with vol.open(f"/f{i}", "wb") as f:
                f.write(b"x" * 100)
    on_1 = len(_files_on(tmp_path / "l1"))
    assert on_1 > 0
    err = node.fails("volume", "remove-brick", name, b[1], "commit")
    assert "force" in err
    data = json.loads(node.ok("--json", "volume", "remove-brick", name, b[1], "commit", "force"))
    assert data["files_left"] == on_1
    assert f"{on_1} file(s) were still on the removed bricks" in data["message"]
    assert "not a brick" in node.fails("volume", "remove-brick", name, b[1], "start")
    assert "every brick" in node.fails("volume", "remove-brick", name, b[0], "start")
    node.ok("volume", "stop", name)


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
@pytest.mark.xfail(
    strict=False,
    reason="sometimes the new brick is not healed to an identical copy in time: replace-brick reuses the "
    "old brick's pending key, and entry heal creates a file before marking it pending; open issue",
)
def test_replace_brick_and_raising_the_replica_count_are_healed(node: Mortard, tmp_path: Path) -> None:
    name = "swap"
    node.ok("volume", "create", name, f"127.0.0.1:{tmp_path}/r0", "force")
    node.ok("volume", "set", name, "cluster.heal-timeout", "3")
    node.ok("volume", "start", name)
    err = node.fails(
        "volume",
        "replace-brick",
        name,
        f"127.0.0.1:{tmp_path}/r0",
        f"127.0.0.1:{tmp_path}/x",
        "commit",
        "force",
    )
    assert "not replicated" in err
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        # writes only: AFR's entry heal creates a file on the new copy a moment before it marks it
        # pending, and a read in that moment sees the empty copy (reported to cluster/replicate)
        writer = Writer(vol, reads=False).start()
        writer.wait_rounds(60)
        # a plain volume becomes replicate: the new copy is filled by a full heal
        node.ok("volume", "add-brick", name, "replica", "2", f"127.0.0.1:{tmp_path}/r1", "force")
        wait_for(lambda: "swap-replicate-0" in vol.avolume.graph.xlators, 30, what="the client's switch")
        writer.wait_rounds(60)
        writer.pause()
        # replace-brick of r0 waits for heal: until then r0 holds the only copy of some changes
        wait_for(lambda: _clean(node, name), 60, 0.5, what="the new copy healed")
        node.ok(
            "volume",
            "replace-brick",
            name,
            f"127.0.0.1:{tmp_path}/r0",
            f"127.0.0.1:{tmp_path}/r2",
            "commit",
            "force",
        )
        # writes resume once this client reaches the new brick: a write through the old graph
        # blames "swap-client-0" meaning r0, and a heal of r2 can clear that blame (reported)
        new_port = node.api("GET", f"/v1/volumes/{name}/status")["bricks"][0]["port"]
        wait_for(
            lambda: vol.avolume.graph.xlators[f"{name}-client-0"].opts["remote-port"] == new_port,
            30,
            what="the client's switch to the new brick",
        )
        writer.resume()
        writer.wait_rounds(60)
        writer.stop()

    def identical() -> bool:
        a, c = tmp_path / "r1", tmp_path / "r2"
        for fname, data in writer.model.items():
            for brick in (a, c):
                p = brick / fname.lstrip("/")
                if not p.exists() or p.read_bytes() != data:
                    return False
        return True

    wait_for(identical, 90, 1.0, what="the new bricks healed to identical copies")
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        writer.verify(vol)
    info = json.loads(node.ok("--json", "volume", "info", name))
    vols = info.get("volumes") or [info.get("volume")]
    assert [x["path"] for x in vols[0]["bricks"]] == [f"{tmp_path}/r2", f"{tmp_path}/r1"]
    assert vols[0]["type"] == "Replicate"
    node.ok("volume", "stop", name)


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
@pytest.mark.xfail(
    reason="dht_migrate over cluster/replicate: every migration fails (fsetxattr refused, client quorum "
    "not met; changelog ESTALE on the source set); open issue",
    strict=False,
)
def test_replica3_gains_a_second_set_and_rebalances_under_writes(node: Mortard, tmp_path: Path) -> None:
    name = "r3grow"
    b = [f"127.0.0.1:{tmp_path}/x{i}" for i in range(6)]
    node.ok("volume", "create", name, "replica", "3", *b[:3], "force")
    node.ok("volume", "start", name)
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        writer = Writer(vol, seed=9).start()
        writer.wait_rounds(80)
        node.ok("volume", "add-brick", name, *b[3:], "force")  # 1 x 3 -> 2 x 3
        wait_for(lambda: f"{name}-dht" in vol.avolume.graph.xlators, 30, what="the client's switch")
        writer.wait_rounds(40)
        node.ok("volume", "rebalance", name, "start")
        wait_for(
            lambda: _task(node, name, "rebalance", name, "status")["state"] in FINAL,
            120,
            0.5,
            what="the rebalance to finish",
        )
        writer.wait_rounds(30)
        writer.stop()
        task = _task(node, name, "rebalance", name, "status")
        assert task["state"] == "completed" and task["files_moved"] > 0, task
        writer.verify(vol)
    info = json.loads(node.ok("--json", "volume", "info", name))
    vols = info.get("volumes") or [info.get("volume")]
    assert vols[0]["number_of_bricks"] == "2 x 3 = 6"
    # each set's three copies are identical on disk
    for k in (0, 1):
        sets = [tmp_path / f"x{3 * k + j}" for j in range(3)]
        assert _files_on(sets[0]) == _files_on(sets[1]) == _files_on(sets[2])
        for rel in _files_on(sets[0]):
            assert (
                (sets[0] / rel).read_bytes() == (sets[1] / rel).read_bytes() == (sets[2] / rel).read_bytes()
            )
    node.ok("volume", "stop", name)
