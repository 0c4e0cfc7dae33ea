"""Rebalance over replica sets: DHT over cluster/replicate over real bricks (posix <- locks <- index),
a second set added to one. Migration runs through AFR's transactions on both sets: files move,
copies stay identical with one gfid, no changelog xattr travels as data, no heal is left pending,
and an fd opened before the move keeps working after it."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mortar.core.fops import GFID_REQ, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Translator
from mortar.xlators.cluster.afr import ReplicateTranslator
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_layout import LINKTO_XATTR, decode_linkto
from mortar.xlators.cluster.dht_rebalance import Rebalance
from mortar.xlators.features.index import IndexTranslator
from mortar.xlators.features.locks import LocksTranslator
from mortar.xlators.storage.posix import PosixTranslator

pytestmark = pytest.mark.timeout(60)
GFID_XATTR = "trusted.mortar.gfid"


@dataclass
class Sets:
    """Bricks (brick i is named vol-client-i) and every translator made, for teardown."""

    base: Path
    tops: list[Translator] = field(default_factory=list)
    made: list[Translator] = field(default_factory=list)

    async def bricks(self, n: int) -> None:
        for _ in range(n):
            i = len(self.tops)
            posix = PosixTranslator(
                f"posix{i}",
                {
                    "directory": str(self.base / f"b{i}"),
                    "volume-id": str(uuid.UUID(int=0xD4)),
                    "brick-create": "on",
                    "health-check-interval": "0",
                },
            )
            locks = LocksTranslator(f"vol-client-{i}", {}, [posix])
            index = IndexTranslator(f"index{i}", {}, [locks])
            for xl in (posix, locks, index):
                await xl.init()
            self.made += [posix, locks, index]
            self.tops.append(index)

    async def dht(self, nsets: int) -> DistributeTranslator:
        """A client: one replicate per 3 bricks under a distribute (as another process has)."""
        afrs = []
        for k in range(nsets):
            afr = ReplicateTranslator(
                f"vol-replicate-{k}",
                {"post-op-delay": "0.05", "child-up-timeout": "0.1", "afr-pending-xattr": ",".join(
                    f"vol-client-{i}" for i in range(3 * k, 3 * k + 3)
                )},
                self.tops[3 * k : 3 * k + 3],
            )  # fmt: skip
            await afr.init()
            afrs.append(afr)
        dht = DistributeTranslator("vol-dht", {}, afrs)
        await dht.init()
        await dht.lookup(Loc("/", ROOT_GFID))
        self.made = [dht, *afrs, *self.made]
        return dht

    def brick(self, i: int) -> Path:
        return self.base / f"b{i}"


@pytest.fixture
async def sets(tmp_path: Path) -> AsyncIterator[Sets]:
    s = Sets(tmp_path)
    yield s
    for xl in s.made:
        await xl.fini()


def loc(name: str) -> Loc:
    return Loc("/" + name, pargfid=ROOT_GFID, name=name)


async def write(dht: Translator, name: str, data: bytes) -> Gfid:
    gfid = Gfid.random()
    fd = Fd(gfid, os.O_RDWR)
    await dht.create(loc(name), os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(gfid)})
    await dht.writev(fd, data, 0, 0)
    await dht.release(fd)
    return gfid


async def read(dht: Translator, fd: Fd) -> bytes:
    return bytes((await dht.readv(fd, 1 << 20, 0, 0)).data)


async def test_a_second_replica_set_gets_files_through_afr(sets: Sets) -> None:
    await sets.bricks(3)
    old = await sets.dht(1)
    files = {f"f{i}": os.urandom(3000 + i) for i in range(16)}
    gfids = {name: await write(old, name, data) for name, data in files.items()}
    await sets.bricks(3)
    dht = await sets.dht(2)
    cli = await sets.dht(2)
    held = {}
    for name, gfid in gfids.items():  # fds opened before the moves, written after them
        fd = Fd(gfid, os.O_RDWR)
        await cli.open(Loc("/" + name, gfid), os.O_RDWR, fd)
        held[name] = fd

    status = await Rebalance(dht).run()
    assert status.state == "completed" and status.files_failed == 0, status.files
    assert status.files_moved > 0
    moved = [n for n in files if (sets.brick(3) / n).exists() and not (sets.brick(0) / n).exists()]
    assert len(moved) == status.files_moved
    for name in files:
        on = (0, 1, 2) if name not in moved else (3, 4, 5)
        copies = [sets.brick(i) / name for i in on]
        assert [p.read_bytes() for p in copies] == [files[name]] * 3
        assert {os.getxattr(p, GFID_XATTR) for p in copies} == {bytes(gfids[name])}
        for p in copies:  # the changelog of the old set is not data: nothing of it moved
            assert not [k for k in os.listxattr(p) if k.startswith("trusted.afr.vol-client-")]
            assert LINKTO_XATTR not in os.listxattr(p)
    for name in moved:  # the old set keeps no copy, the new set no link file left behind
        for i in range(6):
            p = sets.brick(i) / name
            assert not p.exists() or (i >= 3 and os.stat(p).st_mode & 0o7777 == 0o644)

    for name, fd in held.items():  # the moved files' fds are reopened on the new set
        assert await read(cli, fd) == files[name]
        await cli.writev(fd, b"after", 0, 0)
        files[name] = b"after" + files[name][5:]
        await cli.release(fd)
    fresh = await sets.dht(2)
    for name, data in files.items():
        fd = Fd(gfids[name], os.O_RDONLY)
        await fresh.open(Loc("/" + name, gfids[name]), os.O_RDONLY, fd)
        assert await read(fresh, fd) == data
        await fresh.release(fd)
    for xl in sets.made:
        if isinstance(xl, ReplicateTranslator):
            await xl.txn.close()  # the last batches settle their changelog
    for i in range(6):
        for kind in ("dirty", "xattrop"):
            pending = sets.brick(i) / ".mortar" / "indices" / kind
            assert not pending.exists() or not os.listdir(pending), (i, kind, os.listdir(pending))


async def test_a_link_file_is_made_on_every_replica_of_the_set(sets: Sets) -> None:
    await sets.bricks(6)
    dht = await sets.dht(2)
    gfid = await write(dht, "vm", b"x" * 100)
    here = 0 if (sets.brick(0) / "vm").exists() else 1
    there = 1 - here
    await dht.make_linkfile(dht.children[there], loc("vm"), gfid, dht.children[here])
    for i in range(3 * there, 3 * there + 3):
        p = sets.brick(i) / "vm"
        assert os.stat(p).st_mode & 0o7777 == 0o1000
        assert decode_linkto(os.getxattr(p, LINKTO_XATTR)) == f"vol-replicate-{here}"
        assert os.getxattr(p, GFID_XATTR) == bytes(gfid)
