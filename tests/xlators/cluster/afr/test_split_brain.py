"""Split-brain on replica 2: each copy written while the other was down. Access gives EIO, the
listing reports it, and each resolution policy picks the copy it should."""

from __future__ import annotations

import errno
import os

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import AttrSet, Loc, SetAttrValid
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.heal import (
    heal_index,
    list_split_brain,
    resolve_gfid_split_brain,
    resolve_split_brain,
)
from mortar.xlators.cluster.afr.read import SPLIT_BRAIN_STATUS_KEY
from mortar.xlators.cluster.afr.replicate import SPLIT_BRAIN_FINALIZE_KEY

from .conftest import ROOT, Cluster, MakeCluster, entry, open_file, read_file, write_file

BIG = b"A" * 10_000  # written to child 0 first: the bigger copy
SMALL = b"B" * 10  # written to child 1 later: the newer copy
OPTS = {"data_self_heal": "off", "metadata_self_heal": "off", "entry_self_heal": "off"}


async def _write_while(cl: Cluster, down: int, name: str, data: bytes, offset: int = 0) -> None:
    cl.down(down)
    fd = await open_file(cl.afr, name)
    await cl.afr.writev(fd, data, offset, 0)
    await cl.afr.release(fd)
    cl.up(down)


async def data_split_brain(make_cluster: MakeCluster, **opts: str) -> tuple[Cluster, Gfid]:
    cl = await make_cluster(2, **{**OPTS, **opts})
    gfid = await write_file(cl.afr, "f", b"0" * 100)
    await _write_while(cl, 1, "f", BIG)  # child 0 has it, blames child 1
    await _write_while(cl, 0, "f", SMALL)  # child 1 has it, blames child 0
    assert cl.bricks[0].counters("f", "trusted.afr.vol-client-1")[0] > 0
    assert cl.bricks[1].counters("f", "trusted.afr.vol-client-0")[0] > 0
    return cl, gfid


async def test_access_gives_eio_and_listing_reports_it(make_cluster: MakeCluster) -> None:
    cl, gfid = await data_split_brain(make_cluster)
    with pytest.raises(FopError) as exc:
        await read_file(cl.afr, "f")
    assert exc.value.errno == errno.EIO and "split-brain" in exc.value.message
    fd = await open_file(cl.afr, "f")
    with pytest.raises(FopError) as exc:
        await cl.afr.writev(fd, b"more", 0, 0)
    assert exc.value.errno == errno.EIO
    await cl.afr.release(fd)
    status = (await cl.afr.getxattr(Loc("/f", gfid=gfid), SPLIT_BRAIN_STATUS_KEY)).xattrs
    assert b"data-split-brain:yes" in status[SPLIT_BRAIN_STATUS_KEY]
    found = await list_split_brain(cl.afr)
    assert [(h.gfid, h.split_brain) for h in found] == [(gfid, ["data"])]
    stats = await heal_index(cl.afr)  # heal leaves it alone and says so
    assert stats.split_brain == 1 and gfid in stats.split_brain_gfids
    assert cl.copies("f") == [BIG, b"B" * 10 + b"0" * 90]


@pytest.mark.parametrize(
    ("policy", "source", "winner"),
    [
        ("bigger-file", None, 0),
        ("latest-mtime", None, 1),
        ("source-brick", "vol-client-1", 1),
        ("source-brick", 0, 0),
    ],
)
async def test_resolution_policies(
    make_cluster: MakeCluster, policy: str, source: int | str | None, winner: int
) -> None:
    cl, gfid = await data_split_brain(make_cluster)
    expected = cl.bricks[winner].read("f")
    chosen = await resolve_split_brain(cl.afr, gfid, policy, source)
    assert chosen == winner
    assert cl.copies("f") == [expected, expected]
    assert cl.clean("f")
    assert await read_file(cl.afr, "f") == expected
    assert await list_split_brain(cl.afr) == []


async def test_finalize_key_resolves_from_a_mount(make_cluster: MakeCluster) -> None:
    cl, gfid = await data_split_brain(make_cluster)
    await cl.afr.setxattr(Loc("/f", gfid=gfid), {SPLIT_BRAIN_FINALIZE_KEY: b"vol-client-0"}, 0)
    assert cl.copies("f") == [BIG, BIG] and cl.clean("f")


async def test_policy_that_cannot_decide_refuses(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(2, **OPTS)
    gfid = await write_file(cl.afr, "f", b"0" * 100)
    await _write_while(cl, 1, "f", b"x")
    await _write_while(cl, 0, "f", b"y")
    with pytest.raises(FopError) as exc:
        await resolve_split_brain(cl.afr, gfid, "bigger-file")
    assert exc.value.errno == errno.EINVAL and "tie" in exc.value.message
    with pytest.raises(FopError):
        await resolve_split_brain(cl.afr, gfid, "no-such-policy")


async def test_favorite_child_policy_resolves_during_heal(make_cluster: MakeCluster) -> None:
    cl, _ = await data_split_brain(make_cluster, favorite_child_policy="size")
    stats = await heal_index(cl.afr)
    assert stats.split_brain == 0 and stats.failed == 0
    assert cl.copies("f") == [BIG, BIG] and cl.clean("f")


async def test_favorite_child_policy_heals_on_access(make_cluster: MakeCluster) -> None:
    cl, _ = await data_split_brain(make_cluster, favorite_child_policy="mtime")
    assert await read_file(cl.afr, "f") == b"B" * 10 + b"0" * 90


async def test_metadata_split_brain(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(2, **OPTS)
    gfid = await write_file(cl.afr, "m", b"")
    loc = Loc("/m", gfid=gfid)
    cl.down(1)
    await cl.afr.setattr(loc, AttrSet(SetAttrValid.MODE, mode=0o600))
    cl.up(1)
    cl.down(0)
    await cl.afr.setattr(loc, AttrSet(SetAttrValid.MODE, mode=0o640))
    cl.up(0)
    with pytest.raises(FopError) as exc:
        await cl.afr.getxattr(loc, None)
    assert exc.value.errno == errno.EIO
    assert [h.split_brain for h in await list_split_brain(cl.afr)] == [["metadata"]]
    await resolve_split_brain(cl.afr, gfid, "source-brick", 1)
    assert {os.stat(b.path("m")).st_mode & 0o777 for b in cl.bricks} == {0o640}
    assert cl.clean("m")


async def test_gfid_split_brain_of_a_name(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(2, **OPTS)
    cl.down(1)
    first = await write_file(cl.afr, "g", b"first")
    cl.up(1)
    cl.down(0)
    second = await write_file(cl.afr, "g", b"second!")
    cl.up(0)
    assert first != second
    with pytest.raises(FopError) as exc:
        await cl.afr.lookup(entry("g"))
    assert exc.value.errno == errno.EIO and "gfid" in exc.value.message
    info = await list_split_brain(cl.afr)
    assert any(h.gfid == ROOT and "g" in h.conflicts for h in info)
    chosen = await resolve_gfid_split_brain(cl.afr, ROOT, "g", "bigger-file")
    assert chosen == 1
    assert (await cl.afr.lookup(entry("g"))).iatt.gfid == second
    await heal_index(cl.afr)
    assert cl.copies("g") == [b"second!", b"second!"]
