"""Replication helpers for integration tests: whether cluster/replicate is in this tree, and a
client-driven index heal."""

from __future__ import annotations

import time

from mortar.client import AsyncVolume, Volume
from mortar.graph.registry import UnknownTypeError, translator_class
from mortar.xlators.cluster.afr.heal import heal_index


def have_afr() -> bool:
    try:
        translator_class("cluster/replicate")
    except UnknownTypeError:
        return False
    return True


HAVE_AFR = have_afr()


def heal_until_clean(vol: Volume, timeout: float = 60, xlator: str = "itest-replicate-0") -> None:
    """Run the index heal from this client until no brick lists anything (the heal daemon's job)."""
    avol: AsyncVolume = vol.avolume
    afr = avol.graph.xlators[xlator]
    deadline = time.monotonic() + timeout
    while True:
        stats = vol._loop.run(heal_index(afr))  # type: ignore[arg-type]
        if stats.scanned == 0:
            return
        assert time.monotonic() < deadline, f"heal did not converge: {stats}"
        time.sleep(0.2)
