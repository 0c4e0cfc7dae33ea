"""`mortard`: the node daemon. One per host: the trusted pool, volumes, brick processes, volfiles.

The daemon keeps no state of its own beyond its identity (`WORKDIR/node.json`) and which store it
uses; everything else is in the pool's configuration store, which it watches. Each daemon makes
its own bricks match what the store says (`reconcile`), at start and after every change, so a
daemon that was down catches up when it returns, and a change made through any daemon reaches the
bricks wherever they are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

import uvloop
from aiohttp import web

from mortar import __version__
from mortar.core.log import setup_logging
from mortar.mgmt import hosts
from mortar.mgmt.api import make_app
from mortar.mgmt.model import (
    PEERS,
    PORTMAP,
    VOLUMES,
    BrickState,
    MgmtError,
    PortEntry,
    brick_state_key,
    portmap_key,
)
from mortar.mgmt.nbd_service import DEFAULT_PORT as NBD_PORT
from mortar.mgmt.nbd_service import NbdConfig, NbdService, default_socket
from mortar.mgmt.pool import Pool
from mortar.mgmt.rest import DEFAULT_PORT, PeerClient
from mortar.mgmt.store import Store, StoreCompacted, StoreError
from mortar.mgmt.storeman import StoreHolder
from mortar.mgmt.supervisor import BrickProcess, BrickRun, Supervisor
from mortar.mgmt.volumes import Volumes

log = logging.getLogger("mortar.mgmt.daemon")  # not __name__: this module also runs as __main__


def node_uuid(workdir: Path) -> str:
    """This node's identity, created once and kept in the workdir (glusterd.info's role)."""
    path = workdir / "node.json"
    if path.exists():
        return str(json.loads(path.read_text())["uuid"])
    ident = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"uuid": ident, "created_by": f"mortar {__version__}"}) + "\n")
    os.replace(tmp, path)
    return ident


class StoreWriter:
    """Writes this node owns (port map, brick state), retried until the store takes them: a brick
    that starts while the pool has no quorum is still reported once quorum returns."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pending: dict[str, bytes] = {}
        self._wake = asyncio.Event()

    def put(self, key: str, value: bytes) -> None:
        self.pending[key] = value
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for key, value in list(self.pending.items()):
                try:
                    await self.node.store().put(key, value)
                except (StoreError, MgmtError) as exc:
                    log.warning("cannot record %s yet: %s", key, exc)
                    await asyncio.sleep(1.0)
                    self._wake.set()
                    break
                if self.pending.get(key) == value:
                    del self.pending[key]


class Node:
    """Everything one daemon runs, shared by the API handlers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.workdir = Path(args.workdir).resolve()
        self.logdir = Path(args.logdir).resolve()
        self.listen: str = args.listen
        self.port: int = args.port
        self.etcd_ports: tuple[int, int] = (
            args.etcd_client_port or self.port + 1,
            args.etcd_peer_port or self.port + 2,
        )
        self.uuid = node_uuid(self.workdir)
        self.hostnames: list[str] = args.hostname or hosts.default_hostnames(self.listen)
        self.holder = StoreHolder(self.workdir, self.logdir, self.uuid)
        self.rpc = PeerClient()
        self.writer = StoreWriter(self)
        self.supervisor = Supervisor(self.workdir, self.logdir, self._publish_brick, self._brick_created)
        self.pool = Pool(self)
        self.volumes = Volumes(self)
        #: this host's NBD server: every started volume's images as exports VOLUME/path
        self.nbd = NbdService(self.workdir, self.logdir, self.local_api(), nbd_config(args, self.workdir))
        self.supervisor.companions.append(self.nbd.detach)
        self._reconcile = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: set when the daemon stops: long polls answer at once instead of holding the shutdown
        self.closing = False
        #: the store has been read once and this node's bricks are being looked after
        self.synced = False

    def store(self) -> Store:
        return self.holder.store()

    def local_api(self) -> str:
        """HOST:PORT at which processes on this host reach this daemon's API."""
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::", "") else self.listen
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # ---- reacting to the store ---------------------------------------------------------------

    def reconcile_soon(self) -> None:
        self._reconcile.set()

    def store_switched(self) -> None:
        """The store moved (probe, join, leave): re-publish and re-check everything."""
        self.reconcile_soon()
        self._notify_change()

    def change_event(self) -> asyncio.Event:
        """Set at the next change of volumes or port map (volfile long-polls wait on it)."""
        return self._changed

    def _notify_change(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _watch(self) -> None:
        while True:
            store = await self.holder.wait_ready()
            try:
                async with store.watch("/") as events:
                    await self.pool.publish_me()
                    if not self.synced:
                        await self._unverify_bricks(store)
                        self.synced = True
                    self.reconcile_soon()
                    self._notify_change()
                    async for ev in events:
                        if ev.key.startswith(VOLUMES):
                            self.reconcile_soon()
                        if ev.key.startswith((VOLUMES, PORTMAP, PEERS)):
                            self._notify_change()
                        if ev.key.startswith(PEERS):
                            await self.holder.refresh_endpoints()
            except StoreCompacted:
                continue
            except (StoreError, MgmtError) as exc:
                log.warning("watching the store failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _unverify_bricks(self, store: Store) -> None:
        """At start, nothing is known about this node's bricks until the supervisor has looked:
        their port map entries say offline until each is adopted or started again."""
        for key, raw in (await store.get_prefix(PORTMAP)).items():
            entry = PortEntry.from_json(raw)
            if entry.node == self.uuid and entry.online:
                entry.online, entry.pid, entry.error = False, 0, "its node daemon restarted: checking"
                await store.put(key, entry.to_json())

    async def _reconcile_loop(self) -> None:
        while True:
            await self._reconcile.wait()
            self._reconcile.clear()
            try:
                wanted = await self.volumes.wanted_local()
                await self.supervisor.ensure(wanted)
                self._forget_deleted({v.name for v in await self.volumes.all()})
            except (StoreError, MgmtError) as exc:
                log.warning("cannot reconcile the bricks yet: %s", exc)
                await asyncio.sleep(1.0)
                self._reconcile.set()

    def _forget_deleted(self, existing: set[str]) -> None:
        """Remove the local volfiles of volumes deleted from the pool."""
        vols = self.workdir / "vols"
        for d in vols.iterdir() if vols.is_dir() else ():
            if d.name not in existing and not self.supervisor.status(d.name):
                shutil.rmtree(d, ignore_errors=True)
                log.info("volume %s is gone: removed its volfiles", d.name)

    def _publish_brick(self, proc: BrickProcess) -> None:
        st = proc.status
        entry = PortEntry(st.volume, st.port, proc.run.socket, st.pid, st.online, self.uuid, st.error)
        self.writer.put(portmap_key(st.host, st.path), entry.to_json())

    def _brick_created(self, run: BrickRun) -> None:
        self.writer.put(brick_state_key(run.volume, run.index), BrickState(initialized=True).to_json())

    # ---- lifecycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.holder.open()
        runner = web.AppRunner(
            make_app(self), access_log=None, handler_cancellation=True, shutdown_timeout=5.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.listen, self.port, reuse_address=True)
        try:
            await site.start()
            loop = asyncio.get_running_loop()
            for coro in (self._watch(), self._reconcile_loop(), self.writer.run()):
                self._tasks.append(loop.create_task(coro))
            self.nbd.start()
            log.info(
                "mortard %s (node %s, %s) listening on %s:%d", __version__, self.uuid,
                ", ".join(self.hostnames), self.listen, self.port,
            )  # fmt: skip
            await stop.wait()
        finally:
            log.info("mortard stopping (bricks keep running)")
            self.closing = True
            self._notify_change()
            await runner.cleanup()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.supervisor.detach_all()
            await self.rpc.close()
            await self.holder.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mortard", description="mortar's node daemon: pool, volumes, bricks.")
    p.add_argument(
        "--workdir", default="/var/lib/mortar", help="state: node id, store, volfiles (%(default)s)"
    )
    p.add_argument("--logdir", default="/var/log/mortar", help="daemon, etcd and brick logs (%(default)s)")
    p.add_argument("--listen", default="0.0.0.0", help="address of the HTTP API (%(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the HTTP API (%(default)s)")
    p.add_argument("--hostname", action="append", help="a name peers know this node by (repeatable)")
    p.add_argument("--etcd-client-port", type=int, default=0, help="etcd client port (default PORT+1)")
    p.add_argument("--etcd-peer-port", type=int, default=0, help="etcd peer port (default PORT+2)")
    p.add_argument(
        "--nbd-port", type=int, default=NBD_PORT,
        help="TCP port of this host's NBD server (exports VOLUME/path of every started volume; %(default)s; "
        "0: no TCP listener)",
    )  # fmt: skip
    p.add_argument("--nbd-listen", help="address of the NBD server's TCP listener (default: --listen's)")
    p.add_argument(
        "--nbd-socket",
        help="unix socket of the NBD server (default /run/mortar/nbd.sock for the default workdir, else "
        "WORKDIR/run/nbd.sock; 'none': no unix socket)",
    )
    p.add_argument("--no-nbd", action="store_true", help="run no NBD server on this host")
    p.add_argument("--log-file", help="daemon log (default LOGDIR/mortard.log; '-' for stderr)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--pid-file", help="write the daemon's pid here (default WORKDIR/mortard.pid)")
    p.add_argument("--foreground", action="store_true", help="do not detach from the terminal")
    args = p.parse_args(argv)
    if args.port == 24007:
        p.error("port 24007 is GlusterFS's glusterd port; pick another")
    if not 0 <= args.nbd_port < 65536:
        p.error(f"--nbd-port {args.nbd_port}: not a port")
    if args.nbd_socket and args.nbd_socket != "none" and len(os.fsencode(args.nbd_socket)) > 107:
        p.error(f"--nbd-socket {args.nbd_socket}: too long for a unix socket address (108 bytes)")
    return args


def nbd_config(args: argparse.Namespace, workdir: Path) -> NbdConfig:
    """The NBD service's settings from the flags (an empty config when it is off)."""
    if args.no_nbd:
        return NbdConfig(port=0, socket="")
    socket = args.nbd_socket or default_socket(workdir)
    return NbdConfig(args.nbd_listen or args.listen, args.nbd_port, "" if socket == "none" else socket)


def _daemonize() -> None:
    """The classic double fork: no controlling terminal, our own session (and process group)."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = Node(args)
    try:
        await node.run(stop)
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        print(f"mortard: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir, logdir = Path(args.workdir), Path(args.logdir)
    workdir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    lock = os.open(workdir / "mortard.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"mortard: another mortard already runs with workdir {workdir}", file=sys.stderr)
        return 1
    if not args.foreground:
        _daemonize()
    pid_file = Path(args.pid_file or workdir / "mortard.pid")
    pid_file.write_text(f"{os.getpid()}\n")
    setup_logging(
        args.log_level, None if args.log_file == "-" else args.log_file or str(logdir / "mortard.log")
    )
    try:
        return uvloop.run(_serve(args))
    finally:
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()


if __name__ == "__main__":
    sys.exit(main())
