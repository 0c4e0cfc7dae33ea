"""Entry heal marks a new object pending on the sources before it creates the empty copy on the
sink: at no moment does that copy look complete (to a reader, to a concurrent heal that would drop
the index entry, or after a crash between the two steps)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mortar.core.gfid import ROOT_GFID
from mortar.xlators.cluster.afr.changelog import encode
from mortar.xlators.cluster.afr.heal import heal_gfid

from .conftest import MakeCluster, read_file, write_file

KEY = "trusted.afr.vol-client-1"


def _forget_behind_the_back(brick: Path, rel: str) -> None:
    """Remove a file from a brick with its gfid handle (every hard link of it), as a lost disk would."""
    ino = os.stat(brick / rel).st_ino
    for top, _, names in os.walk(brick / ".mortar"):
        for n in names:
            p = os.path.join(top, n)
            if os.lstat(p).st_ino == ino:
                os.unlink(p)
    os.unlink(brick / rel)


async def test_the_source_blames_the_sink_before_the_sink_has_the_file(make_cluster: MakeCluster) -> None:
    cl = await make_cluster(2, data_self_heal="off", entry_self_heal="off", metadata_self_heal="off")
    data = os.urandom(50_000)
    await write_file(cl.afr, "f", data)
    await cl.afr.txn.entries.settle(list(cl.afr.txn.entries.batches))
    _forget_behind_the_back(cl.bricks[1].directory, "f")
    # the root records, on the source, that the sink missed entries (as replace-brick marks it)
    os.setxattr(cl.bricks[0].directory, KEY, encode(0, 0, 1))
    cl.afr.forget(ROOT_GFID)

    seen: list[tuple[int, int, int]] = []
    sink = cl.afr.children[1]
    create_on_sink: Any = sink.mknod

    async def observed(*args: Any, **kwargs: Any) -> Any:
        seen.append(cl.bricks[0].counters("f", KEY))  # what the source says at that very moment
        return await create_on_sink(*args, **kwargs)

    sink.mknod = observed  # type: ignore[method-assign]
    res = await heal_gfid(cl.afr, ROOT_GFID)
    assert "entry" in res.healed and seen, res
    assert seen[0][0] >= 1 and seen[0][1] >= 1  # data and metadata blamed before the copy existed
    assert cl.bricks[1].path("f").stat().st_size == 0  # created empty; its content heal is next

    stats = await heal_gfid(cl.afr, next(iter(res.created)))
    assert "data" in stats.healed
    assert cl.copies("f") == [data, data]
    assert await read_file(cl.afr, "f") == data
    assert cl.clean("f")
