"""io-threads' BatchedPool: results and errors come back to the loop, many per wake-up."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mortar.xlators.performance.io_threads import BatchedPool


async def test_results_errors_and_threads() -> None:
    pool = BatchedPool(4, asyncio.get_running_loop(), thread_name_prefix="t-batched")
    try:
        assert await pool.run_batched(lambda a, b: a + b, 2, 3) == 5
        assert (await pool.run_batched(lambda: threading.current_thread().name)).startswith("t-batched")

        def fail() -> None:
            raise OSError(5, "boom")

        with pytest.raises(OSError, match="boom"):
            await pool.run_batched(fail)
        # many in flight at once: every caller gets its own answer
        got = await asyncio.wait_for(
            asyncio.gather(*(pool.run_batched(lambda i=i: i * i) for i in range(500))), 30
        )
        assert got == [i * i for i in range(500)]
        # still an ordinary executor
        assert await asyncio.get_running_loop().run_in_executor(pool, lambda: 7) == 7
    finally:
        pool.shutdown(wait=True)


async def test_cancelled_caller_is_skipped() -> None:
    pool = BatchedPool(1, asyncio.get_running_loop())
    release = threading.Event()
    try:
        blocked = pool.run_batched(release.wait, 10)
        later = pool.run_batched(lambda: "after")
        blocked.cancel()
        release.set()
        assert await asyncio.wait_for(later, 10) == "after"  # the cancelled one's result is dropped
        assert blocked.cancelled()
    finally:
        release.set()
        pool.shutdown(wait=True)


async def test_a_caller_on_another_loop_gets_its_own_completions() -> None:
    pool = BatchedPool(2, asyncio.get_running_loop())
    try:

        def elsewhere() -> int:
            async def call() -> int:
                return await pool.run_batched(lambda: 41) + 1

            return asyncio.run(call())

        assert await asyncio.wait_for(asyncio.to_thread(elsewhere), 30) == 42

        def stop() -> None:
            raise StopIteration

        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(pool.run_batched(stop), 30)
        assert await asyncio.wait_for(pool.run_batched(lambda: "still served"), 30) == "still served"
    finally:
        pool.shutdown(wait=True)
