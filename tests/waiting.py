"""Bounded waits for conditions the code under test reaches on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(cond: Callable[[], object], what: str, timeout: float = 20.0, period: float = 0.005) -> None:
    """Poll `cond` until it is true; fail the test with `what` after `timeout` seconds (a bound far
    above what the work needs and far below a test timeout)."""
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(period)
    except TimeoutError:
        raise AssertionError(f"not reached in {timeout}s: {what}") from None
