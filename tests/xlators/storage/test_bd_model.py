"""Stateful model test of storage/bd: random writes, snapshots (symlink), clones (link), discards,
truncates, renames, unlinks and restarts through the translator, against plain bytearrays.

The pool is tiny (4 KiB blocks) so copy-on-write, block reuse and ENOSPC happen often. After
every step each image reads back as its model and the listing is the model's names.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mortar.core.errors import FopError
from mortar.core.fops import Fd
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.xlators.storage.bd import BdTranslator
from tests.xlators.storage.conftest import at, by_gfid, req

BS = 4096
POOL_BLOCKS = 10
MAX_IMAGES = 5
_T = TypeVar("_T")


class BdModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="bd-model-"))
        self.loop = asyncio.new_event_loop()
        self.volume_id = str(uuid.uuid4())
        self.xl = self._start(create=True)
        self.model: dict[str, bytearray] = {}
        self.counter = 0

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def _start(self, create: bool) -> BdTranslator:
        opts = {
            "pool": str(self.dir / "pool"),
            "volume-id": self.volume_id,
            "pool-create": "on" if create else "off",
            "pool-size": str(BS + POOL_BLOCKS * BS),
            "block-size": str(BS),
            "commit-interval": "0",
        }
        xl = BdTranslator("bd", opts)
        self._run(xl.init())
        return xl

    def teardown(self) -> None:
        try:
            self._run(self.xl.fini())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _fresh(self) -> str:
        self.counter += 1
        return f"img-{self.counter}"

    def _pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model)), label="image")

    def _gfid(self, name: str) -> Gfid:
        return self._run(self.xl.lookup(at(ROOT_GFID, name))).iatt.gfid

    def _open(self, name: str) -> Fd:
        gfid = self._gfid(name)
        fd = Fd(gfid, os.O_RDWR)
        self._run(self.xl.open(by_gfid(gfid), os.O_RDWR, fd))
        return fd

    def _with_fd(self, name: str, fn: Any) -> Any:
        fd = self._open(name)
        try:
            return self._run(fn(fd))
        finally:
            self._run(self.xl.release(fd))

    # -- rules ----------------------------------------------------------------------------------
    @precondition(lambda self: len(self.model) < MAX_IMAGES)
    @rule()
    def create(self) -> None:
        name = self._fresh()
        fd = Fd(Gfid.random())
        self._run(self.xl.create(at(ROOT_GFID, name), os.O_RDWR, 0o644, 0, fd, req(fd.gfid)))
        self._run(self.xl.release(fd))
        self.model[name] = bytearray()

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def write(self, data: st.DataObject, seed: int) -> None:
        name = self._pick(data)
        size = len(self.model[name])
        off = data.draw(st.one_of(st.integers(0, size + 2 * BS), st.sampled_from([0, BS - 1, size])))
        length = data.draw(st.one_of(st.sampled_from([BS, 2 * BS + 1, 3 * BS]), st.integers(1, 3 * BS)))
        payload = random.Random(seed).randbytes(length)
        try:
            self._with_fd(name, lambda fd: self.xl.writev(fd, payload, off, 0))
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            event("write: ENOSPC")
            return
        model = self.model[name]
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off : off + len(payload)] = payload

    @precondition(lambda self: self.model and len(self.model) < MAX_IMAGES)
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        origin, new = self._pick(data), self._fresh()
        self._run(self.xl.symlink(origin, at(ROOT_GFID, new), 0, req()))
        self.model[new] = bytearray(self.model[origin])

    @precondition(lambda self: self.model and len(self.model) < MAX_IMAGES)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        src, new = self._pick(data), self._fresh()
        try:
            self._run(self.xl.link(by_gfid(self._gfid(src)), at(ROOT_GFID, new)))
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            event("clone: ENOSPC")
            return
        self.model[new] = bytearray(self.model[src])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        name = self._pick(data)
        size = len(self.model[name])
        if not size:
            return
        off = data.draw(st.integers(0, size - 1), label="off")
        length = data.draw(st.integers(1, 4 * BS), label="len")
        try:
            self._with_fd(name, lambda fd: self.xl.discard(fd, off, length))
        except FopError as exc:
            assert exc.errno == errno.ENOSPC  # a partial block of a shared one needs a copy
            event("discard: ENOSPC")
            return
        end = min(off + length, size)
        self.model[name][off:end] = bytes(end - off)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), size=st.integers(0, 12 * BS))
    def truncate(self, data: st.DataObject, size: int) -> None:
        name = self._pick(data)
        try:
            self._run(self.xl.truncate(by_gfid(self._gfid(name)), size))
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            event("truncate: ENOSPC")
            return
        old = self.model[name]
        self.model[name] = old[:size] + bytearray(max(0, size - len(old)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        name = self._pick(data)
        self._run(self.xl.unlink(at(ROOT_GFID, name), 0))
        del self.model[name]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        name = self._pick(data)
        new = data.draw(st.sampled_from([self._fresh(), *sorted(self.model)]), label="new")
        self._run(self.xl.rename(at(ROOT_GFID, name), at(ROOT_GFID, new)))
        self.model[new] = self.model.pop(name)

    @rule()
    def restart(self) -> None:
        self._run(self.xl.fini())
        self.xl = self._start(create=False)

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def contents(self) -> None:
        vfs = self._run(self.xl.statfs(by_gfid(ROOT_GFID))).statvfs
        event(f"pool use: {4 * (vfs.blocks - vfs.bfree) // vfs.blocks}/4")
        fd = Fd(ROOT_GFID)
        self._run(self.xl.opendir(by_gfid(ROOT_GFID), fd))
        listed = [e.name for e in self._run(self.xl.readdirp(fd, 1 << 20, 0)).entries]
        self._run(self.xl.releasedir(fd))
        assert listed == sorted(self.model)
        for name, expect in self.model.items():
            size = len(expect) + 1
            got = self._with_fd(name, lambda fd, n=size: self.xl.readv(fd, n, 0, 0)).data
            assert bytes(got) == bytes(expect), name


BdModel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBdModel = BdModel.TestCase
