"""`mortar-brick`: one brick process, serving the graph of one brick volfile until told to stop.

The top of a brick volfile is `protocol/server`; the process writes the port it listens on to
`--port-file` (the node daemon's port map reads it) and exits cleanly on SIGTERM or SIGINT. SIGHUP
re-reads the volfile and applies changed options in place (`volume set` of a brick-side key); a
changed topology needs a restart and is refused with a log line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from mortar.core.log import setup_logging
from mortar.core.options import OptionError
from mortar.graph.builder import Graph, VolfileError, load
from mortar.graph.volfile import parse

log = logging.getLogger("mortar.mgmt.brick")  # not __name__: this module also runs as __main__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mortar-brick",
        description="Serve one brick: build the translator graph of a brick volfile and listen for clients.",
    )
    parser.add_argument("--volfile", required=True, type=Path, help="brick volfile (top: protocol/server)")
    parser.add_argument("--log-file", help="write logs here instead of stderr")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--port-file", type=Path, help="write the listening port here once serving")
    parser.add_argument("--pid-file", type=Path, help="write the process id here once serving")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    graph = load(str(args.volfile))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, graph, args.volfile)
    await graph.start()
    port = getattr(graph.top, "listen_port", None)
    log.info("brick %s serving on port %s (pid %d)", graph.top.name, port, os.getpid())
    if args.port_file and port is not None:
        _write_atomically(args.port_file, f"{port}\n")
    if args.pid_file:
        _write_atomically(args.pid_file, f"{os.getpid()}\n")
    await stop.wait()
    log.info("brick %s stopping", graph.top.name)
    await graph.stop()
    return 0


def reload(graph: Graph, volfile: Path) -> None:
    """Apply the volfile's current options to the running graph (SIGHUP)."""
    try:
        specs = parse(volfile.read_text(), str(volfile))
        changed = graph.reconfigure(specs, str(volfile))
    except (OSError, VolfileError, OptionError) as exc:
        log.error("reload of %s refused, keeping the running graph: %s", volfile, exc)
        return
    log.info("reloaded %s: %s", volfile, ", ".join(changed) or "nothing changed")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    try:
        return uvloop.run(serve(args))
    except VolfileError as exc:
        print(f"mortar-brick: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a brick that cannot start says why in one line, the log has the rest
        log.exception("brick failed to start")
        print(f"mortar-brick: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
