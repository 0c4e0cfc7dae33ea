"""`mortar-rebalance`: one rebalance (or remove-brick drain) of one volume, as its own process.

mortard starts it on the host that took `volume rebalance NAME start` (or `remove-brick ... start`):
it opens the volume as a client (a fixed graph: the run must not switch graphs under itself), runs
the engine (`dht_rebalance.Rebalance`), and keeps its progress in `--status-file` (written
atomically, at most twice a second, and at the end), which mortard copies into the pool's store.
SIGTERM stops it after the files being moved now; a later run resumes where it stopped.
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
from pathlib import Path
from typing import Any

import uvloop

from mortar.client.volume import AsyncVolume
from mortar.core.log import setup_logging
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_rebalance import Rebalance, RebalanceError, RebalanceStatus

log = logging.getLogger("mortar.mgmt.rebalanced")  # not __name__: this module also runs as __main__

WRITE_EVERY = 0.5
CLIENT_SWITCH = 2.0
PASSES = 3  # drains run again while files are left behind (see `run`)


def write_status(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def public(status: RebalanceStatus) -> dict[str, Any]:
    out = status.to_dict()
    out["files"] = out["files"][:50]  # every file is counted; a few are listed with their reason
    return out


class Progress:
    """Writes snapshots to the status file, not more often than `WRITE_EVERY`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = 0.0
        self.latest: RebalanceStatus | None = None

    def __call__(self, status: RebalanceStatus) -> None:
        self.latest = status
        now = time.monotonic()
        if now - self.last >= WRITE_EVERY or status.state != "running":
            self.last = now
            write_status(self.path, public(status))


async def run(args: argparse.Namespace) -> int:
    progress = Progress(args.status_file)
    write_status(args.status_file, {"state": "starting", "pid": os.getpid()})
    try:
        volume = await AsyncVolume.connect(f"mortar://{args.daemon}/{args.volume}", timeout=30, watch=False)
    except (OSError, TimeoutError) as exc:
        write_status(args.status_file, {"state": "failed", "error": f"cannot open the volume: {exc}"})
        return 1
    try:
        dht = next((x for x in volume.graph.xlators.values() if isinstance(x, DistributeTranslator)), None)
        if dht is None:
            write_status(args.status_file, {"state": "failed", "error": "the volume has no distribute layer"})
            return 1
        try:
            rb = Rebalance(
                dht, force=args.force, throttle=args.throttle, fix_layout_only=args.fix_layout,
                decommission=args.decommission or (), on_progress=progress,
            )  # fmt: skip
        except RebalanceError as exc:
            write_status(args.status_file, {"state": "failed", "error": str(exc)})
            return 1
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def stop() -> None:
            stopping.set()
            rb.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        if args.decommission:  # give clients a moment to switch to the graph that drains them
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), CLIENT_SWITCH)
        final = await rb.run()
        # a client that had not yet switched to the graph naming the drained subvolumes may have
        # put a file on them behind the crawl: drain again (moved files are left alone)
        for _ in range(PASSES - 1):
            if final.state != "completed" or not final.decommissioned or final.drained or stopping.is_set():
                break
            log.info("%s: files left on drained subvolumes %s: another pass", args.volume, final.remaining)
            final = await rb.run()
        write_status(args.status_file, public(final))
        return 0 if final.state in ("completed", "stopped") else 1
    finally:
        await volume.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mortar-rebalance", description="one rebalance of one volume")
    p.add_argument("--daemon", required=True, help="HOST:PORT of this host's mortard")
    p.add_argument("--volume", required=True)
    p.add_argument("--status-file", required=True, type=Path)
    p.add_argument("--fix-layout", action="store_true", help="fix the layouts only, move no file")
    p.add_argument("--force", action="store_true", help="move files even onto fuller subvolumes")
    p.add_argument("--throttle", default="normal", choices=["lazy", "normal", "aggressive"])
    p.add_argument("--decommission", action="append", help="a subvolume to drain (remove-brick)")
    p.add_argument("--log-file")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_file)
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
