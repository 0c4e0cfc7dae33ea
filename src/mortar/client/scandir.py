"""Directory listing in pages: opendir, then readdirp from the last entry's offset cookie until an
empty page, so a directory of a million entries never becomes one reply or one list in memory."""

from __future__ import annotations

import errno
import os
from collections import deque
from typing import TYPE_CHECKING

from mortar.client.resolve import Attempt, join
from mortar.client.results import DirEntry
from mortar.core import fops
from mortar.core.errors import FopError
from mortar.core.fops import Fd
from mortar.core.gfid import Gfid

if TYPE_CHECKING:
    from mortar.client.volume import AsyncVolume, PathArg


class AsyncScandir:
    """`async for entry in volume.scandir(path)`; also `next_page()` for callers that batch.

    The directory is opened on first use and released at the end of the listing or on `aclose()`.
    Entries carry attributes from readdirp; symlinks also carry their target's (one extra lookup per
    symlink) unless `resolve_links` is off, as `listdir` does.
    """

    def __init__(self, volume: AsyncVolume, path: PathArg, *, resolve_links: bool = True) -> None:
        self._volume = volume
        self._path = path
        self._resolve_links = resolve_links
        self._fd: Fd | None = None
        self._dir_gfid: Gfid | None = None
        self._dir_path = ""
        self._offset = 0
        self._done = False
        self._buffer: deque[DirEntry] = deque()

    async def open(self) -> None:
        """Resolve and open the directory (raises FileNotFoundError, NotADirectoryError...)."""
        if self._fd is not None or self._done:
            return
        vol = self._volume

        async def op(attempt: Attempt) -> tuple[Fd, str]:
            res = await vol.resolver.resolve(self._path, attempt)
            if not res.attrs.is_dir:
                raise FopError(errno.ENOTDIR, f"{res.path} is not a directory")
            fd = Fd(res.gfid, os.O_RDONLY | os.O_DIRECTORY, is_dir=True, inode=res.inode)
            await vol.top.opendir(res.loc(), fd)
            return fd, res.path

        fd, self._dir_path = await vol._path_op(op, self._path)
        self._fd, self._dir_gfid = fd, fd.gfid

    async def next_page(self) -> list[DirEntry]:
        """The next entries (never `.` or `..`); an empty list once the listing is over."""
        await self.open()
        while not self._done:
            entries = await self._volume._guarded(self._read_page, self._dir_path)
            if entries:
                return entries
        return []

    async def _read_page(self) -> list[DirEntry]:
        fd = self._fd
        assert fd is not None
        reply = await self._volume.top.readdirp(fd, self._volume.readdir_size, self._offset)
        if not reply.entries or reply.entries[-1].offset == self._offset:
            await self.aclose()
            return []
        self._offset = reply.entries[-1].offset
        return await self._entries(reply.entries)

    async def _entries(self, raw: list[fops.DirEntry]) -> list[DirEntry]:
        resolver = self._volume.resolver
        dir_gfid = self._dir_gfid
        assert dir_gfid is not None
        out: list[DirEntry] = []
        for item in raw:
            if item.name in (".", ".."):
                continue
            path = join(self._dir_path, item.name)
            if item.iatt is None:
                try:
                    iatt = await resolver.lookup(dir_gfid, item.name, path)
                except FopError as exc:
                    if exc.errno == errno.ENOENT:  # removed since the listing was taken
                        continue
                    raise
            else:
                iatt = item.iatt
                resolver.link(dir_gfid, item.name, iatt)
            target = None
            if iatt.is_lnk and self._resolve_links:
                try:
                    target = (await resolver.resolve(path, Attempt(fresh=False))).iatt
                except FopError:
                    target = None  # dangling or looping: is_dir()/is_file() say False, as os does
            out.append(DirEntry(item.name, path, iatt, target))
        return out

    async def aclose(self) -> None:
        """Release the directory; safe to call twice."""
        self._done = True
        self._buffer.clear()
        fd, self._fd = self._fd, None
        if fd is not None and not self._volume.closed:
            await self._volume._guarded(lambda: self._volume.top.releasedir(fd), self._dir_path)

    def __aiter__(self) -> AsyncScandir:
        return self

    async def __anext__(self) -> DirEntry:
        if not self._buffer:
            self._buffer.extend(await self.next_page())
            if not self._buffer:
                raise StopAsyncIteration
        return self._buffer.popleft()

    async def __aenter__(self) -> AsyncScandir:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
