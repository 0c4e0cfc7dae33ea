"""Network namespaces for multi-host tests on one machine.

`Lab(n)` makes n namespaces, each with a veth pair whose outer end is on a bridge in this
namespace, addresses 10.77.X.11, .12... inside and 10.77.X.1 on the bridge (X from the pid, so
two test runs at once do not collide), so the test process
reaches every "host" and they reach each other; nothing is routed off this machine. `cut(i)` takes
host i off the network (its link goes down) and `restore(i)` brings it back. Everything is removed
at `close()`. Needs root and `ip`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.harness import Mortard, kill_all_under


def available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"mtprobe{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Lab:
    count: int
    subnet: str = field(default_factory=lambda: f"10.77.{os.getpid() % 250 + 1}")
    tag: str = field(default_factory=lambda: f"mt{os.getpid() % 100000}")

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def ns(self, i: int) -> str:
        return f"{self.tag}-n{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def _outer(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def _inner(self, i: int) -> str:
        return f"{self.tag}c{i}"

    def __enter__(self) -> Lab:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(1, self.count + 1):
                ns, outer, inner = self.ns(i), self._outer(i), self._inner(i)
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cut(self, i: int) -> None:
        _ip("link", "set", self._outer(i), "down")

    def restore(self, i: int) -> None:
        _ip("link", "set", self._outer(i), "up")

    def close(self) -> None:
        for i in range(1, self.count + 1):
            _ip("link", "del", self._outer(i), check=False)  # takes its peer inside with it
            _ip("netns", "del", self.ns(i), check=False)
        _ip("link", "del", self.bridge, check=False)


@contextlib.contextmanager
def three_mortards(base: Path) -> Iterator[tuple[Lab, list[Mortard]]]:
    """Three namespaces with a mortard each (port 24100), all stopped and cleaned up at the end."""
    started: list[Mortard] = []
    with Lab(3) as lab:
        try:
            for i in (1, 2, 3):
                started.append(Mortard(base, f"n{i}", addr=lab.addr(i), port=24100, netns=lab.ns(i)).start())
            yield lab, started
        finally:
            for node in started:
                node.stop()
            kill_all_under(base)
