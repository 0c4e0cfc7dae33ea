"""`python -m mortar.thinpool create|info|check`: the tool behind `mortar thinpool ...`.

Exit status: 0 success (check: clean), 1 check found problems, 2 error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mortar.core.errors import FopError
from mortar.core.options import parse_size
from mortar.thinpool.pool import ThinPool


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mortar.thinpool", description="Manage mortar thin pools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="make a pool on a file or block device")
    c.add_argument("device", help="backing file (created if missing) or block device")
    c.add_argument("--size", type=_size, help="pool size, e.g. 10GiB (default: the device's size)")
    c.add_argument("--block-size", type=_size, default=64 << 10, help="data block size (default 64KiB)")
    c.add_argument("--metadata", help="metadata file (default DEVICE.meta; required for block devices)")
    c.add_argument("--low-water", type=int, help="free blocks below which a low-water event fires")
    c.add_argument("--force", action="store_true", help="overwrite an existing pool")
    for name, text in (("info", "show pool and volume usage"), ("check", "verify metadata consistency")):
        s = sub.add_parser(name, help=text)
        s.add_argument("device")
        s.add_argument("--metadata", help="metadata file (default: as recorded in the superblock)")
        s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _info(pool: ThinPool, as_json: bool) -> None:
    stats = asdict(pool.stats())
    vols = [v.info() for v in pool.volumes()]
    if as_json:
        print(json.dumps({"pool": stats, "volumes": vols}, indent=2))
        return
    for key, value in stats.items():
        print(f"{key:>16}: {value:.3f}" if isinstance(value, float) else f"{key:>16}: {value}")
    if vols:
        print(f"\n{'volume':<24} {'size':>14} {'mapped':>10} {'exclusive':>10} {'shared':>10}  origin")
        for v in vols:
            print(
                f"{v['name']:<24} {v['size']:>14} {v['mapped_blocks']:>10} {v['exclusive_blocks']:>10} "
                f"{v['shared_blocks']:>10}  {v['origin'] or '-'}"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "create":
            pool = ThinPool.create(
                args.device,
                metadata_path=args.metadata,
                size=args.size,
                block_size=args.block_size,
                low_water=args.low_water,
                commit_interval=0,
                force=args.force,
            )
            with pool:
                st = pool.stats()
                print(f"created pool {st.uuid}: {st.data_blocks} blocks of {st.block_size} bytes")
            return 0
        with ThinPool.open(
            args.device, metadata_path=args.metadata, commit_interval=0, read_only=True
        ) as pool:
            if args.cmd == "info":
                _info(pool, args.json)
                return 0
            problems = pool.check()
            if args.json:
                print(json.dumps({"clean": not problems, "problems": problems}))
            else:
                print("\n".join(problems) if problems else "clean")
            return 1 if problems else 0
    except FopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
