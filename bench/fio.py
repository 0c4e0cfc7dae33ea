"""fio jobs against the three kinds of target the table has: a directory (local disk or a FUSE
mount), a GlusterFS volume through gfapi, and NBD exports.

The seed's job is sequential, 4 files, 1 MiB blocks, direct I/O, one job per file with one request
in flight each (fio's synchronous engines); the random jobs are one file, 4 KiB, 32 in flight
(libaio on a directory, gfapi_async, or the nbd engine). Figures follow fio's own group report:
aggregate = all bytes / the longest job's runtime; min and max = the slowest and fastest job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import procs

MIB = 1 << 20


@dataclass(frozen=True)
class Target:
    """Where fio runs. kind: "dir" (directory), "gfapi" (volume on brick host) or "nbd"
    (`uri(name)` gives the NBD URI of the image called `name`, which must exist at full size)."""

    kind: str
    directory: Path | None = None
    volume: str = ""
    host: str = ""
    uri: Callable[[str], str] | None = None


@dataclass
class Result:
    """One fio run: aggregate and per-job bandwidth (MiB/s), IOPS."""

    aggregate: float
    job_min: float
    job_max: float
    iops: float


def _engine(target: Target, depth: int) -> list[str]:
    if target.kind == "dir":
        return ["ioengine=psync"] if depth == 1 else ["ioengine=libaio", f"iodepth={depth}"]
    if target.kind == "gfapi":
        engine = "gfapi" if depth == 1 else "gfapi_async"
        return [f"ioengine={engine}", f"volume={target.volume}", f"brick={target.host}", f"iodepth={depth}"]
    if target.kind == "nbd":
        return ["ioengine=nbd", f"iodepth={depth}"]
    raise ValueError(target.kind)


def _file(target: Target, name: str) -> list[str]:
    if target.kind == "nbd":
        assert target.uri is not None
        return [f"uri={target.uri(name)}"]
    if target.kind == "dir":
        assert target.directory is not None
        return [f"filename={target.directory / name}"]
    return [f"filename={name}"]


def jobfile(
    target: Target,
    rw: str,
    files: list[str],
    size: int | list[int],
    bs: int,
    depth: int,
    runtime: float | None = None,
) -> str:
    """One section per file (`size` per file, or one for all); `runtime` makes the run time-based."""
    sizes = size if isinstance(size, list) else [size] * len(files)
    glob = [
        f"rw={rw}",
        f"bs={bs}",
        "direct=1",
        "randrepeat=0",
        "norandommap=1",
        "fallocate=none",
        *_engine(target, depth),
    ]
    if runtime is not None:
        glob += ["time_based=1", f"runtime={runtime:g}s", "ramp_time=0"]
    lines = ["[global]", *glob]
    for i, (name, n) in enumerate(zip(files, sizes, strict=True)):
        lines += [f"[job{i}]", f"size={n}", *_file(target, name)]
    return "\n".join(lines) + "\n"


def run(
    target: Target,
    rw: str,
    files: list[str],
    size: int | list[int],
    bs: int,
    depth: int,
    workdir: Path,
    runtime: float | None = None,
    timeout: float = 1800,
) -> Result:
    """Run one fio job file and reduce its JSON report."""
    path = workdir / f"fio-{target.kind}-{rw}.job"
    path.write_text(jobfile(target, rw, files, size, bs, depth, runtime))
    res = procs.run(["fio", "--output-format=json", str(path)], timeout=timeout, check=False)
    try:
        report = json.loads(res.stdout[res.stdout.index("{") :])
    except ValueError:
        raise RuntimeError(
            f"fio failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}"
        ) from None
    if res.returncode != 0 or any(j.get("error") for j in report["jobs"]):
        errs = [j.get("error") for j in report["jobs"]]
        raise RuntimeError(f"fio failed ({res.returncode}, job errors {errs}): {res.stderr.strip()[-400:]}")
    side = "read" if rw in ("read", "randread") else "write"
    jobs = [j[side] for j in report["jobs"]]
    total = sum(j["io_bytes"] for j in jobs)
    longest = max(j["runtime"] for j in jobs) / 1000  # ms
    per_job = [j["io_bytes"] / MIB / (j["runtime"] / 1000) for j in jobs if j["runtime"]]
    return Result(
        aggregate=total / MIB / longest if longest else 0.0,
        job_min=min(per_job, default=0.0),
        job_max=max(per_job, default=0.0),
        iops=sum(j["iops"] for j in jobs),
    )
