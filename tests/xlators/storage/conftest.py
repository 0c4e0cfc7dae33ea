"""A real brick in a temporary directory, and small helpers to drive it fop by fop."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.fops import EntryReply, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.xlators.storage.posix import PosixTranslator

_T = TypeVar("_T")
NOBODY = CallContext(uid=65534, gid=65534, groups=(65534,))


def make_posix(directory: Path, volume_id: str | None = None, **options: str) -> PosixTranslator:
    opts = {
        "directory": str(directory),
        "volume-id": volume_id or str(uuid.uuid4()),
        "brick-create": "on",
        "health-check-interval": "0",
        **options,
    }
    return PosixTranslator("posix", opts)


@pytest.fixture
async def posix(tmp_path: Path) -> AsyncIterator[PosixTranslator]:
    xl = make_posix(tmp_path / "brick")
    await xl.init()
    yield xl
    await xl.fini()


def at(parent: Gfid, name: str) -> Loc:
    return Loc(name, pargfid=parent, name=name)


def by_gfid(gfid: Gfid) -> Loc:
    return Loc(str(gfid), gfid=gfid)


def req(gfid: Gfid | None = None) -> dict[str, Any]:
    return {"gfid-req": bytes(gfid or Gfid.random())}


async def mkdir(xl: PosixTranslator, name: str, parent: Gfid = ROOT_GFID, mode: int = 0o755) -> Gfid:
    reply = await xl.mkdir(at(parent, name), mode, 0o022, req())
    return reply.iatt.gfid


async def create(
    xl: PosixTranslator, name: str, data: bytes = b"", parent: Gfid = ROOT_GFID, flags: int = os.O_RDWR
) -> tuple[EntryReply, Fd]:
    gfid = Gfid.random()
    fd = Fd(gfid)
    reply = await xl.create(at(parent, name), flags, 0o644, 0o022, fd, req(gfid))
    if data:
        await xl.writev(fd, data, 0, 0)
    return reply, fd


async def open_(xl: PosixTranslator, gfid: Gfid, flags: int = os.O_RDWR) -> Fd:
    fd = Fd(gfid, flags)
    await xl.open(by_gfid(gfid), flags, fd)
    return fd


async def as_user(who: CallContext, aw: Awaitable[_T]) -> _T:
    """Await `aw` with `who` as the caller identity (the contextvar protocol/server sets)."""
    token = call_context.set(who)
    try:
        return await aw
    finally:
        call_context.reset(token)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB ext4 filesystem on a loop device, unmounted at teardown."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    image = tmp_path / "tiny.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, timeout=60)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, timeout=60)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=60)
