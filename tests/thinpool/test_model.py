"""Stateful model test: random operations on several volumes against plain bytearrays.

The pool is tiny (4 KiB blocks, few of them) so ENOSPC, block reuse and copy-on-write happen
often; some volumes span several mapping leaves (512 blocks = 2 MiB each) so shared tops and
leaves are shadowed too. After every step the pool must pass `check()` and read back the model.
"""

from __future__ import annotations

import errno
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mortar.core.errors import FopError
from mortar.thinpool import ThinPool, ThinVolume

BS = 4096
LEAF_BYTES = 512 * BS
POOL_BLOCKS = 12
MAX_VOLUMES = 6
SIZES = st.one_of(st.integers(0, 16 * BS), st.integers(LEAF_BYTES - 4 * BS, 2 * LEAF_BYTES + 3 * BS))


class ThinPoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="thinpool-model-"))
        self.path = self.dir / "data.img"
        self.pool = ThinPool.create(self.path, size=BS + POOL_BLOCKS * BS, block_size=BS, commit_interval=0)
        self.model: dict[str, bytearray] = {}
        self.counter = 0

    def teardown(self) -> None:
        self.pool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------
    def _fresh_name(self) -> str:
        self.counter += 1
        return f"vol-{self.counter}"

    def _pick(self, data: st.DataObject) -> tuple[str, ThinVolume]:
        name = data.draw(st.sampled_from(sorted(self.model)), label="volume")
        return name, self.pool.volume(name)

    def _range(self, data: st.DataObject, size: int, max_len: int) -> tuple[int, int]:
        hot = [0, BS - 1, BS, LEAF_BYTES - 5, LEAF_BYTES, size - 1]
        off = data.draw(
            st.one_of(st.integers(0, size - 1), st.sampled_from([h for h in hot if 0 <= h < size])),
            label="off",
        )
        length = data.draw(st.integers(1, min(size - off, max_len)), label="len")
        return off, length

    def _expect_unchanged(self, vol: ThinVolume, name: str, off: int, length: int) -> None:
        assert vol.read(off, length) == bytes(self.model[name][off : off + length])

    # -- rules ----------------------------------------------------------------------------------
    @precondition(lambda self: len(self.model) < MAX_VOLUMES)
    @rule(size=SIZES)
    def create(self, size: int) -> None:
        name = self._fresh_name()
        vol = self.pool.create_volume(name, size)
        assert vol.size == size and vol.allocated_bytes == 0
        self.model[name] = bytearray(size)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 2**32), count=st.integers(1, 4))
    def write(self, data: st.DataObject, seed: int, count: int) -> None:
        rng = random.Random(seed)
        for _ in range(count):
            name, vol = self._pick(data)
            size = len(self.model[name])
            if not size:
                continue
            off, length = self._range(data, size, 8 * BS + 100)
            payload = rng.randbytes(length)
            try:
                assert vol.write(payload, off) == length
            except FopError as exc:
                assert exc.errno == errno.ENOSPC
                event("write: ENOSPC")
                self._expect_unchanged(vol, name, off, length)
                continue
            self.model[name][off : off + length] = payload

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        name, vol = self._pick(data)
        size = len(self.model[name])
        off = data.draw(st.integers(0, size + BS), label="off")
        length = data.draw(st.integers(0, 3 * BS), label="len")
        assert vol.read(off, length) == bytes(self.model[name][off : off + length])
        buf = bytearray(b"\xaa" * length)
        got = vol.readinto(buf, off)
        assert bytes(buf[:got]) == bytes(self.model[name][off : off + length])

    @precondition(lambda self: self.model and len(self.model) < MAX_VOLUMES)
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        name, _ = self._pick(data)
        new = self._fresh_name()
        snap = self.pool.snapshot(name, new)
        assert snap.origin == name
        self.model[new] = bytearray(self.model[name])

    @precondition(lambda self: self.model and len(self.model) < MAX_VOLUMES)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        name, _ = self._pick(data)
        new = self._fresh_name()
        try:
            copy = self.pool.clone(name, new)
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            event("clone: ENOSPC")
            assert new not in {v.name for v in self.pool.volumes()}
            return
        assert copy.origin is None and copy.info()["shared_blocks"] == 0
        self.model[new] = bytearray(self.model[name])

    @precondition(lambda self: self.model)
    @rule(data=st.data(), op=st.sampled_from(["discard", "zeroes", "zeroes-keep"]))
    def zero(self, data: st.DataObject, op: str) -> None:
        name, vol = self._pick(data)
        size = len(self.model[name])
        if not size:
            return
        off, length = self._range(data, size, 6 * BS)
        length += data.draw(st.sampled_from([0, 0, BS]), label="past end")  # clipped to the size
        before = vol.allocated_bytes
        try:
            if op == "discard":
                vol.discard(off, length)
            else:
                vol.write_zeroes(off, length, unmap=op == "zeroes")
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            event(f"{op}: ENOSPC")
            self._expect_unchanged(vol, name, off, min(length, size - off))
            return
        end = min(off + length, size)
        self.model[name][off:end] = bytes(end - off)
        if op != "zeroes-keep":
            assert vol.allocated_bytes <= before

    @precondition(lambda self: self.model)
    @rule(data=st.data(), size=SIZES)
    def resize(self, data: st.DataObject, size: int) -> None:
        name, vol = self._pick(data)
        try:
            vol.resize(size)
        except FopError as exc:
            assert exc.errno == errno.ENOSPC
            event("resize: ENOSPC")
            return
        old = self.model[name]
        self.model[name] = old[:size] + bytearray(max(0, size - len(old)))
        assert vol.size == size

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name, vol = self._pick(data)
        self.pool.delete_volume(name)
        del self.model[name]
        try:
            vol.read(0, 1)
            raise AssertionError("read from a deleted volume")
        except FopError as exc:
            assert exc.errno == errno.ENOENT

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        name, vol = self._pick(data)
        new = self._fresh_name()
        self.pool.rename_volume(name, new)
        assert vol.name == new and self.pool.volume(new) is vol
        self.model[new] = self.model.pop(name)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def seek(self, data: st.DataObject) -> None:
        name, vol = self._pick(data)
        size = len(self.model[name])
        if not size:
            return
        off = data.draw(st.integers(0, size - 1), label="off")
        hole = vol.seek_hole(off)
        assert off <= hole <= size
        if hole < size:
            end = min(size, (hole // BS + 1) * BS)
            assert vol.read(hole, end - hole) == bytes(end - hole)
        try:
            found = vol.seek_data(off)
        except FopError as exc:
            assert exc.errno == errno.ENXIO
            found = size
        assert off <= found <= size
        assert self.model[name][off:found] == bytes(found - off)

    @rule()
    def commit(self) -> None:
        self.pool.commit()
        assert self.pool.stats().withheld_blocks == 0

    @rule()
    def reopen(self) -> None:
        self.pool.close()
        self.pool = ThinPool.open(self.path, commit_interval=0)
        assert sorted(v.name for v in self.pool.volumes()) == sorted(self.model)

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        assert self.pool.check() == []
        st_ = self.pool.stats()
        event(f"pool use: {min(4, 5 * st_.used_blocks // st_.data_blocks)}/4")
        if st_.mapping_nodes > len(self.model) + sum(1 for m in self.model.values() if m.count(0) < len(m)):
            event("some volume spans several leaves or shares them")
        assert st_.used_blocks + st_.free_blocks == st_.data_blocks == POOL_BLOCKS

    @invariant()
    def contents(self) -> None:
        for name, expect in self.model.items():
            vol = self.pool.volume(name)
            assert vol.size == len(expect)
            assert vol.read(0, len(expect)) == bytes(expect), name


ThinPoolModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestThinPoolModel = ThinPoolModel.TestCase
