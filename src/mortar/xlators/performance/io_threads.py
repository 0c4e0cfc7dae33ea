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
import contextlib
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from mortar.core.fops import FOPS
from mortar.core.options import Option
from mortar.core.translator import Translator

#: in-flight fops allowed per thread before callers wait
QUEUE_FACTOR = 4
LOCK_FOPS = frozenset({"inodelk", "finodelk", "entrylk", "fentrylk", "lk"})

_T = TypeVar("_T")
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class BatchedPool(ThreadPoolExecutor):
    """A thread pool whose `run_batched` hands results back to the loop in batches.

    `run_in_executor` wakes the loop once per finished call (a self-pipe write, a read, a callback
    chain of two futures); with 32 small writes in flight that cost the brick's loop more than the
    fop. Here a worker that finishes while a hand-back is already scheduled only queues its result,
    and the loop completes every queued future in one callback. It is still a plain executor for
    anything that calls `run_in_executor` on it.
    """

    def __init__(
        self, max_workers: int, loop: asyncio.AbstractEventLoop, thread_name_prefix: str = ""
    ) -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._loop = loop
        self._lock = threading.Lock()
        self._done: list[_Outcome] = []
        self._scheduled = False

    def run_batched(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run `fn(*args)` in a worker; the returned future completes on the loop (call it there)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a caller on another loop: completions must go to its own
            return loop.run_in_executor(self, fn, *args)
        fut: asyncio.Future[_T] = loop.create_future()
        self.submit(self._call, fut, fn, args)
        return fut

    def _call(self, fut: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            outcome: _Outcome = (fut, fn(*args), None)
        except BaseException as exc:  # handed to the awaiting fop, as run_in_executor would
            outcome = (fut, None, exc)
        with self._lock:
            self._done.append(outcome)
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits any more
            self._loop.call_soon_threadsafe(self._complete)

    def _complete(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._scheduled = False
        for fut, result, exc in done:
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(result)
            elif isinstance(exc, StopIteration):  # a future refuses it; never leave the rest waiting
                fut.set_exception(RuntimeError(f"offloaded call raised {exc!r}"))
            else:
                fut.set_exception(exc)


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
        self.pool: BatchedPool | None = None
        self._gate: asyncio.Semaphore | None = None

    @property
    def thread_count(self) -> int:
        return int(self.opts["thread-count"])

    def _install(self, count: int, loop: asyncio.AbstractEventLoop) -> BatchedPool | None:
        """Put a new pool of `count` threads in place on this subtree; returns the one it replaces."""
        old = self.pool
        self.pool = BatchedPool(count, loop, thread_name_prefix=f"iot-{self.name}")
        for xl in (self, *self.descendants()):
            xl.executor = self.pool
        self._gate = asyncio.Semaphore(QUEUE_FACTOR * count)
        return old

    async def init(self) -> None:
        self._install(self.thread_count, asyncio.get_running_loop())
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
            old = self._install(self.thread_count, self.pool._loop)
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
