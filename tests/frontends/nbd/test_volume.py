"""VolumeExportProvider and VolumeExport over real volumes: a posix brick graph in this process
(under debug/io-stats, whose counters show which fops each NBD command became), and real
`mortar-brick` processes where a brick must die and come back."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mortar.client import AsyncVolume
from mortar.core.errors import FopError
from mortar.core.translator import Event
from mortar.frontends.nbd.backend import ExportBackend, ExportProvider
from mortar.frontends.nbd.protocol import STATE_HOLE, STATE_ZERO
from mortar.frontends.nbd.volume import VolumeExport, VolumeExportProvider, open_volume, split_export_name
from tests.interop.cluster import Cluster, cluster

MiB = 1024 * 1024
HOLE = STATE_HOLE | STATE_ZERO


def local_volfile(directory: Path, name: str, o_direct: bool = False) -> Path:
    """A volume whose graph is the brick itself (storage/posix) under io-stats, in this process."""
    path = directory / f"{name}.vol"
    direct = "    option o-direct on\n" if o_direct else ""
    path.write_text(
        f"volume {name}-posix\n    type storage/posix\n{direct}    option directory {directory / 'brick'}\n"
        f"    option volume-id {uuid.uuid4()}\n    option brick-create on\nend-volume\n\n"
        f"volume {name}\n    type debug/io-stats\n    subvolumes {name}-posix\nend-volume\n"
    )
    return path


async def write_file(vol: AsyncVolume, path: str, size: int, data: bytes = b"", at: int = 0) -> None:
    handle = await vol.open_fd(path, os.O_RDWR | os.O_CREAT)
    try:
        await vol.ftruncate(handle, size)
        if data:
            await vol.pwrite(handle, data, at)
    finally:
        await vol.close(handle)


@pytest.fixture
async def vol(tmp_path: Path) -> AsyncIterator[AsyncVolume]:
    name, volume = await open_volume(str(local_volfile(tmp_path, "data")), timeout=10)
    assert name == "data"
    try:
        await volume.makedirs("/vm/old")
        await volume.mkdir("/emptydir")
        await volume.mkdir("/.trash")
        await write_file(volume, "/vm/disk.raw", 8 * MiB)
        await write_file(volume, "/vm/old/a.qcow2", 3)
        await write_file(volume, "/top.img", 3, b"abc")
        await write_file(volume, "/.hidden.img", 1)
        await write_file(volume, "/.trash/gone.raw", 1)
        await volume.symlink("vm/disk.raw", "/current")
        yield volume
    finally:
        await volume.aclose()


@pytest.fixture
def provider(vol: AsyncVolume) -> VolumeExportProvider:
    return VolumeExportProvider({"data": vol}, default="data/top.img")


@pytest.fixture
async def disk(provider: VolumeExportProvider) -> AsyncIterator[VolumeExport]:
    export = await provider.open_export("data/vm/disk.raw", read_only=False)
    yield export
    await export.close()


def fop_calls(vol: AsyncVolume) -> dict[str, int]:
    stats: dict[str, Any] = vol.top.snapshot()["cumulative"]["fops"]  # type: ignore[attr-defined]
    return {name: int(s["calls"]) for name, s in stats.items()}


async def allocated(vol: AsyncVolume, path: str) -> int:
    return (await vol.stat(path)).st_blocks * 512


# ---- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("data/vm/disk.raw", ("data", "/vm/disk.raw")),
        ("v/x", ("v", "/x")),
        ("v/a b/c%20", ("v", "/a b/c%20")),
    ],
)
def test_split_export_name(name: str, expected: tuple[str, str]) -> None:
    assert split_export_name(name) == expected


@pytest.mark.parametrize(
    "name", ["", "data", "data/", "/data/x", "data//x", "data/./x", "data/../x", "d/x\0"]
)
def test_split_export_name_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        split_export_name(name)


def test_volume_names_must_not_contain_a_slash(vol: AsyncVolume) -> None:
    provider = VolumeExportProvider()
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError):
            provider.add_volume(bad, vol)
    provider.add_volume("ok", vol)
    with pytest.raises(ValueError):
        provider.add_volume("ok", vol)
    assert provider.remove_volume("ok") is vol and provider.volumes == {}


# ---- the provider ------------------------------------------------------------------------------


async def test_interfaces(provider: VolumeExportProvider, disk: VolumeExport) -> None:
    assert isinstance(provider, ExportProvider)
    assert isinstance(disk, ExportBackend)
    assert disk.size == 8 * MiB and not disk.read_only and disk.can_multi_conn
    assert "data/vm/disk.raw" in disk.description


async def test_list_regular_files_breadth_first_without_hidden(provider: VolumeExportProvider) -> None:
    assert await provider.list_exports() == [
        ("data/top.img", "3 bytes"),
        ("data/vm/disk.raw", f"{8 * MiB} bytes"),
        ("data/vm/old/a.qcow2", "3 bytes"),
    ]  # not the symlink, the directories, nor anything hidden


async def test_list_is_bounded(vol: AsyncVolume, tmp_path: Path) -> None:
    for i in range(5):
        await write_file(vol, f"/many{i}.raw", 1)
    provider = VolumeExportProvider({"data": vol}, list_limit=4)
    assert len(await provider.list_exports()) == 4


async def test_several_volumes(vol: AsyncVolume, tmp_path: Path) -> None:
    (tmp_path / "second").mkdir()
    _, other = await open_volume(str(local_volfile(tmp_path / "second", "logs")), timeout=10)
    try:
        await write_file(other, "/disk.raw", MiB, b"other", at=0)
        provider = VolumeExportProvider({"logs": other, "data": vol})
        names = [name for name, _ in await provider.list_exports()]
        assert names == ["data/top.img", "data/vm/disk.raw", "data/vm/old/a.qcow2", "logs/disk.raw"]
        export = await provider.open_export("logs/disk.raw", read_only=True)
        try:
            assert export.size == MiB and bytes(await export.pread(5, 0)) == b"other"
        finally:
            await export.close()
    finally:
        await other.aclose()


@pytest.mark.parametrize(
    "name",
    ["", "data/missing", "data/vm", "data/emptydir", "other/top.img", "data/../top.img", "data", "top.img"],
)
async def test_unknown_names(vol: AsyncVolume, name: str) -> None:
    provider = VolumeExportProvider({"data": vol})  # no default export
    with pytest.raises(KeyError):
        await provider.open_export(name, read_only=True)


async def test_default_export_and_symlinks(provider: VolumeExportProvider) -> None:
    export = await provider.open_export("", read_only=True)
    try:
        assert export.size == 3 and export.read_only and bytes(await export.pread(3, 0)) == b"abc"
    finally:
        await export.close()
    linked = await provider.open_export("data/current", read_only=True)  # followed inside the volume
    try:
        assert linked.size == 8 * MiB
    finally:
        await linked.close()


async def test_open_files_are_released(vol: AsyncVolume, provider: VolumeExportProvider) -> None:
    before = fop_calls(vol).get("release", 0)
    for _ in range(3):
        export = await provider.open_export("data/top.img", read_only=False)
        await export.close()
        await export.close()  # twice is harmless
    assert fop_calls(vol)["release"] - before == 3


# ---- I/O ---------------------------------------------------------------------------------------


async def test_read_write_round_trip_unaligned(disk: VolumeExport) -> None:
    small = os.urandom(777)
    big = os.urandom(3 * MiB + 5)
    await disk.pwrite(small, 513, fua=False)
    await disk.pwrite(memoryview(big), MiB + 1, fua=True)
    assert bytes(await disk.pread(777, 513)) == small
    assert bytes(await disk.pread(len(big), MiB + 1)) == big
    assert bytes(await disk.pread(513, 0)) == bytes(513)
    await disk.flush()


def brick_fd_flags(image: Path) -> list[int]:
    """The open flags of every descriptor this process holds on `image` (the in-process brick's)."""
    ino = image.stat().st_ino
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{name}").st_ino != ino:
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue  # closed meanwhile (listdir's own descriptor)
        found.append(int(info.split("flags:")[1].split()[0], 8))
    return found


@pytest.mark.parametrize(("cache", "direct"), [("none", True), ("writeback", False)])
async def test_cache_mode_decides_o_direct_on_the_brick(tmp_path: Path, cache: str, direct: bool) -> None:
    """cache=none opens images O_DIRECT, which a brick with o-direct on honours;
    requests not in whole blocks (which O_DIRECT refuses) go through a second, buffered handle,
    and either way the data reads back as written."""
    _, volume = await open_volume(str(local_volfile(tmp_path, "d", o_direct=True)), timeout=10)
    try:
        await write_file(volume, "/img", 4 * MiB)
        provider = VolumeExportProvider({"d": volume}, cache=cache)
        export = await provider.open_export("d/img", read_only=False)
        try:
            image = tmp_path / "brick" / "img"
            assert [bool(f & os.O_DIRECT) for f in brick_fd_flags(image)] == [direct]
            block = os.urandom(MiB)
            await export.pwrite(block, MiB, fua=False)  # whole blocks: the main handle only
            assert bytes(await export.pread(MiB, MiB)) == block
            assert len(brick_fd_flags(image)) == 1
            data = os.urandom(MiB + 3)
            await export.pwrite(data, 4097, fua=False)
            assert bytes(await export.pread(len(data), 4097)) == data
            assert bytes(await export.pread(100, 4 * MiB - 100)) == bytes(100)
            # an aligned read (the O_DIRECT handle) sees what the buffered handle wrote
            end = 4097 + len(data)
            assert bytes(await export.pread(8192, MiB)) == data[MiB - 4097 :] + block[end - MiB : 8192]
            await export.flush()
            expect = [False, True] if direct else [False]
            assert sorted(bool(f & os.O_DIRECT) for f in brick_fd_flags(image)) == expect
        finally:
            await export.close()
        assert brick_fd_flags(tmp_path / "brick" / "img") == []
    finally:
        await volume.aclose()
    assert VolumeExportProvider().cache == "writeback"  # qemu-nbd's default
    with pytest.raises(ValueError, match="cache mode"):
        VolumeExportProvider(cache="unsafe")


async def test_fua_and_flush_reach_the_volume_as_fsync(vol: AsyncVolume, disk: VolumeExport) -> None:
    base = fop_calls(vol).get("fsync", 0)
    await disk.pwrite(b"x" * 4096, 0, fua=False)
    assert fop_calls(vol).get("fsync", 0) == base
    await disk.pwrite(b"y" * 4096, 0, fua=True)
    assert fop_calls(vol)["fsync"] == base + 1
    await disk.flush()
    assert fop_calls(vol)["fsync"] == base + 2


async def test_reads_past_the_end_of_a_shrunk_file_are_zeros(vol: AsyncVolume, disk: VolumeExport) -> None:
    await disk.pwrite(b"\xaa" * MiB, 7 * MiB, fua=False)
    await vol.truncate("/vm/disk.raw", 7 * MiB + 100)  # another client shrinks the image
    data = bytes(await disk.pread(MiB, 7 * MiB))
    assert data == b"\xaa" * 100 + bytes(MiB - 100)
    assert disk.size == 8 * MiB  # the export keeps its size until the client reconnects
    assert await disk.block_status(MiB, 7 * MiB) == [(100, 0), (MiB - 100, HOLE)]  # the end is a hole


async def test_block_status_trim_and_zero(vol: AsyncVolume, disk: VolumeExport) -> None:
    assert await disk.block_status(8 * MiB, 0) == [(8 * MiB, HOLE)]
    await disk.pwrite(b"\xff" * (2 * MiB), 2 * MiB, fua=False)
    assert await disk.block_status(8 * MiB, 0) == [(2 * MiB, HOLE), (2 * MiB, 0), (4 * MiB, HOLE)]
    assert await disk.block_status(MiB, 2 * MiB + 4096) == [(MiB, 0)]
    assert await disk.block_status(MiB, 7 * MiB) == [(MiB, HOLE)]

    calls = fop_calls(vol)
    await disk.trim(MiB, 2 * MiB)  # a hole: that MiB reads as zeros and is no longer allocated
    assert fop_calls(vol)["discard"] == calls.get("discard", 0) + 1
    assert bytes(await disk.pread(MiB, 2 * MiB)) == bytes(MiB)
    assert await allocated(vol, "/vm/disk.raw") == MiB

    await disk.zero(MiB, 3 * MiB, may_trim=False, fast=True)  # NO_HOLE: zeros, still allocated
    assert fop_calls(vol)["zerofill"] == calls.get("zerofill", 0) + 1
    assert bytes(await disk.pread(MiB, 3 * MiB)) == bytes(MiB)
    assert await allocated(vol, "/vm/disk.raw") == MiB

    await disk.zero(MiB, 3 * MiB, may_trim=True, fast=False)  # may punch
    assert bytes(await disk.pread(MiB, 3 * MiB)) == bytes(MiB)
    assert await allocated(vol, "/vm/disk.raw") == 0
    assert await disk.block_status(8 * MiB, 0) == [(8 * MiB, HOLE)]

    await disk.zero(2 * MiB, 5 * MiB, may_trim=False, fast=False)  # in a hole: allocates
    assert await allocated(vol, "/vm/disk.raw") == 2 * MiB

    reads = fop_calls(vol)["readv"]
    await disk.cache(4 * MiB, 6 * MiB)  # a hint: reads what is inside the export, and no more
    assert fop_calls(vol)["readv"] - reads == 2


async def test_zero_without_stack_support(disk: VolumeExport) -> None:
    """Where neither discard nor zerofill works, slow zeroing writes zeros; fast zeroing refuses."""
    await disk.pwrite(b"\x01" * 8192, 0, fua=False)
    disk._can_discard = disk._can_zerofill = False  # as on a brick without fallocate modes
    with pytest.raises(FopError) as err:
        await disk.zero(8192, 0, may_trim=True, fast=True)
    assert err.value.errno == errno.ENOTSUP
    await disk.zero(8192, 0, may_trim=True, fast=False)
    assert bytes(await disk.pread(8192 + 1, 0)) == bytes(8193)
    await disk.trim(4096, 0)  # advisory: nothing to do, no error


async def test_read_only_export_refuses_writes(provider: VolumeExportProvider) -> None:
    export = await provider.open_export("data/vm/disk.raw", read_only=True)
    try:
        assert export.read_only
        with pytest.raises(OSError):
            await export.pwrite(b"x", 0, fua=False)
        assert bytes(await export.pread(4, 0)) == bytes(4)
    finally:
        await export.close()


async def test_multi_conn_exports_share_the_file(provider: VolumeExportProvider) -> None:
    a = await provider.open_export("data/vm/disk.raw", read_only=False)
    b = await provider.open_export("data/vm/disk.raw", read_only=False)
    try:
        await asyncio.gather(*(a.pwrite(bytes([i]) * 4096, i * 4096, fua=False) for i in range(32)))
        await b.flush()
        assert bytes(await b.pread(32 * 4096, 0)) == b"".join(bytes([i]) * 4096 for i in range(32))
    finally:
        await a.close()
        await b.close()


async def test_size_is_refreshed_on_each_open(vol: AsyncVolume, provider: VolumeExportProvider) -> None:
    first = await provider.open_export("data/vm/disk.raw", read_only=False)
    await vol.truncate("/vm/disk.raw", 16 * MiB)
    second = await provider.open_export("data/vm/disk.raw", read_only=False)
    try:
        assert (first.size, second.size) == (8 * MiB, 16 * MiB)
    finally:
        await first.close()
        await second.close()


# ---- a brick process that dies and comes back ------------------------------------------------


class Restarts:
    """Restarts brick 0 and waits until the client saw it go down and come back up."""

    def __init__(self, vol: AsyncVolume, vol_cluster: Cluster) -> None:
        self.vol = vol
        self.cluster = vol_cluster
        self.downs = 0
        vol.subscribe(self._event)

    def _event(self, event: Event, data: object) -> None:
        if event is Event.CHILD_DOWN:
            self.downs += 1

    async def restart(self, timeout: float = 20) -> None:
        downs = self.downs
        await asyncio.to_thread(self.cluster.restart, 0)
        async with asyncio.timeout(timeout):
            while self.downs == downs or not self.vol.up:
                await asyncio.sleep(0.02)


@pytest.mark.integration
@pytest.mark.parametrize("cache", ["writeback", "none"])
async def test_export_survives_a_brick_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cache: str
) -> None:
    """The brick forgets its fds when it restarts; the export opens the file again (same gfid) and
    the request goes on. A file replaced meanwhile is not silently written instead: ESTALE. With
    cache=none both handles (O_DIRECT, and the buffered one for odd-sized requests) come back."""
    with cluster(tmp_path, replica=1) as vol_cluster:
        _, vol = await open_volume(str(vol_cluster.client_volfile), timeout=10)
        try:
            await write_file(vol, "/disk.raw", 4 * MiB, b"before", at=MiB)
            provider = VolumeExportProvider({"vol": vol}, cache=cache)
            export = await provider.open_export("vol/disk.raw", read_only=False)
            bricks = Restarts(vol, vol_cluster)
            try:
                await export.pwrite(b"acked", 2 * MiB, fua=True)
                await export.pwrite(bytes(4096), 3 * MiB, fua=False)  # whole blocks
                await bricks.restart()
                assert bytes(await export.pread(5, 2 * MiB)) == b"acked"  # the odd-sized handle
                assert bytes(await export.pread(4096, 3 * MiB)) == bytes(4096)  # the main one
                await bricks.restart()
                with caplog.at_level(logging.INFO, logger="mortar.frontends.nbd.volume"):
                    assert bytes(await export.pread(6, MiB)) == b"before"
                assert "reopened after its brick connection was lost" in caplog.text
                await export.pwrite(b"after", 3 * MiB, fua=True)
                assert bytes(await export.pread(5, 2 * MiB)) == b"acked"

                await bricks.restart()
                await vol.unlink("/disk.raw")
                await write_file(vol, "/disk.raw", 4 * MiB)  # another file under the same name
                with pytest.raises(OSError) as err:
                    await export.pread(5, 3 * MiB)
                assert err.value.errno == errno.ESTALE
            finally:
                await export.close()
        finally:
            await vol.aclose()


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_verifies_cache_none_on_an_o_direct_brick(tmp_path: Path) -> None:
    """fio's nbd engine with crc32c verification through `--cache none` onto a brick that honours
    O_DIRECT: requests of 512 bytes to 256 KiB, so both handles serve (most are not whole 4 KiB
    blocks) and what one wrote the other reads."""
    with cluster(tmp_path, replica=1) as vol_cluster:
        for brick in vol_cluster.bricks:
            posix = "    type storage/posix\n"
            brick.volfile.write_text(
                brick.volfile.read_text().replace(posix, f"{posix}    option o-direct on\n")
            )
            vol_cluster.restart(brick.index)

        async def make_image() -> None:
            _, vol = await open_volume(str(vol_cluster.client_volfile), timeout=10)
            try:
                await write_file(vol, "/disk.raw", 16 * MiB)
            finally:
                await vol.aclose()

        asyncio.run(make_image())
        sock = str(tmp_path / "nbd.sock")
        cmd = [sys.executable, "-m", "mortar.frontends.nbd", "--volfile", str(vol_cluster.client_volfile)]
        cmd += ["--socket", sock, "--cache", "none", "--log-file", str(tmp_path / "nbd.log")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None and "ready" in [proc.stdout.readline().strip() for _ in range(2)]
            job = ["fio", "--name=v", "--ioengine=nbd", f"--uri=nbd+unix:///vol/disk.raw?socket={sock}"]
            job += ["--rw=randwrite", "--bsrange=512-256k", "--size=16m", "--iodepth=8", "--verify=crc32c"]
            job += ["--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"]
            done = subprocess.run(job, capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            report = json.loads(done.stdout[done.stdout.index("{") :])["jobs"][0]
            assert report["error"] == 0 and report["read"]["io_bytes"] == report["write"]["io_bytes"] > 0
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
        assert "Traceback" not in (tmp_path / "nbd.log").read_text()
