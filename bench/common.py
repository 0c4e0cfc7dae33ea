"""Shared pieces of the benchmarks: timing, repetitions, a brick started for the run, tables."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mortar.mgmt.volgen import Brick, VolumeDescription, brick_volfile, client_volfile

BIN = Path(sys.executable).parent


@dataclass
class Cell:
    """One measured figure: the median of `runs`, with min and max kept.

    `job_min`/`job_max` hold, per run, the slowest and fastest of the parallel jobs (the seed's
    Min BW and Max BW columns); `note` says why a cell has no runs (pending, n/a, failed)."""

    row: str
    job: str
    unit: str
    runs: list[float] = field(default_factory=list)
    job_min: list[float] = field(default_factory=list)
    job_max: list[float] = field(default_factory=list)
    note: str = ""
    #: other figures per run, e.g. "wall": qemu-img's rate including process start and exit
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        if self.runs:
            d.update(median=self.median, min=min(self.runs), max=max(self.runs))
        return d


def repeat(row: str, job: str, unit: str, reps: int, fn: Callable[[], float]) -> Cell:
    cell = Cell(row, job, unit)
    for _ in range(reps):
        cell.runs.append(fn())
    return cell


def drop_caches() -> bool:
    """Empty the page cache so reads come from the disk (root only); False when not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_dir() -> Path:
    """A scratch directory on the disk under test (not tmpfs): $MORTAR_BENCH_DIR or /var/tmp."""
    base = Path(os.environ.get("MORTAR_BENCH_DIR", "/var/tmp"))
    return Path(tempfile.mkdtemp(prefix="mortar-bench-", dir=base))


@contextlib.contextmanager
def brick_process(workdir: Path, profile: str | None = None) -> Iterator[Path]:
    """Start one `mortar-brick` on `workdir/brick`; yields the client volfile path."""
    desc = VolumeDescription("bench", str(uuid.uuid4()), [Brick("127.0.0.1", str(workdir / "brick"))])
    vol = workdir / "brick.vol"
    vol.write_text(brick_volfile(desc, 0, create=True))
    port_file = workdir / "brick.port"
    cmd = [
        str(BIN / "mortar-brick"),
        "--volfile",
        str(vol),
        "--port-file",
        str(port_file),
        "--log-file",
        str(workdir / "brick.log"),
        "--log-level",
        "WARNING",
    ]
    if profile:
        cmd = [str(BIN / "py-spy"), "record", "-o", profile, "-f", "speedscope", "--", *cmd]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"brick did not start; see {workdir / 'brick.log'}")
            time.sleep(0.05)
        desc.bricks[0] = Brick("127.0.0.1", desc.bricks[0].path, int(port_file.read_text()))
        client = workdir / "client.vol"
        client.write_text(client_volfile(desc))
        yield client
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT if profile else signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def markdown_table(cells: list[Cell], base_row: str) -> str:
    """Rows x jobs with median (min-max) and the ratio to `base_row` for the same job."""
    jobs = list(dict.fromkeys(c.job for c in cells))
    rows = list(dict.fromkeys(c.row for c in cells))
    index = {(c.row, c.job): c for c in cells}
    out = ["| row | " + " | ".join(jobs) + " |", "| --- |" + " --- |" * len(jobs)]
    for row in rows:
        parts = []
        for job in jobs:
            c = index.get((row, job))
            if c is None or not c.runs:
                parts.append(c.note if c is not None else "")
                continue
            text = f"{c.median:,.0f} {c.unit} ({min(c.runs):,.0f}-{max(c.runs):,.0f})"
            base = index.get((base_row, job))
            if base is not None and base.runs and row != base_row and base.median:
                text += f" **{c.median / base.median:.2f}x**"
            parts.append(text)
        out.append(f"| {row} | " + " | ".join(parts) + " |")
    return "\n".join(out)


def save_results(results: Path, name: str, md: str, doc: Mapping[str, object]) -> None:
    """Write a scenario's table (`NAME.md`) and raw figures (`NAME.json`) and print the table."""
    results.mkdir(exist_ok=True)
    (results / f"{name}.md").write_text(md + "\n")
    (results / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    print(md)
    print(f"\nresults: {results / name}.json, .md")
