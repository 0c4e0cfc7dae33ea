"""`volume heal`: what mortard does with it. Each host's heal daemon looks after that host's
bricks, so triggers, `info` and `statistics` go to every host holding bricks of the volume (each
answers for its own) and the answers are merged; a split-brain resolution goes to one heal daemon
(the source brick's host for `source-brick`), which reaches every copy through its graph.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from mortar.mgmt.model import MgmtError, PeerInfo, VolumeInfo
from mortar.mgmt.shdctl import heal_enabled

if TYPE_CHECKING:
    from mortar.mgmt.daemon import Node

POLICIES = ("bigger-file", "latest-mtime", "latest-ctime", "majority", "source-brick")


class Heal:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def _replicated(self, name: str, crawl: bool = False) -> VolumeInfo:
        info = await self.node.volumes.get(name)
        if info.replica_count < 2:
            raise MgmtError(f"volume {name} is not of type replicate: it has nothing to heal")
        if info.status != "Started":
            raise MgmtError(f"volume {name} is not started", 409)
        if crawl and not heal_enabled(info.public()):
            raise MgmtError(
                f"self-heal is disabled for {name}: heal will not be triggered "
                f"('mortar volume heal {name} enable')",
                409,
            )
        return info

    async def local(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """An operation on this host's heal daemon (`/v1/internal/shd/OP`)."""
        shd = self.node.volumes.shd
        volume = str(body.get("volume", ""))
        if op == "heal":
            return await shd.call("POST", "/heal", body, timeout=float(body.get("timeout", 300)) + 5)
        if op in ("info", "statistics"):
            return await shd.call("GET", f"/{op}", params={"volume": volume}, timeout=120)
        if op == "split-brain":
            return await shd.call("POST", "/split-brain", body, timeout=300)
        raise MgmtError(f"unknown heal daemon operation {op!r}", 404)

    async def _on(self, peer: PeerInfo, op: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if peer.uuid == self.node.uuid:
            return await self.local(op, body)
        return await self.node.rpc.call(
            peer.hostname, peer.port, "POST", f"/v1/internal/shd/{op}", body, timeout=timeout
        )

    async def _fan_out(
        self, info: VolumeInfo, op: str, body: dict[str, Any], timeout: float = 120
    ) -> list[tuple[PeerInfo, dict[str, Any] | MgmtError]]:
        peers = {p.uuid: p for p in await self.node.pool.peers()}
        owners = [peers[u] for u in dict.fromkeys(b.peer for b in info.bricks) if u in peers]
        results = await asyncio.gather(
            *(self._on(p, op, body, timeout) for p in owners), return_exceptions=True
        )
        out: list[tuple[PeerInfo, dict[str, Any] | MgmtError]] = []
        for p, r in zip(owners, results, strict=True):
            if isinstance(r, MgmtError):
                out.append((p, r))
            elif isinstance(r, BaseException):
                raise r
            else:
                out.append((p, r))
        return out

    async def trigger(self, name: str, full: bool, wait: bool, timeout: float = 300) -> dict[str, Any]:
        info = await self._replicated(name, crawl=True)
        body = {"volume": name, "full": full, "wait": wait, "timeout": timeout}
        answers = await self._fan_out(info, "heal", body, timeout + 10)
        failed = {p.hostname: str(r) for p, r in answers if isinstance(r, MgmtError)}
        if failed and len(failed) == len(answers):
            raise MgmtError(f"no heal daemon took the request: {'; '.join(failed.values())}", 502)
        crawls = [r["crawl"] for _, r in answers if not isinstance(r, MgmtError) and r.get("crawl")]
        return {"volume": name, "kind": "full" if full else "index", "failed": failed, "crawls": crawls}

    async def info(self, name: str, mode: str = "") -> dict[str, Any]:
        """Per brick: entries needing heal; `mode` summary (counts) or split-brain (only those)."""
        if mode not in ("", "summary", "split-brain"):
            raise MgmtError("heal info takes nothing, 'summary' or 'split-brain'")
        info = await self._replicated(name)
        answers = await self._fan_out(info, "info", {"volume": name}, timeout=30)
        rows: dict[int, dict[str, Any]] = {}
        for peer, r in answers:
            if isinstance(r, MgmtError):
                for i, b in enumerate(info.bricks):
                    if b.peer == peer.uuid:
                        rows[i] = {"index": i, "brick": b.name, "status": f"host not reachable: {r}",
                                   "count": None, "entries": []}  # fmt: skip
                continue
            for row in r.get("bricks", []):
                rows[int(row["index"])] = row
        bricks = [rows[i] for i in sorted(rows)]
        for row in bricks:
            entries = row.get("entries", [])
            row["split_brain_count"] = sum(1 for e in entries if e["split_brain"])
            if mode == "split-brain":
                row["entries"] = [e for e in entries if e["split_brain"]]
            elif mode == "summary":
                row["pending_count"] = len(entries) - row["split_brain_count"]
                row["entries"] = []
        return {"volume": name, "mode": mode or "all", "bricks": bricks}

    async def statistics(self, name: str) -> dict[str, Any]:
        info = await self._replicated(name)
        answers = await self._fan_out(info, "statistics", {"volume": name}, timeout=15)
        hosts = []
        for peer, r in answers:
            if isinstance(r, MgmtError):
                hosts.append({"host": peer.hostname, "error": str(r), "crawls": []})
            else:
                hosts.append({"host": peer.hostname, "crawls": r.get("crawls", [])})
        return {"volume": name, "hosts": hosts}

    async def split_brain(
        self, name: str, policy: str, file: str | None, source: str | None
    ) -> dict[str, Any]:
        if policy not in POLICIES:
            raise MgmtError(f"unknown split-brain policy {policy!r} (use {', '.join(POLICIES)})")
        if policy == "source-brick" and not source:
            raise MgmtError("source-brick needs the brick HOST:/PATH to take as the source")
        if policy != "source-brick" and not file:
            raise MgmtError(f"{policy} needs the FILE to resolve (a path in the volume or gfid:UUID)")
        info = await self._replicated(name)
        peers = {p.uuid: p for p in await self.node.pool.peers()}
        if source:
            brick = next((b for b in info.bricks if b.name == source), None)
            if brick is None:
                raise MgmtError(f"{source} is not a brick of volume {name}")
            peer = peers[brick.peer]
        else:
            mine = any(b.peer == self.node.uuid for b in info.bricks)
            peer = peers[self.node.uuid] if mine else peers[info.bricks[0].peer]
        body = {"volume": name, "policy": policy, "file": file, "source": source}
        return await self._on(peer, "split-brain", body, 300)
