"""The grammar of `volume heal`, `add-brick`, `remove-brick`, `replace-brick` and `rebalance`
(usage errors before any daemon is asked) and the GlusterFS-style text of heal info, heal
statistics and task status, from answers shaped as mortard gives them."""

from __future__ import annotations

import pytest

from mortar.cli.bricks import format_task
from mortar.cli.command import CliError, Context
from mortar.cli.heal import format_info, format_statistics, volume_heal
from mortar.cli.main import main
from mortar.cli.volume import parse_create

NOWHERE = Context(remote_host="127.0.0.1:1")  # any call to a daemon would fail with 502, not 2


@pytest.mark.parametrize(
    "words",
    [
        ["v", "info", "everything"],
        ["v", "split-brain"],
        ["v", "split-brain", "bigger-file"],
        ["v", "split-brain", "source-brick", "notabrick"],
        ["v", "split-brain", "coin-toss", "/f"],
        ["v", "statistics", "extra"],
        [],
    ],
)
def test_heal_usage_errors(words: list[str]) -> None:
    with pytest.raises(CliError) as exc:
        volume_heal(words, NOWHERE)
    assert exc.value.status == 2 and "usage" in str(exc.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["volume", "add-brick", "v"],
        ["volume", "add-brick", "v", "replica", "x", "h:/b"],
        ["volume", "remove-brick", "v", "h:/b", "later"],
        ["volume", "replace-brick", "v", "h:/a", "h:/b", "commit"],
        ["volume", "rebalance", "v", "go"],
        ["volume", "rebalance", "v", "status", "force"],
    ],
)
def test_brick_command_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--remote-host", "127.0.0.1:1", *argv]) == 2
    assert "usage" in capsys.readouterr().err


def test_create_device_lv_words() -> None:
    req = parse_create(["v", "device", "lv", "pool-size", "1G", "backend", "thin", "h:/pool", "force"])
    assert req["device"] == "lv" and req["bd_options"] == {"pool-size": "1G", "backend": "thin"}
    assert req["bricks"] == ["h:/pool"] and req["force"]
    with pytest.raises(CliError):
        parse_create(["v", "h:/pool", "device", "lv"])


INFO = {
    "volume": "v",
    "mode": "all",
    "bricks": [
        {
            "index": 0,
            "brick": "h1:/b",
            "status": "Connected",
            "count": 2,
            "entries": [
                {"gfid": "g1", "path": "/a", "split_brain": [], "conflicts": []},
                {"gfid": "g2", "path": "<gfid:g2>", "split_brain": ["data"], "conflicts": []},
            ],
            "split_brain_count": 1,
        },
        {
            "index": 1,
            "brick": "h2:/b",
            "status": "Transport endpoint is not connected",
            "count": None,
            "entries": [],
            "split_brain_count": 0,
        },
    ],
}


def test_heal_info_text() -> None:
    text = format_info(INFO)
    assert text.splitlines()[:5] == [
        "Brick h1:/b",
        "/a",
        "<gfid:g2> - Is in split-brain",
        "Status: Connected",
        "Number of entries: 2",
    ]
    assert "Status: Transport endpoint is not connected\nNumber of entries: -" in text
    summary = format_info({**INFO, "mode": "summary"})
    assert "Total Number of entries: 2" in summary and "Number of entries in split-brain: 1" in summary
    assert "Number of entries in heal pending: 1" in summary and "/a" not in summary


def test_statistics_and_task_text() -> None:
    crawl = {
        "kind": "index",
        "reason": "child up: v-client-1",
        "start": 1.0e9,
        "end": 1.0e9 + 2,
        "scanned": 3,
        "healed": 3,
        "failed": 0,
        "split_brain": 0,
        "skipped": 0,
        "bytes": 4096,
        "bricks": "",
    }
    text = format_statistics(
        {
            "volume": "v",
            "hosts": [{"host": "h1", "crawls": [crawl]}, {"host": "h2", "error": "down", "crawls": []}],
        }
    )
    assert "Type of crawl: INDEX (child up: v-client-1)" in text and "No. of entries healed: 3" in text
    assert "Bytes healed: 4096" in text and "not available: down" in text
    task = {
        "kind": "remove-brick",
        "host": "h1",
        "state": "completed",
        "files_moved": 5,
        "bytes_moved": 10,
        "files_scanned": 9,
        "files_failed": 0,
        "files_skipped": 1,
        "elapsed": 1.5,
        "bricks": ["h:/b"],
        "drained": True,
        "remaining": {"v-client-1": 0},
        "skipped": {"open for write": 1},
        "failed": {},
    }
    text = format_task(task)
    assert "completed" in text and "drained: yes" in text and "1 file(s): open for write" in text
    assert format_task(None) == "no task has run on this volume"
