"""File objects over volume handles: `RawFile` is an `io.RawIOBase` that the sync API wraps in
io's buffered (and text) layers exactly as the built-in `open()` does; `AsyncFile` is its
unbuffered asyncio counterpart. Both keep their own position and use positional pread/pwrite."""

from __future__ import annotations

import io
import os
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from mortar.core.fops import Buffer

if TYPE_CHECKING:
    from mortar.client.sync import Volume
    from mortar.client.volume import AsyncVolume, FileHandle


class _Closable(Protocol):
    async def close(self) -> None: ...


T = TypeVar("T", bound=_Closable)
BUFFER_SIZE = 128 * 1024  # buffered layer size: one readv/writev per 128 KiB, not per 8 KiB


def parse_mode(mode: str) -> tuple[int, bool, bool, bool]:
    """`open()`'s mode string -> (os flags, readable, writable, binary); ValueError like open()."""
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwaxb+t") or len(chars & set("rwax")) != 1:
        raise ValueError(f"invalid mode: {mode!r}")
    if "b" in chars and "t" in chars:
        raise ValueError("can't have text and binary mode at once")
    plus = "+" in chars
    kind = (chars & set("rwax")).pop()
    access = os.O_RDWR if plus else (os.O_RDONLY if kind == "r" else os.O_WRONLY)
    extra = {
        "r": 0,
        "w": os.O_CREAT | os.O_TRUNC,
        "a": os.O_CREAT | os.O_APPEND,
        "x": os.O_CREAT | os.O_EXCL,
    }[kind]
    return access | extra, kind == "r" or plus, kind != "r" or plus, "b" in chars


class Opening(Generic[T]):
    """An open in progress: `await` it for the file, or `async with` it to close automatically."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._result: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    async def __aenter__(self) -> T:
        self._result = await self._coro
        return self._result

    async def __aexit__(self, *exc: object) -> None:
        if self._result is not None:
            await self._result.close()


def _seek_target(offset: int, whence: int, pos: int, size: int | None) -> int:
    if whence == os.SEEK_SET:
        target = offset
    elif whence == os.SEEK_CUR:
        target = pos + offset
    elif whence == os.SEEK_END:
        assert size is not None
        target = size + offset
    else:
        raise ValueError(f"invalid whence ({whence})")
    if target < 0:
        raise OSError(22, os.strerror(22))
    return target


class AsyncFile:
    """A binary file on the volume for asyncio code. Unbuffered: each read or write is a call
    (the client graph's performance translators do the caching)."""

    def __init__(self, volume: AsyncVolume, handle: FileHandle, mode: str, readable: bool, writable: bool):
        self._volume = volume
        self.handle = handle
        self.mode = mode
        self._readable = readable
        self._writable = writable
        self._pos = 0

    @classmethod
    async def create(cls, volume: AsyncVolume, handle: FileHandle, mode: str) -> AsyncFile:
        _, readable, writable, _ = parse_mode(mode)
        f = cls(volume, handle, mode, readable, writable)
        if handle.append:
            f._pos = (await volume.fstat(handle)).st_size
        return f

    @property
    def name(self) -> str:
        return self.handle.path

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def _check(self, want_read: bool = False, want_write: bool = False) -> None:
        if self.handle.closed:
            raise ValueError("I/O operation on closed file")
        if want_read and not self._readable:
            raise io.UnsupportedOperation("not readable")
        if want_write and not self._writable:
            raise io.UnsupportedOperation("not writable")

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return self._writable

    async def read(self, size: int = -1) -> bytes:
        self._check(want_read=True)
        if size is None or size < 0:
            size = max(0, (await self._volume.fstat(self.handle)).st_size - self._pos)
            chunks = [await self._volume.pread(self.handle, size, self._pos)] if size else []
            self._pos += len(chunks[0]) if chunks else 0
            while True:  # the file may have grown since fstat
                more = await self._volume.pread(self.handle, 1 << 20, self._pos)
                if not more:
                    return b"".join(chunks)
                chunks.append(more)
                self._pos += len(more)
        data = await self._volume.pread(self.handle, size, self._pos)
        self._pos += len(data)
        return data

    async def readinto(self, buf: Buffer) -> int:
        self._check(want_read=True)
        n = await self._volume.preadinto(self.handle, buf, self._pos)
        self._pos += n
        return n

    async def write(self, data: Buffer) -> int:
        self._check(want_write=True)
        n = await self._volume.pwrite(self.handle, data, self._pos)
        last = self.handle.last_iatt
        self._pos = last.size if self.handle.append and last is not None else self._pos + n
        return n

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        if whence == os.SEEK_DATA:
            self._pos = await self._volume.seek_data(self.handle, offset)
        elif whence == os.SEEK_HOLE:
            self._pos = await self._volume.seek_hole(self.handle, offset)
        else:
            size = (await self._volume.fstat(self.handle)).st_size if whence == os.SEEK_END else None
            self._pos = _seek_target(offset, whence, self._pos, size)
        return self._pos

    async def tell(self) -> int:
        self._check()
        return self._pos

    async def truncate(self, size: int | None = None) -> int:
        self._check(want_write=True)
        size = self._pos if size is None else size
        await self._volume.ftruncate(self.handle, size)
        return size

    async def flush(self) -> None:
        self._check()

    async def fsync(self) -> None:
        self._check()
        await self._volume.fsync(self.handle)

    async def close(self) -> None:
        if not self.handle.closed:
            await self._volume.close(self.handle)

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncFile {self.name!r} mode={self.mode!r}>"


class RawFile(io.RawIOBase):
    """The unbuffered layer under the sync `Volume.open()`; `buffering=0` returns it directly."""

    def __init__(self, volume: Volume, handle: FileHandle, mode: str, readable: bool, writable: bool) -> None:
        super().__init__()
        self._volume = volume
        self.handle = handle
        self.mode = mode
        self._readable = readable
        self._writable = writable
        self._pos = volume.fstat(handle).st_size if handle.append else 0

    @property
    def name(self) -> str:
        return self.handle.path

    def readable(self) -> bool:
        self._checkClosed()
        return self._readable

    def writable(self) -> bool:
        self._checkClosed()
        return self._writable

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def _need(self, readable: bool) -> None:
        self._checkClosed()
        if readable and not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        if not readable and not self._writable:
            raise io.UnsupportedOperation("File not open for writing")

    def readinto(self, buffer: Any) -> int:
        self._need(readable=True)
        n = self._volume.preadinto(self.handle, buffer, self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        self._need(readable=True)
        data = self._volume.pread(self.handle, size, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        """The rest of the file in as few calls as its size allows (not 8 KiB at a time)."""
        self._need(readable=True)
        size = max(0, self._volume.fstat(self.handle).st_size - self._pos)
        chunks: list[bytes] = []
        while True:
            data = self._volume.pread(self.handle, size or (1 << 20), self._pos)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            self._pos += len(data)
            size = 0

    def write(self, b: Any) -> int:
        self._need(readable=False)
        n = self._volume.pwrite(self.handle, b, self._pos)
        last = self.handle.last_iatt
        self._pos = last.size if self.handle.append and last is not None else self._pos + n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_DATA:
            self._pos = self._volume.seek_data(self.handle, offset)
        elif whence == os.SEEK_HOLE:
            self._pos = self._volume.seek_hole(self.handle, offset)
        else:
            size = self._volume.fstat(self.handle).st_size if whence == os.SEEK_END else None
            self._pos = _seek_target(offset, whence, self._pos, size)
        return self._pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self._need(readable=False)
        size = self._pos if size is None else size
        self._volume.ftruncate(self.handle, size)
        return size

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a volume file has no OS file descriptor")

    def isatty(self) -> bool:
        self._checkClosed()
        return False

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.handle.closed:
                self._volume._close_handle_from_any_thread(self.handle)
        finally:
            super().close()

    def __repr__(self) -> str:
        return f"<mortar.RawFile name={self.name!r} mode={self.mode!r}>"


def check_open_args(
    mode: str, buffering: int, encoding: str | None, errors: str | None, newline: str | None
) -> int:
    """The os flags for `mode`; ValueError for the combinations the built-in `open()` refuses."""
    flags, _, _, binary = parse_mode(mode)
    if binary and (encoding is not None or errors is not None or newline is not None):
        raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
    if buffering == 0 and not binary:
        raise ValueError("can't have unbuffered text I/O")
    if newline not in (None, "", "\n", "\r", "\r\n"):
        raise ValueError(f"illegal newline value: {newline!r}")
    return flags


def open_file(
    volume: Volume,
    handle: FileHandle,
    mode: str,
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
) -> io.IOBase:
    """Wrap an open handle like the built-in `open()`: raw, buffered, or text (arguments checked
    by `check_open_args` before the handle was opened)."""
    _, readable, writable, binary = parse_mode(mode)
    raw = RawFile(volume, handle, mode.replace("t", "").replace("b", "") + "b", readable, writable)
    line_buffering = False
    if buffering == 1 and not binary:
        line_buffering, buffering = True, -1
    if buffering == 0:
        return raw
    size = BUFFER_SIZE if buffering < 0 or buffering == 1 else buffering
    buffered: io.BufferedIOBase
    if readable and writable:
        buffered = io.BufferedRandom(raw, size)
    elif writable:
        buffered = io.BufferedWriter(raw, size)
    else:
        buffered = io.BufferedReader(raw, size)
    if binary:
        return buffered
    text = io.TextIOWrapper(buffered, encoding or "utf-8", errors, newline, line_buffering)
    text.mode = mode  # type: ignore[misc]
    return text
