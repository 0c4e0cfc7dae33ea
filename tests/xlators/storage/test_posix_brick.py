"""storage/posix as a brick: the root marker, options, health check, and what it leaves to others."""

from __future__ import annotations

import asyncio
import errno
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import Fd, Flock, LockCmd, LockType
from mortar.core.gfid import ROOT_GFID
from mortar.core.translator import Event, Translator
from mortar.graph.registry import translator_class
from mortar.xlators.storage.posix import BrickError, PosixTranslator
from mortar.xlators.storage.posix_handles import GFID_XATTR, VOLUME_ID_XATTR

from .conftest import at, by_gfid, create, make_posix


def test_registry_names_the_class() -> None:
    assert translator_class("storage/posix") is PosixTranslator
    assert PosixTranslator.type_name == "storage/posix"


async def test_brick_create_stamps_marker_and_layout(tmp_path: Path) -> None:
    vol = str(uuid.uuid4())
    xl = make_posix(tmp_path / "new" / "brick", vol)
    await xl.init()
    try:
        root = tmp_path / "new" / "brick"
        assert os.getxattr(root, VOLUME_ID_XATTR) == uuid.UUID(vol).bytes
        assert os.getxattr(root, GFID_XATTR) == ROOT_GFID
        root_handle = root / ".mortar/handles/00/00" / ROOT_GFID.canonical
        assert os.readlink(root_handle) == "../../../.."
        assert os.path.samefile(root_handle, root)
    finally:
        await xl.fini()
    # a second start with the same id and without brick-create serves the same brick
    again = make_posix(tmp_path / "new" / "brick", vol, **{"brick-create": "off"})
    await again.init()
    await again.fini()


@pytest.mark.parametrize(
    "options",
    [{"volume-id": str(uuid.uuid4())}, {"directory": "/tmp/x"}, {"directory": "/tmp/x", "volume-id": "nope"}],
)
async def test_required_options(options: dict[str, str]) -> None:
    xl = PosixTranslator("posix", options)
    with pytest.raises(BrickError):
        await xl.init()
    assert not os.path.exists("/tmp/x")


async def test_refuses_directory_without_marker(tmp_path: Path) -> None:
    """An unmounted disk's empty mount point must not silently become a brick."""
    bare = tmp_path / "mountpoint"
    bare.mkdir()
    with pytest.raises(BrickError, match=str(bare)):
        await make_posix(bare, **{"brick-create": "off"}).init()
    with pytest.raises(BrickError, match="does not exist"):
        await make_posix(tmp_path / "absent", **{"brick-create": "off"}).init()
    (bare / "data").write_bytes(b"someone's file")
    with pytest.raises(BrickError, match="not empty"):
        await make_posix(bare).init()  # brick-create on, but the directory is in use
    assert not os.path.exists(bare / ".mortar")


async def test_refuses_other_volumes_brick(tmp_path: Path) -> None:
    first = make_posix(tmp_path / "b")
    await first.init()
    await first.fini()
    with pytest.raises(BrickError, match="brick of volume"):
        await make_posix(tmp_path / "b", str(uuid.uuid4())).init()


async def test_statfs_and_no_lock_table(posix: PosixTranslator) -> None:
    st = (await posix.statfs(by_gfid(ROOT_GFID))).statvfs
    assert st.blocks > 0 and st.bsize > 0 and st.namemax >= 255
    _, fd = await create(posix, "f")
    lock = Flock(LockType.WRLCK)
    for call in (
        posix.lk(fd, LockCmd.SETLK, lock),
        posix.inodelk("dom", by_gfid(fd.gfid), LockCmd.SETLK, lock),
        posix.finodelk("dom", fd, LockCmd.SETLK, lock),
        posix.entrylk("dom", by_gfid(ROOT_GFID), "f", 0, 0),
        posix.fentrylk("dom", fd, None, 0, 0),
    ):
        with pytest.raises(FopError) as exc:
            await call
        assert exc.value.errno == errno.ENOSYS and "features/locks" in exc.value.message
    await posix.release(fd)


async def test_fd_ops_need_an_open_fd(posix: PosixTranslator) -> None:
    reply, fd = await create(posix, "f")
    stranger = Fd(reply.iatt.gfid)
    for call in (posix.readv(stranger, 1, 0, 0), posix.writev(stranger, b"x", 0, 0), posix.fstat(stranger)):
        with pytest.raises(FopError) as exc:
            await call
        assert exc.value.errno == errno.EBADF
    await posix.release(fd)
    with pytest.raises(FopError) as exc:
        await posix.readv(fd, 1, 0, 0)
    assert exc.value.errno == errno.EBADF


class _Watcher(Translator):
    type_name = "test/watcher"

    def __init__(self, child: Translator) -> None:
        super().__init__("watcher", children=[child])
        self.events: asyncio.Queue[tuple[Event, Any]] = asyncio.Queue()

    def notify(self, event: Event, source: Any, data: Any = None) -> None:
        self.events.put_nowait((event, data))


async def test_health_check_reports_child_down(tmp_path: Path) -> None:
    xl = make_posix(tmp_path / "b", **{"health-check-interval": "20ms"})
    watcher = _Watcher(xl)
    await xl.init()
    try:
        await asyncio.sleep(0.1)  # a few healthy rounds: nothing reported
        assert watcher.events.empty()
        assert (tmp_path / "b/.mortar/health_check").exists()
        os.chmod(tmp_path / "b/.mortar", 0o700)
        os.rename(tmp_path / "b/.mortar", tmp_path / "b/.gone")  # the private tree vanishes
        event, data = await asyncio.wait_for(watcher.events.get(), timeout=10)
        assert event is Event.CHILD_DOWN and data == "health-check failed"
    finally:
        os.rename(tmp_path / "b/.gone", tmp_path / "b/.mortar")
        await xl.fini()


async def test_reconfigure_applies_reserve_and_health(posix: PosixTranslator, tmp_path: Path) -> None:
    opts = {"directory": str(tmp_path / "brick"), "volume-id": posix.opts["volume-id"]}
    posix.reconfigure({**opts, "reserve": "100", "health-check-interval": "1h"})
    assert posix.brick.reserve_pct == 100
    with pytest.raises(FopError) as exc:
        await create(posix, "full", b"x")
    assert exc.value.errno == errno.ENOSPC
    posix.reconfigure({**opts, "reserve": "0", "health-check-interval": "0"})
    _, fd = await create(posix, "fine", b"x")
    await posix.release(fd)


async def test_lookup_of_root(posix: PosixTranslator) -> None:
    reply = await posix.lookup(by_gfid(ROOT_GFID))
    assert reply.iatt.gfid == ROOT_GFID and reply.iatt.is_dir
    assert reply.iatt.nlink == 2  # the private directory is not counted
    with pytest.raises(FopError) as exc:
        await posix.lookup(at(ROOT_GFID, ".mortar"))
    assert exc.value.errno == errno.ENOENT


async def test_restart_clears_files_left_open(tmp_path: Path) -> None:
    vol = str(uuid.uuid4())
    xl = make_posix(tmp_path / "b", vol)
    await xl.init()
    reply, _ = await create(xl, "f", b"open at shutdown")
    await xl.unlink(at(ROOT_GFID, "f"), 0)
    parked = tmp_path / "b/.mortar/unlink" / reply.iatt.gfid.canonical
    assert parked.exists()
    os.link(parked, tmp_path / "b/.mortar/unlink/crash-leftover")  # as if the process had died
    await xl.fini()  # closes what clients left open
    assert not parked.exists()
    again = make_posix(tmp_path / "b", vol)
    await again.init()
    try:
        assert os.listdir(tmp_path / "b/.mortar/unlink") == []
    finally:
        await again.fini()
