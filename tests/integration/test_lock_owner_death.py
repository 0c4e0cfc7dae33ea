"""A client that dies holding a lock does not wedge everybody else: the brick releases it."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mortar.client import AsyncVolume
from mortar.core import Flock, Loc
from mortar.core.context import CallContext, call_context
from mortar.core.errors import FopError
from mortar.core.fops import LockCmd, LockType
from tests.integration.brickproc import TestVolume

pytestmark = pytest.mark.integration

HOLDER = """
import asyncio, os, sys
from mortar.client import AsyncVolume
from mortar.core import Flock, Loc
from mortar.core.context import CallContext, call_context
from mortar.core.fops import LockCmd, LockType

async def main():
    vol = await AsyncVolume.from_volfile(sys.argv[1])
    st = await vol.stat("/locked")
    call_context.set(CallContext(pid=os.getpid(), lk_owner=b"holder"))
    loc = Loc("/locked", gfid=st.gfid)
    await vol.graph.top.inodelk("test.domain", loc, LockCmd.SETLKW, Flock(LockType.WRLCK))
    print("locked", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_dead_holders_inodelk_is_released(tmp_path: Path) -> None:
    tv = TestVolume(tmp_path)
    try:
        volfile = tv.start()
        vol = await AsyncVolume.from_volfile(volfile)
        try:
            await vol.close(await vol.create("/locked"))
            st = await vol.stat("/locked")
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(volfile)], stdout=subprocess.PIPE, start_new_session=True
            )
            try:
                assert holder.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), 30)
                assert line.strip() == b"locked"
                loc = Loc("/locked", gfid=st.gfid)
                call_context.set(CallContext(pid=os.getpid(), lk_owner=b"waiter"))
                top = vol.graph.top
                with pytest.raises(FopError) as busy:  # held: a non-blocking attempt is refused
                    await top.inodelk("test.domain", loc, LockCmd.SETLK, Flock(LockType.WRLCK))
                assert busy.value.errno == errno.EAGAIN
                waiter = asyncio.create_task(
                    top.inodelk("test.domain", loc, LockCmd.SETLKW, Flock(LockType.WRLCK))
                )
                await asyncio.sleep(0.3)
                assert not waiter.done()
                os.killpg(holder.pid, signal.SIGKILL)  # the owner dies holding the lock
                await asyncio.wait_for(waiter, 20)  # granted once the brick sees the disconnect
                await top.inodelk("test.domain", loc, LockCmd.SETLK, Flock(LockType.UNLCK))
            finally:
                if holder.poll() is None:
                    os.killpg(holder.pid, signal.SIGKILL)
                holder.wait(10)
        finally:
            await vol.aclose()
    finally:
        tv.stop()
