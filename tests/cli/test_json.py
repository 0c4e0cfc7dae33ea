"""Every pool and volume command of the CLI, as text and as `--json`: the JSON parses and carries
every fact the text shows; errors are one line on stderr with a non-zero status; help exists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mortar.cli.command import COMMANDS
from mortar.cli.volume import _size
from tests.integration.harness import Mortard

pytestmark = pytest.mark.timeout(120)


def both(node: Mortard, *args: str) -> tuple[str, Any]:
    """The text of a read-only command and its --json answer."""
    text = node.ok(*args)
    data = json.loads(node.ok("--json", *args))
    return text, data


def test_every_command_text_and_json(node: Mortard, tmp_path: Path) -> None:
    b = [f"127.0.0.1:{tmp_path}/b{i}" for i in range(2)]

    data = json.loads(node.ok("--json", "volume", "create", "cj", *b, "force"))
    assert data["volume"]["name"] == "cj" and [x["name"] for x in data["volume"]["bricks"]] == b
    assert data["message"] == "please start the volume to access data"
    node.ok("volume", "delete", "cj")
    text = node.ok("volume", "create", "cj", *b, "force")
    assert text.strip() == "volume create: cj: success: please start the volume to access data"

    text, data = both(node, "volume", "info", "cj")
    (vol,) = data["volumes"]
    for fact in (
        vol["name"],
        vol["id"],
        vol["type"],
        vol["status"],
        vol["number_of_bricks"],
        vol["transport"],
    ):
        assert str(fact) in text
    for brick in vol["bricks"]:
        assert f"Brick{brick['index'] + 1}: {brick['name']}" in text
    assert both(node, "volume", "info", "all")[1]["volumes"] == [vol]

    text, data = both(node, "volume", "list")
    assert text.split() == data["volumes"] == ["cj"]

    data = json.loads(node.ok("--json", "volume", "start", "cj"))
    assert data["volume"]["status"] == "Started" and data["failed"] == []
    assert node.ok("volume", "start", "cj", "force").strip() == "volume start: cj: success"

    for args in (("volume", "status", "cj"), ("volume", "status"), ("volume", "status", "all")):
        text, data = both(node, *args)
        (status,) = data["volumes"]
        assert f"Status of volume: {status['volume']}" in text
        for row in status["bricks"]:
            line = next(ln for ln in text.splitlines() if ln.startswith(f"Brick {row['name']} "))
            assert line.split()[-3:] == [str(row["port"]), "Y" if row["online"] else "N", str(row["pid"])]

    text, data = both(node, "volume", "status", "cj", "detail")
    for row in data["volumes"][0]["bricks"]:
        d = row["detail"]
        block = text.split(f"Brick {row['name']}\n", 1)[1].split("-" * 78, 1)[0]
        for label, value in [
            ("TCP Port", row["port"]),
            ("Pid", row["pid"]),
            ("File System", d["file_system"]),
            ("Device", d["device"]),
            ("Mount Options", d["mount_options"]),
            ("Total Disk Space", _size(d["total_bytes"])),
            ("Inode Count", d["inode_count"]),
        ]:
            assert f"{label:<21}: {value}" in block

    data = json.loads(
        node.ok("--json", "volume", "set", "cj", "network.ping-timeout", "15", "storage.reserve", "2")
    )
    assert data["options"] == {"network.ping-timeout": "15", "storage.reserve": "2"}
    assert (
        node.ok("volume", "set", "cj", "diagnostics.count-fop-hits", "off").strip() == "volume set: success"
    )

    text, data = both(node, "volume", "get", "cj", "all")
    rows = {r["key"]: r for r in data["options"]}
    assert rows["network.ping-timeout"]["value"] == "15" and rows["network.ping-timeout"]["source"] == "set"
    assert rows["network.frame-timeout"]["source"] == "default"
    for line in text.splitlines()[2:]:
        key, *rest = line.split()
        assert rest[-1] == rows[key]["source"]
        assert " ".join(rest[:-1]) == (rows[key]["value"] or "")
    text, data = both(node, "volume", "get", "cj", "storage.reserve")
    assert [r["key"] for r in data["options"]] == ["storage.reserve"]
    assert text.splitlines()[2].split() == ["storage.reserve", "2", "set"]

    text = node.ok("volume", "info", "cj")
    assert "Options Reconfigured:" in text and "network.ping-timeout: 15" in text

    data = json.loads(node.ok("--json", "volume", "reset", "cj", "storage.reserve"))
    assert data["reset"] == ["storage.reserve"]
    assert node.ok("volume", "reset", "cj", "all").strip() == "volume reset: success: reset volume successful"
    assert both(node, "volume", "info", "cj")[1]["volumes"][0]["options"] == {}

    text, data = both(node, "volume", "volfile", "cj")
    assert data["volfile"].rstrip("\n") == text.rstrip("\n") and len(data["revision"]) == 16
    assert "type protocol/client" in text and "option remote-port" in text

    text, data = both(node, "peer", "status")
    assert text.startswith(f"Number of Peers: {len(data['peers'])}")
    text, data = both(node, "pool", "list")
    (me,) = data["peers"]
    assert f"{me['uuid']}\tlocalhost\tConnected" in text

    data = json.loads(node.ok("--json", "volume", "stop", "cj"))
    assert data["volume"]["status"] == "Stopped"
    data = json.loads(node.ok("--json", "volume", "delete", "cj"))
    assert data == {"volume": "cj", "message": "success"}


def test_errors_are_one_line_even_with_json(node: Mortard) -> None:
    run = node.cli("--json", "volume", "info", "nosuch")
    assert run.status == 1 and run.out == ""
    assert run.err.strip() == "mortar: volume info: nosuch: failed: volume nosuch does not exist"
    run = node.cli("volume", "set", "nosuch", "key")
    assert run.status == 2 and run.err.startswith("mortar: usage: mortar volume set")
    down = Mortard(node.base, "nobody", port=1)
    run = down.cli("volume", "list")
    assert run.status == 1 and "cannot reach the node daemon at 127.0.0.1:1" in run.err
    assert "is mortard running?" in run.err and len(run.err.strip().splitlines()) == 1


def test_help_for_every_command(node: Mortard) -> None:
    mine = [c for c in COMMANDS if c.words[0] in ("peer", "pool", "volume")]
    assert {" ".join(c.words) for c in mine} >= {
        "peer probe", "peer detach", "peer status", "pool list", "volume create", "volume start",
        "volume stop", "volume delete", "volume info", "volume list", "volume status", "volume set",
        "volume reset", "volume get", "volume volfile",
    }  # fmt: skip
    for cmd in mine:
        text = node.ok("help", *cmd.words)
        assert text.startswith(f"usage: mortar {cmd.synopsis}") and cmd.summary in text
        assert node.ok(*cmd.words, "--help") == text
    overview = node.ok("help")
    assert all(c.synopsis in overview for c in mine)
