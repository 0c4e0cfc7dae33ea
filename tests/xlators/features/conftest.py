"""Shared pieces for the features/locks and features/index tests: a real brick and lock owners."""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.fops import Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Translator
from mortar.xlators.storage.posix import PosixTranslator

_T = TypeVar("_T")


@pytest.fixture
def brick_dir(tmp_path: Path) -> Path:
    return tmp_path / "brick"


def make_brick(directory: Path, volume_id: str = "5f1c3a52-2f0e-4a43-9d7c-2b8e1f0c9a11") -> PosixTranslator:
    """A real storage/posix brick (init it before use); the same id lets a test restart it."""
    return PosixTranslator(
        "posix",
        {
            "directory": str(directory),
            "volume-id": volume_id,
            "brick-create": "on",
            "health-check-interval": "0",
        },
    )


async def new_file(top: Translator, name: str) -> tuple[Gfid, Fd]:
    """Create `name` in the brick root through `top`; returns its gfid and the open fd."""
    gfid = Gfid.random()
    fd = Fd(gfid)
    reply = await top.create(
        Loc("/" + name, pargfid=ROOT_GFID, name=name), os.O_RDWR, 0o644, 0o022, fd, {"gfid-req": bytes(gfid)}
    )
    assert reply.iatt.gfid == gfid
    return gfid, fd


def as_owner(client: str, owner: bytes, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """Run `coro` as a task whose calls come from lock owner (client, owner)."""
    ctx = contextvars.copy_context()
    ctx.run(call_context.set, CallContext(client=client, lk_owner=owner, pid=4242))
    return asyncio.get_running_loop().create_task(coro, context=ctx)


async def settle() -> None:
    """Let every runnable task run until it blocks (lock waits here involve no I/O)."""
    for _ in range(10):
        await asyncio.sleep(0)
