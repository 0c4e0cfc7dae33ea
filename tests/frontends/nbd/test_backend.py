"""FileExportProvider and FileExport against real files on /tmp (ext4: holes, punch, zero range)."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mortar.core.errors import FopError
from mortar.frontends.nbd.backend import ExportBackend, ExportProvider, FileExport, FileExportProvider
from mortar.frontends.nbd.protocol import STATE_HOLE, STATE_ZERO

MiB = 1024 * 1024
HOLE = STATE_HOLE | STATE_ZERO


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[FileExportProvider]:
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "disk.raw").write_bytes(b"")
    os.truncate(tmp_path / "vm" / "disk.raw", 8 * MiB)
    (tmp_path / "top.img").write_bytes(b"abc")
    (tmp_path / "emptydir").mkdir()
    os.symlink("/etc/passwd", tmp_path / "escape")
    prov = FileExportProvider(str(tmp_path), default="top.img")
    yield prov
    prov.close()


@pytest.fixture
async def disk(provider: FileExportProvider) -> AsyncIterator[FileExport]:
    export = await provider.open_export("vm/disk.raw", read_only=False)
    yield export
    await export.close()


def allocated(extents: list[tuple[int, int]]) -> int:
    return sum(length for length, flags in extents if not flags & STATE_HOLE)


async def test_interfaces(provider: FileExportProvider, disk: FileExport) -> None:
    assert isinstance(provider, ExportProvider)
    assert isinstance(disk, ExportBackend)
    assert disk.size == 8 * MiB and not disk.read_only and disk.can_multi_conn


async def test_list_uses_relative_paths(provider: FileExportProvider) -> None:
    names = [name for name, _ in await provider.list_exports()]
    assert names == ["top.img", "vm/disk.raw"]  # the symlink to a file outside the root is not listed


@pytest.mark.parametrize(
    "name",
    ["missing", "vm", "emptydir", "../etc/passwd", "/etc/passwd", "vm/../top.img", "vm//disk.raw", "escape"],
)
async def test_names_outside_the_tree_are_unknown(provider: FileExportProvider, name: str) -> None:
    with pytest.raises(KeyError):
        await provider.open_export(name, read_only=True)


async def test_empty_name_opens_the_default(provider: FileExportProvider) -> None:
    export = await provider.open_export("", read_only=True)
    try:
        assert export.size == 3 and export.read_only
        assert await export.pread(3, 0) == b"abc"
    finally:
        await export.close()


async def test_read_write_round_trip_unaligned(disk: FileExport) -> None:
    small = os.urandom(777)
    big = os.urandom(3 * MiB + 5)
    await disk.pwrite(small, 513, fua=False)
    await disk.pwrite(memoryview(big), 1 * MiB + 1, fua=True)
    assert bytes(await disk.pread(777, 513)) == small  # small: tried on the loop with RWF_NOWAIT
    assert bytes(await disk.pread(len(big), 1 * MiB + 1)) == big  # large: in the thread pool
    assert bytes(await disk.pread(513, 0)) == bytes(513)
    await disk.flush()


async def test_block_status_trim_and_zero(disk: FileExport) -> None:
    assert await disk.block_status(8 * MiB, 0) == [(8 * MiB, HOLE)]
    await disk.pwrite(b"\xff" * (2 * MiB), 2 * MiB, fua=False)
    extents = await disk.block_status(8 * MiB, 0)
    assert extents == [(2 * MiB, HOLE), (2 * MiB, 0), (4 * MiB, HOLE)]
    assert await disk.block_status(MiB, 2 * MiB + 4096) == [(MiB, 0)]

    await disk.trim(MiB, 2 * MiB)  # punch: the first MiB of data becomes a hole
    assert allocated(await disk.block_status(8 * MiB, 0)) == MiB
    assert bytes(await disk.pread(MiB, 2 * MiB)) == bytes(MiB)

    await disk.zero(4096, 3 * MiB, may_trim=False, fast=True)  # zero range keeps the blocks
    assert bytes(await disk.pread(4096, 3 * MiB)) == bytes(4096)
    assert allocated(await disk.block_status(8 * MiB, 0)) == MiB
    await disk.zero(MiB, 3 * MiB, may_trim=True, fast=False)  # may punch
    assert bytes(await disk.pread(MiB, 3 * MiB)) == bytes(MiB)
    assert allocated(await disk.block_status(8 * MiB, 0)) == 0
    await disk.cache(MiB, 0)


async def test_zero_falls_back_to_writing_or_refuses_when_fast(disk: FileExport) -> None:
    """Where fallocate cannot zero, slow zeroing writes zeros, and fast zeroing says ENOTSUP."""
    await disk.pwrite(b"\x01" * 8192, 0, fua=False)
    disk._can_punch = disk._can_zero_range = False  # as on a file system without fallocate modes
    with pytest.raises(FopError) as err:
        await disk.zero(8192, 0, may_trim=True, fast=True)
    assert err.value.errno == errno.ENOTSUP
    await disk.zero(8192, 0, may_trim=True, fast=False)
    assert bytes(await disk.pread(8192, 0)) == bytes(8192)


async def test_read_only_export_refuses_writes(provider: FileExportProvider) -> None:
    export = await provider.open_export("vm/disk.raw", read_only=True)
    try:
        with pytest.raises(OSError):
            await export.pwrite(b"x", 0, fua=False)
    finally:
        await export.close()


async def test_shared_file_durability_across_exports(provider: FileExportProvider) -> None:
    """Multi-conn: a write through one export is read by another, and flush on either syncs it."""
    a = await provider.open_export("vm/disk.raw", read_only=False)
    b = await provider.open_export("vm/disk.raw", read_only=False)
    try:
        await a.pwrite(b"shared", 4096, fua=False)
        await b.flush()
        assert bytes(await b.pread(6, 4096)) == b"shared"
    finally:
        await a.close()
        await b.close()
