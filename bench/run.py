"""`make bench`: run mortar beside its anchors in one run and print the table with ratios.

    bench/run.py [--scenario foundation] [--size-mib 1024] [--reps 3] [--seconds 5] [--profile]

Raw results go to bench/results/<scenario>-<time>.json; the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import foundation
from bench.common import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = {"foundation": (foundation.run, "local disk (os.pwrite/os.pread)")}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="foundation", choices=sorted(SCENARIOS))
    parser.add_argument("--size-mib", type=int, default=1024, help="file size for sequential jobs")
    parser.add_argument("--reps", type=int, default=3, help="runs per cell (median, min, max kept)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each random-I/O run")
    parser.add_argument("--profile", action="store_true", help="run the brick under py-spy; save the profile")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    profile = None
    if args.profile:
        if not shutil.which("py-spy", path=str(Path(sys.executable).parent)):
            parser.error("--profile needs py-spy in the venv (pip install py-spy)")
        profile = str(RESULTS / f"{args.scenario}-{stamp}-brick.speedscope.json")
    fn, base = SCENARIOS[args.scenario]
    cells = fn(size_mib=args.size_mib, reps=args.reps, seconds=args.seconds, profile=profile)
    out = RESULTS / f"{args.scenario}-{stamp}.json"
    out.write_text(
        json.dumps(
            {"scenario": args.scenario, "args": vars(args), "cells": [c.as_dict() for c in cells]}, indent=2
        )
    )
    print(markdown_table(cells, base))
    print(f"\nraw results: {out}" + (f"\nbrick profile: {profile}" if profile else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
