"""The self-heal daemon run by mortard: a brick of replica 3 SIGKILLed during sequential and random
writes is restarted by the supervisor and healed by the heal daemon on its own (the client's own
background heal is off), the copies byte-identical on disk; `volume heal` info, statistics and
the split-brain resolutions (bigger-file, latest-mtime, source-brick) checked on the bricks."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from mortar.client import Volume
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate"),
]

MIB = 1 << 20


def _status(node: Mortard, volume: str) -> list[dict[str, object]]:
    return list(node.api("GET", f"/v1/volumes/{volume}/status")["bricks"])


def _heal_info(node: Mortard, volume: str, *mode: str) -> dict[str, object]:
    return dict(json.loads(node.ok("--json", "volume", "heal", volume, "info", *mode)))


def _clean(node: Mortard, volume: str) -> bool:
    rows = _heal_info(node, volume, "summary")["bricks"]
    return all(r["status"] == "Connected" and r["count"] == 0 for r in rows)  # type: ignore[attr-defined]


def _digests(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.mark.parametrize("pattern", ["sequential", "random"])
def test_brick_killed_during_writes_is_healed_by_the_daemon(
    node: Mortard, tmp_path: Path, pattern: str
) -> None:
    name = f"shd-{pattern}"
    dirs = [tmp_path / f"b{i}" for i in range(3)]
    node.ok("volume", "create", name, "replica", "3", *(f"127.0.0.1:{d}" for d in dirs), "force")
    node.ok("volume", "set", name, "cluster.heal-timeout", "3")
    node.ok("volume", "set", name, "cluster.background-self-heal-count", "0")  # only the daemon heals
    node.ok("volume", "set", name, "network.ping-timeout", "3")
    node.ok("volume", "start", name)
    size = 16 * MIB
    model = bytearray(size)
    victim_pid = int(_status(node, name)[1]["pid"])  # type: ignore[call-overload]
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        h = vol.create("/disk.img")
        vol.ftruncate(h, size)
        errors: list[OSError] = []
        rng = random.Random(11)
        stop = threading.Event()
        written = [0, 0]  # before, after the kill
        killed = threading.Event()

        def writer() -> None:
            n = 0
            while not stop.is_set():
                if pattern == "sequential":
                    off, length = (n % (size // MIB)) * MIB, MIB
                else:
                    off, length = rng.randrange(size - 65536), rng.choice((512, 4096, 65536))
                data = bytes([n % 251 + 1]) * length
                try:
                    vol.pwrite(h, data, off)
                except OSError as exc:
                    errors.append(exc)
                    return
                model[off : off + length] = data
                n += 1
                written[killed.is_set()] += 1

        t = threading.Thread(target=writer)
        t.start()
        wait_for(lambda: written[0] > 5, 20, what="writes before the kill")
        os.kill(victim_pid, signal.SIGKILL)
        killed.set()
        wait_for(lambda: written[1] > 20, 30, what="writes after the kill")
        # the supervisor brings the brick back (a new pid); keep writing through its return
        wait_for(
            lambda: _status(node, name)[1]["online"] and _status(node, name)[1]["pid"] != victim_pid,
            30,
            what="the brick restarted by mortard",
        )
        time.sleep(1.0)
        stop.set()
        t.join(60)
        assert not t.is_alive()
        assert errors == [], f"the application saw {errors[0]!r}"
        vol.fsync(h)
        vol.close(h)
        # nobody heals but the daemon: wait for its crawls to leave nothing listed
        wait_for(lambda: _clean(node, name), 90, interval=0.5, what="the heal daemon to heal everything")
        with vol.open("/disk.img", "rb") as f:
            assert f.read() == bytes(model)
    digests = _digests([d / "disk.img" for d in dirs])
    assert digests == [hashlib.sha256(model).hexdigest()] * 3
    stats = json.loads(node.ok("--json", "volume", "heal", name, "statistics"))
    crawls = [c for host in stats["hosts"] for c in host["crawls"]]
    assert sum(c["healed"] for c in crawls) >= 1  # bytes may be 0: later writes can refill every block
    text = node.ok("volume", "heal", name, "statistics")
    assert "Crawl statistics for host" in text and "Type of crawl: INDEX" in text
    node.ok("volume", "stop", name)


def _half_volfile(node: Mortard, volume: str, broken: int, path: Path) -> Path:
    """The volume's client volfile with brick `broken` unreachable: this client writes to the other
    copy only, and marks it as accusing the unreachable one."""
    text, _ = _fetch(node, volume)
    out, current = [], ""
    for line in text.splitlines():
        m = re.match(r"\s*volume\s+(\S+)", line)
        if m:
            current = m.group(1)
        if current == f"{volume}-client-{broken}" and line.strip().startswith("option remote-port"):
            line = "    option remote-port 1"
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


def _fetch(node: Mortard, volume: str) -> tuple[str, str]:
    run = node.cli("volume", "volfile", volume)
    assert run.status == 0, run.err
    return run.out, ""


def _write(volfile: Path, files: dict[str, bytes]) -> None:
    with Volume.from_volfile(volfile, timeout=20) as vol:
        for fname, data in files.items():
            with vol.open(fname, "wb") as f:
                f.write(data)


def test_split_brain_reported_and_resolved_by_each_policy(node: Mortard, tmp_path: Path) -> None:
    name = "splitbrain"
    dirs = [tmp_path / f"s{i}" for i in range(2)]
    bricks = [f"127.0.0.1:{d}" for d in dirs]
    node.ok("volume", "create", name, "replica", "2", *bricks, "force")
    node.ok("volume", "set", name, "cluster.background-self-heal-count", "0")
    node.ok("volume", "heal", name, "disable")  # nothing heals while the split-brain is made
    node.ok("volume", "start", name)
    files = ["/big", "/mtime", "/src"]
    with Volume.connect(f"mortar://{node.remote}/{name}", timeout=20) as vol:
        for fname in files:
            with vol.open(fname, "wb") as f:
                f.write(b"0" * 10)
    # copy 0 written with brick 1 away, then copy 1 written with brick 0 away: each accuses the other
    _write(
        _half_volfile(node, name, 1, tmp_path / "only0.vol"),
        {"/big": b"A" * 100, "/mtime": b"A" * 50, "/src": b"A" * 50},
    )
    time.sleep(1.1)  # copy 1's mtime is later
    _write(
        _half_volfile(node, name, 0, tmp_path / "only1.vol"),
        {"/big": b"B" * 10, "/mtime": b"B" * 50, "/src": b"B" * 50},
    )
    node.ok("volume", "heal", name, "enable")
    node.ok("volume", "heal", name)

    def listed() -> list[str]:
        rows = _heal_info(node, name, "split-brain")["bricks"]
        return sorted({e["path"] for r in rows for e in r["entries"]})  # type: ignore[attr-defined]

    assert wait_for(lambda: listed() == files, 30, what="the three files reported in split-brain")
    text = node.ok("volume", "heal", name, "info")
    assert "/big - Is in split-brain" in text and "Status: Connected" in text
    summary = node.ok("volume", "heal", name, "info", "summary")
    assert "Number of entries in split-brain: 3" in summary

    out = node.ok("volume", "heal", name, "split-brain", "bigger-file", "/big")
    assert "Healed /big" in out and bricks[0] in out
    out = node.ok("volume", "heal", name, "split-brain", "latest-mtime", "/mtime")
    assert bricks[1] in out
    gfid = os.getxattr(dirs[0] / "src", "trusted.mortar.gfid").hex()
    assert gfid  # source-brick without FILE resolves every remaining split-brain entry
    out = node.ok("volume", "heal", name, "split-brain", "source-brick", bricks[0])
    assert "Healed gfid:" in out
    for d in dirs:
        assert (d / "big").read_bytes() == b"A" * 100
        assert (d / "mtime").read_bytes() == b"B" * 50
        assert (d / "src").read_bytes() == b"A" * 50
    wait_for(lambda: _clean(node, name), 30, interval=0.5, what="nothing left to heal")
    err = node.fails("volume", "heal", name, "split-brain", "bigger-file", "/big")
    assert "not in split-brain" in err
    node.ok("volume", "stop", name)


def test_heal_refusals(node: Mortard, tmp_path: Path) -> None:
    node.ok("volume", "create", "plain1", f"127.0.0.1:{tmp_path}/p0", "force")
    node.ok("volume", "start", "plain1")
    assert "not of type replicate" in node.fails("volume", "heal", "plain1")
    assert "usage" in node.fails("volume", "heal", "plain1", "split-brain", "nonsense", "/x")
    assert "does not exist" in node.fails("volume", "heal", "nosuch", "info")
    node.ok("volume", "stop", "plain1")
