"""Bricks changing under a writing client, through mortard: distribute 2 -> 4 with add-brick and a
rebalance run by mortard to completion, remove-brick with migration (nothing lost, checksums),
refused and forced commits, replace-brick and raising the replica count (heal fills the new
brick, byte-identical to the others)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from mortar.client import Volume
from mortar.graph.volfile import VolumeSpec, parse
from mortar.mgmt.bricks_change import LINKTO_XATTR
from mortar.mgmt.rest import request_sync
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


def _file_heals(brick: Path) -> list[str]:
    """Heal index entries of a brick that are not directories (gone files, or files)."""
    out = []
    for kind in ("dirty", "xattrop"):
        index = brick / ".mortar" / "indices" / kind
        for gfid in os.listdir(index) if index.exists() else []:
            handle = brick / ".mortar" / "handles" / gfid[:2] / gfid[2:4] / gfid
            if not handle.is_symlink():
                out.append(f"{kind}/{gfid}")
    return out


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
        # reads too: entry heal marks a file pending on the sources before it creates the empty
        # copy, so no read ever takes that copy for a complete one
        writer = Writer(vol).start()
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
        # writes resume once this client reaches the new brick (a write through the old graph blames
        # "swap-client-0", the name r2 took over: true of r2 as well, which heal then fills)
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
    # migration left no file to heal (no changelog work on a source that lost its name); a directory
    # may stay listed a while (a client's entry batch still open when it disconnected)
    for k in range(6):
        assert not _file_heals(tmp_path / f"x{k}"), k
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


# ---- remove-brick: drained bricks get no new files, and no brick is renamed (issue 4) ----------------


def _client_specs(node: Mortard, name: str) -> dict[str, VolumeSpec]:
    raw, _ = request_sync(node.addr, node.port, "GET", f"/v1/volumes/{name}/volfile", timeout=30)
    return {s.name: s for s in parse(raw.decode())}


def _data_on(brick: Path, rel: str) -> bool:
    """`rel` is a file with data on `brick` (not absent, not a DHT link file)."""
    p = brick / rel.lstrip("/")
    if not p.exists():
        return False
    st = p.stat()
    return not (st.st_mode & 0o1000 and st.st_size == 0)


def _linktos(bricks: list[Path]) -> dict[str, str]:
    """Each DHT link file on `bricks` (path in the volume) and the subvolume it points at."""
    out = {}
    for brick in bricks:
        for p in brick.rglob("*"):
            if ".mortar" in p.parts or not p.is_file():
                continue
            try:
                out["/" + str(p.relative_to(brick))] = os.getxattr(p, LINKTO_XATTR).rstrip(b"\0").decode()
            except OSError:
                continue
    return out


def _verify(node: Mortard, name: str, model: dict[str, bytes]) -> bool:
    """Every file of `model` reads back through a new client. Bricks that moved in the volume are
    restarted by their daemon a moment after a remove-brick commit: until then reads may fail
    with OSError, which `wait_for` retries; a wrong byte fails at once."""
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=30) as vol:
        for path, data in model.items():
            with vol.open(path, "rb") as f:
                assert f.read() == data, path
    return True


def _write(vol: Volume, model: dict[str, bytes], path: str) -> None:
    data = os.urandom(random.choice((100, 5000, 70_000)))
    with vol.open(path, "wb") as f:
        f.write(data)
    model[path] = data


def test_remove_brick_places_no_new_file_on_the_drained_brick_nor_renames_the_others(
    node: Mortard, tmp_path: Path
) -> None:
    name = "shrink"
    b = [f"127.0.0.1:{tmp_path}/s{i}" for i in range(3)]
    s0 = tmp_path / "s0"
    node.ok("volume", "create", name, *b, "force")
    node.ok("volume", "start", name)
    model: dict[str, bytes] = {}
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        vol.makedirs("/old", exist_ok=True)
        for i in range(60):
            _write(vol, model, f"/old/f{i}")
        for i in range(0, 60, 4):  # renames leave link files naming the subvolume that has the data
            vol.rename(f"/old/f{i}", f"/old/r{i}")
            model[f"/old/r{i}"] = model.pop(f"/old/f{i}")
        assert any(_data_on(s0, p) for p in model)

        # start, then stop: the client's distribute drains s0 only in between
        node.ok("volume", "remove-brick", name, b[0], "start")
        dht = _client_specs(node, name)[f"{name}-dht"]
        assert dht.options["decommissioned-bricks"] == f"{name}-client-0"
        node.ok("volume", "remove-brick", name, b[0], "stop")
        assert "decommissioned-bricks" not in _client_specs(node, name)[f"{name}-dht"].options

        node.ok("volume", "remove-brick", name, b[0], "start")
        wait_for(
            lambda: (
                getattr(vol.avolume.graph.xlators[f"{name}-dht"], "decommissioned", None)
                == {f"{name}-client-0"}
            ),
            30,
            what="the client's switch to the draining graph",
        )
        # new files, in an old directory (its layout still gives s0 a range until the drain
        # rewrites it) and in a new one, during the drain: none lands on s0
        vol.makedirs("/new", exist_ok=True)
        for i in range(60):
            for path in (f"/old/n{i}", f"/new/n{i}"):
                _write(vol, model, path)
                assert not _data_on(s0, path), f"{path} was created on the brick being drained"
        drain_done(node, name, b[0])
        task = _task(node, name, "remove-brick", name, b[0], "status")
        assert task["state"] == "completed" and task["drained"], task
        assert not _files_on(s0)
        node.ok("volume", "remove-brick", name, b[0], "commit")

    # the bricks left keep their names: clients, server names and link files agree
    specs = _client_specs(node, name)
    clients = {n: s.options["remote-subvolume"] for n, s in specs.items() if s.type == "protocol/client"}
    assert clients == {f"{name}-client-1": f"{name}-brick-1", f"{name}-client-2": f"{name}-brick-2"}
    assert "decommissioned-bricks" not in specs[f"{name}-dht"].options
    # a link file never points at a brick other than the one it meant (s1 is still client-1)
    brick_of = {f"{name}-client-1": tmp_path / "s1", f"{name}-client-2": tmp_path / "s2"}
    for path, target in _linktos([tmp_path / "s1", tmp_path / "s2"]).items():
        assert target not in brick_of or _data_on(brick_of[target], path), (path, target)
    wait_for(lambda: _verify(node, name, model), 60, 1.0, what="every file read back")
    node.ok("volume", "stop", name)


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_removing_the_first_replica_set_keeps_pending_keys_meaningful(node: Mortard, tmp_path: Path) -> None:
    """A copy's changelog names its partners by client name: after the first set goes, the mark
    "rep-client-3 missed data" recorded on x2 before the change still names x3, so heal repairs x3."""
    name = "rep"
    x = [tmp_path / f"x{i}" for i in range(6)]
    node.ok("volume", "create", name, "replica", "2", *(f"127.0.0.1:{p}" for p in x), "force")
    node.ok("volume", "start", name)
    model: dict[str, bytes] = {}
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        vol.makedirs("/d", exist_ok=True)
        for i in range(40):
            _write(vol, model, f"/d/f{i}")
    kept = {p: d for p, d in model.items() if _data_on(x[2], p) or _data_on(x[4], p)}
    victim = next(p for p in kept if _data_on(x[2], p))
    # x3 silently missed a write that x2 has, recorded the AFR way on x2
    os.setxattr(x[2] / victim.lstrip("/"), f"trusted.afr.{name}-client-3", struct.pack(">3i", 1, 0, 0))
    with open(x[3] / victim.lstrip("/"), "r+b") as f:
        f.write(b"\0" * len(kept[victim]))
    node.ok("volume", "remove-brick", name, f"127.0.0.1:{x[0]}", f"127.0.0.1:{x[1]}", "commit", "force")

    specs = _client_specs(node, name)
    sets = {n: s.subvolumes for n, s in specs.items() if s.type == "cluster/replicate"}
    assert sets == {f"{name}-replicate-1": [f"{name}-client-2", f"{name}-client-3"],
                    f"{name}-replicate-2": [f"{name}-client-4", f"{name}-client-5"]}  # fmt: skip

    def healed() -> bool:
        # the bricks that moved in the volume restart once after the commit: a crawl that runs
        # while they are away heals nothing, so ask again until one has run with them up
        node.api("POST", f"/v1/volumes/{name}/heal", {"full": True, "wait": True, "timeout": 20})
        return (x[3] / victim.lstrip("/")).read_bytes() == kept[victim]

    wait_for(healed, 90, 1.0, what="x3's copy healed")
    wait_for(lambda: _verify(node, name, kept), 60, 1.0, what="every file read back")
    node.ok("volume", "stop", name)


@pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")
def test_remove_brick_lowers_the_replica_count(node: Mortard, tmp_path: Path) -> None:
    name = "lower"
    y = [f"127.0.0.1:{tmp_path}/y{i}" for i in range(3)]
    node.ok("volume", "create", name, "replica", "3", *y, "force")
    node.ok("volume", "start", name)
    model: dict[str, bytes] = {}
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        for i in range(20):
            _write(vol, model, f"/f{i}")
    node.ok("volume", "heal", name)  # copies to drop must hold nothing the others lack
    wait_for(lambda: _clean(node, name), 60, 0.5, what="nothing left to heal")
    assert "force" in node.fails("volume", "remove-brick", name, "replica", "2", y[0], "start")
    assert "give 1, not 2" in node.fails("volume", "remove-brick", name, "replica", "2", y[0], y[1], "force")
    out = node.ok("volume", "remove-brick", name, "replica", "2", y[0], "force")
    assert "success" in out
    info = json.loads(node.ok("--json", "volume", "info", name))
    vols = info.get("volumes") or [info.get("volume")]
    assert vols[0]["number_of_bricks"] == "1 x 2 = 2"
    assert [b["name"] for b in vols[0]["bricks"]] == y[1:]
    specs = _client_specs(node, name)
    assert specs[f"{name}-replicate-0"].subvolumes == [f"{name}-client-1", f"{name}-client-2"]
    wait_for(lambda: _verify(node, name, model), 60, 1.0, what="every file read back")
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=30) as vol:
        _write(vol, model, "/after")

    def both_copies() -> bool:  # a brick that moved may have been restarting: then heal fills it
        if all(_data_on(tmp_path / b, "/after") for b in ("y1", "y2")):
            return all((tmp_path / b / "after").read_bytes() == model["/after"] for b in ("y1", "y2"))
        node.ok("volume", "heal", name)
        return False

    wait_for(both_copies, 60, 1.0, what="the new file on both copies left")
    node.ok("volume", "stop", name)
