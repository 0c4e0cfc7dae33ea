"""Who is asking: the kernel gives each FUSE request the caller's uid, gid and pid; the supplementary
groups, which the brick needs for group permission checks, come from /proc/PID/status.

Reading /proc on every request would cost more than the request, so groups are cached per pid for a
short time (a process rarely changes its groups, and a pid reused within that second is rarer still).
"""

from __future__ import annotations

import time

from mortar.core.context import ROOT_CONTEXT, CallContext


def read_groups(pid: int) -> tuple[int, ...]:
    """The supplementary groups of `pid` (empty if it is gone or not visible from here)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


class Identities:
    """CallContexts for requests, with groups cached `ttl` seconds per (pid, uid, gid)."""

    def __init__(self, ttl: float = 1.0, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._cache: dict[tuple[int, int, int], tuple[float, CallContext]] = {}

    def context(self, uid: int, gid: int, pid: int) -> CallContext:
        if uid == 0 and gid == 0:
            return ROOT_CONTEXT if pid == 0 else CallContext(0, 0, (), pid)
        key = (pid, uid, gid)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        ctx = CallContext(uid, gid, read_groups(pid) if pid > 0 else (), pid)
        self._cache[key] = (now + self.ttl, ctx)
        return ctx
