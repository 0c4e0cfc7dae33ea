"""Path resolution for the client API: a path becomes (parent gfid, name, attributes) through
`lookup` one component at a time, with directories cached in the inode table's dentry cache.

Below the client nothing sees a full path: fops name objects by gfid or (parent gfid, name). The
cache makes a deep path cost one lookup (the last component is always asked fresh, so stat and
open see the current object). A cached directory may have been renamed or removed by another
client; a fop that then fails with ESTALE or ENOENT is retried once with every component looked up
fresh (`Resolver.run`). Symlinks in the middle of a path are followed (absolute targets start at
the volume root, as gfapi does); `..` is walked physically and stops at the root, as POSIX does.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from mortar.core.errors import FopError
from mortar.core.fops import Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.iatt import Iatt
from mortar.core.inode import Inode, InodeTable
from mortar.core.translator import Translator

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_SYMLINKS = 40  # Linux's limit before ELOOP


def split_path(path: str | os.PathLike[str]) -> tuple[list[str], bool]:
    """Components of a volume path (`.` and empty ones dropped) and whether it ended with `/`."""
    text = os.fspath(path)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if "\0" in text:
        raise FopError(errno.EINVAL, "embedded null byte in path")
    comps = [c for c in text.split("/") if c and c != "."]
    return comps, text.endswith("/") and bool(comps)


def join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


@dataclass(slots=True)
class Resolved:
    """Where a path led: the object's parent and name (None/"" for the root or a `..` result)."""

    pargfid: Gfid | None
    name: str
    iatt: Iatt | None
    path: str
    parent: Inode | None = None
    inode: Inode | None = None

    @property
    def attrs(self) -> Iatt:
        if self.iatt is None:
            raise FopError(errno.ENOENT, f"{self.path} does not exist")
        return self.iatt

    @property
    def gfid(self) -> Gfid:
        return self.attrs.gfid

    def loc(self) -> Loc:
        """Names the object by gfid (with parent and name for translators that want them)."""
        return Loc(self.path, self.gfid, self.pargfid, self.name, self.inode, self.parent)

    def entry_loc(self) -> Loc:
        """Names the entry by (parent gfid, name): what namespace fops act on."""
        return Loc(self.path, None, self.pargfid, self.name, None, self.parent)


@dataclass(slots=True)
class Attempt:
    """One try of a path operation: whether the cache may be used, and which dentries it used."""

    fresh: bool
    used: list[tuple[Gfid, str]] = field(default_factory=list)


class Resolver:
    """Resolves paths against `top`, caching directories in `table` for `entry_timeout` seconds."""

    def __init__(self, top: Translator, table: InodeTable, entry_timeout: float | None = 1.0) -> None:
        self.top = top
        self.table = table
        self.entry_timeout = entry_timeout

    async def run(self, op: Callable[[Attempt], Awaitable[T]]) -> T:
        """Run `op`; if it fails with ESTALE/ENOENT after trusting cached dentries, drop them and
        run it once more with a fresh resolution."""
        attempt = Attempt(fresh=False)
        try:
            return await op(attempt)
        except FopError as exc:
            if exc.errno not in (errno.ESTALE, errno.ENOENT) or not attempt.used:
                raise
            log.debug("stale dentries %s (%s), retrying with fresh lookups", attempt.used, exc)
            for pargfid, name in attempt.used:
                self.table.unlink(pargfid, name)
        return await op(Attempt(fresh=True))

    # ---- the inode table ----------------------------------------------------------------------

    def link(self, pargfid: Gfid | None, name: str, iatt: Iatt) -> Inode:
        inode = self.table.link(pargfid, name, iatt)
        if iatt.is_dir and self.entry_timeout is not None:
            inode.ctx[self] = time.monotonic() + self.entry_timeout
        return inode

    def _cached_dir(self, pargfid: Gfid, name: str) -> Inode | None:
        inode = self.table.find(pargfid, name)
        if inode is None or (inode.mode & 0o170000) != 0o040000:
            return None
        if self.entry_timeout is not None and inode.ctx.get(self, 0.0) < time.monotonic():
            return None
        return inode

    # ---- walking -------------------------------------------------------------------------------

    async def lookup(self, pargfid: Gfid, name: str, path: str) -> Iatt:
        reply = await self.top.lookup(Loc(path, None, pargfid, name, None, self.table.get(pargfid)))
        self.link(pargfid, name, reply.iatt)
        return reply.iatt

    async def revalidate(self, gfid: Gfid, path: str) -> Iatt:
        """A name-less lookup: the object's current attributes by gfid."""
        reply = await self.top.lookup(Loc(path, gfid, None, "", self.table.get(gfid)))
        return reply.iatt

    async def resolve(
        self,
        path: str | os.PathLike[str],
        attempt: Attempt,
        *,
        follow: bool = True,
        missing_ok: bool = False,
    ) -> Resolved:
        """The object at `path`. With `missing_ok`, a missing last component gives `iatt=None`
        (and the parent it would be created in, after following symlinks)."""
        comps, trailing_slash = split_path(path)
        result = await self._walk(deque(comps), attempt, follow or trailing_slash, missing_ok)
        if trailing_slash and result.iatt is not None and not result.iatt.is_dir:
            raise FopError(errno.ENOTDIR, f"{result.path} is not a directory")
        return result

    async def resolve_parent(
        self, path: str | os.PathLike[str], attempt: Attempt, root_errno: int = errno.EEXIST
    ) -> Resolved:
        """The directory that holds the last component, and that component's name, for fops that
        act on a name (create, unlink, rename...); `root_errno` when there is no such name."""
        comps, _ = split_path(path)
        if not comps or comps[-1] == "..":
            raise FopError(root_errno, f"{os.fspath(path)!s} has no last component to act on")
        parent = await self._walk(deque(comps[:-1]), attempt, True, False)
        if parent.iatt is None or not parent.iatt.is_dir:
            raise FopError(errno.ENOTDIR, f"{parent.path} is not a directory")
        gfid = parent.iatt.gfid
        name = comps[-1]
        return Resolved(gfid, name, None, join(parent.path, name), self.table.get(gfid))

    async def _walk(
        self, comps: deque[str], attempt: Attempt, follow_last: bool, missing_ok: bool
    ) -> Resolved:
        stack: list[tuple[Gfid, str]] = [(ROOT_GFID, "/")]  # directories walked through, physically
        hops = 0
        while comps:
            name = comps.popleft()
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            last = not comps
            pargfid, ppath = stack[-1]
            path = join(ppath, name)
            if not last and not attempt.fresh:
                cached = self._cached_dir(pargfid, name)
                if cached is not None:
                    attempt.used.append((pargfid, name))
                    stack.append((cached.gfid, path))
                    continue
            try:
                iatt = await self.lookup(pargfid, name, path)
            except FopError as exc:
                if exc.errno == errno.ENOENT and last and missing_ok:
                    return Resolved(pargfid, name, None, path, self.table.get(pargfid))
                raise FopError(exc.errno, f"{path}: {exc.message}") from None
            if iatt.is_lnk and (follow_last or not last):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise FopError(errno.ELOOP, f"too many levels of symbolic links at {path}")
                target = (await self.top.readlink(Loc(path, iatt.gfid, pargfid, name))).target
                target_comps, _ = split_path(target)
                if target.startswith("/"):
                    del stack[1:]
                comps.extendleft(reversed(target_comps))
                continue
            if last:
                parent = self.table.get(pargfid)
                return Resolved(pargfid, name, iatt, path, parent, self.table.get(iatt.gfid))
            if not iatt.is_dir:
                raise FopError(errno.ENOTDIR, f"{path} is not a directory")
            stack.append((iatt.gfid, path))
        # the path named a directory already walked (the root, or the result of `..`)
        gfid, path = stack[-1]
        iatt = await self.revalidate(gfid, path)
        return Resolved(None, "", iatt, path, None, self.table.get(gfid))
