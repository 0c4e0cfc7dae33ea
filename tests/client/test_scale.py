"""Many files, big directories and many threads: the client stays correct at some scale."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from mortar.client import AsyncVolume, Volume

from .conftest import counter_of


async def test_two_thousand_small_files_in_nested_directories(avol: AsyncVolume) -> None:
    dirs = [f"/top{i}/mid{j}" for i in range(5) for j in range(4)]  # 20 directories, 100 files each
    for d in dirs:
        await avol.makedirs(d, exist_ok=True)

    async def fill(d: str) -> None:
        for k in range(100):
            async with avol.open(f"{d}/file{k}", "xb") as f:
                await f.write(f"{d}:{k}".encode() * (k % 7 + 1))

    await asyncio.gather(*(fill(d) for d in dirs))

    seen = 0
    async for dirpath, dirnames, filenames in avol.walk("/"):
        if dirpath.count("/") == 2:
            assert dirnames == [] and len(filenames) == 100
            for name in filenames:
                k = int(name[4:])
                async with avol.open(f"{dirpath}/{name}") as f:
                    assert await f.read() == f"{dirpath}:{k}".encode() * (k % 7 + 1)
                seen += 1
    assert seen == 2000
    assert sorted(await avol.listdir("/")) == [f"top{i}" for i in range(5)]


async def test_scandir_pages_through_five_thousand_entries(volfile: Path) -> None:
    volume = await AsyncVolume.from_volfile(volfile, readdir_size=16 * 1024)
    try:
        await volume.mkdir("/big")

        async def make(batch: range) -> None:
            for i in batch:
                await volume.close(await volume.create(f"/big/e{i:05d}"))

        await asyncio.gather(*(make(range(start, 5000, 8)) for start in range(8)))
        counter = counter_of(volume)
        before = counter.calls["readdirp"]
        names: list[str] = []
        pages = 0
        lister = volume.scandir("/big")
        async with lister:
            while page := await lister.next_page():
                pages += 1
                assert len(page) < 5000
                for entry in page:
                    assert entry.is_file() and not entry.is_dir() and entry.stat().st_size == 0
                    names.append(entry.name)
        assert sorted(names) == [f"e{i:05d}" for i in range(5000)]
        assert pages > 5 and counter.calls["readdirp"] - before == pages + 1  # the last, empty page
        assert counter.calls["releasedir"] == 1
    finally:
        await volume.aclose()


def test_sync_volume_from_four_threads(vol: Volume) -> None:
    shared = vol.create("/shared")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            vol.makedirs(f"/t{n}/sub", exist_ok=True)
            for i in range(50):
                with vol.open(f"/t{n}/sub/f{i}", "wb") as f:
                    f.write(bytes([n]) * (i + 1))
                vol.pwrite(shared, bytes([n + 1]) * 100, (n * 50 + i) * 100)
            for i in range(50):
                assert vol.stat(f"/t{n}/sub/f{i}").st_size == i + 1
                with vol.open(f"/t{n}/sub/f{i}") as f:
                    assert f.read() == bytes([n]) * (i + 1)
            assert len(vol.listdir(f"/t{n}/sub")) == 50
            vol.rename(f"/t{n}/sub/f0", f"/t{n}/renamed")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    data = vol.pread(shared, 4 * 50 * 100, 0)
    assert data == b"".join(bytes([n + 1]) * 5000 for n in range(4))
    vol.close(shared)
    assert sorted(vol.listdir("/")) == ["shared", "t0", "t1", "t2", "t3"]
    assert all(vol.exists(f"/t{n}/renamed") for n in range(4))
