"""`mortar-nbdd`: the NBD server mortard runs on each host (the issue's "run by mortard on each host").

It serves every *started* volume of the pool, each file an export named `VOLUME/path/to/image`,
on TCP (10809 by default) and a unix socket. The volume list comes from this host's mortard by
long poll (`GET /v1/volumes?wait=REVISION`), so a volume started later is served within moments
and a stopped or deleted one is dropped, without restarting the process: connections that still
use a dropped volume are closed (the client sees the disconnect as an I/O error, never a hang).
Each volume is opened as `mortar://DAEMON/VOLUME`, so option changes reach it by live graph switch.

When mortard is down the server keeps serving what it has: QEMU's data path does not depend on the
management daemon. The served state is written to `--state-file` (JSON) for `volume status`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from mortar.client import AsyncVolume
from mortar.core.log import setup_logging
from mortar.frontends.nbd.__main__ import listen, stop_on_signals
from mortar.frontends.nbd.server import NbdServer
from mortar.frontends.nbd.volume import VolumeExport, VolumeExportProvider
from mortar.mgmt.model import MgmtError
from mortar.mgmt.rest import PeerClient

log = logging.getLogger("mortar.mgmt.nbdd")  # not __name__: this module also runs as __main__

POLL_TIMEOUT = 30.0  # seconds one long poll of the volume list waits for a change
RETRY_FIRST = 0.5
RETRY_MAX = 10.0
CONNECT_TIMEOUT = 30.0
DROP_TIMEOUT = 15.0  # seconds a dropped volume's connections get to finish requests in flight


class Follower:
    """Keeps the provider's volumes equal to the pool's started volumes (by name and id)."""

    def __init__(self, daemon: str, server: NbdServer, provider: VolumeExportProvider, state: State) -> None:
        self.daemon = daemon
        self.server = server
        self.provider = provider
        self.state = state
        self.rpc = PeerClient()
        #: name -> (volume id, open volume) for the volumes served now
        self.served: dict[str, tuple[str, AsyncVolume]] = {}
        #: name -> (volume id, task opening it) for started volumes not served yet
        self.opening: dict[str, tuple[str, asyncio.Task[None]]] = {}

    async def run(self) -> None:
        host, _, port = self.daemon.rpartition(":")
        revision = ""
        backoff = RETRY_FIRST
        while True:
            try:
                reply = await self.rpc.call(
                    host.strip("[]"), int(port), "GET", "/v1/volumes",
                    params={"wait": revision, "timeout": str(POLL_TIMEOUT)} if revision else None,
                    timeout=POLL_TIMEOUT + 10,
                )  # fmt: skip
            except MgmtError as exc:  # mortard down or without quorum: keep serving what we have
                log.info("cannot list the volumes (%s); retrying in %gs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            backoff = RETRY_FIRST
            revision = str(reply.get("revision", ""))
            started = {
                str(v["name"]): str(v["id"]) for v in reply.get("volumes", []) if v.get("status") == "Started"
            }
            await self.apply(started)
            if not revision:  # a daemon without the long poll: poll
                await asyncio.sleep(2.0)

    async def apply(self, started: dict[str, str]) -> None:
        for name, (ident, _) in list(self.served.items()):
            if started.get(name) != ident:
                await self.drop(name)
        for name, (ident, task) in list(self.opening.items()):
            if started.get(name) != ident:
                log.info("volume %s: no longer started, not opening it", name)
                del self.opening[name]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for name, ident in started.items():
            if name not in self.served and name not in self.opening:
                task = asyncio.get_running_loop().create_task(
                    self._open(name, ident), name=f"nbd open {name}"
                )
                self.opening[name] = (ident, task)
        self.state.write(self)

    async def _open(self, name: str, ident: str) -> None:
        """Open the volume until it works (its bricks may still be starting), then export it."""
        uri = f"mortar://{self.daemon}/{name}"
        backoff = RETRY_FIRST
        while True:
            try:
                volume = await AsyncVolume.connect(uri, timeout=CONNECT_TIMEOUT)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # volfile not ready (503), bricks down, ...: all mean "later"
                log.info("volume %s: cannot open it yet (%s); retrying in %gs", name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
        self.opening.pop(name, None)
        self.provider.add_volume(name, volume)
        self.served[name] = (ident, volume)
        log.info("volume %s: serving its images as exports %s/...", name, name)
        self.state.write(self)

    async def drop(self, name: str) -> None:
        """Stop offering the volume; close the connections using it, then the volume."""
        _, volume = self.served.pop(name)
        self.provider.remove_volume(name)
        self.state.write(self)
        closed = await self.server.disconnect(
            lambda b: isinstance(b, VolumeExport) and b.volume is volume, DROP_TIMEOUT
        )
        log.info("volume %s: no longer started: dropped (%d connections closed)", name, closed)
        try:
            async with asyncio.timeout(DROP_TIMEOUT):
                await volume.aclose()
        except (TimeoutError, OSError) as exc:
            log.warning("volume %s: closing it failed: %s", name, exc or "timed out")

    async def close(self) -> None:
        for _, task in self.opening.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.opening.values()), return_exceptions=True)
        self.opening.clear()
        for name in list(self.served):
            await self.drop(name)
        await self.rpc.close()


class State:
    """What this server does, as JSON in a file mortard reads for `volume status`."""

    def __init__(self, path: Path | None, tcp: str, socket: str) -> None:
        self.path = path
        self.tcp = tcp
        self.socket = socket

    def write(self, follower: Follower | None) -> None:
        if self.path is None:
            return
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "tcp": self.tcp,
            "socket": self.socket,
            "volumes": sorted(follower.served) if follower else [],
            "opening": sorted(follower.opening) if follower else [],
            "updated": time.time(),
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write the state file %s: %s", self.path, exc)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mortar-nbdd",
        description="mortar's NBD server as mortard runs it on each host: every started volume of the pool, "
        "exports VOLUME/path/to/image (nbd://HOST:PORT/VOLUME/path, nbd+unix:///VOLUME/path?socket=PATH).",
    )
    p.add_argument("--daemon", required=True, help="HOST:PORT of this host's mortard (the volume list)")
    p.add_argument("--socket", help="unix socket to listen on")
    p.add_argument("--port", type=int, help="TCP port to listen on")
    p.add_argument("--host", default="0.0.0.0", help="TCP address to listen on (%(default)s)")
    p.add_argument("--state-file", type=Path, help="JSON file describing what is served (for mortard)")
    p.add_argument("--max-inflight", type=int, default=64, help="requests in flight per connection")
    p.add_argument("--log-file")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = p.parse_args(argv)
    if not args.socket and not args.port:
        p.error("give --socket, --port or both")
    return args


async def serve(args: argparse.Namespace) -> int:
    stop = stop_on_signals()
    provider = VolumeExportProvider()
    server = NbdServer(provider, max_inflight=args.max_inflight)
    tcp = await listen(server, args.socket, args.host, args.port or None)  # --port 0: no TCP
    state = State(args.state_file, tcp, args.socket or "")
    follower = Follower(args.daemon, server, provider, state)
    state.write(follower)
    watcher = asyncio.get_running_loop().create_task(follower.run(), name="nbd volume list")
    log.info(
        "mortar-nbdd serving the pool's started volumes (tcp %s, unix %s)", tcp or "-", args.socket or "-"
    )
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DROP_TIMEOUT + 5):
                await server.close()
                await follower.close()
        if args.state_file:
            with contextlib.suppress(OSError):
                args.state_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    try:
        return uvloop.run(serve(args))
    except OSError as exc:  # the port or socket is taken
        log.error("cannot serve: %s", exc)
        print(f"mortar-nbdd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
