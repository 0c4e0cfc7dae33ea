"""The asyncio face, path resolution and its dentry cache, identity, and the volume lifecycle."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from mortar.client import AsyncVolume, Volume
from mortar.client.resolve import split_path
from mortar.core.context import CallContext
from mortar.core.options import Option
from mortar.core.translator import Event, Translator
from mortar.graph import from_text, register, unregister

from .conftest import HAVE_POSIX, counter_of


async def test_async_file_object(avol: AsyncVolume) -> None:
    async with avol.open("/a.bin", "w+b") as f:
        assert f.name == "/a.bin" and f.readable() and f.writable()
        assert await f.write(b"0123456789") == 10
        assert await f.tell() == 10
        assert await f.seek(-4, os.SEEK_END) == 6
        assert await f.read(2) == b"67"
        assert await f.seek(1, os.SEEK_CUR) == 9
        assert await f.read() == b"9"
        await f.seek(0)
        buf = bytearray(4)
        assert await f.readinto(buf) == 4 and buf == b"0123"
        assert await f.truncate() == 4
        await f.flush()
        await f.fsync()
    assert f.closed
    f = await avol.open("/a.bin", "ab")
    await f.write(b"tail")
    assert await f.tell() == 8
    with pytest.raises(OSError):
        await f.read()
    await f.close()
    async with avol.open("/a.bin", "rb") as f:
        assert await f.read() == b"0123tail"
        with pytest.raises(OSError):
            await f.write(b"x")
        with pytest.raises(OSError) as info:
            await f.seek(-1)
        assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        await f.read()
    with pytest.raises(ValueError):
        avol.open("/a.bin", "r")  # the async file is binary only
    with pytest.raises(FileNotFoundError):
        await avol.open("/missing")


async def test_pread_buffer_is_pread_without_the_copy(avol: AsyncVolume) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    h = await avol.create("/buf.bin")
    try:
        await avol.pwrite(h, data, 0)
        for size, offset in (
            (100, 5),
            (1 << 20, 0),
            (3 * (1 << 20), 9),
            (1 << 20, len(data) - 10),
            (8, len(data)),
        ):
            got = await avol.pread_buffer(h, size, offset)
            assert bytes(got) == await avol.pread(h, size, offset) == data[offset : offset + size]
        with pytest.raises(OSError) as info:
            await avol.pread_buffer(h, 1, -1)
        assert info.value.errno == errno.EINVAL
    finally:
        await avol.close(h)
    with pytest.raises(OSError) as info:
        await avol.pread_buffer(h, 1, 0)
    assert info.value.errno == errno.EBADF


async def test_async_calls_run_concurrently(avol: AsyncVolume) -> None:
    await avol.mkdir("/c")
    handles = await asyncio.gather(*(avol.create(f"/c/f{i}") for i in range(100)))
    await asyncio.gather(*(avol.pwrite(h, str(i).encode(), 0) for i, h in enumerate(handles)))
    await asyncio.gather(*(avol.close(h) for h in handles))
    sizes = await asyncio.gather(*(avol.stat(f"/c/f{i}") for i in range(100)))
    assert [s.st_size for s in sizes] == [len(str(i)) for i in range(100)]
    entries = [e async for e in avol.scandir("/c")]
    assert len(entries) == 100 and all(e.path == f"/c/{e.name}" for e in entries)


async def test_scandir_entries_and_symlinks(avol: AsyncVolume) -> None:
    await avol.mkdir("/s")
    await avol.mkdir("/s/dir")
    await avol.close(await avol.create("/s/file"))
    await avol.symlink("dir", "/s/to-dir")
    await avol.symlink("nowhere", "/s/dangling")
    entries = {e.name: e async for e in avol.scandir("/s")}
    assert sorted(entries) == ["dangling", "dir", "file", "to-dir"]
    assert entries["dir"].is_dir() and not entries["dir"].is_symlink()
    assert entries["file"].is_file() and entries["file"].stat().st_size == 0
    assert entries["to-dir"].is_symlink() and entries["to-dir"].is_dir()
    assert not entries["to-dir"].is_dir(follow_symlinks=False)
    assert entries["dangling"].is_symlink() and not entries["dangling"].is_dir()
    with pytest.raises(FileNotFoundError):
        entries["dangling"].stat()
    assert stat.S_ISLNK(entries["dangling"].stat(follow_symlinks=False).st_mode)
    assert os.fspath(entries["file"]) == "/s/file"
    walked = [(p, sorted(d), sorted(f)) async for p, d, f in avol.walk("/s")]
    assert walked == [("/s", ["dir", "to-dir"], ["dangling", "file"]), ("/s/dir", [], [])]
    bottom_up = [p async for p, _, _ in avol.walk("/s", topdown=False, followlinks=True)]
    assert bottom_up == ["/s/dir", "/s/to-dir", "/s"] or bottom_up == ["/s/to-dir", "/s/dir", "/s"]
    errors: list[OSError] = []
    assert [t async for t in avol.walk("/absent", onerror=errors.append)] == []
    assert isinstance(errors[0], FileNotFoundError)


def test_split_path() -> None:
    assert split_path("/a//b/./c/") == (["a", "b", "c"], True)
    assert split_path("a/b") == (["a", "b"], False)
    assert split_path("/") == ([], False)
    assert split_path(Path("/x/../y")) == (["x", "..", "y"], False)


async def test_dotdot_is_physical_and_stops_at_root(avol: AsyncVolume) -> None:
    await avol.makedirs("/p/q/r")
    await avol.symlink("/p/q/r", "/link")
    await avol.close(await avol.create("/p/q/file"))
    assert (await avol.stat("/../../p/./q/../q/file")).st_size == 0
    assert (await avol.stat("/link/..")).st_ino == (await avol.stat("/p/q")).st_ino  # .. of the target
    assert (await avol.stat("/p/..")).st_ino == (await avol.stat("/")).st_ino
    with pytest.raises(OSError) as info:
        await avol.rmdir("/p/..")
    assert info.value.errno == errno.EBUSY


async def test_deep_paths_use_the_dentry_cache(volfile: Path) -> None:
    volume = await AsyncVolume.from_volfile(volfile, entry_timeout=None)
    try:
        await volume.makedirs("/a/b/c/d")
        await volume.close(await volume.create("/a/b/c/d/f"))
        counter = counter_of(volume)
        before = counter.calls["lookup"]
        for _ in range(10):
            await volume.stat("/a/b/c/d/f")
        assert counter.calls["lookup"] - before == 10  # only the last component each time
    finally:
        await volume.aclose()


def _second_volume(volfile: Path, first: AsyncVolume) -> AsyncVolume:
    """Another client of the same brick (for memfs: a graph sharing the first one's namespace)."""
    graph = from_text(volfile.read_text(), str(volfile))
    brick = graph.xlators["brick"]
    if not HAVE_POSIX or type(brick).__name__ == "MemFs":
        brick.nodes = first.graph.xlators["brick"].nodes  # type: ignore[attr-defined]
    return AsyncVolume(graph, entry_timeout=None)


async def test_stale_dentries_recovered_after_renames_behind_our_back(volfile: Path) -> None:
    one = await AsyncVolume.from_volfile(volfile, entry_timeout=None)  # trusts its cache forever
    other = _second_volume(volfile, one)
    await other._start(10)
    try:
        await one.makedirs("/a/b")
        async with one.open("/a/b/f", "wb") as f:
            await f.write(b"old")
        assert (await one.stat("/a/b/f")).st_size == 3  # /a and /a/b are now cached
        # another client renames the directory away and builds a new one at the same path
        await other.rename("/a", "/old")
        await other.makedirs("/a/b")
        async with other.open("/a/b/f", "wb") as f:
            await f.write(b"brand new")
        async with other.open("/a/b/g", "wb") as f:
            await f.write(b"g")
        # cached /a/b still names the old directory: its `g` is missing -> ENOENT -> fresh retry
        async with one.open("/a/b/g") as f:
            assert await f.read() == b"g"
        async with one.open("/a/b/f") as f:
            assert await f.read() == b"brand new"
        # a directory replaced by rename-over is gone: ESTALE -> fresh retry
        assert (await one.stat("/old/b/f")).st_size == 3
        await other.mkdir("/fresh")
        await other.makedirs("/old2")
        await other.rename("/old/b/f", "/f-kept")
        await other.rmdir("/old/b")
        await other.rename("/fresh", "/old")  # replaces the cached, now empty, /old
        await other.mkdir("/old/b")
        assert await one.listdir("/old/b") == []
        assert await one.listdir("/old") == ["b"]
        # a name that really is gone still fails after the retry
        with pytest.raises(FileNotFoundError):
            await one.stat("/old/b/f")
    finally:
        await other.aclose()
        await one.aclose()


@pytest.mark.skipif(not HAVE_POSIX, reason="permission checks need storage/posix")
async def test_identity_is_checked_by_the_brick(tmp_path: Path) -> None:
    from .conftest import brick_volfile

    text = brick_volfile("posix", tmp_path / "brick", "11111111-2222-3333-4444-555555555555")
    path = tmp_path / "v.vol"
    path.write_text(text)
    async with await AsyncVolume.from_volfile(path) as root:
        await root.mkdir("/private", 0o700)
        await root.mkdir("/public")
        await root.chmod("/public", 0o777)  # mkdir applies the umask
        nobody = CallContext(65534, 65534, (65534,), os.getpid())
        root.identity = nobody
        with pytest.raises(PermissionError):
            await root.listdir("/private")
        with pytest.raises(PermissionError):
            await root.create("/private/x")
        await root.close(await root.create("/public/mine"))
        st = await root.stat("/public/mine")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        root.identity = None
        assert await root.listdir("/private") == []
        assert {c.uid for c in counter_of(root).identities} == {os.getuid(), 65534}


class Silent(Translator):
    """A connecting translator that never reports CHILD_UP."""

    type_name = "test/silent"
    announces_child_up = True
    options: ClassVar[dict[str, Option]] = {}


async def test_volume_that_never_comes_up(tmp_path: Path) -> None:
    register(Silent.type_name, Silent)
    try:
        path = tmp_path / "silent.vol"
        path.write_text("volume s\n    type test/silent\nend-volume\n")
        with pytest.raises(TimeoutError, match="not up"):
            await AsyncVolume.from_volfile(path, timeout=0.1)
        before = {t.name for t in threading.enumerate()}
        with pytest.raises(TimeoutError):
            Volume.from_volfile(path, timeout=0.1)
        assert not [
            t for t in threading.enumerate() if t.name.startswith("mortar-volume") and t.name not in before
        ]
    finally:
        unregister(Silent.type_name)


def test_sync_volume_loop_thread(vol: Volume) -> None:
    events: list[Event] = []
    unsubscribe = vol.subscribe(lambda event, data: events.append(event))
    result: dict[str, Any] = {}

    done = threading.Event()

    def from_loop() -> None:
        try:
            vol.stat("/")
        except RuntimeError as exc:
            result["error"] = exc
        done.set()

    loop = vol._loop.loop
    loop.call_soon_threadsafe(from_loop)
    assert done.wait(10)
    assert "deadlock" in str(result["error"])
    brick = vol.avolume.graph.top
    loop.call_soon_threadsafe(brick.notify, Event.CHILD_DOWN, brick, "test")
    vol.stat("/")  # a round trip through the loop: the event was delivered before it
    assert events == [Event.CHILD_DOWN]
    unsubscribe()
    assert vol._loop.thread.daemon and vol._loop.thread.is_alive()
    assert vol.identity is None
    vol.identity = CallContext(0, 0)
    vol.stat("/")
    assert CallContext(0, 0) in counter_of(vol).identities
