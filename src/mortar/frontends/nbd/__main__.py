"""`python -m mortar.frontends.nbd --dir DIR`: serve the image files of a directory over NBD."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

import uvloop

from mortar.core.log import setup_logging
from mortar.frontends.nbd.backend import FileExportProvider
from mortar.frontends.nbd.server import NbdServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m mortar.frontends.nbd",
        description="Serve every file under DIR as an NBD export named by its relative path "
        "(nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME).",
    )
    ap.add_argument("--dir", required=True, help="directory of image files to export")
    ap.add_argument("--socket", help="unix socket path to listen on")
    ap.add_argument("--port", type=int, help="TCP port to listen on (0 picks a free one)")
    ap.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default %(default)s)")
    ap.add_argument("--read-only", action="store_true", help="refuse writes on every export")
    ap.add_argument("--default", help="export served to clients that ask for the empty name")
    ap.add_argument("--max-inflight", type=int, default=64, help="requests in flight per connection")
    ap.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING... (default %(default)s)")
    args = ap.parse_args(argv)
    if args.socket is None and args.port is None:
        ap.error("give --socket, --port or both")
    if not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: not a directory")
    return args


async def serve(args: argparse.Namespace) -> None:
    provider = FileExportProvider(args.dir, default=args.default)
    server = NbdServer(provider, read_only=args.read_only, max_inflight=args.max_inflight)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.socket:
            await server.listen_unix(args.socket)
            print(f"listening unix:{args.socket}", flush=True)
        if args.port is not None:
            port = await server.listen_tcp(args.host, args.port)
            print(f"listening tcp:{args.host}:{port}", flush=True)
        print("ready", flush=True)
        await stop.wait()
    finally:
        await server.close()
        provider.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
