"""A single-node mortard: the lifecycle of each volume type, every refusal of volume create and of
the state changes, brick supervision as `volume status` reports it, and a daemon restart that
adopts its running bricks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mortar.cli.main import main as cli_main
from mortar.client import Volume
from mortar.mgmt.rest import call_sync
from tests.integration.afr import HAVE_AFR
from tests.integration.harness import Mortard, alive, free_port, kill_all_under, wait_for

pytestmark = pytest.mark.timeout(180)

SHAPES = [
    pytest.param("", 3, "Distribute", "3", id="distribute"),
    pytest.param("transport unix", 2, "Distribute", "2", id="unix-sockets"),
    pytest.param("replica 3", 3, "Replicate", "1 x 3 = 3", id="replicate",
                 marks=pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")),
    pytest.param("replica 3", 6, "Distributed-Replicate", "2 x 3 = 6", id="distributed-replicate",
                 marks=pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")),
    pytest.param("replica 3 arbiter 1", 3, "Replicate", "1 x (2 + 1) = 3", id="arbiter",
                 marks=pytest.mark.skipif(not HAVE_AFR, reason="needs cluster/replicate")),
]  # fmt: skip


def _status(node: Mortard, name: str) -> list[dict[str, object]]:
    return list(node.api("GET", f"/v1/volumes/{name}/status")["bricks"])


def _all_online(node: Mortard, name: str) -> list[dict[str, object]] | None:
    rows = _status(node, name)
    return rows if all(r["online"] for r in rows) else None


@pytest.mark.parametrize(("layout", "count", "vtype", "number"), SHAPES)
def test_volume_lifecycle(
    node: Mortard, bricks: Path, layout: str, count: int, vtype: str, number: str
) -> None:
    name = f"life-{vtype.lower()}-{count}"
    paths = [f"127.0.0.1:{bricks}/b{i}" for i in range(count)]
    out = node.ok("volume", "create", name, *layout.split(), *paths, "force")
    assert out.strip() == f"volume create: {name}: success: please start the volume to access data"
    info = node.ok("volume", "info", name)
    assert f"Type: {vtype}" in info and "Status: Created" in info and f"Number of Bricks: {number}" in info
    assert all(p in info for p in paths)

    assert node.ok("volume", "start", name).strip() == f"volume start: {name}: success"
    rows = _status(node, name)
    assert [r["name"] for r in rows] == paths
    assert all(r["online"] and int(r["pid"]) > 0 for r in rows)  # type: ignore[call-overload]
    if "unix" in layout:
        assert all(str(r["socket"]).endswith(".sock") and r["port"] == 0 for r in rows)
    else:
        assert all(int(r["port"]) > 0 for r in rows)  # type: ignore[call-overload]
    for i in range(count):  # each brick log is where the admin guide says
        assert (node.logdir / "bricks" / f"{str(bricks).strip('/').replace('/', '-')}-b{i}.log").exists()

    payload = os.urandom(3 << 20)
    with Volume.connect(f"mortar://{node.remote}/{name}") as vol:
        vol.makedirs("/d/e")
        for i in range(8):
            with vol.open(f"/d/e/f{i}", "wb") as f:
                f.write(payload[i:])
        assert sorted(vol.listdir("/d/e")) == [f"f{i}" for i in range(8)]
        with vol.open("/d/e/f5", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload[5:]).digest()
    if "arbiter" in layout:  # the arbiter keeps names, not data
        assert os.path.getsize(bricks / "b2" / "d" / "e" / "f0") == 0
        assert os.path.getsize(bricks / "b0" / "d" / "e" / "f0") == len(payload)

    assert node.ok("volume", "stop", name).strip() == f"volume stop: {name}: success"
    assert "is not started" in node.fails("volume", "status", name)
    assert node.ok("volume", "delete", name).strip() == f"volume delete: {name}: success"
    wait_for(lambda: not (node.workdir / "vols" / name).exists(), 10, what="its volfiles to go")
    assert name not in node.ok("volume", "list")
    assert "does not exist" in node.fails("volume", "info", name)


def test_create_refusals(node: Mortard, bricks: Path) -> None:
    b = f"127.0.0.1:{bricks}"
    node.ok("volume", "create", "taken", f"{b}/t1", "force")
    marked = bricks / "marked"
    marked.mkdir()
    os.setxattr(marked, "trusted.mortar.volume-id", os.urandom(16))
    cases = [
        (["v", "10.255.255.1:/x", "force"], "host 10.255.255.1 is not in the pool"),
        (["v", "nosuchhost.invalid:/x", "force"], "is not in the pool"),
        (["v", f"{b}/a", f"{b}/a/b", "force"], "are nested"),
        (["v", f"{b}/a", f"{b}/a", "force"], "is given twice"),
        (["v", f"{b}/t1/sub", "force"], "overlaps brick"),
        (["v", f"{b}/t1", "force"], f"is brick {b}/t1 of volume taken"),
        (["v", f"127.0.0.1:{bricks.parent}", "force"], "overlaps brick"),
        (["v", f"{b}/r"], "is on the root file system"),
        (["v", "replica", "3", f"{b}/1", f"{b}/2", f"{b}/3"], "form one replica set but several are on host"),
        (
            ["v", "replica", "3", f"{b}/1", f"{b}/2", f"{b}/3", f"{b}/4", "force"],
            "not a multiple of the replica",
        ),
        (["taken", f"{b}/z", "force"], "volume taken already exists"),
        (["v", "replica", "2", "arbiter", "1", f"{b}/1", f"{b}/2", "force"], "replica 3 arbiter 1"),
        (["v", "replica", "1", f"{b}/1", "force"], "at least 2"),
        (["v", "stripe", "2", f"{b}/1", f"{b}/2", "force"], "stripe volumes are not available yet"),
        (["v", "disperse", "3", f"{b}/1", f"{b}/2", f"{b}/3", "force"], "disperse"),
        (["v", "transport", "rdma", f"{b}/1", "force"], "transport 'rdma' is not supported"),
        (["-bad", f"{b}/1", "force"], "bad volume name"),
        (["v", f"{b}/marked", "force"], "already part of a volume"),
        (["v", f"{b}/marked/inner", "force"], "which is already part of a volume"),
    ]
    for args, expected in cases:
        line = node.fails("volume", "create", *args)
        assert expected in line, (args, line)
        assert line.startswith(f"mortar: volume create: {args[0]}: failed: ")
    assert node.cli("volume", "create").status == 2
    assert node.cli("volume", "create", "v", "replica", "x", f"{b}/1").status == 2
    assert node.ok("volume", "list").split() == ["taken"]


def test_state_refusals_and_first_start(node: Mortard, bricks: Path) -> None:
    node.ok("volume", "create", "states", f"127.0.0.1:{bricks}/s1", "force")
    assert "not in the started state" in node.fails("volume", "stop", "states")
    assert "is not started" in node.fails("volume", "status", "states")
    node.ok("volume", "start", "states")
    assert "already started" in node.fails("volume", "start", "states")
    assert "stop it before deleting it" in node.fails("volume", "delete", "states")
    node.ok("volume", "start", "states", "force")  # force on a started volume: (re)starts offline bricks

    # the brick directory is created and stamped at its first start only
    volfile = next((node.workdir / "vols" / "states").glob("*.vol"))
    wait_for(lambda: "brick-create" not in volfile.read_text(), 10, what="brick-create to go")
    node.ok("volume", "stop", "states")
    shutil.rmtree(bricks / "s1")
    (bricks / "s1").mkdir()  # as if its disk were not mounted
    line = node.fails("volume", "start", "states")
    assert "did not start" in line and "marker" in line
    assert "Status: Stopped" in node.ok("volume", "info", "states")
    node.ok("volume", "delete", "states")


def test_killed_brick_is_restarted_and_status_tells_the_truth(node: Mortard, bricks: Path) -> None:
    node.ok("volume", "create", "crash", f"127.0.0.1:{bricks}/c1", f"127.0.0.1:{bricks}/c2", "force")
    node.ok("volume", "start", "crash")
    before = _status(node, "crash")
    victim = int(before[0]["pid"])  # type: ignore[call-overload]
    os.kill(victim, signal.SIGKILL)
    down = wait_for(
        lambda: [r for r in _status(node, "crash") if not r["online"]], 5, 0.05, "the brick to be offline"
    )
    assert down[0]["pid"] == 0 and "signal 9" in str(down[0]["error"])
    text = node.ok("volume", "status", "crash")
    assert f"Brick 127.0.0.1:{bricks}/c1" in text and "N/A" in text and "signal 9" in text
    after = wait_for(lambda: _all_online(node, "crash"), 20, what="the restart")
    assert after[0]["pid"] not in (0, victim) and after[0]["restarts"] == 1
    assert after[1]["pid"] == before[1]["pid"]

    # the daemon crashes; its bricks keep serving; the next daemon adopts them
    pids = {int(r["pid"]) for r in after}  # type: ignore[call-overload]
    node.kill(with_etcd=False)
    for pid in pids:
        os.kill(pid, 0)
    node.start()
    rows = wait_for(lambda: _all_online(node, "crash"), 20, what="adoption")
    assert {int(r["pid"]) for r in rows} == pids  # type: ignore[call-overload]
    node.ok("volume", "stop", "crash")
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 10, what="brick exit")
    node.ok("volume", "delete", "crash")


def test_node_and_pool_of_one(node: Mortard) -> None:
    info = node.api("GET", "/v1/node")
    assert info["store"] == "sqlite" and info["peer_count"] == 1
    assert (node.workdir / "store.db").exists()
    assert json.loads((node.workdir / "node.json").read_text())["uuid"] == info["uuid"]
    assert node.ok("peer", "status").startswith("Number of Peers: 0")
    assert info["uuid"] in node.ok("pool", "list")
    assert "this node" in node.fails("peer", "probe", node.remote)
    assert "not reachable" in node.fails("peer", "probe", "127.0.0.1:1")
    assert "not part of the pool" in node.fails("peer", "detach", "10.9.9.9")


def test_daemonizes_and_keeps_a_second_daemon_out(tmp_path: Path) -> None:
    port = free_port()
    args = [sys.executable, "-m", "mortar.mgmt.daemon", "--workdir", str(tmp_path / "w"),
            "--logdir", str(tmp_path / "l"), "--listen", "127.0.0.1", "--port", str(port)]  # fmt: skip
    try:
        assert subprocess.run(args, timeout=30).returncode == 0  # the parent returns, the daemon stays
        pid = int(wait_for(lambda: (tmp_path / "w" / "mortard.pid").read_text(), 10, what="the pid file"))
        assert wait_for(lambda: call_sync("127.0.0.1", port, "GET", "/v1/node", timeout=2)["store_ready"], 20)
        assert os.getsid(pid) not in (os.getsid(0), pid)  # a session of its own, not leading it: no tty
        second = subprocess.run([*args, "--foreground"], capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and "another mortard already runs" in second.stderr
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), 20, what="the daemon to stop")
        assert not (tmp_path / "w" / "mortard.pid").exists()
    finally:
        kill_all_under(tmp_path)
    refused = subprocess.run([*args, "--port", "24007"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "24007 is GlusterFS's glusterd port" in refused.stderr


def test_mortar_host_names_the_daemon(node: Mortard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORTAR_HOST", node.remote)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["--json", "pool", "list"]) == 0
    assert json.loads(out.getvalue())["peers"][0]["uuid"] == node.api("GET", "/v1/node")["uuid"]
