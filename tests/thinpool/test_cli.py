"""`python -m mortar.thinpool`: create, info and check, as the `mortar thinpool` CLI will call them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mortar.thinpool import ThinPool
from mortar.thinpool.__main__ import main


def test_help_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mortar.thinpool", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "check" in out.stdout and "create" in out.stdout


def test_create_info_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pool.img"
    assert main(["create", str(path), "--size", "16MiB", "--block-size", "32KiB"]) == 0
    assert "created pool" in capsys.readouterr().out
    assert main(["create", str(path), "--size", "16MiB"]) == 2  # exists
    assert "error:" in capsys.readouterr().err
    with ThinPool.open(path, commit_interval=0) as pool:
        pool.create_volume("img", 1 << 30).write(b"x" * 100_000, 0)
        pool.snapshot("img", "snap")
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pool"]["block_size"] == 32 << 10 and info["pool"]["volumes"] == 2
    assert {v["name"]: v["origin"] for v in info["volumes"]} == {"img": None, "snap": "img"}
    assert main(["info", str(path)]) == 0
    assert "overcommit" in capsys.readouterr().out
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "clean"
    assert main(["check", str(tmp_path / "missing.img")]) == 2


def test_check_reports_damaged_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    path = tmp_path / "pool.img"
    with ThinPool.create(path, size=16 << 20, commit_interval=0) as pool:
        pool.create_volume("v", 1 << 20).write(b"v" * (1 << 20), 0)
    db = sqlite3.connect(f"{path}.meta")
    db.execute("UPDATE spacemap SET counts = zeroblob(4096)")  # forget every block's count
    db.commit()
    db.close()
    assert main(["check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["clean"] and any("wrong counts" in p for p in report["problems"])
    assert any("free in the allocator" in p for p in report["problems"])
