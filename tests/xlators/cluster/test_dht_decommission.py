"""remove-brick's drain seen by a client: with `decommissioned-bricks`, a new file whose name hashes
to a subvolume being drained (under a layout written before the drain) lands where the rebalance's
new layout will hash it, behind a link file on the drained one, so that it is readable through
either layout and never has to be moved."""

from __future__ import annotations

from mortar.core.fops import Loc
from mortar.xlators.cluster.dht_rebalance import Rebalance

from .conftest import ROOT, MakeBricks, MakeDht, brick_dir, create, mkdir, read_all, where


async def test_new_files_never_land_on_a_decommissioned_subvolume(
    make_bricks: MakeBricks, make_dht: MakeDht
) -> None:
    bricks = await make_bricks(3)
    before = await make_dht(bricks)
    await before.lookup(Loc("/", ROOT))
    dg = await mkdir(before, ROOT, "d")  # its layout gives each of the three a range
    gone = bricks[1].name
    draining = await make_dht(bricks, decommissioned_bricks=gone)
    names = [f"new{i}" for i in range(60)]
    for name in names:
        await create(draining, dg.gfid, name, name.encode())
    placed = {name: where(bricks, f"d/{name}") for name in names}
    assert all(p.get(gone, "link").startswith("link") for p in placed.values())  # no data on it
    # some names did hash to it under the old layout: they have a link file there
    behind = [n for n, p in placed.items() if gone in p]
    assert behind
    for name in names:
        assert await read_all(before, dg.gfid, name) == name.encode()  # an old-layout client
        assert await read_all(draining, dg.gfid, name) == name.encode()

    # the drain writes the layout the files were placed by: nothing of them has to move
    status = await Rebalance(draining, decommission=[gone]).run()
    assert status.state == "completed" and status.drained, status.error
    after = await make_dht([bricks[0], bricks[2]])  # committed
    for name in names:
        assert await read_all(after, dg.gfid, name) == name.encode()
        assert [k for k, v in where(bricks, f"d/{name}").items() if v == "data"] != [gone]
    assert not [p for p in (brick_dir(bricks[1]) / "d").iterdir() if p.stat().st_size]
