"""`make bench`: mortar beside its anchors (the local disk, GlusterFS 10) in one run, with ratios.

    bench/run.py                      the seed's full table (about 31 minutes on 2 cores)
    bench/run.py --quick              the same, tiny sizes, one run per cell, one brick (~2 minutes)
    bench/run.py --rows base,gluster-native,mortar-native --shapes 1 --jobs seqread,seqwrite
    bench/run.py --profile ...        mortar's processes under py-spy; profiles and their top
                                      functions are saved beside the results
    bench/run.py --scenario foundation   the native client through one brick vs the local disk
    bench/run.py --scenario thin      thin volumes vs a raw file: I/O, snapshot time, clone (issue 7)
    bench/run.py --scenario heal      replica-3 self-heal throughput, mortar vs GlusterFS (issue 4)
    bench/run.py --scenario all       seed, then thin, then heal (what `make bench` runs)

Rows: base, gluster-fuse, gluster-native, mortar-fuse, mortar-nbd, mortar-native, mortar-custom.
Shapes: 1 (one brick), 3 (replica 3 on this host). Jobs: seqread, seqwrite, randread, randwrite,
convert, smallfiles. Must run as root (GlusterFS, FUSE, dropping caches, the network namespace).

Both systems' servers and all their clients run in a network namespace of the run's own,
mortar-bench-<pid> (address 198.18.0.1; see it with `ip netns exec mortar-bench-<pid> ss -ltnp`);
nothing listens on the host's network. It is removed at the end, and a run deletes those left by
benchmarks that were killed (bench/netns.py).

Outputs go to bench/results/: <name>.json (every run of every cell), <name>.md (the tables) and
<name>.png (mortar / GlusterFS ratios). <name> is "seed" for a full default run, "seed-quick" for
--quick and "seed-partial" for a narrowed one, so a trial never replaces the published table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import foundation, heal, procs, report, seed, thin
from bench.common import markdown_table
from bench.profile_top import summarise

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ROWS = list(seed.ROWS)
DEFAULT_JOBS = list(seed.JOBS)
QUICK = {"size_mib": 16, "rand_mib": 16, "seconds": 1.0, "convert_mib": 64, "files": 200, "reps": 1}


def _list(value: str, allowed: list[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})"
        )
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scenario",
        default="seed",
        choices=["seed", "foundation", "thin", "heal", "all"],
        help="seed (default: the seed's table), foundation, thin (thin volumes vs a raw file, issue 7; "
        "uses --reps), heal (replica-3 self-heal, mortar vs GlusterFS, issue 4), all (seed, thin, heal; "
        "what `make bench` runs); results in bench/results/<scenario>[-quick].{json,md}",
    )
    ap.add_argument(
        "--rows",
        type=lambda v: _list(v, DEFAULT_ROWS, "row"),
        default=DEFAULT_ROWS,
        help="comma-separated rows (default: all)",
    )
    ap.add_argument(
        "--shapes",
        type=lambda v: _list(v, list(seed.SHAPES), "shape"),
        default=None,
        help="1 (one brick), 3 (replica 3); default both (--quick: 1)",
    )
    ap.add_argument(
        "--jobs",
        type=lambda v: _list(v, DEFAULT_JOBS, "job"),
        default=DEFAULT_JOBS,
        help="comma-separated jobs (default: all)",
    )
    ap.add_argument(
        "--size-mib",
        type=int,
        default=None,
        help="MiB per file of the sequential jobs (seed: 4 files, default 256; foundation: 1024)",
    )
    ap.add_argument("--rand-mib", type=int, default=256, help="MiB of the file the random jobs use")
    ap.add_argument("--seconds", type=float, default=None, help="duration of each random run (default 5)")
    ap.add_argument("--convert-mib", type=int, default=1024, help="size of the qemu-img convert image")
    ap.add_argument("--files", type=int, default=10000, help="files in the small-file job")
    ap.add_argument(
        "--files-budget",
        type=float,
        default=30.0,
        help="seconds after which the small-file create phase stops early (stat and delete then cover "
        "the files made; the count is in the JSON) so a slow row cannot stretch the run",
    )
    ap.add_argument("--reps", type=int, default=3, help="runs per cell (median, min and max kept)")
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes, one run per cell: a check that all works"
    )
    ap.add_argument("--profile", action="store_true", help="run mortar's processes under py-spy")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (volumes, logs)")
    ap.add_argument(
        "--mortar-via",
        choices=["mortard", "bricks"],
        default="mortard",
        help="make mortar's volumes through a private mortard (default) or start mortar-brick "
        "processes from volgen's volfiles directly",
    )
    ap.add_argument("--out", help="base name of the result files (default: see above)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.shapes is None:
        args.shapes = ["1"] if args.quick else list(seed.SHAPES)
    if args.profile and not (procs.BIN / "py-spy").exists():
        ap.error("--profile needs py-spy in the venv (pip install py-spy)")
    return args


def _name(args: argparse.Namespace) -> str:
    if args.out:
        return str(args.out)
    if args.quick:
        return "seed-quick"
    full = args.rows == DEFAULT_ROWS and args.jobs == DEFAULT_JOBS and args.shapes == list(seed.SHAPES)
    return "seed" if full else "seed-partial"


def run_seed(args: argparse.Namespace) -> int:
    name = _name(args)
    profile_dir = RESULTS / f"{name}-profiles" if args.profile else None
    if profile_dir is not None:
        shutil.rmtree(profile_dir, ignore_errors=True)
        profile_dir.mkdir(parents=True)
    settings = seed.Settings(
        rows=args.rows,
        shapes=args.shapes,
        jobs=args.jobs,
        file_mib=args.size_mib or 256,
        rand_mib=args.rand_mib,
        seconds=args.seconds or 5.0,
        convert_mib=args.convert_mib,
        files=args.files,
        files_budget=args.files_budget,
        reps=args.reps,
        profile_dir=profile_dir,
        keep=args.keep,
        mortar_via=args.mortar_via,
    )
    outcome = seed.run(settings)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    s = outcome.setup
    header = (
        f"mortar vs {s.get('glusterfs', 'GlusterFS')} on {os.uname().nodename} ({os.cpu_count()} CPUs, "
        f"kernel {os.uname().release}), {stamp}; {settings.reps} run(s) per cell, sequential jobs 4 x "
        f"{settings.file_mib} MiB, random {settings.rand_mib} MiB file for {settings.seconds:g}s, convert "
        f"{settings.convert_mib} MiB, {settings.files} small files (create stops after "
        f"{settings.files_budget:g}s); run took {s.get('elapsed_s', '?')}s."
    )
    md = report.markdown(outcome, header)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    (RESULTS / f"{name}.json").write_text(
        json.dumps(
            {
                "scenario": "seed",
                "when": stamp,
                "setup": s,
                "rows": [vars(r) for r in outcome.rows],
                "cells": [c.as_dict() for c in outcome.cells],
            },
            indent=1,
            default=str,
        )
    )
    png = RESULTS / f"{name}.png"
    drew = report.chart(outcome, png)
    print(md)
    print(f"\nresults: {RESULTS / name}.json, .md" + (", .png" if drew else ""))
    if profile_dir is not None:
        tops = [summarise(p, 12) for p in sorted(profile_dir.glob("*.speedscope.json"))]
        (profile_dir / "top.txt").write_text("\n\n".join(tops) + "\n")
        print(f"profiles: {profile_dir} (summary in top.txt)")
    return 0


def run_foundation(args: argparse.Namespace) -> int:
    profile = str(RESULTS / "foundation-brick.speedscope.json") if args.profile else None
    cells = foundation.run(
        size_mib=args.size_mib or 1024, reps=args.reps, seconds=args.seconds or 5.0, profile=profile
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "foundation.json"
    out.write_text(
        json.dumps(
            {"scenario": "foundation", "args": vars(args), "cells": [c.as_dict() for c in cells]},
            indent=1,
            default=str,
        )
    )
    print(markdown_table(cells, "local disk (os.pwrite/os.pread)"))
    print(f"\nraw results: {out}" + (f"\nbrick profile: {profile}" if profile else ""))
    return 0


def dispatch(args: argparse.Namespace) -> int:
    """One scenario, or all three in turn (one failing does not stop the others)."""
    scenarios = {
        "seed": lambda: run_seed(args),
        "foundation": lambda: run_foundation(args),
        "thin": lambda: thin.main(RESULTS, args.quick, args.reps, args.keep),
        "heal": lambda: heal.main(RESULTS, args.quick, args.keep),
    }
    if args.scenario != "all":
        return scenarios[args.scenario]()
    worst = 0
    for name in ("seed", "thin", "heal"):
        print(f"\n=== scenario {name} ===", flush=True)
        try:
            worst = max(worst, scenarios[name]())
        except Exception:
            logging.getLogger("bench").exception("scenario %s failed", name)
            worst = max(worst, 1)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("bench").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if os.geteuid() != 0:
        print("bench: run as root (GlusterFS, FUSE, dropping caches, network namespace)", file=sys.stderr)
        return 2
    try:
        return dispatch(args)
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
