"""Host facts: brick specs, nesting, mount points, whether a directory may become a brick."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mortar.mgmt import hosts


def test_parse_brick() -> None:
    assert hosts.parse_brick("h1:/data/b1/") == ("h1", "/data/b1")
    assert hosts.parse_brick("[::1]:/b") == ("::1", "/b")
    assert hosts.parse_brick("10.0.0.1:/a//b") == ("10.0.0.1", "/a/b")
    for bad, why in [
        ("/data/b1", "HOST:/PATH"),
        ("h1:data", "absolute"),
        ("h1:/a/../b", "'..'"),
        ("h1:/", "root directory"),
        (":/x", "HOST:/PATH"),
    ]:
        with pytest.raises(ValueError, match=why):
            hosts.parse_brick(bad)


def test_nested() -> None:
    assert hosts.nested("/a/b", "/a/b")
    assert hosts.nested("/a/b/c", "/a/b") and hosts.nested("/a/b", "/a/b/c")
    assert not hosts.nested("/a/bc", "/a/b")
    assert not hosts.nested("/x", "/y")


def test_split_host_port() -> None:
    assert hosts.split_host_port("h", 24100) == ("h", 24100)
    assert hosts.split_host_port("h:1", 24100) == ("h", 1)
    assert hosts.split_host_port("[::1]:5", 24100) == ("::1", 5)
    assert hosts.split_host_port("::1", 7) == ("::1", 7)
    with pytest.raises(ValueError):
        hosts.split_host_port("h:x", 1)


def test_mount_point_and_detail(tmp_path: Path) -> None:
    point = hosts.mount_point(str(tmp_path / "not" / "yet"))
    assert os.path.ismount(point)
    assert str(tmp_path).startswith(point)
    detail = hosts.disk_detail(str(tmp_path))
    assert detail["mount_point"] == point and detail["file_system"]
    assert 0 < detail["free_bytes"] <= detail["total_bytes"] and detail["inode_count"] > 0


def test_check_brick_path(tmp_path: Path) -> None:
    on_root = hosts.mount_point(str(tmp_path)) == "/"
    fresh = str(tmp_path / "b1")
    assert hosts.check_brick_path(fresh, force=True) == []
    if on_root:
        (err,) = hosts.check_brick_path(fresh, force=False)
        assert "root file system" in err and "force" in err
    (tmp_path / "file").write_text("x")
    assert "not a directory" in hosts.check_brick_path(str(tmp_path / "file"), force=True)[0]
    used = tmp_path / "used"
    used.mkdir()
    os.setxattr(used, hosts.VOLUME_ID_XATTR, os.urandom(16))
    assert "already part of a volume" in hosts.check_brick_path(str(used), force=True)[0]
    assert "inside" in hosts.check_brick_path(str(used / "sub" / "b"), force=True)[0]
