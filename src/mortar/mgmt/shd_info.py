"""What `volume heal NAME info` shows, computed by the heal daemon for this host's bricks.

Entries come from each local brick's index (through AFR's `heal_info`, which also judges
split-brain). A gfid is shown as a path when the brick can tell it: a directory's handle is a
symlink to its parent's handle, a file's handle is a hard link, found by one scan of the brick
(bounded); anything else shows as `<gfid:UUID>`, as GlusterFS does.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

from mortar.client.volume import AsyncVolume
from mortar.core.errors import FopError
from mortar.core.gfid import Gfid
from mortar.xlators.cluster.afr.base import ReplicateBase
from mortar.xlators.cluster.afr.heal import HealInfo, heal_info, list_split_brain

PRIVATE = ".mortar"
GFID_XATTR = "trusted.mortar.gfid"
SCAN_LIMIT = 200_000  # entries of a brick looked at to name files


def handle_of(brick: str, gfid: Gfid) -> Path:
    hexed = gfid.hex()
    return Path(brick, PRIVATE, "handles", hexed[0:2], hexed[2:4], gfid.canonical)


def _dir_path(brick: str, handle: Path) -> str | None:
    """A directory handle is a relative symlink chain ending in the directory itself."""
    try:
        real = os.path.realpath(handle)
    except OSError:
        return None
    root = os.path.realpath(brick)
    if real == root:
        return "/"
    if not real.startswith(root + "/") or f"/{PRIVATE}/" in real[len(root) :] + "/":
        return None
    return real[len(root) :]


def paths_on_brick(brick: str, gfids: list[Gfid]) -> dict[Gfid, str]:
    """Paths of `gfids` on a local brick (blocking: run in a thread)."""
    found: dict[Gfid, str] = {}
    files: dict[tuple[int, int], Gfid] = {}
    for g in gfids:
        h = handle_of(brick, g)
        try:
            st = os.lstat(h)
        except OSError:
            continue
        if os.path.islink(h):
            p = _dir_path(brick, h)
            if p is not None:
                found[g] = p
        else:
            files[st.st_dev, st.st_ino] = g
    if not files:
        return found
    seen = 0
    for top, dirs, names in os.walk(brick):
        if top == brick:
            dirs[:] = [d for d in dirs if d != PRIVATE]
        for n in names:
            seen += 1
            full = os.path.join(top, n)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            hit = files.pop((st.st_dev, st.st_ino), None)
            if hit is not None:
                found[hit] = full[len(brick.rstrip("/")) :]
                if not files:
                    return found
        if seen > SCAN_LIMIT:
            break
    return found


def _entry(h: HealInfo, path: str | None) -> dict[str, Any]:
    return {
        "gfid": str(h.gfid),
        "path": path or f"<gfid:{h.gfid}>",
        "split_brain": h.split_brain,
        "conflicts": h.conflicts,
    }


async def brick_entries(
    sets: list[tuple[ReplicateBase, list[int]]], local: dict[str, tuple[int, str]], info: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per local brick: its index entries needing heal, or why it cannot be read."""
    rows: list[dict[str, Any]] = []
    for afr, children in sets:
        listed: list[HealInfo] | None = None
        for c in children:
            index, path = local[afr.children[c].name]
            row: dict[str, Any] = {"index": index, "brick": info["bricks"][index]["name"], "entries": []}
            rows.append(row)
            if not afr.is_up(c):
                row.update(status="Transport endpoint is not connected", count=None)
                continue
            if listed is None:
                try:
                    listed = await heal_info(afr)
                except FopError as exc:
                    row.update(status=f"cannot read the index: {exc}", count=None)
                    continue
            mine = [h for h in listed if c in h.children]
            names = await asyncio.to_thread(paths_on_brick, path, [h.gfid for h in mine])
            row["entries"] = [_entry(h, names.get(h.gfid)) for h in mine]
            row.update(status="Connected", count=len(mine))
    return sorted(rows, key=lambda r: int(r["index"]))


async def split_brain_paths(sets: list[tuple[ReplicateBase, list[int]]]) -> list[str]:
    """Every object in split-brain in the replica sets healed here, as `gfid:UUID`."""
    out: dict[str, None] = {}
    for afr, _ in sets:
        for h in await list_split_brain(afr):
            out[f"gfid:{h.gfid}"] = None
    return list(out)


async def find_gfid(volume: AsyncVolume, path: str, bricks: list[str]) -> Gfid:
    """The gfid of FILE: from a local brick's copy (works even when the copies disagree so much that
    a lookup through the volume fails), else through the volume."""
    found = local_gfid(bricks, path)
    if found is not None:
        return found
    try:
        return (await volume.stat("/" + path.strip("/"), follow_symlinks=False)).gfid
    except OSError as exc:
        raise FopError(exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}") from None


def local_gfid(bricks: list[str], path: str) -> Gfid | None:
    """The gfid a local brick's copy of `path` carries."""
    for brick in bricks:
        try:
            return Gfid(os.getxattr(os.path.join(brick, path.strip("/")), GFID_XATTR, follow_symlinks=False))
        except OSError:
            continue
    return None
