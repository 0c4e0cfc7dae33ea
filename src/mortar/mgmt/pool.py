"""The trusted storage pool: peer probe, detach and status, and the join/leave each side performs.

Probing a host makes it a member of this node's etcd cluster (moving this node's configuration
from SQLite to etcd first, if the pool had one node); detaching removes its member and sends it
back to an empty SQLite store. Membership is etcd's, and a peer record under `/peers/` tells every
daemon how to reach the others.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from mortar.mgmt import hosts
from mortar.mgmt.etcd import EtcdStore
from mortar.mgmt.model import PEERS, MgmtError, PeerInfo, VolumeInfo
from mortar.mgmt.rest import DEFAULT_PORT

if TYPE_CHECKING:
    from mortar.mgmt.daemon import Node

log = logging.getLogger(__name__)

REACH_TIMEOUT = 3.0
WILDCARDS = ("0.0.0.0", "::", "")


class Pool:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._lock = asyncio.Lock()  # one membership change at a time from this node

    # ---- records ---------------------------------------------------------------------------------

    def me(self) -> PeerInfo:
        n = self.node
        member = n.holder.member
        return PeerInfo(
            n.uuid,
            list(n.hostnames),
            n.port,
            member.client_url if member else "",
            member.peer_url if member else "",
        )

    async def peers(self) -> list[PeerInfo]:
        items = await self.node.store().get_prefix(PEERS)
        return sorted((PeerInfo.from_json(v) for v in items.values()), key=lambda p: p.hostname)

    async def publish_me(self) -> None:
        """Keep this node's record current (after start, a store move, a join)."""
        store = self.node.store()
        me = self.me()
        old = await store.get(me.key())
        if old is not None:
            known = PeerInfo.from_json(old)  # keep names others know this node by (the probed one)
            me.hostnames = list(dict.fromkeys(known.hostnames + me.hostnames))
        if old != me.to_json():
            await store.put(me.key(), me.to_json())

    async def reachable(self, peer: PeerInfo) -> bool:
        if peer.uuid == self.node.uuid:
            return True
        try:
            info = await self.node.rpc.call(
                peer.hostname, peer.port, "GET", "/v1/node", timeout=REACH_TIMEOUT
            )
        except MgmtError:
            return False
        return info.get("uuid") == peer.uuid

    async def status(self) -> list[dict[str, Any]]:
        peers = await self.peers()
        up = await asyncio.gather(*(self.reachable(p) for p in peers))
        return [
            {
                "uuid": p.uuid,
                "hostname": p.hostname,
                "hostnames": p.hostnames,
                "port": p.port,
                "self": p.uuid == self.node.uuid,
                "connected": ok,
                "state": "Peer in Cluster",
            }
            for p, ok in zip(peers, up, strict=True)
        ]

    async def owner(self, host: str, peers: list[PeerInfo] | None = None) -> PeerInfo:
        """The pool member a brick's `HOST` names; refused when it names none."""
        peers = peers if peers is not None else await self.peers()
        for p in peers:
            if host in p.hostnames:
                return p
        loopback = host == "localhost" or (hosts.is_ip(host) and ipaddress.ip_address(host).is_loopback)
        if loopback and self.node.listen in WILDCARDS:  # this host's loopback reaches this node
            mine = next((p for p in peers if p.uuid == self.node.uuid), None)
            if mine is not None:
                return mine
        loop = asyncio.get_running_loop()
        wanted = await loop.run_in_executor(None, hosts.resolve, host)
        if wanted:
            for p in peers:
                names = await asyncio.gather(
                    *(loop.run_in_executor(None, hosts.resolve, h) for h in p.hostnames)
                )
                if wanted & set().union(*names):
                    return p
        raise MgmtError(f"host {host} is not in the pool (add it with 'mortar peer probe {host}')")

    # ---- probe -----------------------------------------------------------------------------------

    async def probe(self, target: str) -> dict[str, Any]:
        try:
            host, port = hosts.split_host_port(target, DEFAULT_PORT)
        except ValueError as exc:
            raise MgmtError(str(exc)) from None
        async with self._lock:
            try:
                info = await self.node.rpc.call(host, port, "GET", "/v1/node", timeout=5)
            except MgmtError as exc:
                raise MgmtError(f"{host} is not reachable: {exc}", 502) from None
            if info.get("uuid") == self.node.uuid:
                raise MgmtError(f"{host} is this node: probe on localhost not needed")
            peers = await self.peers()
            known = next((p for p in peers if p.uuid == info.get("uuid")), None)
            if known is not None:
                return {"peer": known.__dict__, "message": f"host {host} port {port} already in peer list"}
            if int(info.get("peer_count", 1)) > 1:
                raise MgmtError(f"{host} is already part of another pool")
            if int(info.get("volume_count", 0)) > 0:
                raise MgmtError(f"{host} has volumes of its own: it cannot join this pool")
            await self._ensure_etcd(host, port)
            holder = self.node.holder
            reply = await self.node.rpc.call(
                host,
                port,
                "POST",
                "/v1/internal/join",
                {"endpoints": holder.config.endpoints or [holder.config.client_url], "hostname": host},
                timeout=120,
            )
            await holder.refresh_endpoints()
            log.info("peer probe: %s (%s) joined the pool", host, info.get("uuid"))
            return {"peer": reply["peer"], "message": "success"}

    async def _ensure_etcd(self, host: str, port: int) -> None:
        holder = self.node.holder
        if holder.kind == "etcd":
            return
        addr = self.node.listen
        if addr in WILDCARDS:  # peers will reach this node at the address it reaches them from
            addr = hosts.outward_address(host, port)
            if addr not in self.node.hostnames:
                self.node.hostnames.insert(0, addr)
        client_port, peer_port = self.node.etcd_ports
        await holder.to_etcd(_url(addr, client_port), _url(addr, peer_port))
        await self.publish_me()

    async def join(self, endpoints: list[str], hostname: str, local_addr: str) -> PeerInfo:
        """This node joins the pool whose etcd members are at `endpoints` (called by the prober)."""
        async with self._lock:
            volumes = await self.node.store().get_prefix("/volumes/")
            if any(k.endswith("/info") for k in volumes):
                raise MgmtError("this node has volumes of its own: it cannot join a pool", 409)
            if len(await self.peers()) > 1:
                raise MgmtError("this node is already part of a pool", 409)
            addr = self.node.listen if self.node.listen not in WILDCARDS else local_addr
            client_port, peer_port = self.node.etcd_ports
            old = await self.node.store().get(self.me().key())
            await self.node.holder.join(endpoints, _url(addr, client_port), _url(addr, peer_port))
            me = self.me()
            names = PeerInfo.from_json(old).hostnames if old else []
            me.hostnames = list(dict.fromkeys([hostname, *names, *me.hostnames]))
            await self.node.store().put(me.key(), me.to_json())
            self.node.store_switched()
            return me

    # ---- detach ----------------------------------------------------------------------------------

    async def detach(self, host: str, force: bool) -> dict[str, Any]:
        async with self._lock:
            peers = await self.peers()
            peer = next((p for p in peers if host in p.hostnames), None)
            if peer is None:
                raise MgmtError(f"{host} is not part of the pool")
            if peer.uuid == self.node.uuid:
                raise MgmtError(f"{host} is this node: a node cannot detach itself")
            holding = volumes_on(peer, await self.node.volumes.all())
            if holding:
                raise MgmtError(
                    f"{host} still holds bricks of volume(s) {', '.join(holding)}: "
                    "remove them (or delete the volumes) before detaching it"
                )
            others = [p.etcd_client_url for p in peers if p.uuid != peer.uuid and p.etcd_client_url]
            if await self.reachable(peer):
                await self.node.rpc.call(
                    peer.hostname, peer.port, "POST", "/v1/internal/leave", {"endpoints": others}, timeout=90
                )
            elif not force:
                raise MgmtError(f"{host} is not connected: detach it with 'force'", 409)
            else:
                await self._remove_member(peer)
            await self.node.store().delete(peer.key())
            await self.node.holder.refresh_endpoints()
            log.info("peer detach: %s (%s) left the pool", host, peer.uuid)
            return {"message": "success"}

    async def _remove_member(self, peer: PeerInfo) -> None:
        store = self.node.store()
        if not isinstance(store, EtcdStore) or not peer.etcd_peer_url:
            return
        for m in await store.member_list():
            if peer.etcd_peer_url in m.peer_urls:
                await store.member_remove(m.id)
                log.info("removed the etcd member of %s (%x)", peer.hostname, m.id)

    async def leave(self, others: list[str]) -> None:
        """This node leaves the pool (called by the node that detaches it)."""
        async with self._lock:
            await self.node.holder.leave(others)
            await self.publish_me()
            self.node.store_switched()


def _url(addr: str, port: int) -> str:
    return f"http://[{addr}]:{port}" if ":" in addr else f"http://{addr}:{port}"


def volumes_on(peer: PeerInfo, volumes: list[VolumeInfo]) -> list[str]:
    return sorted(v.name for v in volumes if any(b.peer == peer.uuid for b in v.bricks))
