"""`Volume`: the synchronous native API. It owns one private event loop (uvloop when available)
running in a daemon thread and submits each call there with `run_coroutine_threadsafe`; it never
creates a loop per call. Any number of threads may call one Volume at once: the calls interleave
on the loop, which is where the graph lives."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mortar.client.file import check_open_args, open_file
from mortar.client.results import DirEntry, StatResult, StatVfsResult
from mortar.client.scandir import AsyncScandir
from mortar.client.volume import AsyncVolume, FileHandle, PathArg
from mortar.core.context import CallContext
from mortar.core.fops import Buffer
from mortar.core.translator import Event
from mortar.graph.builder import Graph, load

log = logging.getLogger(__name__)

T = TypeVar("T")
_counter = itertools.count(1)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """One event loop in one daemon thread, for the lifetime of a Volume."""

    def __init__(self, name: str) -> None:
        self.loop = _new_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread.ident

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for it; refuses from the loop's own thread (deadlock)."""
        if self.in_loop_thread:
            coro.close()
            raise RuntimeError("a synchronous Volume call from its own event loop thread would deadlock")
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if not self.in_loop_thread:
                self.thread.join()


class ScandirIterator:
    """`os.scandir`'s iterator: entries fetched a readdirp page at a time; a context manager."""

    def __init__(self, volume: Volume, lister: AsyncScandir) -> None:
        self._volume = volume
        self._lister = lister
        self._buffer: deque[DirEntry] = deque()
        self._closed = False

    def __iter__(self) -> ScandirIterator:
        return self

    def __next__(self) -> DirEntry:
        while not self._buffer:
            if self._closed:
                raise StopIteration
            page = self._volume._run(self._lister.next_page())
            if not page:
                self._closed = True
                raise StopIteration
            self._buffer.extend(page)
        return self._buffer.popleft()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._buffer.clear()
            self._volume._run_from_any_thread(self._lister.aclose())

    def __enter__(self) -> ScandirIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            # the interpreter may be shutting down; the brick frees the directory at disconnect
            with contextlib.suppress(Exception):
                self.close()


class Volume:
    """A volume opened in this process, with blocking calls named as in `os`.

    `Volume.from_volfile(path)` returns a started volume that is up; use it as a context manager
    or call `close()`. `close(handle)` closes an open file handle instead.
    """

    def __init__(self, avolume: AsyncVolume, loop: LoopThread) -> None:
        self.avolume = avolume
        self._loop = loop
        self._closed = False

    @classmethod
    def from_volfile(cls, path: str | Path, *, timeout: float = 30, **kwargs: Any) -> Volume:
        """Build, start and wait for the graph a client volfile describes (`AsyncVolume` options)."""
        return cls.from_graph(load(path), timeout=timeout, **kwargs)

    @classmethod
    def connect(cls, uri: str, *, timeout: float = 30, watch: bool = True, **kwargs: Any) -> Volume:
        """Open `mortar://HOST[:PORT]/VOLUME` through its node daemon (see `AsyncVolume.connect`)."""
        loop = LoopThread(f"mortar-volume-{next(_counter)}")
        try:
            avolume = loop.run(AsyncVolume.connect(uri, timeout=timeout, watch=watch, **kwargs))
        except BaseException:
            loop.stop()
            raise
        return cls(avolume, loop)

    @classmethod
    def from_graph(cls, graph: Graph, *, timeout: float = 30, **kwargs: Any) -> Volume:
        """Serve from a built, not yet started graph (the `mortar://HOST/VOLUME` connect lands here)."""
        loop = LoopThread(f"mortar-volume-{next(_counter)}")
        try:
            avolume = loop.run(AsyncVolume.from_graph(graph, timeout=timeout, **kwargs))
        except BaseException:
            loop.stop()
            raise
        return cls(avolume, loop)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ValueError("I/O operation on a closed volume")
        return self._loop.run(coro)

    def _run_from_any_thread(self, coro: Coroutine[Any, Any, None]) -> None:
        """Wait for `coro`, or only schedule it when called on the loop thread (a finaliser)."""
        if self._closed:
            coro.close()
        elif self._loop.in_loop_thread:
            self._loop.loop.create_task(coro)
        else:
            self._loop.run(coro)

    def _close_handle_from_any_thread(self, handle: FileHandle) -> None:
        self._run_from_any_thread(self.avolume.close(handle))

    def close(self, handle: FileHandle | None = None) -> None:
        """Without an argument: close the volume (open files are released). With a handle:
        flush and release that file."""
        if handle is not None:
            self._run(self.avolume.close(handle))
            return
        if self._closed:
            return
        try:
            self._loop.run(self.avolume.aclose())
        finally:
            self._closed = True
            self._loop.stop()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def identity(self) -> CallContext | None:
        """Who calls run as; None (the default) means this process's uid/gid/groups/pid."""
        return self.avolume.identity

    @identity.setter
    def identity(self, value: CallContext | None) -> None:
        self.avolume.identity = value

    def subscribe(self, callback: Callable[[Event, Any], None]) -> Callable[[], None]:
        """Events from the graph's top; the callback runs on the volume's loop thread."""
        return self.avolume.subscribe(callback)

    # ---- files -----------------------------------------------------------------------------------

    def open(
        self,
        path: PathArg,
        mode: str = "rb",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object like the built-in `open()`: raw (buffering=0), buffered, or text."""
        flags = check_open_args(mode, buffering, encoding, errors, newline)
        handle = self.open_fd(path, flags, 0o666)
        try:
            return open_file(self, handle, mode, buffering, encoding, errors, newline)
        except BaseException:
            if not handle.closed:
                self.close(handle)
            raise

    def open_fd(self, path: PathArg, flags: int = os.O_RDONLY, mode: int = 0o666) -> FileHandle:
        return self._run(self.avolume.open_fd(path, flags, mode))

    def create(self, path: PathArg, mode: int = 0o644, flags: int = os.O_RDWR | os.O_EXCL) -> FileHandle:
        return self._run(self.avolume.create(path, mode, flags))

    def pread(self, handle: FileHandle, size: int, offset: int) -> bytes:
        return self._run(self.avolume.pread(handle, size, offset))

    def preadinto(self, handle: FileHandle, buf: Buffer, offset: int) -> int:
        return self._run(self.avolume.preadinto(handle, buf, offset))

    def pwrite(self, handle: FileHandle, data: Buffer, offset: int) -> int:
        return self._run(self.avolume.pwrite(handle, data, offset))

    def fstat(self, handle: FileHandle) -> StatResult:
        return self._run(self.avolume.fstat(handle))

    def fsync(self, handle: FileHandle, datasync: bool = False) -> None:
        self._run(self.avolume.fsync(handle, datasync))

    def ftruncate(self, handle: FileHandle, size: int) -> None:
        self._run(self.avolume.ftruncate(handle, size))

    def fallocate(self, handle: FileHandle, mode: int, offset: int, length: int) -> None:
        self._run(self.avolume.fallocate(handle, mode, offset, length))

    def discard(self, handle: FileHandle, offset: int, length: int) -> None:
        self._run(self.avolume.discard(handle, offset, length))

    def zerofill(self, handle: FileHandle, offset: int, length: int) -> None:
        self._run(self.avolume.zerofill(handle, offset, length))

    def seek_data(self, handle: FileHandle, offset: int) -> int:
        return self._run(self.avolume.seek_data(handle, offset))

    def seek_hole(self, handle: FileHandle, offset: int) -> int:
        return self._run(self.avolume.seek_hole(handle, offset))

    # ---- attributes ------------------------------------------------------------------------------

    def stat(self, path: PathArg, *, follow_symlinks: bool = True) -> StatResult:
        return self._run(self.avolume.stat(path, follow_symlinks=follow_symlinks))

    def lstat(self, path: PathArg) -> StatResult:
        return self._run(self.avolume.lstat(path))

    def exists(self, path: PathArg) -> bool:
        return self._run(self.avolume.exists(path))

    def access(self, path: PathArg, mode: int) -> bool:
        return self._run(self.avolume.access(path, mode))

    def chmod(self, path: PathArg, mode: int, *, follow_symlinks: bool = True) -> None:
        self._run(self.avolume.chmod(path, mode, follow_symlinks=follow_symlinks))

    def chown(self, path: PathArg, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        self._run(self.avolume.chown(path, uid, gid, follow_symlinks=follow_symlinks))

    def utime(
        self,
        path: PathArg,
        times: tuple[float, float] | None = None,
        *,
        ns: tuple[int, int] | None = None,
        follow_symlinks: bool = True,
    ) -> None:
        self._run(self.avolume.utime(path, times, ns=ns, follow_symlinks=follow_symlinks))

    def truncate(self, path: PathArg, size: int) -> None:
        self._run(self.avolume.truncate(path, size))

    def statvfs(self, path: PathArg = "/") -> StatVfsResult:
        return self._run(self.avolume.statvfs(path))

    def getxattr(self, path: PathArg, name: str, *, follow_symlinks: bool = True) -> bytes:
        return self._run(self.avolume.getxattr(path, name, follow_symlinks=follow_symlinks))

    def setxattr(
        self, path: PathArg, name: str, value: Buffer, flags: int = 0, *, follow_symlinks: bool = True
    ) -> None:
        self._run(self.avolume.setxattr(path, name, value, flags, follow_symlinks=follow_symlinks))

    def listxattr(self, path: PathArg = "/", *, follow_symlinks: bool = True) -> list[str]:
        return self._run(self.avolume.listxattr(path, follow_symlinks=follow_symlinks))

    def removexattr(self, path: PathArg, name: str, *, follow_symlinks: bool = True) -> None:
        self._run(self.avolume.removexattr(path, name, follow_symlinks=follow_symlinks))

    # ---- namespace -------------------------------------------------------------------------------

    def mkdir(self, path: PathArg, mode: int = 0o777) -> None:
        self._run(self.avolume.mkdir(path, mode))

    def makedirs(self, path: PathArg, mode: int = 0o777, exist_ok: bool = False) -> None:
        self._run(self.avolume.makedirs(path, mode, exist_ok))

    def rmdir(self, path: PathArg) -> None:
        self._run(self.avolume.rmdir(path))

    def unlink(self, path: PathArg) -> None:
        self._run(self.avolume.unlink(path))

    remove = unlink

    def rename(self, src: PathArg, dst: PathArg) -> None:
        self._run(self.avolume.rename(src, dst))

    def link(self, src: PathArg, dst: PathArg) -> None:
        self._run(self.avolume.link(src, dst))

    def symlink(self, target: str, path: PathArg) -> None:
        self._run(self.avolume.symlink(target, path))

    def readlink(self, path: PathArg) -> str:
        return self._run(self.avolume.readlink(path))

    def listdir(self, path: PathArg = "/") -> list[str]:
        return self._run(self.avolume.listdir(path))

    def scandir(self, path: PathArg = "/") -> ScandirIterator:
        """Like `os.scandir`: raises at once for a missing directory, then pages lazily."""
        lister = self.avolume.scandir(path)
        self._run(lister.open())
        return ScandirIterator(self, lister)

    def walk(
        self,
        top: PathArg = "/",
        topdown: bool = True,
        onerror: Callable[[OSError], None] | None = None,
        followlinks: bool = False,
    ) -> Iterator[tuple[str, list[str], list[str]]]:
        """`os.walk` over the volume (one loop round trip per directory; `onerror` runs on the loop)."""
        walker = self.avolume.walk(top, topdown, onerror, followlinks)
        try:
            while True:
                try:
                    yield self._run(walker.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run_from_any_thread(walker.aclose())
