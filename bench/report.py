"""The seed scenario's outputs: markdown tables shaped like the seed's, ratios against Base and
against each mortar row's GlusterFS counterpart with the targets checked, and a PNG of the ratios."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from bench.common import Cell
from bench.seed import COUNTERPART, ROWS, Outcome, RowInfo

#: (row key, job) -> the ratio to the GlusterFS counterpart that row must reach
SMALL_JOBS = ("create", "stat", "delete")


def target(key: str, job: str) -> float | None:
    if job in ("seq read", "seq write"):
        return 1.0 if key in COUNTERPART else None
    if job.startswith("rand") and key in ("mortar-native", "mortar-custom", "mortar-nbd"):
        return 1.0
    if job in SMALL_JOBS and key in COUNTERPART:
        return 5.0
    return None


def counterpart(key: str, job: str) -> str | None:
    if key not in COUNTERPART:
        return None
    return "gluster-fuse" if job in SMALL_JOBS else COUNTERPART[key]


class Index:
    def __init__(self, outcome: Outcome) -> None:
        self.rows = outcome.rows
        self.by_label = {r.label: r for r in outcome.rows}
        self.cells = {(c.row, c.job): c for c in outcome.cells}
        self.jobs = list(dict.fromkeys(c.job for c in outcome.cells))
        self.base = next((r for r in outcome.rows if r.key == "base"), None)

    def cell(self, label: str, job: str) -> Cell | None:
        c = self.cells.get((label, job))
        return c if c is not None and c.runs else None

    def peer(self, row: RowInfo, job: str) -> RowInfo | None:
        key = counterpart(row.key, job)
        return next((r for r in self.rows if r.key == key and r.shape == row.shape), None)

    def ratio(self, row: RowInfo, other: RowInfo | None, job: str) -> float | None:
        a = self.cell(row.label, job)
        b = self.cell(other.label, job) if other else None
        if a is None or b is None or not b.median:
            return None
        return a.median / b.median


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def seed_table(outcome: Outcome, job: str, title: str) -> str:
    """The seed's table for one sequential job: aggregate, slowest and fastest job, ratios."""
    ix = Index(outcome)
    out = [
        f"**{title}**",
        "",
        "| row | aggregate BW (MiB/s) | min BW (MiB/s) | max BW (MiB/s) | vs Base | vs GlusterFS |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in ix.rows:
        c = ix.cells.get((row.label, job))
        if c is None:
            continue
        if not c.runs:
            out.append(f"| {row.label} | {c.note} | | | | |")
            continue
        agg = f"{_num(c.median)} ({_num(min(c.runs))}-{_num(max(c.runs))})"
        jmin = _num(statistics.median(c.job_min)) if c.job_min else ""
        jmax = _num(statistics.median(c.job_max)) if c.job_max else ""
        vs_base = _ratio(ix.ratio(row, ix.base, job)) if row.key != "base" else ""
        vs_peer = _ratio(ix.ratio(row, ix.peer(row, job), job))
        out.append(f"| {row.label} | {agg} | {jmin} | {jmax} | {vs_base} | {vs_peer} |")
    return "\n".join(out)


def jobs_table(outcome: Outcome) -> str:
    """Every row and job: median (min-max) of the runs; the unit is in the header."""
    ix = Index(outcome)
    units = {c.job: c.unit for c in outcome.cells}
    out = [
        "| row | " + " | ".join(f"{j} ({units[j]})" for j in ix.jobs) + " |",
        "| --- |" + " ---: |" * len(ix.jobs),
    ]
    for row in ix.rows:
        parts = []
        for job in ix.jobs:
            c = ix.cells.get((row.label, job))
            if c is None:
                parts.append("")
            elif not c.runs:
                parts.append(c.note)
            else:
                parts.append(f"{_num(c.median)} ({_num(min(c.runs))}-{_num(max(c.runs))})")
        out.append(f"| {row.label} | " + " | ".join(parts) + " |")
    return "\n".join(out)


def ratio_table(outcome: Outcome) -> tuple[str, list[str]]:
    """mortar rows: ratio to Base / to the GlusterFS counterpart per job, with the target verdict.
    Also returns one line per missed target."""
    ix = Index(outcome)
    out = ["| mortar row | " + " | ".join(ix.jobs) + " |", "| --- |" + " ---: |" * len(ix.jobs)]
    missed: list[str] = []
    for row in ix.rows:
        if row.key not in COUNTERPART:
            continue
        parts = []
        for job in ix.jobs:
            peer = ix.peer(row, job)
            vs_peer = ix.ratio(row, peer, job)
            vs_base = ix.ratio(row, ix.base, job)
            if vs_peer is None and vs_base is None:
                c = ix.cells.get((row.label, job))
                parts.append(c.note.split(":")[0] if c is not None and c.note else "")
                continue
            goal = target(row.key, job)
            text = " / ".join(
                f"{_ratio(v)} {what}" for v, what in ((vs_peer, "GF"), (vs_base, "base")) if v is not None
            )
            if goal is not None and vs_peer is not None:
                ok = vs_peer >= goal
                text += f" {'met' if ok else 'MISS'} (>={goal:g}x)"
                if not ok and peer is not None:
                    missed.append(f"{row.label}: {job} {vs_peer:.2f}x {peer.label} (target >= {goal:g}x)")
            parts.append(text)
        out.append(f"| {row.label} | " + " | ".join(parts) + " |")
    return "\n".join(out), missed


def markdown(outcome: Outcome, header: str) -> str:
    parts = [header, ""]
    if any(c.job == "seq read" for c in outcome.cells):
        parts += [
            seed_table(outcome, "seq read", "Sequential read, 4 files, 1 MiB blocks, direct I/O, 4 jobs"),
            "",
        ]
    if any(c.job == "seq write" for c in outcome.cells):
        parts += [
            seed_table(outcome, "seq write", "Sequential write, 4 files, 1 MiB blocks, direct I/O, 4 jobs"),
            "",
        ]
    parts += ["**All jobs** (median of the runs, min-max in brackets)", "", jobs_table(outcome), ""]
    table, missed = ratio_table(outcome)
    parts += ["**mortar against its GlusterFS counterpart (GF) and the local disk (base)**", "", table, ""]
    if missed:
        parts += ["**Targets missed**", "", *[f"- {m}" for m in missed], ""]
    return "\n".join(parts)


def chart(outcome: Outcome, path: Path) -> bool:
    """Grouped bars: each mortar row's ratio to its GlusterFS counterpart per job (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    ix = Index(outcome)
    mortar_rows = [r for r in ix.rows if r.key in COUNTERPART]
    series: list[tuple[RowInfo, list[float]]] = []
    for row in mortar_rows:
        found = [ix.ratio(row, ix.peer(row, job), job) for job in ix.jobs]
        if any(v is not None for v in found):
            series.append((row, [v if v is not None else math.nan for v in found]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(ix.jobs) + 3), 5.5))
    width = 0.8 / len(series)
    for i, (row, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(ix.jobs))]
        ax.bar(xs, values, width, label=row.label.replace(ROWS[row.key], row.key))
    ax.axhline(1.0, color="black", linewidth=1)
    if any(j in SMALL_JOBS for j in ix.jobs):
        ax.axhline(5.0, color="grey", linewidth=1, linestyle="--")
        ax.text(len(ix.jobs) - 0.5, 5.0, " 5x (small-file target)", va="bottom", ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xticks(range(len(ix.jobs)))
    ax.set_xticklabels(ix.jobs, rotation=20)
    ax.set_ylabel("mortar / GlusterFS counterpart (log)")
    ax.set_title("mortar vs GlusterFS 10 (FUSE vs FUSE; native, NBD vs gfapi; small files vs FUSE)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
