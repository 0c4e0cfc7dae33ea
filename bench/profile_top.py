"""What dominates a py-spy profile: the top functions by own (self) and inclusive samples.

    python bench/profile_top.py PROFILE.speedscope.json [-n 15]

Reads py-spy's speedscope output, so a benchmark run with --profile can say in text where the
time went without opening a browser. Idle samples (the event loop waiting in select/epoll) are
counted apart, so the percentages are of the time the process was working.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

_IDLE = ("select", "poll", "epoll", "_run_once", "wait", "run_forever", "acquire", "sleep")


def summarise(path: Path, top: int = 15) -> str:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    # one entry per function: py-spy's frames differ by line number
    names = [f"{f['name']} ({Path(f.get('file', '?')).name})" for f in frames]
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = idle = 0.0
    for prof in data["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack:
                continue
            leaf = frames[stack[-1]]["name"]
            if any(leaf.startswith(i) or leaf.endswith(i) for i in _IDLE):
                idle += weight
                continue
            total += weight
            own[names[stack[-1]]] += weight
            for name in {names[i] for i in stack}:
                incl[name] += weight
    lines = [f"{path.name}: {total:.1f}s busy, {idle:.1f}s idle (sampled)"]
    if not total:
        return lines[0]
    lines.append("  self%  function")
    lines += [f"  {100 * n / total:5.1f}  {name}" for name, n in own.most_common(top)]
    lines.append("  incl%  function")
    lines += [f"  {100 * n / total:5.1f}  {name}" for name, n in incl.most_common(top + 5)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", type=Path)
    ap.add_argument("-n", type=int, default=15, help="functions to show")
    args = ap.parse_args()
    for p in args.profiles:
        print(summarise(p, args.n))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
