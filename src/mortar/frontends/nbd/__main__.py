"""`python -m mortar.frontends.nbd`: serve mortar volumes (or a directory of image files) over NBD.

    python -m mortar.frontends.nbd --volfile /etc/mortar/vol.vol --socket /run/mortar/nbd.sock
    python -m mortar.frontends.nbd --volume data=mortar://node1/data --port 10809
    python -m mortar.frontends.nbd --dir /var/lib/images --socket /tmp/nbd.sock

Volume exports are named `VOLUME/path/to/image`; directory exports by their relative path.
`mortar nbd serve` runs this same server with the CLI's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

import uvloop

from mortar.client import AsyncVolume
from mortar.core.log import setup_logging
from mortar.frontends.nbd.backend import ExportProvider, FileExportProvider
from mortar.frontends.nbd.server import NbdServer
from mortar.frontends.nbd.volume import CACHE_MODES, DEFAULT_CACHE, VolumeExportProvider, open_volume

log = logging.getLogger(__name__)

#: what a volume that cannot be opened or a listener that cannot bind raise (volfile errors are
#: ValueErrors, an unknown translator type a LookupError)
SERVE_ERRORS = (OSError, RuntimeError, ValueError, LookupError, TimeoutError)
SHUTDOWN_TIMEOUT = 20.0  # seconds a stopping server waits for requests in flight


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m mortar.frontends.nbd",
        description="Serve the images of mortar volumes (exports VOLUME/path/to/image) or the files of a "
        "directory over NBD (nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME).",
    )
    ap.add_argument("sources", nargs="*", metavar="mortar://HOST[:PORT]/VOLUME", help="volumes to serve")
    ap.add_argument("--volfile", action="append", default=[], help="client volfile of a volume to serve")
    ap.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="NAME=VOLFILE|URI",
        help="a volume served under NAME (instead of its own name)",
    )
    ap.add_argument("--dir", help="directory of image files to export (instead of volumes)")
    ap.add_argument("--socket", help="unix socket path to listen on")
    ap.add_argument("--port", type=int, help="TCP port to listen on (0 picks a free one)")
    ap.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default %(default)s)")
    ap.add_argument("--read-only", action="store_true", help="refuse writes on every export")
    ap.add_argument("--default", help="export served to clients that ask for the empty name")
    ap.add_argument("--max-inflight", type=int, default=64, help="requests in flight per connection")
    ap.add_argument(
        "--cache",
        choices=sorted(CACHE_MODES),
        default=DEFAULT_CACHE,
        help="writeback (default): through the bricks' page caches; none: images are opened O_DIRECT, "
        "so bricks with storage.o-direct on bypass their page caches, as QEMU's cache=none asks",
    )
    ap.add_argument("--timeout", type=float, default=30, help="seconds to wait for a volume to come up")
    ap.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default %(default)s)")
    ap.add_argument("--log-file", help="log here instead of stderr")
    args = ap.parse_args(argv)
    if args.socket is None and args.port is None:
        ap.error("give --socket, --port or both")
    has_volumes = bool(args.sources or args.volfile or args.volume)
    if args.dir is not None:
        if has_volumes:
            ap.error("--dir serves a directory: give it without volumes")
        if not os.path.isdir(args.dir):
            ap.error(f"--dir {args.dir}: not a directory")
    elif not has_volumes:
        ap.error("give volumes (mortar:// URIs, --volfile, --volume NAME=...) or --dir")
    for item in args.volume:
        if "=" not in item or not item.split("=", 1)[0] or not item.split("=", 1)[1]:
            ap.error(f"--volume {item}: expected NAME=VOLFILE or NAME=mortar://HOST/VOLUME")
    return args


def volume_sources(args: argparse.Namespace) -> list[tuple[str | None, str]]:
    """(export name or None for the volume's own, volfile or URI) for every volume to serve."""
    named = [tuple(item.split("=", 1)) for item in args.volume]
    return [(None, s) for s in [*args.sources, *args.volfile]] + [(n, s) for n, s in named]


async def open_provider(args: argparse.Namespace, volumes: list[AsyncVolume]) -> ExportProvider:
    """The exports to serve; volumes opened on the way are appended to `volumes` (to close)."""
    if args.dir is not None:
        return FileExportProvider(args.dir, default=args.default)
    provider = VolumeExportProvider(default=args.default, cache=args.cache)
    for name, source in volume_sources(args):
        own_name, volume = await open_volume(source, timeout=args.timeout)
        volumes.append(volume)
        provider.add_volume(name or own_name, volume)
        log.info("serving volume %s from %s", name or own_name, source)
    return provider


def stop_on_signals() -> asyncio.Event:
    """An event SIGINT and SIGTERM set: the server then closes its connections after the requests in
    flight instead of dying in the middle of a guest's write."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def listen(
    server: NbdServer, socket: str | None, host: str, port: int | None, announce: bool = False
) -> str:
    """Listen on the unix `socket` (its directory created) and on TCP `port` (0: a free one) where
    given; with `announce`, print a `listening unix:PATH` / `listening tcp:HOST:PORT` line for each as
    it opens (what a parent process waits for). Returns the TCP address as HOST:PORT, "" without."""
    tcp = ""
    if socket:
        os.makedirs(os.path.dirname(os.path.abspath(socket)), exist_ok=True)
        await server.listen_unix(socket)
        if announce:
            print(f"listening unix:{socket}", flush=True)
    if port is not None:
        tcp = f"{host}:{await server.listen_tcp(host, port)}"
        if announce:
            print(f"listening tcp:{tcp}", flush=True)
    return tcp


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM; prints `listening ...` lines, then `ready`."""
    stop = stop_on_signals()
    volumes: list[AsyncVolume] = []
    provider: ExportProvider | None = None
    server: NbdServer | None = None
    try:
        provider = await open_provider(args, volumes)
        server = NbdServer(provider, read_only=args.read_only, max_inflight=args.max_inflight)
        await listen(server, args.socket, args.host, args.port, announce=True)
        print("ready", flush=True)
        await stop.wait()
    finally:
        await shutdown(server, provider, volumes)


async def shutdown(
    server: NbdServer | None, provider: ExportProvider | None, volumes: list[AsyncVolume]
) -> None:
    """Close connections (letting requests in flight finish), then the volumes; bounded, so that a
    request stuck in the stack cannot keep a stopped server alive."""
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT):
            if server is not None:
                await server.close()
            if isinstance(provider, FileExportProvider):
                provider.close()
            for volume in volumes:
                await volume.aclose()
    except TimeoutError:
        raise RuntimeError(
            f"requests still running {SHUTDOWN_TIMEOUT:g}s after the stop: abandoned"
        ) from None


def run(args: argparse.Namespace) -> None:
    """Serve in this thread until SIGINT or SIGTERM (parsed `args`; logging already set up)."""
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    try:
        run(args)
    except SERVE_ERRORS as exc:
        log.error("cannot serve: %s", exc)
        print(f"mortar nbd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
