"""Bricks changing under a volume: add-brick, remove-brick (drain, then commit), replace-brick, and
the rebalance that spreads files over added bricks.

Each change is validated like `volume create` (hosts in the pool, nesting, replica-set counts), then
written to the volume's record; volgen regenerates, the owning daemons start or stop bricks, and
running clients switch graphs live. Draining and rebalancing are long tasks (`tasks.py`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mortar.core.errors import FopError
from mortar.core.fops import Loc, XattropFlag
from mortar.core.gfid import ROOT_GFID
from mortar.graph.builder import from_text
from mortar.graph.volfile import VolumeSpec, dump
from mortar.mgmt import hosts
from mortar.mgmt.model import BrickInfo, BrickState, MgmtError, VolumeInfo, brick_state_key, portmap_key
from mortar.mgmt.store import Compare, Delete, Put
from mortar.mgmt.tasks import Tasks, VolumeTask, task_key
from mortar.xlators.cluster.afr.changelog import encode, pending_key
from mortar.xlators.cluster.afr.state import acting_as, identity

if TYPE_CHECKING:
    from mortar.mgmt.daemon import Node

log = logging.getLogger(__name__)

LINKTO_XATTR = "trusted.mortar.dht.linkto"  # dht_layout's name; read here without loading DHT


def count_files(path: str) -> int:
    """Files (not directories, not DHT link files) under a brick: what a forced commit loses."""
    count = 0
    for top, dirs, names in os.walk(path):
        if top == path:
            dirs[:] = [d for d in dirs if d != ".mortar"]
        for n in names:
            full = os.path.join(top, n)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            if st.st_mode & stat.S_ISVTX and st.st_size == 0:
                try:
                    os.getxattr(full, LINKTO_XATTR, follow_symlinks=False)
                    continue
                except OSError:
                    pass
            count += 1
    return count


@dataclass
class BrickChange:
    """A request of add-brick, remove-brick or replace-brick as the API takes it."""

    bricks: list[str]
    replica: int | None = None
    arbiter: int | None = None
    force: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BrickChange:
        try:
            bricks = [str(b) for b in data.get("bricks") or []]
            replica = None if data.get("replica") is None else int(data["replica"])
            arbiter = None if data.get("arbiter") is None else int(data["arbiter"])
        except (TypeError, ValueError) as exc:
            raise MgmtError(f"bad brick change request: {exc}") from None
        return cls(bricks, replica, arbiter, bool(data.get("force")))


class BricksChange:
    def __init__(self, node: Node, daemon: str) -> None:
        self.node = node
        self.tasks = Tasks(node, daemon)

    @property
    def volumes(self) -> Any:
        return self.node.volumes

    async def _resolve(self, texts: list[str]) -> list[BrickInfo]:
        if not texts:
            raise MgmtError("give at least one brick HOST:/PATH")
        peers = await self.node.pool.peers()
        out = []
        for text in texts:
            try:
                host, path = hosts.parse_brick(text)
            except ValueError as exc:
                raise MgmtError(str(exc)) from None
            out.append(BrickInfo(host, path, (await self.node.pool.owner(host, peers)).uuid))
        return out

    async def _check_new(self, info: VolumeInfo, new: list[BrickInfo], all_bricks: list[BrickInfo],
                         replica: int, force: bool) -> None:  # fmt: skip
        """The checks of volume create, for bricks joining `info`."""
        peers = await self.node.pool.peers()
        self.volumes._check_layout(all_bricks, replica, force, peers)
        self.volumes._check_against(new, [v for v in await self.volumes.all() if v.name != info.name])
        by_uuid = {p.uuid: p for p in peers}
        await self.volumes._check_on_hosts(new, [by_uuid[b.peer] for b in new], force)

    async def _commit(self, info: VolumeInfo, extra: list[Any] | None = None) -> int:
        """Write `info` (under the config lock, as its version + 1); returns the store revision before."""
        async with self.volumes._locked() as (store, handle):
            current = await self.volumes.get(info.name)
            if current.version != info.version:
                raise MgmtError(f"volume {info.name} changed under us; try again", 409)
            since = await store.revision()
            info.version += 1
            ok = await store.txn(
                [Compare.exists(handle.key)], [Put(info.key(), info.to_json()), *(extra or [])]
            )
            if not ok:
                raise MgmtError(f"volume {info.name} changed under us; try again", 409)
        self.node.reconcile_soon()
        return since

    async def _wait_online(self, info: VolumeInfo, bricks: list[BrickInfo], since: int) -> list[str]:
        if info.status != "Started":
            return []
        return list(await self.volumes._wait_bricks(bricks, since, online=True))

    def _heal_full_soon(self, name: str) -> None:
        """New or replaced copies are filled by a full crawl of the heal daemons."""

        async def heal() -> None:
            try:
                await self.volumes.heal.trigger(name, full=True, wait=False)
            except MgmtError as exc:
                log.warning("cannot start the full heal of %s: %s", name, exc)

        asyncio.get_running_loop().create_task(heal(), name=f"heal full {name}")

    async def _mark_sinks(self, info: VolumeInfo, sources: list[int], sinks: list[str]) -> None:
        """Before new empty copies join a replica set (their client names `sinks`), the copies in
        place record on their root that the new ones missed its entries and metadata (AFR's
        changelog, the root then listed by their heal index), as glusterd does for replace-brick:
        clients treat what the new copies lack as not yet healed, not as removed, and the heal
        daemons fill them from the root down. A replacement keeps the old brick's client name, so
        marks against it that predate the swap stay true: the new copy lacks everything."""
        if info.status != "Started":
            return
        desc = self.volumes.description(info, await self.volumes.ports(info))
        delta = {pending_key(name): encode(metadata=1, entry=1) for name in sinks}
        for i in sources:
            brick = desc.bricks[i]
            opts = {
                "remote-host": brick.host,
                "remote-subvolume": desc.brick_name(i),
                "transport-type": desc.transport,
                "username": desc.username,
                "password": desc.password,
            }
            if desc.transport == "unix":
                opts["transport.socket.connect-path"] = brick.socket_path
            else:
                opts["remote-port"] = str(brick.port)
            graph = from_text(dump([VolumeSpec(f"{info.name}-mark-{i}", "protocol/client", opts)]), "mark")
            try:
                await graph.start(10)
                if not await graph.wait_up(10):
                    raise TimeoutError("not up")
                with acting_as(identity()):
                    await graph.top.xattrop(Loc("/", ROOT_GFID), XattropFlag.ADD_ARRAY, delta)
            except (FopError, OSError, TimeoutError) as exc:
                log.warning("%s: cannot mark brick %s as the source of new copies: %s", info.name, brick, exc)
            finally:
                await graph.stop(10)

    # ---- add-brick ----------------------------------------------------------------------------------

    async def add(self, name: str, req: BrickChange) -> dict[str, Any]:
        info = await self.volumes.get(name)
        new = await self._resolve(req.bricks)
        r = info.replica_count
        replica = req.replica if req.replica is not None else r
        arbiter = info.arbiter_count
        if req.arbiter is not None:
            if req.arbiter != 1 or replica != 3:
                raise MgmtError("arbiter is supported only as 'replica 3 arbiter 1'")
            arbiter = 1
        if replica < r:
            raise MgmtError(f"replica {replica} is lower than the volume's ({r}): use remove-brick")
        raising = replica > r
        if raising:
            sets = len(info.bricks) // r
            if sets != 1:
                raise MgmtError("raising the replica count is supported for a volume of one replica set")
            if len(new) != replica - r:
                raise MgmtError(f"raising replica {r} to {replica} needs {replica - r} new brick(s)")
        elif len(new) % r:
            raise MgmtError(f"the number of new bricks ({len(new)}) is not a multiple of replica {r}")
        if arbiter and not raising and req.arbiter is None and info.arbiter_count == 0:
            arbiter = 0
        combined = info.bricks + new
        await self._check_new(info, new, combined, replica, req.force)
        if self.tasks and (task := await self.tasks.get(name)) is not None and task.active:
            raise MgmtError(f"a {task.kind} of volume {name} is in progress: wait or stop it first", 409)
        for k, b in enumerate(new):
            b.id = info.take_brick_id()
            if raising:
                b.group = info.bricks[0].group
            elif k % replica == 0:
                b.group = info.take_set_id()
            else:
                b.group = new[k - 1].group
        if raising:
            await self._mark_sinks(info, list(range(r)), [f"{name}-client-{b.id}" for b in new])
        info.bricks, info.replica_count, info.arbiter_count = combined, replica, arbiter
        since = await self._commit(info)
        failed = await self._wait_online(info, new, since)
        if raising and info.status == "Started":
            self._heal_full_soon(name)
        log.info("volume %s: added %s", name, ", ".join(b.name for b in new))
        return {"volume": info.public(), "failed": failed, "message": "success"}

    # ---- replace-brick -------------------------------------------------------------------------------

    async def replace(self, name: str, old: str, new_text: str, force: bool) -> dict[str, Any]:
        if not force:
            raise MgmtError("only 'commit force' is supported: replace-brick NAME OLD NEW commit force")
        info = await self.volumes.get(name)
        if info.replica_count < 2:
            raise MgmtError(
                f"volume {name} is not replicated: replacing a brick would lose its files "
                "(use add-brick, then remove-brick, which migrates them)"
            )
        index = next((i for i, b in enumerate(info.bricks) if b.name == old), None)
        if index is None:
            raise MgmtError(f"{old} is not a brick of volume {name}")
        (new,) = await self._resolve([new_text])
        new.id, new.group = info.bricks[index].id, info.bricks[index].group  # its names live on
        combined = list(info.bricks)
        combined[index] = new
        await self._check_new(info, [new], combined, info.replica_count, True)
        await self._check_no_pending(info, index)
        gone = info.bricks[index]
        first = index - index % info.replica_count
        others = [j for j in range(first, first + info.replica_count) if j != index]
        await self._mark_sinks(info, others, [info.client_name(index)])
        info.bricks = combined
        since = await self._commit(
            info, [Delete(brick_state_key(name, index)), Delete(portmap_key(gone.host, gone.path))]
        )
        failed = await self._wait_online(info, [new], since)
        if info.status == "Started":
            self._heal_full_soon(name)
        log.info("volume %s: brick %s replaced by %s", name, old, new.name)
        msg = "replace-brick commit force operation successful"
        return {"volume": info.public(), "failed": failed, "message": msg}

    async def _check_no_pending(self, info: VolumeInfo, index: int, doing: str = "replacing") -> None:
        """Refuse to replace a brick that holds changes its partners have not received yet: its copy
        would be the only one of them. Entries of writes in flight come and go; only those listed
        in two looks a second apart count (wait for `volume heal NAME info` to show nothing)."""
        if info.status != "Started":
            return

        async def listed() -> set[str]:
            rows = (await self.volumes.heal.info(info.name))["bricks"]
            row = next((r for r in rows if int(r["index"]) == index), None)
            return {e["gfid"] for e in row["entries"]} if row is not None and row.get("count") else set()

        try:
            stuck = await listed()
            if stuck:
                await asyncio.sleep(1.0)
                stuck &= await listed()
        except MgmtError as exc:
            log.warning("%s: cannot check pending heals before replace-brick: %s", info.name, exc)
            return
        if stuck:
            raise MgmtError(
                f"brick {info.bricks[index].name} holds {len(stuck)} change(s) not yet healed to the "
                f"other copies: {doing} it now loses them (see 'mortar volume heal {info.name} info')",
                409,
            )

    # ---- remove-brick ---------------------------------------------------------------------------------

    def _indexes(self, info: VolumeInfo, texts: list[str]) -> list[int]:
        names = {b.name: i for i, b in enumerate(info.bricks)}
        indexes = []
        for text in texts:
            host, path = hosts.parse_brick(text) if ":" in text else (text, "")
            i = names.get(f"{host}:{path}")
            if i is None:
                raise MgmtError(f"{text} is not a brick of volume {info.name}")
            if i in indexes:
                raise MgmtError(f"brick {text} is given twice")
            indexes.append(i)
        return indexes

    async def _removal(self, info: VolumeInfo, req: BrickChange) -> tuple[list[int], list[str]]:
        """The indexes of the bricks to remove and the distribute subvolumes they make up."""
        r = info.replica_count
        if req.replica is not None and req.replica > r:
            raise MgmtError(f"raise the replica count of {info.name} with add-brick, not remove-brick")
        if req.replica is not None and req.replica != r:
            raise MgmtError(
                f"lowering the replica count of {info.name} to {req.replica} removes copies, no data moves: "
                f"use 'remove-brick {info.name} replica {req.replica} BRICK... force'"
            )
        indexes = self._indexes(info, req.bricks)
        sets = sorted({i // r for i in indexes})
        for k in sets:
            missing = [info.bricks[j].name for j in range(k * r, k * r + r) if j not in indexes]
            if missing:
                raise MgmtError(f"remove whole replica sets: {', '.join(missing)} would be left alone")
        if len(sets) >= len(info.bricks) // r:
            raise MgmtError("cannot remove every brick of a volume (delete the volume instead)")
        subvols = [info.subvolume_name(k * r) for k in sets]
        return sorted(indexes), subvols

    async def remove(self, name: str, action: str, req: BrickChange) -> dict[str, Any]:
        info = await self.volumes.get(name)
        if action == "status":
            task = await self.tasks.get(name)
            if task is None or task.kind != "remove-brick":
                raise MgmtError(f"remove-brick of volume {name} has not been started", 409)
            return {"task": task.public()}
        if action == "stop":
            task = await self.tasks.stop(name, "remove-brick")
            if task.state != "stopped":
                # the drain had already ended: stopping still gives the bricks back to clients
                task.state = "stopped"
                await self.tasks._put(task)
            return {"task": task.public()}
        if req.replica is not None and req.replica < info.replica_count and action == "commit" and req.force:
            return await self._reduce_replica(info, req)
        indexes, subvols = await self._removal(info, req)
        bricks = [info.bricks[i].name for i in indexes]
        if action == "start":
            task = await self.tasks.start(info, "remove-brick", bricks=bricks, decommission=subvols)
            return {"task": task.public(), "message": "remove-brick start: success"}
        if action == "commit":
            return await self._remove_commit(info, indexes, bricks, req.force)
        raise MgmtError(f"remove-brick action must be start, status, stop or commit, not {action!r}")

    async def _remove_commit(self, info: VolumeInfo, indexes: list[int], bricks: list[str],
                             force: bool) -> dict[str, Any]:  # fmt: skip
        task = await self.tasks.get(info.name)
        matches = task is not None and task.kind == "remove-brick" and sorted(task.bricks) == sorted(bricks)
        if task is not None and task.active:
            if not force:
                raise MgmtError(f"remove-brick of {info.name} is still draining: wait or 'commit force'", 409)
            await self.tasks.stop(info.name, task.kind)
        drained = matches and task is not None and task.drained
        if not drained and not force:
            why = "its drain has not completed" if matches else "'remove-brick ... start' was not run"
            raise MgmtError(f"cannot commit: {why} ('commit force' loses the files left on the bricks)", 409)
        left = 0 if drained else await self._count_left(info, indexes)
        keep = [b for i, b in enumerate(info.bricks) if i not in indexes]
        removed = [info.bricks[i] for i in indexes]
        ops: list[Any] = [Delete(task_key(info.name))] if task is not None else []
        ops += [Delete(portmap_key(b.host, b.path)) for b in removed]
        ops += [Delete(brick_state_key(info.name, i)) for i in range(len(keep), len(info.bricks))]
        made = BrickState(initialized=True).to_json()
        ops += [Put(brick_state_key(info.name, i), made) for i in range(len(keep))]
        info.bricks = keep
        await self._commit(info, ops)
        log.info("volume %s: removed %s (%d files left on them)", info.name, ", ".join(bricks), left)
        msg = "remove-brick commit: success"
        if left:
            msg += f"; {left} file(s) were still on the removed bricks and are no longer in the volume"
        return {"volume": info.public(), "files_left": left, "message": msg}

    async def _reduce_replica(self, info: VolumeInfo, req: BrickChange) -> dict[str, Any]:
        """`remove-brick VOL replica N BRICK... force`: drop copies, the same number from every replica
        set, as GlusterFS allows; the remaining copies hold all the data, so nothing moves. The
        bricks left keep their client and set names, so their pending keys and the layouts (which
        name sets) stay right. Refused while a brick to drop holds changes its partners lack."""
        r, n = info.replica_count, int(req.replica or 0)
        if n < 1:
            raise MgmtError("the replica count must be at least 1")
        indexes = self._indexes(info, req.bricks)
        sets = len(info.bricks) // r
        if len(indexes) != (r - n) * sets:
            raise MgmtError(
                f"lowering replica {r} to {n} removes {r - n} brick(s) from each of the {sets} replica "
                f"set(s): give {(r - n) * sets}, not {len(indexes)}"
            )
        for k in range(sets):
            gone = [i for i in indexes if i // r == k]
            if len(gone) != r - n:
                first = info.bricks[k * r].name
                raise MgmtError(f"remove {r - n} brick(s) of the replica set of {first}, not {len(gone)}")
        arbiter = info.arbiter_count
        if arbiter:
            if any(not info.is_arbiter(i) for i in indexes) or n != 2:
                raise MgmtError("from 'replica 3 arbiter 1' only the arbiter bricks can go (to replica 2)")
            arbiter = 0
        if self.tasks and (task := await self.tasks.get(info.name)) is not None and task.active:
            raise MgmtError(f"a {task.kind} of volume {info.name} is in progress: wait or stop it first", 409)
        for i in indexes:
            await self._check_no_pending(info, i, "removing")
        removed = [info.bricks[i] for i in sorted(indexes)]
        keep = [b for i, b in enumerate(info.bricks) if i not in indexes]
        ops: list[Any] = [Delete(portmap_key(b.host, b.path)) for b in removed]
        ops += [Delete(brick_state_key(info.name, i)) for i in range(len(keep), len(info.bricks))]
        made = BrickState(initialized=True).to_json()
        ops += [Put(brick_state_key(info.name, i), made) for i in range(len(keep))]
        info.bricks, info.replica_count, info.arbiter_count = keep, n, arbiter
        await self._commit(info, ops)
        names = ", ".join(b.name for b in removed)
        log.info("volume %s: replica %d -> %d, removed %s", info.name, r, n, names)
        return {"volume": info.public(), "files_left": 0, "message": "remove-brick commit force: success"}

    async def _count_left(self, info: VolumeInfo, indexes: list[int]) -> int:
        peers = {p.uuid: p for p in await self.node.pool.peers()}
        by_peer: dict[str, list[str]] = {}
        for i in indexes:
            by_peer.setdefault(info.bricks[i].peer, []).append(info.bricks[i].path)

        async def count(uuid: str, paths: list[str]) -> int:
            if uuid == self.node.uuid:
                return sum(await asyncio.gather(*(asyncio.to_thread(count_files, p) for p in paths)))
            peer = peers[uuid]
            reply = await self.node.rpc.call(
                peer.hostname, peer.port, "POST", "/v1/internal/bricks/count", {"paths": paths}, timeout=120
            )
            return int(reply.get("files", 0))

        counts = await asyncio.gather(*(count(u, p) for u, p in by_peer.items()), return_exceptions=True)
        return sum(c for c in counts if isinstance(c, int))

    # ---- rebalance -------------------------------------------------------------------------------------

    async def rebalance(self, name: str, action: str, fix_layout: bool, force: bool) -> dict[str, Any]:
        info = await self.volumes.get(name)
        if action == "status":
            task = await self.tasks.get(name)
            if task is None or task.kind not in ("rebalance", "fix-layout"):
                raise MgmtError(f"rebalance of volume {name} has not been started", 409)
            return {"task": task.public()}
        if action == "stop":
            return {"task": (await self.tasks.stop(name, "rebalance")).public()}
        if action != "start":
            raise MgmtError(f"rebalance action must be start, status or stop, not {action!r}")
        if len(info.bricks) // info.replica_count < 2:
            raise MgmtError(f"volume {name} is not a distribute volume or contains only 1 brick (set)")
        task = await self.tasks.start(info, "fix-layout" if fix_layout else "rebalance", force=force)
        return {"task": task.public(), "message": f"rebalance on {name} has been started successfully"}

    def decommissioned(self, task: VolumeTask | None) -> list[str]:
        """The bricks (`HOST:PATH`) whose subvolumes clients must stop placing files on: those of a
        remove-brick started and neither stopped nor committed (volgen names their subvolumes)."""
        if task is None or task.kind != "remove-brick" or task.state == "stopped":
            return []
        return list(task.bricks)
