"""`test/recorder`: a pass-through translator that remembers the largest read and write it saw, so
tests can check the size of the kernel's requests; getxattr of `user.test.recorder` on any file
answers with the figures (JSON). `python -m tests.frontends.fuse.recorder ARGS` runs the mount
entry (`-f` for the foreground) with the type registered."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from mortar.core.fops import Buffer, ChangeReply, Fd, Loc, ReadReply, XattrReply, Xdata
from mortar.core.options import Option
from mortar.core.translator import Translator
from mortar.frontends.fuse.mount import main
from mortar.graph import register

KEY = "user.test.recorder"
FIGURES = ("max_read", "max_write", "reads", "writes", "last_read", "last_write", "max_inflight_writes")


class Recorder(Translator):
    type_name = "test/recorder"
    options: ClassVar[Mapping[str, Option]] = {
        "write-delay": Option("time", 0, "hold every write this long (shows how many overlap)"),
    }

    def __init__(self, name: str, options: Any = None, children: Any = ()) -> None:
        super().__init__(name, options, children)
        self.max_read = self.max_write = self.reads = self.writes = 0
        self.last_read = self.last_write = 0
        self.inflight_writes = self.max_inflight_writes = 0

    async def readv(self, fd: Fd, size: int, offset: int, flags: int, xdata: Xdata = None) -> ReadReply:
        self.reads += 1
        self.last_read = size
        self.max_read = max(self.max_read, size)
        return await super().readv(fd, size, offset, flags, xdata)

    async def writev(self, fd: Fd, data: Buffer, offset: int, flags: int, xdata: Xdata = None) -> ChangeReply:
        self.writes += 1
        self.last_write = memoryview(data).nbytes
        self.max_write = max(self.max_write, self.last_write)
        self.inflight_writes += 1
        self.max_inflight_writes = max(self.max_inflight_writes, self.inflight_writes)
        try:
            if self.opts["write-delay"]:
                await asyncio.sleep(self.opts["write-delay"])
            return await super().writev(fd, data, offset, flags, xdata)
        finally:
            self.inflight_writes -= 1

    async def getxattr(self, loc: Loc, name: str | None, xdata: Xdata = None) -> XattrReply:
        if name != KEY:
            return await super().getxattr(loc, name, xdata)
        figures = {k: getattr(self, k) for k in FIGURES}
        return XattrReply({KEY: json.dumps(figures).encode()})


def volfile(client_volfile: str, write_delay: float = 0) -> str:
    """The client volfile with the recorder on top of its graph."""
    top = [line.split()[1] for line in client_volfile.splitlines() if line.startswith("volume ")][-1]
    delay = f"    option write-delay {write_delay:g}\n" if write_delay else ""
    head = f"{client_volfile}\nvolume recorder\n    type test/recorder\n{delay}"
    return f"{head}    subvolumes {top}\nend-volume\n"


if __name__ == "__main__":
    register(Recorder.type_name, Recorder)
    sys.exit(main(sys.argv[1:]))
