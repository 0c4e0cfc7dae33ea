"""replica 2 arbiter 1: the arbiter holds names, metadata and the changelog but no data; reads never
go to it; a write that would leave only the arbiter and a copy it blames is refused."""

from __future__ import annotations

import errno
import os

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Fd, Loc, SetAttrValid
from mortar.core.translator import Translator
from mortar.xlators.cluster.afr.heal import heal_index

from .conftest import ROOT, MakeCluster, entry, open_file, read_file, write_file

READS = ("readv", "stat", "fstat", "seek", "rchecksum", "readdirp", "getxattr")


async def test_arbiter_holds_metadata_not_data(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, arbiter_count="1")
    data = os.urandom(100_000)
    gfid = await write_file(cl.afr, "f", data)
    await cl.afr.setattr(Loc("/f", gfid=gfid), AttrSet(SetAttrValid.MODE, mode=0o600))
    await cl.afr.setxattr(Loc("/f", gfid=gfid), {"user.tag": b"t"}, 0)
    fd = await open_file(cl.afr, "f")
    await cl.afr.ftruncate(fd, 50_000)
    await cl.afr.fsync(fd, 0)
    await cl.afr.release(fd)
    assert cl.bricks[0].read("f") == cl.bricks[1].read("f") == data[:50_000]
    arbiter = cl.bricks[2].path("f")
    assert arbiter.stat().st_size == 0
    assert arbiter.stat().st_mode & 0o777 == 0o600
    assert os.getxattr(arbiter, "user.tag") == b"t"
    assert os.getxattr(arbiter, "trusted.mortar.gfid") == bytes(gfid)
    assert cl.clients[0].gens[2].bytes_written == 0
    assert cl.clean("f")


async def test_reads_never_hit_the_arbiter(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, arbiter_count="1", read_hash_mode="3")
    for i in range(20):
        await write_file(cl.afr, f"f{i}", bytes([i]) * 100)
    arb = cl.clients[0].gens[2]
    before = {k: arb.counts[k] for k in READS}
    for i in range(20):
        assert await read_file(cl.afr, f"f{i}") == bytes([i]) * 100
        rep = await cl.afr.lookup(entry(f"f{i}"))
        assert (await cl.afr.stat(Loc(f"/f{i}", gfid=rep.iatt.gfid))).iatt.size == 100
    listing = await listdir(cl.afr)
    assert {f"f{i}" for i in range(20)} <= set(listing)
    assert all(listing[f"f{i}"] in (None, 100) for i in range(20))
    assert {k: arb.counts[k] for k in READS} == before


async def listdir(xl: Translator) -> dict[str, int | None]:
    fd = Fd(ROOT, is_dir=True)
    await xl.opendir(Loc("/", gfid=ROOT), fd)
    out: dict[str, int | None] = {}
    offset = 0
    while entries := (await xl.readdirp(fd, 4096, offset)).entries:
        out.update({e.name: e.iatt.size if e.iatt else None for e in entries})
        offset = entries[-1].offset
    await xl.releasedir(fd)
    return out


async def test_write_refused_when_only_arbiter_and_a_blamed_copy_are_up(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, arbiter_count="1", data_self_heal="off")
    await write_file(cl.afr, "f", b"v1")
    cl.down(1)
    fd = await open_file(cl.afr, "f")
    await cl.afr.writev(fd, b"v2", 0, 0)  # child 0 and the arbiter record that child 1 missed it
    await cl.afr.release(fd)
    assert cl.bricks[2].counters("f", "trusted.afr.vol-client-1")[0] >= 1
    cl.up(1)
    cl.down(0)
    fd = await open_file(cl.afr, "f")
    with pytest.raises(FopError) as exc:
        await cl.afr.writev(fd, b"v3", 0, 0)
    assert exc.value.errno == errno.ENOTCONN
    with pytest.raises(FopError):
        await cl.afr.readv(fd, 10, 0, 0)  # no good data copy is up to read from either
    await cl.afr.release(fd)
    assert cl.bricks[1].read("f") == b"v1"
    cl.up(0)
    await heal_index(cl.afr)
    assert cl.bricks[0].read("f") == cl.bricks[1].read("f") == b"v2"
    assert cl.bricks[2].path("f").stat().st_size == 0
    assert cl.clean("f")


async def test_arbiter_forces_quorum(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(3, arbiter_count="1", quorum_type="none")
    assert cl.afr.quorum_type == "auto"
    await write_file(cl.afr, "f", b"x")
    cl.down(1)
    cl.down(2)
    fd = await open_file(cl.afr, "f")
    with pytest.raises(FopError) as exc:
        await cl.afr.writev(fd, b"y", 0, 0)
    assert exc.value.errno == errno.ENOTCONN
    assert await read_file(cl.afr, "f") == b"x"
    await cl.afr.release(fd)
