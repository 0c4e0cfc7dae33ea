"""debug/io-stats: per-fop counts, errors and latency, bytes moved and I/O size histograms.

What `volume profile` shows: cumulative figures since start (or `reset()`) and interval figures since
the last `snapshot(reset_interval=True)`. Every fop of the table is wrapped by a generated method
that times the child call; the bookkeeping per call is a few attribute updates on preallocated
records, with no allocation beyond the call itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar

from mortar.core.fops import FOPS
from mortar.core.options import Option
from mortar.core.translator import Translator

_FOP_NAMES: tuple[str, ...] = tuple(FOPS)
_BUCKETS = 64  # power-of-two size classes: bucket k holds sizes in [2**k, 2**(k+1)); sizes of 0 go in 0


class FopStats:
    __slots__ = ("calls", "errors", "max_ns", "min_ns", "timed", "total_ns")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.timed = 0
        self.total_ns = 0
        self.min_ns = 0
        self.max_ns = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"calls": self.calls, "errors": self.errors}
        if self.timed:
            out["latency_us"] = {
                "min": self.min_ns / 1000,
                "avg": self.total_ns / self.timed / 1000,
                "max": self.max_ns / 1000,
            }
        return out


class Window:
    """Counters over one span of time (the cumulative one, or the current interval)."""

    __slots__ = ("fops", "read_bytes", "read_hist", "started", "write_bytes", "write_hist")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.fops = [FopStats() for _ in _FOP_NAMES]
        self.read_bytes = 0
        self.write_bytes = 0
        self.read_hist = [0] * _BUCKETS
        self.write_hist = [0] * _BUCKETS

    def as_dict(self, now: float) -> dict[str, Any]:
        fops = {name: s.as_dict() for name, s in zip(_FOP_NAMES, self.fops, strict=True) if s.calls}
        return {
            "duration_s": round(now - self.started, 6),
            "fops": fops,
            "totals": {
                "calls": sum(s.calls for s in self.fops),
                "errors": sum(s.errors for s in self.fops),
            },
            "read": {"bytes": self.read_bytes, "histogram": _hist(self.read_hist)},
            "write": {"bytes": self.write_bytes, "histogram": _hist(self.write_hist)},
        }


def _hist(buckets: list[int]) -> dict[str, int]:
    """Non-empty buckets keyed by their lower bound in bytes, as `volume profile` labels them."""
    return {str(1 << k if k else 0): n for k, n in enumerate(buckets) if n}


def _bucket(size: int) -> int:
    return min(size.bit_length() - 1, _BUCKETS - 1) if size > 0 else 0


class IoStatsTranslator(Translator):
    type_name: ClassVar[str] = "debug/io-stats"
    options: ClassVar[Mapping[str, Option]] = {
        "latency-measurement": Option("bool", True, "time every fop (min/avg/max latency per fop)"),
        "count-fop-hits": Option("bool", True, "count calls and errors per fop"),
    }

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        self._windows = (Window(), Window())
        self.interval_index = 0
        self._apply_options()

    def _apply_options(self) -> None:
        self._latency = bool(self.opts["latency-measurement"])
        self._count = bool(self.opts["count-fop-hits"])

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        super().reconfigure(options)
        self._apply_options()

    def snapshot(self, reset_interval: bool = False) -> dict[str, Any]:
        """JSON-serialisable figures; with `reset_interval` a new interval starts after this one."""
        now = time.monotonic()
        cumulative, interval = self._windows
        out = {
            "name": self.name,
            "cumulative": cumulative.as_dict(now),
            "interval": {"index": self.interval_index, **interval.as_dict(now)},
        }
        if reset_interval:
            self._windows = (cumulative, Window())
            self.interval_index += 1
        return out

    def reset(self) -> None:
        """Start over: cumulative and interval figures both go back to zero."""
        self._windows = (Window(), Window())
        self.interval_index = 0

    def _record(self, index: int, started: int, failed: bool) -> None:
        elapsed = time.perf_counter_ns() - started if started else -1
        for window in self._windows:
            stats = window.fops[index]
            if self._count:
                stats.calls += 1
                if failed:
                    stats.errors += 1
            if elapsed >= 0:
                if not stats.timed or elapsed < stats.min_ns:
                    stats.min_ns = elapsed
                if elapsed > stats.max_ns:
                    stats.max_ns = elapsed
                stats.timed += 1
                stats.total_ns += elapsed

    def _read(self, size: int) -> None:
        bucket = _bucket(size)
        for window in self._windows:
            window.read_bytes += size
            window.read_hist[bucket] += 1

    def _written(self, size: int) -> None:
        bucket = _bucket(size)
        for window in self._windows:
            window.write_bytes += size
            window.write_hist[bucket] += 1


def _size(buf: Any) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _wrap(name: str, index: int) -> Callable[..., Coroutine[Any, Any, Any]]:
    is_read, is_write = name == "readv", name == "writev"

    async def fop(self: IoStatsTranslator, *args: Any, **kwargs: Any) -> Any:
        if not (self._count or self._latency):
            reply = await getattr(self.children[0], name)(*args, **kwargs)
        else:
            started = time.perf_counter_ns() if self._latency else 0
            try:
                reply = await getattr(self.children[0], name)(*args, **kwargs)
            except Exception:
                self._record(index, started, True)
                raise
            self._record(index, started, False)
        if is_read:
            self._read(_size(reply.data))
        elif is_write:
            self._written(_size(args[1] if len(args) > 1 else kwargs["data"]))
        return reply

    fop.__name__ = fop.__qualname__ = name
    return fop


for _index, _name in enumerate(_FOP_NAMES):
    setattr(IoStatsTranslator, _name, _wrap(_name, _index))
