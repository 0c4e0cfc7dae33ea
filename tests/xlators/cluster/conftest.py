"""DHT over real storage/posix bricks in temporary directories: fixtures and small helpers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mortar.core.fops import GFID_REQ, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_layout import LAYOUT_XATTR, LINKTO_XATTR, decode_linkto, decode_range
from mortar.xlators.storage.posix import PosixTranslator

VOLUME_ID = str(uuid.UUID(int=0xD47))

MakeBricks = Callable[..., Awaitable[list[PosixTranslator]]]
MakeDht = Callable[..., Awaitable[DistributeTranslator]]


@pytest.fixture
async def make_bricks(tmp_path: Path) -> AsyncIterator[MakeBricks]:
    """`await make_bricks(n, first=0, under=None)`: n posix bricks named vol-client-<i>."""
    made: list[PosixTranslator] = []

    async def make(n: int, first: int = 0, under: list[Path] | None = None) -> list[PosixTranslator]:
        out = []
        for i in range(first, first + n):
            base = under[i - first] if under else tmp_path
            opts = {
                "directory": str(base / f"brick{i}"),
                "volume-id": VOLUME_ID,
                "brick-create": "on",
                "health-check-interval": "0",
            }
            brick = PosixTranslator(f"vol-client-{i}", opts)
            await brick.init()
            made.append(brick)
            out.append(brick)
        return out

    yield make
    for brick in made:
        await brick.fini()


@pytest.fixture
async def make_dht() -> AsyncIterator[MakeDht]:
    """`await make_dht(children, **options)`: a distribute translator over `children`."""
    made: list[DistributeTranslator] = []

    async def make(children: list[Translator], **options: Any) -> DistributeTranslator:
        dht = DistributeTranslator("vol-dht", {k.replace("_", "-"): v for k, v in options.items()}, children)
        await dht.init()
        made.append(dht)
        return dht

    yield make
    for dht in made:
        await dht.fini()


def brick_dir(brick: PosixTranslator) -> Path:
    return Path(brick.opts["directory"])


def loc(pargfid: Gfid, name: str, parent_path: str = "") -> Loc:
    return Loc(f"{parent_path}/{name}", pargfid=pargfid, name=name)


async def mkdir(xl: Translator, pargfid: Gfid, name: str, mode: int = 0o755) -> Iatt:
    rep = await xl.mkdir(loc(pargfid, name), mode, 0, {GFID_REQ: bytes(Gfid.random())})
    return rep.iatt


async def create(xl: Translator, pargfid: Gfid, name: str, data: bytes = b"") -> Iatt:
    """Create a file through `xl`, write `data`, close it."""
    gfid = Gfid.random()
    fd = Fd(gfid)
    rep = await xl.create(loc(pargfid, name), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(gfid)})
    if data:
        await xl.writev(fd, data, 0, 0)
    await xl.release(fd)
    return rep.iatt


async def read_all(xl: Translator, pargfid: Gfid, name: str) -> bytes:
    """Look a file up by name, open it and read it whole (as a client would)."""
    rep = await xl.lookup(loc(pargfid, name))
    fd = Fd(rep.iatt.gfid)
    await xl.open(Loc(name, rep.iatt.gfid), os.O_RDONLY, fd)
    try:
        return bytes((await xl.readv(fd, 1 << 20, 0, 0)).data)
    finally:
        await xl.release(fd)


async def listdir(xl: Translator, gfid: Gfid, size: int = 4096) -> list[str]:
    """Every name readdirp returns through `xl`, paging with the returned cookies."""
    fd = Fd(gfid, is_dir=True)
    await xl.opendir(Loc("", gfid), fd)
    names: list[str] = []
    offset = 0
    try:
        while entries := (await xl.readdirp(fd, size, offset)).entries:
            names.extend(e.name for e in entries)
            offset = entries[-1].offset
    finally:
        await xl.releasedir(fd)
    return names


def where(bricks: list[PosixTranslator], rel: str) -> dict[str, str]:
    """For each brick holding `rel`: "data", "dir", or "link->SUBVOL"."""
    out = {}
    for b in bricks:
        p = brick_dir(b) / rel
        if not os.path.lexists(p):
            continue
        st = os.lstat(p)
        if os.path.isdir(p):
            out[b.name] = "dir"
        elif (st.st_mode & 0o7777) == 0o1000 and st.st_size == 0:
            out[b.name] = "link->" + decode_linkto(os.getxattr(p, LINKTO_XATTR))
        else:
            out[b.name] = "data"
    return out


def disk_layout(brick: PosixTranslator, rel: str = "") -> tuple[int, int, int] | None:
    """(commit hash, start, stop) of a directory's layout on one brick, None without one."""
    try:
        raw = os.getxattr(brick_dir(brick) / rel, LAYOUT_XATTR)
    except OSError:
        return None
    r = decode_range(brick.name, raw)
    return r.commit_hash, r.start, r.stop


ROOT = ROOT_GFID
