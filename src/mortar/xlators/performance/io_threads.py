"""performance/io-threads: the thread pool that blocking disk work below it runs in.

On a brick every translator below io-threads (posix above all) calls `offload`, which runs in the
`executor` this translator installs on its whole subtree at init. Fops pass through unchanged but
through a gate of 4 x thread-count in-flight calls, so a flood of requests waits here instead of
queueing unbounded work (and the buffers that come with it) in the pool.

Lock fops (inodelk, entrylk, lk and their fd forms) bypass the gate: a blocking lock waits in
features/locks for as long as another client holds it, and letting waiters fill the gate would keep
out the very unlock that frees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from mortar.core.fops import FOPS
from mortar.core.options import Option
from mortar.core.translator import Translator

#: in-flight fops allowed per thread before callers wait
QUEUE_FACTOR = 4
LOCK_FOPS = frozenset({"inodelk", "finodelk", "entrylk", "fentrylk", "lk"})


class IoThreadsTranslator(Translator):
    type_name: ClassVar[str] = "performance/io-threads"
    options: ClassVar[Mapping[str, Option]] = {
        "thread-count": Option(
            "int", 16, "threads doing blocking I/O for the translators below", min=1, max=64
        ),
    }

    def __init__(
        self, name: str, options: Mapping[str, Any] | None = None, children: Sequence[Translator] = ()
    ) -> None:
        super().__init__(name, options, children)
        self.pool: ThreadPoolExecutor | None = None
        self._gate: asyncio.Semaphore | None = None

    @property
    def thread_count(self) -> int:
        return int(self.opts["thread-count"])

    def _install(self, count: int) -> ThreadPoolExecutor | None:
        """Put a new pool of `count` threads in place on this subtree; returns the one it replaces."""
        old = self.pool
        self.pool = ThreadPoolExecutor(count, thread_name_prefix=f"iot-{self.name}")
        for xl in (self, *self.descendants()):
            xl.executor = self.pool
        self._gate = asyncio.Semaphore(QUEUE_FACTOR * count)
        return old

    async def init(self) -> None:
        self._install(self.thread_count)
        self.log.info("%d I/O threads", self.thread_count)

    async def fini(self) -> None:
        pool, self.pool, self._gate = self.pool, None, None
        if pool is None:
            return
        for xl in (self, *self.descendants()):
            if xl.executor is pool:
                xl.executor = None  # children finishing after us use the loop's default pool
        await asyncio.to_thread(pool.shutdown, True)

    def reconfigure(self, options: Mapping[str, Any]) -> None:
        """A new thread-count replaces the pool; the old one finishes what it has queued and exits."""
        before = self.thread_count
        super().reconfigure(options)
        if self.pool is not None and self.thread_count != before:
            old = self._install(self.thread_count)
            if old is not None:
                old.shutdown(wait=False)
            self.log.info("now %d I/O threads", self.thread_count)


def _gated(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    async def fop(self: IoThreadsTranslator, *args: Any, **kwargs: Any) -> Any:
        gate = self._gate
        if gate is None:
            return await getattr(self.children[0], name)(*args, **kwargs)
        async with gate:
            return await getattr(self.children[0], name)(*args, **kwargs)

    fop.__name__ = fop.__qualname__ = name
    return fop


for _name in FOPS:
    if _name not in LOCK_FOPS:
        setattr(IoThreadsTranslator, _name, _gated(_name))
