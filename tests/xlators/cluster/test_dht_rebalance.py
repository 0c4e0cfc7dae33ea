"""Rebalance over real bricks (storage/posix under features/locks, as on a brick) in temp dirs:
add-brick with files in use, remove-brick drain, stop and resume, space checks, the commit hash.

The helpers here are shared with test_dht_rebalance_migrate.py (single-file migrations).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.core.fops import GFID_REQ, Fd, Loc
from mortar.core.gfid import Gfid
from mortar.core.translator import Translator
from mortar.xlators.cluster.dht import DistributeTranslator
from mortar.xlators.cluster.dht_common import VOL_COMMIT_XATTR
from mortar.xlators.cluster.dht_layout import Layout, LayoutRange, hashed_subvol
from mortar.xlators.cluster.dht_migrator import FileToMove
from mortar.xlators.cluster.dht_rebalance import Rebalance, RebalanceStatus
from mortar.xlators.features.locks import LocksTranslator
from mortar.xlators.storage.posix import PosixTranslator

from .conftest import ROOT, MakeBricks, brick_dir, disk_layout, where

pytestmark = pytest.mark.timeout(120)


@dataclass
class Volume:
    """Bricks as a volume's servers run them (posix under locks) and DHT clients over them."""

    make_bricks: MakeBricks
    posix: list[PosixTranslator]
    subvols: list[LocksTranslator]
    clients: list[DistributeTranslator]

    async def add(self, n: int, under: list[Path] | None = None) -> list[LocksTranslator]:
        first = len(self.posix)
        bricks = await self.make_bricks(n, first=first, under=under)
        new = [LocksTranslator(f"vol-locks-{first + i}", None, [b]) for i, b in enumerate(bricks)]
        self.posix += bricks
        self.subvols += new
        return new

    async def client(
        self, subvols: list[LocksTranslator] | None = None, **options: str
    ) -> DistributeTranslator:
        """A DHT client (its own caches, as another process would have) over `subvols`."""
        opts = {k.replace("_", "-"): v for k, v in options.items()}
        dht = DistributeTranslator("vol-dht", opts, list(subvols or self.subvols))
        await dht.init()
        self.clients.append(dht)
        return dht

    def brick_of(self, subvol: str) -> PosixTranslator:
        return self.posix[int(subvol.rsplit("-", 1)[1])]

    def layout(self, rel: str) -> Layout:
        """A directory's layout as the bricks hold it, by subvolume name."""
        ranges = []
        for i, b in enumerate(self.posix):
            lay = disk_layout(b, rel)
            if lay is not None:
                ranges.append(LayoutRange(f"vol-locks-{i}", lay[1], lay[2], lay[0]))
        return Layout(ranges)

    def placement(self, rel: str) -> dict[str, str]:
        """Subvolume -> "data" or "link->SUBVOL" for every brick holding `rel`."""
        return {f"vol-locks-{b.name.rsplit('-', 1)[1]}": kind for b, kind in self._where(rel)}

    def _where(self, rel: str) -> Iterator[tuple[PosixTranslator, str]]:
        found = where(self.posix, rel)
        for b in self.posix:
            if b.name in found:
                yield b, found[b.name]

    def hashed(self, rel: str) -> str:
        d, name = os.path.split(rel)
        owner = hashed_subvol(self.layout(d), name)
        assert owner is not None
        return owner


@pytest.fixture
async def volume(make_bricks: MakeBricks) -> AsyncIterator[Volume]:
    vol = Volume(make_bricks, [], [], [])
    yield vol
    for dht in vol.clients:
        await dht.fini()


# ---- file helpers ------------------------------------------------------------------------------


async def mkdir(dht: Translator, pargfid: Gfid, name: str) -> Gfid:
    rep = await dht.mkdir(Loc(name, pargfid=pargfid, name=name), 0o755, 0, {GFID_REQ: bytes(Gfid.random())})
    return rep.iatt.gfid


async def open_new(dht: Translator, pargfid: Gfid, name: str) -> Fd:
    gfid = Gfid.random()
    fd = Fd(gfid, os.O_RDWR)
    loc = Loc(name, pargfid=pargfid, name=name)
    await dht.create(loc, os.O_RDWR | os.O_CREAT, 0o644, 0, fd, {GFID_REQ: bytes(gfid)})
    return fd


async def open_existing(dht: Translator, pargfid: Gfid, name: str, flags: int = os.O_RDWR) -> Fd:
    rep = await dht.lookup(Loc(name, pargfid=pargfid, name=name))
    fd = Fd(rep.iatt.gfid, flags)
    await dht.open(Loc(name, rep.iatt.gfid), flags, fd)
    return fd


async def write_file(
    dht: Translator, pargfid: Gfid, name: str, pieces: list[tuple[int, bytes]], size: int
) -> None:
    """A file of `size` bytes holding `pieces` (offset, data), holes elsewhere."""
    fd = await open_new(dht, pargfid, name)
    try:
        for off, data in pieces:
            for i in range(0, len(data), 1 << 20):
                await dht.writev(fd, data[i : i + (1 << 20)], off + i, 0)
        await dht.ftruncate(fd, size)
    finally:
        await dht.release(fd)


async def read_fd(dht: Translator, fd: Fd) -> bytes:
    out = []
    off = 0
    while True:
        data = bytes((await dht.readv(fd, 1 << 20, off, 0)).data)
        out.append(data)
        off += len(data)
        if len(data) < 1 << 20:
            return b"".join(out)


async def read_file(dht: Translator, pargfid: Gfid, name: str) -> bytes:
    fd = await open_existing(dht, pargfid, name, os.O_RDONLY)
    try:
        return await read_fd(dht, fd)
    finally:
        await dht.release(fd)


def materialise(pieces: list[tuple[int, bytes]], size: int) -> bytes:
    buf = bytearray(size)
    for off, data in pieces:
        buf[off : off + len(data)] = data[: max(0, size - off)]
    return bytes(buf)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name_hashing_to(layout: Layout, subvol: str, prefix: str) -> str:
    for i in range(100_000):
        if hashed_subvol(layout, f"{prefix}{i}") == subvol:
            return f"{prefix}{i}"
    raise AssertionError(f"no name hashes to {subvol}")


# ---- add-brick -----------------------------------------------------------------------------------


@dataclass
class Planted:
    rel: str
    parent: Gfid
    name: str
    digest: str
    data_bytes: int


async def plant_tree(dht: DistributeTranslator, rng: random.Random, nfiles: int) -> list[Planted]:
    """Nested directories with files of various sizes: empty, small, a few MiB, sparse."""
    dirs: list[tuple[str, Gfid]] = [("", ROOT)]
    for i in range(5):
        top = await mkdir(dht, ROOT, f"d{i}")
        dirs.append((f"d{i}", top))
        for j in range(3):
            dirs.append((f"d{i}/s{j}", await mkdir(dht, top, f"s{j}")))
    planted = []
    for k in range(nfiles):
        rel_dir, parent = dirs[k % len(dirs)]
        name = f"f{k:04d}.img" if k % 7 else f".f{k:04d}.tmp"
        if k % 97 == 5:  # sparse: two extents with a hole between
            pieces = [(0, rng.randbytes(64 << 10)), (2 << 20, rng.randbytes(64 << 10))]
            size = (2 << 20) + (64 << 10)
        elif k % 50 == 3:
            pieces, size = [(0, rng.randbytes(3 << 19))], 3 << 19
        elif k % 10 == 0:
            pieces, size = [], 0
        else:
            n = rng.randrange(1, 16 << 10)
            pieces, size = [(0, rng.randbytes(n))], n
        await write_file(dht, parent, name, pieces, size)
        data_bytes = sum(len(d) for _, d in pieces)
        rel = f"{rel_dir}/{name}" if rel_dir else name
        planted.append(Planted(rel, parent, name, sha(materialise(pieces, size)), data_bytes))
    return planted


async def test_add_two_bricks_and_rebalance(volume: Volume) -> None:
    old = await volume.add(2)
    writer = await volume.client(old)
    planted = await plant_tree(writer, random.Random(1), 500)
    before = {p.rel: volume.placement(p.rel) for p in planted}
    assert all(len(b) == 1 and "data" in b.values() for b in before.values())

    await volume.add(2)
    dht = await volume.client()
    seen: list[RebalanceStatus] = []
    status = await Rebalance(dht, on_progress=seen.append).run()

    assert status.state == "completed", status.error
    moved = []
    for p in planted:
        hashed = volume.hashed(p.rel)
        assert volume.placement(p.rel) == {hashed: "data"}, p.rel  # nothing left behind, no link file
        if next(iter(before[p.rel])) != hashed:
            moved.append(p)
    reader = await volume.client()
    for p in planted:
        assert sha(await read_file(reader, p.parent, p.name)) == p.digest, p.rel
    # counters add up; sparse files stay sparse
    assert status.files_scanned == len(planted)
    assert status.files_moved == len(moved) and 150 < len(moved) < 350  # about half the hash space
    assert status.files_skipped == status.files_failed == status.files_gone == 0 and not status.files
    assert status.bytes_moved == sum(p.data_bytes for p in moved)
    assert status.dirs_fixed == 1 + 5 + 15 and status.dirs_failed == 0
    assert seen and seen[-1].state == "completed" and seen[-1].files_moved == len(moved)
    for p in moved:
        if p.data_bytes == 128 << 10:
            st = os.stat(brick_dir(volume.brick_of(volume.hashed(p.rel))) / p.rel)
            assert st.st_blocks * 512 < st.st_size
    # every directory carries the run's commit hash, and the root says the run completed
    for b in volume.posix:
        assert os.getxattr(brick_dir(b), VOL_COMMIT_XATTR) == struct.pack(">I", status.commit_hash)
        for rel in ["", "d0", "d3/s2"]:
            lay = disk_layout(b, rel)
            assert lay is not None and lay[0] == status.commit_hash
    # so lookup-unhashed auto trusts these directories: a file put on a wrong brick is not searched for
    auto = await volume.client(lookup_unhashed="auto")
    await auto.lookup(Loc("/", ROOT))
    assert auto.volume_commit == status.commit_hash
    d0 = planted[1].parent
    stray = name_hashing_to(volume.layout("d0"), "vol-locks-3", "stray")
    posix0 = volume.posix[0]
    fd = Fd(Gfid.random())
    await posix0.create(
        Loc(stray, pargfid=d0, name=stray), os.O_RDWR, 0o644, 0, fd, {GFID_REQ: bytes(fd.gfid)}
    )
    await posix0.release(fd)
    with pytest.raises(FopError) as exc:
        await auto.lookup(Loc(stray, pargfid=d0, name=stray))
    assert exc.value.errno == errno.ENOENT
    # a second run has only the stray to move, after which lookups find it where it hashes
    again = await Rebalance(await volume.client(), throttle="lazy").run()
    assert again.state == "completed" and again.files_scanned == len(planted) + 1
    assert again.files_moved == 1 and volume.placement(f"d0/{stray}") == {"vol-locks-3": "data"}
    assert (await auto.lookup(Loc(stray, pargfid=d0, name=stray))).iatt.gfid == fd.gfid


# ---- a writer keeps writing while the rebalance runs ------------------------------------------


async def test_writer_keeps_writing_and_verifying_during_the_rebalance(
    volume: Volume, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writers overwrite, extend and truncate random ranges of files (the ones being copied
    first of all) through fds opened before the rebalance, reading back each change; every file
    ends equal to the writers' model, on its hashed subvolume."""
    caplog.set_level(logging.DEBUG, logger="mortar.xlators.cluster")
    rng = random.Random(7)
    old = await volume.add(2)
    seeder = await volume.client(old)
    d = await mkdir(seeder, ROOT, "vms")
    model: dict[str, bytearray] = {}
    for i in range(24):
        data = rng.randbytes(rng.randrange(2 << 20, 4 << 20))
        await write_file(seeder, d, f"disk{i}.img", [(0, data)], len(data))
        model[f"disk{i}.img"] = bytearray(data)
    await volume.add(2)
    cli = await volume.client()
    fds = {name: await open_existing(cli, d, name) for name in model}
    copying: set[str] = set()
    hits: Counter[str] = Counter()

    async def hook(step: str, job: FileToMove, offset: int) -> None:
        if step == "chunk":
            copying.add(job.name)
        else:
            copying.discard(job.name)
        await asyncio.sleep(0.001)  # let the writers in between chunks

    async def writer(names: list[str], seed: int) -> None:
        r = random.Random(seed)
        while not done.is_set():
            busy = [n for n in names if n in copying]
            name = r.choice(busy if busy and r.random() < 0.8 else names)
            fd, buf = fds[name], model[name]
            hits["copying" if name in copying else "other"] += 1
            if r.random() < 0.1:
                size = r.randrange(len(buf) // 2, len(buf) + (256 << 10))
                await cli.ftruncate(fd, size)
                buf[size:] = b""
                buf.extend(bytes(size - len(buf)))
                assert (await cli.fstat(fd)).iatt.size == size
                continue
            off = r.randrange(0, len(buf) + (64 << 10))
            data = r.randbytes(r.randrange(1, 300 << 10))
            await cli.writev(fd, data, off, 0)
            if off > len(buf):
                buf.extend(bytes(off - len(buf)))
            buf[off : off + len(data)] = data
            got = bytes((await cli.readv(fd, len(data), off, 0)).data)
            assert got == data, f"{name}: read back differs at {off}"
            await asyncio.sleep(0)

    done = asyncio.Event()
    names = sorted(model)
    tasks = [asyncio.create_task(writer(names[k::2], k)) for k in range(2)]
    try:
        status = await Rebalance(await volume.client(), hook=hook).run()
    finally:
        done.set()
        await asyncio.gather(*tasks)
    assert status.state == "completed" and status.files_failed == 0 and status.files_skipped == 0
    assert status.files_moved >= 6 and hits["copying"] >= 10
    assert any("change repeated on" in r.getMessage() for r in caplog.records)  # phase 1 was met
    assert any("reopened there" in r.getMessage() for r in caplog.records)  # and phase 2
    for name, fd in fds.items():  # the fds opened before: reopened where their file went
        assert await read_fd(cli, fd) == bytes(model[name]), name
        assert fd.ctx[cli].subvol.name == volume.hashed(f"vms/{name}")
        await cli.release(fd)
    fresh = await volume.client()
    for name in names:
        assert await read_file(fresh, d, name) == bytes(model[name]), name
        assert volume.placement(f"vms/{name}") == {volume.hashed(f"vms/{name}"): "data"}


# ---- remove-brick --------------------------------------------------------------------------------


async def test_remove_brick_drains_the_subvolume(volume: Volume) -> None:
    subvols = await volume.add(3)
    dht = await volume.client()
    rng = random.Random(3)
    contents: dict[tuple[Gfid, str], bytes] = {}
    for dname in ("a", "b"):
        dg = await mkdir(dht, ROOT, dname)
        sg = await mkdir(dht, dg, "deep")
        for parent in (dg, sg):
            for i in range(20):
                data = rng.randbytes(rng.choice([0, 100, 5000, 1 << 20]))
                await write_file(dht, parent, f"f{i}", [(0, data)], len(data))
                contents[(parent, f"f{i}")] = data
            for i in range(3):
                loc = Loc(f"l{i}", pargfid=parent, name=f"l{i}")
                await dht.symlink(f"target-{i}", loc, 0, {GFID_REQ: bytes(Gfid.random())})
            fifo = Loc("fifo", pargfid=parent, name="fifo")
            await dht.mknod(fifo, 0o10644, 0, 0, {GFID_REQ: bytes(Gfid.random())})
    gone = subvols[1]
    on_gone = [p for p in brick_dir(volume.posix[1]).rglob("*") if ".mortar" not in p.parts and p.is_file()]
    assert len(on_gone) > 10

    status = await Rebalance(dht, decommission=[gone]).run()

    assert status.state == "completed", status.error
    assert status.drained and status.remaining == {gone.name: 0}
    assert status.files_failed == status.files_skipped == 0 and status.files_moved >= len(on_gone)
    left = [p for p in brick_dir(volume.posix[1]).rglob("*") if ".mortar" not in p.parts and not p.is_dir()]
    assert all((os.lstat(p).st_mode & 0o7777, os.lstat(p).st_size) == (0o1000, 0) for p in left)
    gone_layout = disk_layout(volume.posix[1], "a/deep")
    assert gone_layout is not None and gone_layout[1:] == (0, 0)
    # commit: the volume without the drained brick has everything
    after = await volume.client([subvols[0], subvols[2]])
    for (parent, name), data in contents.items():
        assert await read_file(after, parent, name) == data
    for parent in {p for p, _ in contents}:
        assert (await after.readlink(Loc("l2", pargfid=parent, name="l2"))).target == "target-2"
        assert (await after.lookup(Loc("fifo", pargfid=parent, name="fifo"))).iatt.type_bits == 0o10000


# ---- stop and resume -----------------------------------------------------------------------------


async def test_stop_and_resume(volume: Volume) -> None:
    old = await volume.add(2)
    seeder = await volume.client(old)
    d = await mkdir(seeder, ROOT, "data")
    names = [f"file{i}" for i in range(80)]
    for n in names:
        await write_file(seeder, d, n, [(0, n.encode() * 5000)], len(n) * 5000)
    home = {n: next(iter(volume.placement(f"data/{n}"))) for n in names}
    await volume.add(1)
    switched = 0

    async def stop_after_five(step: str, job: FileToMove, offset: int) -> None:
        nonlocal switched
        if step == "switch":
            switched += 1
            if switched == 5:
                reb.stop()  # the files being moved now still finish

    reb = Rebalance(await volume.client(), throttle="aggressive", hook=stop_after_five)
    first = await reb.run()
    assert first.state == "stopped" and first.files_moved >= 5
    root = brick_dir(volume.posix[0])
    with pytest.raises(OSError):  # not a complete run: no commit hash on the root
        os.getxattr(root, VOL_COMMIT_XATTR)

    second = await Rebalance(await volume.client()).run()
    assert second.state == "completed" and second.files_failed == 0
    misplaced = [n for n in names if home[n] != volume.hashed(f"data/{n}")]
    assert first.files_moved < len(misplaced)
    assert first.files_moved + second.files_moved == len(misplaced)  # nothing moved twice
    reader = await volume.client()
    for n in names:
        assert volume.placement(f"data/{n}") == {volume.hashed(f"data/{n}"): "data"}
        assert await read_file(reader, d, n) == n.encode() * 5000
    assert os.getxattr(root, VOL_COMMIT_XATTR) == struct.pack(">I", second.commit_hash)


async def test_fix_layout_alone_moves_nothing_and_leaves_lookups_searching(volume: Volume) -> None:
    old = await volume.add(2)
    seeder = await volume.client(old)
    for i in range(30):
        await write_file(seeder, ROOT, f"x{i}", [(0, b"y" * 100)], 100)
    before = {f"x{i}": volume.placement(f"x{i}") for i in range(30)}
    await volume.add(1)
    status = await Rebalance(await volume.client(), fix_layout_only=True).run()
    assert status.state == "completed" and status.fix_layout_only
    assert status.files_scanned == 30 and status.files_moved == 0
    assert {f"x{i}": volume.placement(f"x{i}") for i in range(30)} == before
    assert {r.subvol for r in volume.layout("").owners} == {s.name for s in volume.subvols}
    with pytest.raises(OSError):  # files are not where they hash: no volume commit
        os.getxattr(brick_dir(volume.posix[0]), VOL_COMMIT_XATTR)
    auto = await volume.client(lookup_unhashed="auto")
    for i in range(30):  # found by searching, wherever the new layout hashes them
        assert await read_file(auto, ROOT, f"x{i}") == b"y" * 100


async def test_watch_reports_progress_until_the_end(volume: Volume) -> None:
    old = await volume.add(1)
    seeder = await volume.client(old)
    for i in range(20):
        await write_file(seeder, ROOT, f"w{i}", [(0, b"x" * 1000)], 1000)
    await volume.add(1)
    reb = Rebalance(await volume.client())
    run = asyncio.create_task(reb.run())
    seen = [st async for st in reb.watch()]
    final = await run
    assert seen[-1].state == "completed" and seen[-1].files_moved == final.files_moved > 0
    assert [s.files_moved for s in seen] == sorted(s.files_moved for s in seen)
    assert final.to_dict()["files_moved"] == final.files_moved and final.elapsed > 0


# ---- space ---------------------------------------------------------------------------------------

Mount = Callable[[int], Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """`tmpfs(mib)`: a fresh small tmpfs (skips the test where mounting is not allowed)."""
    import subprocess

    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        at = tmp_path / f"fs{len(mounted)}"
        at.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(at)], capture_output=True, timeout=30
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount tmpfs: {res.stderr.decode().strip()}")
        mounted.append(at)
        return at

    yield mount
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], capture_output=True, timeout=30)


async def test_files_that_do_not_fit_are_skipped_and_reported(volume: Volume, tmpfs: Mount) -> None:
    old = await volume.add(2)
    seeder = await volume.client(old)
    d = await mkdir(seeder, ROOT, "big")
    rng = random.Random(5)
    data = {f"img{i}": rng.randbytes(512 << 10) for i in range(36)}
    for name, payload in data.items():
        await write_file(seeder, d, name, [(0, payload)], len(payload))
    small = (await volume.add(1, under=[tmpfs(4)]))[0]
    status = await Rebalance(await volume.client(min_free_disk="10")).run()

    assert status.state == "completed" and status.files_failed == 0
    assert status.skipped.get("space", 0) == status.files_skipped > 0
    onto_small = [n for n in data if volume.hashed(f"big/{n}") == small.name]
    assert len(onto_small) - status.files_skipped > 0  # some did fit
    reported = {f.path for f in status.files}
    assert all(f.status == "skipped" and f.reason == "space" and small.name in f.detail for f in status.files)
    for name in onto_small:
        where_now = volume.placement(f"big/{name}")
        assert (f"/big/{name}" in reported) == (where_now.get(small.name) != "data")
    reader = await volume.client()
    for name, payload in data.items():
        assert await read_file(reader, d, name) == payload
    # the directory with files left behind is not taken as rebalanced; the root is
    lay = disk_layout(volume.posix[0], "big")
    assert lay is not None and lay[0] != status.commit_hash
    auto = await volume.client(lookup_unhashed="auto")
    await auto.lookup(Loc("/", ROOT))
    assert auto.volume_commit == status.commit_hash
    assert not auto.settled(await auto.layout_for(Loc("/big", d)))
    assert auto.settled(await auto.layout_for(Loc("/", ROOT)))
