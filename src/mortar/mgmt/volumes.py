"""Volume lifecycle: create, start, stop, delete, info, status, options, and the client volfile.

Every change is validated first, then written to the store under the pool-wide `config` lock; the
daemons that own bricks react to the stored state (see `Node.reconcile`), and the node that took
the request waits for the bricks to report through the port map. Refusals are one clear line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mortar.mgmt import hosts, volopts
from mortar.mgmt.bdvol import DeviceRecord, check_bd_options, device_key
from mortar.mgmt.bricks_change import BricksChange
from mortar.mgmt.heal import Heal
from mortar.mgmt.model import (
    VOLUMES,
    BrickInfo,
    BrickState,
    MgmtError,
    PeerInfo,
    PortEntry,
    VolumeInfo,
    brick_state_key,
    check_volume_name,
    info_key,
    portmap_key,
)
from mortar.mgmt.shdctl import ShdManager, wants_shd
from mortar.mgmt.store import Compare, Delete, DeletePrefix, LockHandle, Put, Store, StoreUnavailable
from mortar.mgmt.supervisor import BrickRun
from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile

if TYPE_CHECKING:
    from mortar.mgmt.daemon import Node

log = logging.getLogger(__name__)

BRICK_WAIT = 40.0  # how long start/stop wait for the bricks to report


@dataclass
class CreateRequest:
    name: str
    bricks: list[str]
    replica: int | None = None
    arbiter: int | None = None
    stripe: int | None = None
    disperse: int | None = None
    transport: str = "tcp"
    force: bool = False
    #: "lv": the bricks are thin pools served by storage/bd (`volume create ... device lv`)
    device: str | None = None
    bd_options: dict[str, str] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CreateRequest:
        def number(key: str) -> int | None:
            return None if data.get(key) is None else int(data[key])

        try:
            req = cls(
                str(data["name"]),
                [str(b) for b in data["bricks"]],
                replica=number("replica"),
                arbiter=number("arbiter"),
                stripe=number("stripe"),
                disperse=number("disperse"),
                transport=str(data.get("transport") or "tcp"),
                force=bool(data.get("force", False)),
                device=None if data.get("device") is None else str(data["device"]),
                bd_options={str(k): str(v) for k, v in (data.get("bd_options") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MgmtError(f"bad volume create request: {exc!r}") from None
        return req


def revision_of(text: str) -> str:
    """The volfile's revision as clients see it: it changes exactly when the text does."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Volumes:
    def __init__(self, node: Node) -> None:
        self.node = node
        api_host = "127.0.0.1" if node.listen in ("0.0.0.0", "::", "") else node.listen
        api_host = f"[{api_host}]" if ":" in api_host else api_host
        #: this host's self-heal daemon, wanted while a started replicated volume has bricks here
        self.shd = ShdManager(node.workdir, node.logdir, node.uuid, f"{api_host}:{node.port}")
        self.heal = Heal(node)
        #: add/remove/replace-brick and the long tasks (rebalance, remove-brick drain)
        self.changes = BricksChange(node, f"{api_host}:{node.port}")
        node.supervisor.companions += [self.shd.detach, self.changes.tasks.close]

    # ---- reading -------------------------------------------------------------------------------

    async def all(self) -> list[VolumeInfo]:
        items = await self.node.store().get_prefix(VOLUMES)
        return sorted(
            (VolumeInfo.from_json(v) for k, v in items.items() if k.endswith("/info")), key=lambda v: v.name
        )

    async def device(self, name: str) -> DeviceRecord | None:
        """The block-device facts of a `device lv` volume, None for directory bricks."""
        raw = await self.node.store().get(device_key(name))
        return DeviceRecord.from_json(raw) if raw is not None else None

    async def get(self, name: str) -> VolumeInfo:
        raw = await self.node.store().get(info_key(name))
        if raw is None:
            raise MgmtError(f"volume {name} does not exist", 404)
        return VolumeInfo.from_json(raw)

    async def ports(self, info: VolumeInfo) -> dict[int, PortEntry]:
        store = self.node.store()
        raws = await asyncio.gather(*(store.get(portmap_key(b.host, b.path)) for b in info.bricks))
        return {i: PortEntry.from_json(raw) for i, raw in enumerate(raws) if raw is not None}

    def description(self, info: VolumeInfo, ports: dict[int, PortEntry]) -> VolumeDescription:
        bricks = []
        for i, b in enumerate(info.bricks):
            entry = ports.get(i)
            socket = entry.socket if entry and entry.socket else ""
            if not socket and b.peer == self.node.uuid and info.transport == "unix":
                socket = self.socket_path(info.name, b.path)
            bricks.append(Brick(b.host, b.path, entry.port if entry else 0, socket, b.id, b.group))
        desc = VolumeDescription(
            info.name,
            info.id,
            bricks,
            info.replica_count,
            info.arbiter_count,
            info.transport,
            username=info.username,
            password=info.password,
        )
        volopts.apply(desc, info.options)
        return desc

    def socket_path(self, volume: str, path: str) -> str:
        """Where a local brick of a `transport unix` volume listens: under the workdir when the path
        fits a socket address (108 bytes), else in /run/mortar or the temp dir, as glusterd does."""
        name = hashlib.sha256(f"{self.node.uuid}/{volume}/{path}".encode()).hexdigest()[:20] + ".sock"
        for where in (self.node.workdir / "run", Path("/run/mortar"), Path(tempfile.gettempdir())):
            if len(os.fsencode(where / name)) < 100:
                with contextlib.suppress(OSError):
                    where.mkdir(parents=True, exist_ok=True)
                    return str(where / name)
        raise MgmtError(f"no directory short enough for the unix socket of brick {path}", 500)

    async def client_volfile(self, name: str) -> str:
        info = await self.get(name)
        if info.status != "Started":
            raise MgmtError(f"volume {name} is not started", 409)
        ports = await self.ports(info)
        desc = self.description(info, ports)
        desc.decommissioned = self.changes.decommissioned(await self.changes.tasks.get(name))
        for i, brick in enumerate(desc.bricks):
            if (info.transport == "tcp" and not brick.port) or (
                info.transport == "unix" and not brick.socket_path
            ):
                raise MgmtError(
                    f"brick {info.bricks[i].name} of {name} has never listened, so its address is unknown "
                    f"(start it with 'mortar volume start {name} force')",
                    503,
                )
        return client_volfile(desc)

    async def wanted_local(self) -> list[BrickRun]:
        """The bricks this node should be running, with their volfiles (what reconcile enforces)."""
        items = await self.node.store().get_prefix(VOLUMES)
        runs: list[BrickRun] = []
        infos = [VolumeInfo.from_json(raw) for key, raw in items.items() if key.endswith("/info")]
        self.shd.set_wanted(any(wants_shd(info.public(), self.node.uuid) for info in infos))
        await self.changes.tasks.adopt(items)
        for info in infos:
            if info.status != "Started":
                continue
            mine = [i for i, b in enumerate(info.bricks) if b.peer == self.node.uuid]
            if not mine:
                continue
            desc = self.description(info, {})
            device_raw = items.get(device_key(info.name))
            if device_raw is not None:
                device = DeviceRecord.from_json(device_raw)
                desc.brick_type, desc.bd_options = device.brick_type, dict(device.options)
            for i in mine:
                b = info.bricks[i]
                socket = self.socket_path(info.name, b.path) if info.transport == "unix" else ""
                desc.bricks[i] = Brick(b.host, b.path, 0, socket, b.id, b.group)
                state_raw = items.get(brick_state_key(info.name, i))
                created = state_raw is not None and BrickState.from_json(state_raw).initialized
                runs.append(
                    BrickRun(
                        info.name,
                        i,
                        b.host,
                        b.path,
                        brick_volfile(desc, i, create=not created),
                        desc.brick_volfile_name(i),
                        creating=not created,
                        socket=socket,
                    )
                )
        return runs

    # ---- changing --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[tuple[Store, LockHandle]]:
        """The pool-wide configuration lock; without quorum this fails with a clear error."""
        store = self.node.store()
        held = False
        try:
            async with store.lock("config", ttl=15, timeout=20) as handle:
                held = True
                yield store, handle
        except StoreUnavailable as exc:
            raise MgmtError(
                f"the pool has no quorum: its configuration cannot change now ({exc})", 503
            ) from None
        except TimeoutError:
            if held:
                raise
            raise MgmtError("another configuration change is in progress; try again", 409) from None

    async def _write(self, store: Store, handle: LockHandle, info: VolumeInfo, *, new: bool = False) -> None:
        guard = [Compare.exists(handle.key)]
        if new:
            guard.append(Compare.absent(info.key()))
        try:
            ok = await store.txn(guard, [Put(info.key(), info.to_json())])
        except StoreUnavailable as exc:
            raise MgmtError(
                f"the pool has no quorum: its configuration cannot change now ({exc})", 503
            ) from None
        if not ok:
            raise MgmtError(f"volume {info.name} changed under us; try again", 409)

    async def create(self, req: CreateRequest) -> VolumeInfo:
        name = check_volume_name(req.name)
        if req.stripe is not None:
            raise MgmtError("stripe volumes are not available yet in mortar (shard will be)")
        if req.disperse is not None:
            raise MgmtError("disperse (erasure-coded) volumes are not available yet in mortar")
        if req.transport not in ("tcp", "unix"):
            raise MgmtError(f"transport {req.transport!r} is not supported (use tcp or unix)")
        replica = req.replica if req.replica is not None else 1
        if req.replica is not None and replica < 2:
            raise MgmtError("replica count must be at least 2")
        arbiter = req.arbiter or 0
        if req.arbiter is not None and (arbiter != 1 or replica != 3):
            raise MgmtError("arbiter is supported only as 'replica 3 arbiter 1'")
        if not req.bricks:
            raise MgmtError("a volume needs at least one brick")
        device: DeviceRecord | None = None
        if req.device is not None:
            if req.device != "lv":
                raise MgmtError(f"device {req.device!r} is not supported (use 'device lv')")
            device = DeviceRecord(options=check_bd_options(req.bd_options or {}))
        elif req.bd_options:
            raise MgmtError("pool options need 'device lv'")
        if len(req.bricks) % replica:
            raise MgmtError(
                f"the number of bricks ({len(req.bricks)}) is not a multiple of the replica count ({replica})"
            )
        parsed: list[tuple[str, str]] = []
        for text in req.bricks:
            try:
                parsed.append(hosts.parse_brick(text))
            except ValueError as exc:
                raise MgmtError(str(exc)) from None
        peers = await self.node.pool.peers()
        owners = [await self.node.pool.owner(host, peers) for host, _ in parsed]
        bricks = [
            BrickInfo(host, path, owner.uuid) for (host, path), owner in zip(parsed, owners, strict=True)
        ]
        self._check_layout(bricks, replica, req.force, peers)
        async with self._locked() as (store, handle):
            if await store.get(info_key(name)) is not None:
                raise MgmtError(f"volume {name} already exists", 409)
            self._check_against(bricks, await self.all())
            await self._check_on_hosts(bricks, owners, req.force)
            info = VolumeInfo.new(name, bricks, replica, arbiter, req.transport)
            await self._write(store, handle, info, new=True)
            if device is not None:
                await store.put(device_key(name), device.to_json())
        log.info("volume %s created (%s, %d bricks)", name, info.type, len(bricks))
        return info

    @staticmethod
    def _check_layout(bricks: list[BrickInfo], replica: int, force: bool, peers: list[PeerInfo]) -> None:
        seen: dict[tuple[str, str], str] = {}
        for b in bricks:
            if (b.peer, b.path) in seen:
                raise MgmtError(f"brick {b.name} is given twice (as {seen[b.peer, b.path]})")
            seen[b.peer, b.path] = b.name
        for i, a in enumerate(bricks):
            for b in bricks[i + 1 :]:
                if a.peer == b.peer and hosts.nested(a.path, b.path):
                    raise MgmtError(f"brick {a.name} and brick {b.name} are nested: one is inside the other")
        if replica > 1 and not force:
            names = {p.uuid: p.hostname for p in peers}
            for k in range(0, len(bricks), replica):
                owners = [b.peer for b in bricks[k : k + replica]]
                dup = next((o for o in owners if owners.count(o) > 1), None)
                if dup is not None:
                    raise MgmtError(
                        f"bricks {k + 1}-{k + replica} form one replica set but several are on host "
                        f"{names.get(dup, dup)}: losing that host loses the set "
                        "(use 'force' to create it anyway)"
                    )

    @staticmethod
    def _check_against(bricks: list[BrickInfo], volumes: list[VolumeInfo]) -> None:
        for vol in volumes:
            for old in vol.bricks:
                for b in bricks:
                    if b.peer == old.peer and hosts.nested(b.path, old.path):
                        what = "is" if b.path == old.path else "overlaps"
                        raise MgmtError(f"brick {b.name} {what} brick {old.name} of volume {vol.name}")

    async def _check_on_hosts(self, bricks: list[BrickInfo], owners: list[PeerInfo], force: bool) -> None:
        by_peer: dict[str, tuple[PeerInfo, list[BrickInfo]]] = {}
        for b, owner in zip(bricks, owners, strict=True):
            by_peer.setdefault(owner.uuid, (owner, []))[1].append(b)

        async def check(peer: PeerInfo, mine: list[BrickInfo]) -> list[str]:
            paths = [b.path for b in mine]
            if peer.uuid == self.node.uuid:
                return check_paths(paths, force)
            reply = await self.node.rpc.call(
                peer.hostname,
                peer.port,
                "POST",
                "/v1/internal/bricks/check",
                {"paths": paths, "force": force},
            )
            return [f"{peer.hostname}: {e}" for e in reply.get("errors", [])]

        results = await asyncio.gather(*(check(p, m) for p, m in by_peer.values()), return_exceptions=True)
        for (peer, _), res in zip(by_peer.values(), results, strict=True):
            if isinstance(res, MgmtError):
                raise MgmtError(f"host {peer.hostname} is not connected: {res}", 502)
            if isinstance(res, BaseException):
                raise res
            if res:
                raise MgmtError(res[0])

    async def _down_hosts(self, info: VolumeInfo) -> dict[str, str]:
        """Owners of the volume's bricks whose daemon does not answer: uuid -> host name."""
        peers = {p.uuid: p for p in await self.node.pool.peers()}
        owners = [peers[u] for u in dict.fromkeys(b.peer for b in info.bricks) if u in peers]
        up = await asyncio.gather(*(self.node.pool.reachable(p) for p in owners))
        return {p.uuid: p.hostname for p, ok in zip(owners, up, strict=True) if not ok}

    async def _require_connected(self, info: VolumeInfo, what: str) -> None:
        down = await self._down_hosts(info)
        if down:
            raise MgmtError(
                f"cannot {what} {info.name}: host(s) {', '.join(down.values())} not connected (use 'force')",
                409,
            )

    async def start(self, name: str, force: bool) -> dict[str, Any]:
        info = await self.get(name)
        if info.status == "Started" and not force:
            raise MgmtError(f"volume {name} already started", 409)
        down = await self._down_hosts(info)
        if down and not force:
            raise MgmtError(
                f"cannot start {name}: host(s) {', '.join(down.values())} not connected (use 'force')", 409
            )
        previous = info.status
        async with self._locked() as (store, handle):
            info = await self.get(name)
            since = await store.revision()
            info.status = "Started"
            await self._write(store, handle, info)
        self.node.reconcile_soon()
        waiting = [b for b in info.bricks if b.peer not in down]
        failed = [
            f"{b.name} not started: host {down[b.peer]} is not connected"
            for b in info.bricks
            if b.peer in down
        ]
        failed += await self._wait_bricks(waiting, since, online=True, stale_ok=previous == "Started")
        if failed and not force:
            async with self._locked() as (store, handle):
                info = await self.get(name)
                info.status = previous
                await self._write(store, handle, info)
            self.node.reconcile_soon()
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise MgmtError(f"brick {failed[0]}{more}", 500)
        return {"volume": info.public(), "failed": failed}

    async def stop(self, name: str, force: bool) -> dict[str, Any]:
        info = await self.get(name)
        if info.status != "Started":
            raise MgmtError(f"volume {name} is not in the started state", 409)
        if not force:
            await self._require_connected(info, "stop")
        async with self._locked() as (store, handle):
            info = await self.get(name)
            since = await store.revision()
            info.status = "Stopped"
            await self._write(store, handle, info)
        self.node.reconcile_soon()
        mine = [b for b in info.bricks if not force or b.peer == self.node.uuid]
        still = await self._wait_bricks(mine, since, online=False)
        if still and not force:
            raise MgmtError(f"brick {still[0]}", 500)
        return {"volume": info.public()}

    async def _wait_bricks(
        self, bricks: list[BrickInfo], since: int, *, online: bool, stale_ok: bool = False
    ) -> list[str]:
        """Wait until every brick reports `online` in the port map; returns those that did not, each
        with its reason. When starting, only reports written after revision `since` count (unless
        `stale_ok`: the volume was already started, so bricks online before are fine)."""
        store = self.node.store()
        deadline = time.monotonic() + BRICK_WAIT
        while True:
            entries = await asyncio.gather(
                *(store.get_with_revision(portmap_key(b.host, b.path)) for b in bricks)
            )
            pending: list[str] = []
            for b, kv in zip(bricks, entries, strict=True):
                entry = PortEntry.from_json(kv.value) if kv else None
                fresh = kv is not None and kv.mod_revision > since
                if online:
                    if entry is not None and entry.online and (fresh or stale_ok):
                        continue
                    if entry is not None and fresh and entry.error:
                        return [f"{b.name} did not start: {entry.error}"]
                    pending.append(f"{b.name} did not start within {BRICK_WAIT:g}s")
                elif entry is not None and entry.online:
                    pending.append(f"{b.name} did not stop within {BRICK_WAIT:g}s")
            if not pending or time.monotonic() > deadline:
                return pending
            await asyncio.sleep(0.1)

    async def delete(self, name: str) -> None:
        info = await self.get(name)
        if info.status == "Started":
            raise MgmtError(f"volume {name} has been started: stop it before deleting it", 409)
        async with self._locked() as (store, handle):
            ops = [DeletePrefix(f"{VOLUMES}{name}/")] + [
                Delete(portmap_key(b.host, b.path)) for b in info.bricks
            ]
            await store.txn([Compare.exists(handle.key), Compare.exists(info.key())], ops)
        log.info("volume %s deleted", name)

    # ---- options ---------------------------------------------------------------------------------

    async def set_options(self, name: str, options: dict[str, str], group: str | None) -> dict[str, str]:
        try:
            changes = volopts.load_group(group, [self.node.workdir / "groups"]) if group else {}
            for key, value in options.items():
                changes[key] = volopts.validate(key, str(value))
        except volopts.OptionKeyError as exc:
            raise MgmtError(str(exc)) from None
        if not changes:
            raise MgmtError("nothing to set: give KEY VALUE pairs or 'group NAME'")
        async with self._locked() as (store, handle):
            info = await self.get(name)
            info.options.update(changes)
            info.version += 1
            await self._write(store, handle, info)
        return changes

    async def reset_options(self, name: str, key: str | None) -> list[str]:
        if key is not None:
            try:
                volopts.lookup(key)
            except volopts.OptionKeyError as exc:
                raise MgmtError(str(exc)) from None
        async with self._locked() as (store, handle):
            info = await self.get(name)
            removed = [k for k in info.options if key is None or k == key]
            for k in removed:
                del info.options[k]
            if removed:
                info.version += 1
                await self._write(store, handle, info)
        return removed

    async def get_options(self, name: str, key: str | None) -> list[dict[str, Any]]:
        info = await self.get(name)
        try:
            if key is None:
                return volopts.describe_all(info.options)
            return [volopts.describe(key, info.options.get(key))]
        except volopts.OptionKeyError as exc:
            raise MgmtError(str(exc)) from None

    # ---- status ----------------------------------------------------------------------------------

    def local_status(self, volume: str, detail: bool) -> list[dict[str, Any]]:
        """This node's bricks of `volume` as its supervisor sees them right now."""
        out = []
        for st in self.node.supervisor.status(volume):
            row: dict[str, Any] = {
                "index": st.index,
                "host": st.host,
                "path": st.path,
                "port": st.port,
                "pid": st.pid,
                "online": st.online,
                "error": st.error,
                "restarts": st.restarts,
            }
            if detail:
                row["detail"] = hosts.disk_detail(st.path)
            out.append(row)
        return out

    async def status(self, name: str, detail: bool) -> dict[str, Any]:
        info = await self.get(name)
        if info.status != "Started":
            raise MgmtError(f"volume {name} is not started", 409)
        peers = {p.uuid: p for p in await self.node.pool.peers()}
        ports = await self.ports(info)

        async def live(uuid: str) -> dict[int, dict[str, Any]] | None:
            if uuid == self.node.uuid:
                rows = self.local_status(name, detail)
            else:
                peer = peers.get(uuid)
                if peer is None:
                    return None
                try:
                    reply = await self.node.rpc.call(
                        peer.hostname,
                        peer.port,
                        "GET",
                        "/v1/internal/bricks",
                        params={"volume": name, "detail": "1" if detail else "0"},
                        timeout=5,
                    )
                except MgmtError:
                    return None
                rows = reply.get("bricks", [])
            return {int(r["index"]): r for r in rows}

        owners = list(dict.fromkeys(b.peer for b in info.bricks))
        lives = dict(zip(owners, await asyncio.gather(*(live(u) for u in owners)), strict=True))
        bricks = []
        for i, b in enumerate(info.bricks):
            known = lives.get(b.peer)
            entry = ports.get(i)
            if known is not None and i in known:
                row = dict(known[i])
                row["source"] = "node"
            else:
                row = {
                    "index": i,
                    "port": entry.port if entry else 0,
                    "pid": entry.pid if entry else 0,
                    "online": bool(entry and entry.online),
                    "error": entry.error if entry else "",
                    "source": "store" if known is None else "node",
                }
                if known is not None:  # its node runs but does not run it
                    row.update(online=False, pid=0, error=row["error"] or "not running")
            row.update(name=b.name, host=b.host, path=b.path, arbiter=info.is_arbiter(i))
            if info.transport == "unix":
                row["socket"] = entry.socket if entry else ""
            bricks.append(row)
        nbd = await self._nbd_status(name, list(peers.values()))
        return {"volume": name, "status": info.status, "type": info.type, "bricks": bricks, "nbd": nbd}

    async def _nbd_status(self, name: str, peers: list[PeerInfo]) -> list[dict[str, Any]]:
        """Each host's NBD server and whether it serves `name` now: every host of the pool serves
        every started volume, as every GlusterFS host runs its Self-heal Daemon."""

        async def one(peer: PeerInfo) -> dict[str, Any]:
            if peer.uuid == self.node.uuid:
                st = self.node.nbd.status()
            else:
                try:
                    reply = await self.node.rpc.call(
                        peer.hostname, peer.port, "GET", "/v1/internal/nbd", timeout=5
                    )
                    st = dict(reply["nbd"])
                except (MgmtError, KeyError, TypeError) as exc:
                    st = {"enabled": True, "port": 0, "socket": "", "pid": 0, "online": False, "volumes": [],
                          "error": f"its node does not answer: {exc}"}  # fmt: skip
            return {**st, "host": peer.hostname, "node": peer.uuid, "serving": name in st.get("volumes", [])}

        return list(await asyncio.gather(*(one(p) for p in peers)))


def check_paths(paths: list[str], force: bool) -> list[str]:
    errors: list[str] = []
    for path in paths:
        errors.extend(hosts.check_brick_path(path, force))
    return errors
