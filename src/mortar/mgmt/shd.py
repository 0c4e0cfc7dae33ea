"""`mortar-shd`: the self-heal daemon, one process per host (glustershd's role), run by mortard.

For every started replicated volume with bricks on this host (and `cluster.self-heal-daemon` not
off) it opens the volume as a client (`mortar://` through this host's mortard, so it follows
graph switches) and heals what the indexes of the LOCAL bricks list: when it starts, when a child
of a replica set comes back up, on `volume heal NAME [full]`, and every `cluster.heal-timeout`
seconds. Its own process, so a crash while healing never takes mortard or a brick down.

mortard talks to it over HTTP on a unix socket (`--socket`): `POST /heal`, `GET /statistics`,
`GET /info`, `POST /split-brain`, `GET /volumes`. Crawl statistics persist in `--state-dir`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from mortar.client.volume import AsyncVolume
from mortar.core.errors import FopError
from mortar.core.gfid import Gfid
from mortar.core.log import setup_logging
from mortar.mgmt.model import MgmtError
from mortar.mgmt.rest import PeerClient
from mortar.mgmt.shd_info import brick_entries, find_gfid, split_brain_paths
from mortar.mgmt.shdctl import heal_enabled, option, wants_shd
from mortar.xlators.cluster.afr.base import ReplicateBase
from mortar.xlators.cluster.afr.heal import heal_full, heal_index

log = logging.getLogger("mortar.mgmt.shd")  # not __name__: this module also runs as __main__

DEFAULT_HEAL_TIMEOUT = 600.0
POLL = 2.0  # how often the volume list and the children's states are looked at
HISTORY = 32


@dataclass(slots=True)
class Crawl:
    """One heal crawl of this host's bricks of a volume (`volume heal NAME statistics`)."""

    kind: str  # "index" or "full"
    reason: str
    start: float
    end: float = 0.0
    scanned: int = 0
    healed: int = 0
    failed: int = 0
    split_brain: int = 0
    skipped: int = 0
    bytes: int = 0
    bricks: str = ""


def client_of(info: dict[str, Any], index: int) -> str:
    """The client translator of brick `index` (named by the brick's stable id, not its position)."""
    brick = info["bricks"][index]
    return str(brick.get("client") or f"{info['name']}-client-{index}")


class VolumeHealer:
    """The heal loop of one volume: a client graph and the crawls over its local bricks."""

    def __init__(self, shd: Shd, info: dict[str, Any], first: tuple[str, str] = ("index", "start")) -> None:
        self.shd = shd
        self.name: str = info["name"]
        self.info = info
        self.volume: AsyncVolume | None = None
        self.history: deque[Crawl] = deque(self._load_history(), maxlen=HISTORY)
        self.running: Crawl | None = None
        self._wake = asyncio.Event()
        self._pending: tuple[str, str] | None = first
        self._done = asyncio.Condition()
        self._seen_up: dict[str, set[int]] = {}
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"shd {self.name}")

    # ---- what this host holds --------------------------------------------------------------------

    def local_bricks(self) -> dict[str, tuple[int, str]]:
        """client translator name -> (brick index, brick path) for this host's bricks."""
        return {
            client_of(self.info, i): (i, b["path"])
            for i, b in enumerate(self.info.get("bricks", []))
            if b.get("peer") == self.shd.node
        }

    def afrs(self) -> list[tuple[ReplicateBase, list[int]]]:
        """Each replica set with a local brick, and that brick's child indexes in it."""
        if self.volume is None:
            return []
        local = self.local_bricks()
        out = []
        for xl in self.volume.graph.xlators.values():
            if isinstance(xl, ReplicateBase):
                mine = [c for c, child in enumerate(xl.children) if child.name in local]
                if mine:
                    out.append((xl, mine))
        return out

    @property
    def heal_timeout(self) -> float:
        try:
            return max(1.0, float(option(self.info, "cluster.heal-timeout", str(DEFAULT_HEAL_TIMEOUT))))
        except ValueError:
            return DEFAULT_HEAL_TIMEOUT

    @property
    def max_threads(self) -> int:
        try:
            return max(1, int(option(self.info, "cluster.shd-max-threads", "1")))
        except ValueError:
            return 1

    # ---- triggers ----------------------------------------------------------------------------------

    def trigger(self, kind: str, reason: str) -> None:
        """Ask for a crawl; a full crawl asked for wins over a pending index crawl."""
        if self._pending is None or kind == "full":
            self._pending = (kind, reason)
        self._wake.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no crawl runs or is pending (`heal` with wait)."""
        async with asyncio.timeout(timeout):
            async with self._done:
                await self._done.wait_for(lambda: self.running is None and self._pending is None)
        return True

    def _check_children(self) -> None:
        """A child that came back up is a reason to crawl (glustershd reacts to CHILD_UP)."""
        for afr, _ in self.afrs():
            up = set(afr.up_indices())
            before = self._seen_up.get(afr.name)
            self._seen_up[afr.name] = up
            if before is not None and up - before:
                names = ", ".join(afr.children[i].name for i in sorted(up - before))
                self.trigger("index", f"child up: {names}")

    # ---- the loop ------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        uri = f"mortar://{self.shd.daemon}/{self.name}"
        while self.volume is None:
            try:
                self.volume = await AsyncVolume.connect(uri, timeout=20)
                log.info("%s: connected", self.name)
            except (OSError, TimeoutError) as exc:
                log.info("%s: cannot connect yet (%s)", self.name, exc)
                await asyncio.sleep(POLL)

    async def _run(self) -> None:
        await self._connect()
        last = time.monotonic()
        while True:
            if self._pending is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(POLL, self.heal_timeout)):
                        await self._wake.wait()
                self._wake.clear()
                self._check_children()
                if self._pending is None and time.monotonic() - last >= self.heal_timeout:
                    self._pending = ("index", "heal-timeout")
                if self._pending is None:
                    continue
            kind, reason = self._pending
            self._pending = None
            if reason == "requested" or heal_enabled(self.info):
                await self._crawl(kind, reason)
            last = time.monotonic()
            async with self._done:
                self._done.notify_all()

    async def _crawl(self, kind: str, reason: str) -> None:
        crawl = Crawl(kind, reason, time.time())
        local = self.local_bricks()
        self.running = crawl
        slots = asyncio.Semaphore(self.max_threads)

        async def one(afr: ReplicateBase, children: list[int]) -> None:
            async with slots:
                try:
                    stats = await (heal_full(afr) if kind == "full" else heal_index(afr, children))
                except FopError as exc:
                    log.warning("%s: %s crawl of %s failed: %s", self.name, kind, afr.name, exc)
                    crawl.failed += 1
                    return
            crawl.scanned += stats.scanned
            crawl.healed += stats.healed
            crawl.failed += stats.failed
            crawl.split_brain += stats.split_brain
            crawl.skipped += stats.skipped
            crawl.bytes += stats.bytes

        sets = self.afrs()
        crawl.bricks = ", ".join(
            f"{self.info['bricks'][local[afr.children[c].name][0]]['name']}" for afr, cs in sets for c in cs
        )
        try:
            await asyncio.gather(*(one(afr, cs) for afr, cs in sets))
        except Exception:
            log.exception("%s: %s crawl failed", self.name, kind)
            crawl.failed += 1
        crawl.end = time.time()
        self.running = None
        if crawl.scanned or kind == "full" or reason != "heal-timeout":
            log.info(
                "%s: %s crawl (%s): %d scanned, %d healed, %d failed, %d in split-brain, %d bytes",
                self.name, kind, reason, crawl.scanned, crawl.healed, crawl.failed, crawl.split_brain,
                crawl.bytes,
            )  # fmt: skip
        self.history.append(crawl)
        self._save_history()

    # ---- statistics on disk ----------------------------------------------------------------------------

    def _history_file(self) -> Path:
        return self.shd.state_dir / f"{self.name}.json"

    def _load_history(self) -> list[Crawl]:
        try:
            return [Crawl(**c) for c in json.loads(self._history_file().read_text())][-HISTORY:]
        except (OSError, ValueError, TypeError):
            return []

    def _save_history(self) -> None:
        path = self._history_file()
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps([asdict(c) for c in self.history]))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep heal statistics in %s: %s", path, exc)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self.volume is not None:
            await self.volume.aclose()
            self.volume = None


class Shd:
    def __init__(self, node: str, daemon: str, state_dir: Path) -> None:
        self.node = node
        self.daemon = daemon
        self.state_dir = state_dir
        self.healers: dict[str, VolumeHealer] = {}
        self.rpc = PeerClient()

    async def refresh(self) -> None:
        host, _, port = self.daemon.rpartition(":")
        try:
            reply = await self.rpc.call(host, int(port), "GET", "/v1/volumes", timeout=10)
        except MgmtError as exc:
            log.info("cannot list the volumes yet: %s", exc)
            return
        wanted = {v["name"]: v for v in reply.get("volumes", []) if wants_shd(v, self.node)}
        for name in list(self.healers):
            healer = self.healers[name]
            info = wanted.get(name)
            if info is None or info["id"] != healer.info["id"]:
                log.info("%s: no longer healed here", name)
                del self.healers[name]
                await healer.close()
        for name, info in wanted.items():
            healer_now = self.healers.get(name)
            if healer_now is None:
                log.info("%s: healing this host's bricks", name)
                self.healers[name] = VolumeHealer(self, info)
            elif (
                info["bricks"] != healer_now.info["bricks"]
                or info["replica_count"] != healer_now.info["replica_count"]
            ):
                # new or replaced copies: a fresh graph (the new bricks' addresses) and a full crawl
                log.info("%s: bricks changed: reconnecting for a full crawl", name)
                await healer_now.close()
                self.healers[name] = VolumeHealer(self, info, ("full", "bricks changed"))
            else:
                healer_now.info = info

    async def watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(POLL)

    def healer(self, name: str) -> VolumeHealer:
        found = self.healers.get(name)
        if found is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"the heal daemon on this host does not heal volume {name}"}),
                content_type="application/json",
            )
        return found

    async def close(self) -> None:
        for healer in list(self.healers.values()):
            await healer.close()
        self.healers.clear()
        await self.rpc.close()


# ---- control API (unix socket) ---------------------------------------------------------------------

SHD: web.AppKey[Shd] = web.AppKey("shd")


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def h_volumes(request: web.Request) -> web.Response:
    shd = request.app[SHD]
    return _json({"volumes": sorted(shd.healers), "pid": os.getpid()})


async def h_heal(request: web.Request) -> web.Response:
    body = await request.json()
    healer = request.app[SHD].healer(str(body["volume"]))
    kind = "full" if body.get("full") else "index"
    healer.trigger(kind, "requested")
    if body.get("wait"):
        try:
            await healer.wait_idle(float(body.get("timeout", 300)))
        except TimeoutError:
            return _json({"error": f"the {kind} heal did not finish in time"}, 504)
    last = healer.history[-1] if healer.history and body.get("wait") else None
    return _json({"volume": healer.name, "kind": kind, "crawl": asdict(last) if last else None})


async def h_statistics(request: web.Request) -> web.Response:
    healer = request.app[SHD].healer(request.query["volume"])
    crawls = [asdict(c) for c in healer.history]
    if healer.running is not None:
        crawls.append({**asdict(healer.running), "in_progress": True})
    return _json({"volume": healer.name, "crawls": crawls})


async def h_info(request: web.Request) -> web.Response:
    healer = request.app[SHD].healer(request.query["volume"])
    if healer.volume is None:
        return _json({"error": f"the heal daemon is not connected to {healer.name} yet"}, 503)
    bricks = await brick_entries(healer.afrs(), healer.local_bricks(), healer.info)
    return _json({"volume": healer.name, "bricks": bricks})


async def h_split_brain(request: web.Request) -> web.Response:
    body = await request.json()
    healer = request.app[SHD].healer(str(body["volume"]))
    if healer.volume is None:
        return _json({"error": f"the heal daemon is not connected to {healer.name} yet"}, 503)
    policy = str(body["policy"])
    source = body.get("source")
    files: list[str] = [str(body["file"])] if body.get("file") else []
    try:
        if not files:
            if policy != "source-brick":
                raise FopError(22, f"{policy} needs a FILE")
            files = await split_brain_paths(healer.afrs())
        results = [await resolve_one(healer, f, policy, source) for f in files]
    except FopError as exc:
        return _json({"error": exc.message}, 400)
    return _json({"volume": healer.name, "resolved": results})


async def resolve_one(healer: VolumeHealer, file: str, policy: str, source: Any) -> dict[str, Any]:
    """Resolve one FILE (a path or `gfid:UUID`) with `policy`; `source` is a brick name."""
    from mortar.xlators.cluster.afr.heal import resolve_split_brain

    assert healer.volume is not None
    bricks = [p for _, p in healer.local_bricks().values()]
    gfid = Gfid(file[5:]) if file.startswith("gfid:") else await find_gfid(healer.volume, file, bricks)
    errors = []
    for afr, _ in healer.afrs() or []:
        child: int | None = None
        if policy == "source-brick":
            names = {b["name"]: i for i, b in enumerate(healer.info["bricks"])}
            if str(source) not in names:
                raise FopError(22, f"{source} is not a brick of {healer.name}")
            child_name = client_of(healer.info, names[str(source)])
            found = [c for c, x in enumerate(afr.children) if x.name == child_name]
            if not found:
                continue
            child = found[0]
        try:
            chosen = await resolve_split_brain(afr, gfid, policy, child)
        except FopError as exc:
            errors.append(exc.message)
            continue
        by_client = {client_of(healer.info, i): b["name"] for i, b in enumerate(healer.info["bricks"])}
        return {"file": file, "gfid": str(gfid), "source": by_client.get(afr.children[chosen].name, "?")}
    raise FopError(22, f"{file}: " + ("; ".join(errors) or "not found in a replica set healed here"))


def make_app(shd: Shd) -> web.Application:
    app = web.Application()
    app[SHD] = shd
    app.router.add_get("/volumes", h_volumes)
    app.router.add_post("/heal", h_heal)
    app.router.add_get("/statistics", h_statistics)
    app.router.add_get("/info", h_info)
    app.router.add_post("/split-brain", h_split_brain)
    return app


# ---- process -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mortar-shd", description="mortar's self-heal daemon (one per host)")
    p.add_argument("--node", required=True, help="this host's node uuid (which bricks are local)")
    p.add_argument("--daemon", required=True, help="HOST:PORT of this host's mortard")
    p.add_argument("--socket", required=True, type=Path, help="unix socket of the control API")
    p.add_argument("--state-dir", required=True, type=Path, help="where crawl statistics are kept")
    p.add_argument("--pid-file", type=Path)
    p.add_argument("--log-file")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    shd = Shd(args.node, args.daemon, args.state_dir)
    runner = web.AppRunner(make_app(shd), access_log=None)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        args.socket.unlink()
    await web.UnixSite(runner, str(args.socket)).start()
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    watcher = loop.create_task(shd.watch())
    log.info("mortar-shd (node %s) serving on %s", args.node, args.socket)
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await runner.cleanup()
        await shd.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    return uvloop.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
