"""Pieces of the heal daemon and of brick changes that need no daemon: naming index entries by path
on a real posix brick (directories through their handle symlinks, files through their hard links),
which volumes a host's heal daemon looks after, block-device options, and counting what a forced
remove-brick commit loses (link files do not count)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.mgmt.bdvol import check_bd_options
from mortar.mgmt.bricks_change import LINKTO_XATTR, count_files
from mortar.mgmt.model import MgmtError
from mortar.mgmt.shd_info import local_gfid, paths_on_brick
from mortar.mgmt.shdctl import heal_enabled, wants_shd
from tests.xlators.storage.conftest import create, make_posix, mkdir


async def test_index_entries_named_by_path(tmp_path: Path) -> None:
    brick = tmp_path / "brick"
    xl = make_posix(brick)
    await xl.init()
    try:
        top = await mkdir(xl, "vm")
        sub = await mkdir(xl, "disks", top)
        reply, fd = await create(xl, "a.img", b"x" * 100, sub)
        await xl.release(fd)
        file_gfid = reply.iatt.gfid
    finally:
        await xl.fini()
    unknown = Gfid.random()
    found = paths_on_brick(str(brick), [top, sub, file_gfid, unknown, ROOT_GFID])
    assert found[top] == "/vm" and found[sub] == "/vm/disks" and found[file_gfid] == "/vm/disks/a.img"
    assert found[ROOT_GFID] == "/" and unknown not in found
    assert local_gfid([str(tmp_path / "nowhere"), str(brick)], "/vm/disks/a.img") == file_gfid
    assert local_gfid([str(brick)], "/missing") is None


def test_which_volumes_the_heal_daemon_heals() -> None:
    vol = {
        "status": "Started",
        "replica_count": 3,
        "options": {},
        "bricks": [{"peer": "me"}, {"peer": "other"}, {"peer": "third"}],
    }
    assert wants_shd(vol, "me")
    assert not wants_shd(vol, "stranger")  # no local brick
    assert not wants_shd({**vol, "status": "Stopped"}, "me")
    assert not wants_shd({**vol, "replica_count": 1}, "me")
    off = {**vol, "options": {"cluster.self-heal-daemon": "off"}}
    assert wants_shd(off, "me") and not heal_enabled(off)  # answers heal info, crawls only when asked
    assert heal_enabled({**vol, "options": {"cluster.self-heal-daemon": "on"}}) and heal_enabled(vol)


def test_block_device_options() -> None:
    assert check_bd_options({"pool-size": "1G", "backend": "thin"}) == {"pool-size": "1G", "backend": "thin"}
    for bad in ({"pool-size": "big"}, {"backend": "zfs"}, {"colour": "red"}, {"backend": "lvm"}):
        with pytest.raises(MgmtError):
            check_bd_options(bad)
    assert check_bd_options({"backend": "lvm", "vg": "vg0", "thinpool": "tp"})["vg"] == "vg0"


def test_count_files_skips_link_files_and_private_tree(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "real").write_bytes(b"data")
    (tmp_path / "top").write_bytes(b"")
    link = tmp_path / "d" / "moved"
    link.write_bytes(b"")
    os.chmod(link, 0o1000)
    os.setxattr(link, LINKTO_XATTR, b"v-client-1\0")
    (tmp_path / ".mortar" / "handles").mkdir(parents=True)
    (tmp_path / ".mortar" / "handles" / "h").write_bytes(b"x")
    assert count_files(str(tmp_path)) == 2
