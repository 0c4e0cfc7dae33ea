"""Replicate over real bricks in temporary directories: posix <- locks <- index on each brick, and
per client one debug/error-gen per brick (named vol-client-<i>, as protocol/client would be) under
a cluster/replicate. Error-gen takes a replica down and up in-process."""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mortar.core.context import CallContext, call_context
from mortar.core.fops import GFID_REQ, Fd, Loc
from mortar.core.gfid import ROOT_GFID, Gfid
from mortar.core.translator import Translator
from mortar.xlators.cluster.afr import ReplicateTranslator
from mortar.xlators.debug.error_gen import ErrorGenTranslator
from mortar.xlators.features.index import IndexTranslator
from mortar.xlators.features.locks import LocksTranslator
from mortar.xlators.storage.posix import PosixTranslator

VOLUME_ID = str(uuid.UUID(int=0xAF12))
ROOT = ROOT_GFID


@dataclass
class Brick:
    directory: Path
    posix: PosixTranslator
    locks: LocksTranslator
    index: IndexTranslator

    def path(self, rel: str) -> Path:
        return self.directory / rel

    def read(self, rel: str) -> bytes:
        return (self.directory / rel).read_bytes()

    def counters(self, rel: str, key: str) -> tuple[int, int, int]:
        """A changelog xattr of `rel` on this brick, (0, 0, 0) when absent."""
        try:
            raw = os.getxattr(self.directory / rel, key, follow_symlinks=False)
        except OSError:
            return (0, 0, 0)
        return struct.unpack(">3i", raw[:12])

    def pending(self, rel: str) -> dict[str, tuple[int, int, int]]:
        """Every non-zero trusted.afr.* counter of `rel`."""
        out = {}
        for key in os.listxattr(self.directory / rel, follow_symlinks=False):
            if key.startswith("trusted.afr."):
                value = self.counters(rel, key)
                if value != (0, 0, 0):
                    out[key] = value
        return out

    def listed(self, kind: str = "xattrop") -> set[str]:
        base = self.directory / ".mortar" / "indices" / kind
        return set(os.listdir(base)) if base.exists() else set()


@dataclass
class Client:
    """One client's view: its error-gens (one per brick) and its replicate translator."""

    name: str
    gens: list[ErrorGenTranslator]
    afr: ReplicateTranslator

    def down(self, i: int) -> None:
        self.gens[i].set_down(True)

    def up(self, i: int) -> None:
        self.gens[i].set_down(False)

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        token = call_context.set(CallContext(client=self.name, pid=os.getpid()))
        try:
            yield
        finally:
            call_context.reset(token)


@dataclass
class Cluster:
    bricks: list[Brick]
    clients: list[Client] = field(default_factory=list)

    @property
    def afr(self) -> ReplicateTranslator:
        return self.clients[0].afr

    def down(self, i: int) -> None:
        for c in self.clients:
            c.down(i)

    def up(self, i: int) -> None:
        for c in self.clients:
            c.up(i)

    def copies(self, rel: str) -> list[bytes]:
        return [b.read(rel) for b in self.bricks]

    def clean(self, rel: str) -> bool:
        """No pending counter (dirty included) on any brick, and no index entry anywhere."""
        return all(not b.pending(rel) for b in self.bricks) and all(
            not b.listed() and not b.listed("dirty") for b in self.bricks
        )


MakeCluster = Callable[..., Awaitable[Cluster]]


async def _client(cluster: Cluster, name: str, options: dict[str, Any]) -> Client:
    gens = [ErrorGenTranslator(f"vol-client-{i}", {}, [b.index]) for i, b in enumerate(cluster.bricks)]
    for g in gens:
        await g.init()
    opts = {"post-op-delay": "0.05", "child-up-timeout": "0.1", **options}
    afr = ReplicateTranslator("vol-replicate-0", {k.replace("_", "-"): v for k, v in opts.items()}, gens)
    await afr.init()
    client = Client(name, gens, afr)
    cluster.clients.append(client)
    return client


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[MakeCluster]:
    """`await make_cluster(n=3, **replicate options)`; `await add_client(cluster, name)` for more."""
    made: list[Cluster] = []

    async def make(n: int = 3, **options: Any) -> Cluster:
        bricks = []
        for i in range(n):
            d = tmp_path / f"brick{i}"
            posix = PosixTranslator(
                f"posix{i}",
                {
                    "directory": str(d),
                    "volume-id": VOLUME_ID,
                    "brick-create": "on",
                    "health-check-interval": "0",
                },
            )
            locks = LocksTranslator(f"locks{i}", {}, [posix])
            index = IndexTranslator(f"index{i}", {}, [locks])
            for xl in (posix, locks, index):
                await xl.init()
            bricks.append(Brick(d, posix, locks, index))
        cluster = Cluster(bricks)
        made.append(cluster)
        await _client(cluster, "client-a", options)
        return cluster

    yield make
    for cluster in made:
        for c in cluster.clients:
            await c.afr.fini()
            for g in c.gens:
                await g.fini()
        for b in cluster.bricks:
            for xl in (b.index, b.locks, b.posix):
                await xl.fini()


async def add_client(cluster: Cluster, name: str, **options: Any) -> Client:
    return await _client(cluster, name, options)


# ---- fop helpers -------------------------------------------------------------------------------


def entry(name: str, parent: Gfid = ROOT) -> Loc:
    return Loc("/" + name, pargfid=parent, name=name)


async def create(xl: Translator, name: str, parent: Gfid = ROOT, mode: int = 0o644) -> Fd:
    gfid = Gfid.random()
    fd = Fd(gfid)
    await xl.create(entry(name, parent), os.O_RDWR | os.O_CREAT, mode, 0, fd, {GFID_REQ: bytes(gfid)})
    return fd


async def write_file(xl: Translator, name: str, data: bytes, parent: Gfid = ROOT) -> Gfid:
    fd = await create(xl, name, parent)
    if data:
        await xl.writev(fd, data, 0, 0)
    await xl.release(fd)
    return fd.gfid


async def open_file(xl: Translator, name: str, flags: int = os.O_RDWR, parent: Gfid = ROOT) -> Fd:
    rep = await xl.lookup(entry(name, parent))
    fd = Fd(rep.iatt.gfid)
    await xl.open(Loc("/" + name, gfid=rep.iatt.gfid), flags, fd)
    return fd


async def read_file(xl: Translator, name: str, parent: Gfid = ROOT) -> bytes:
    fd = await open_file(xl, name, os.O_RDONLY, parent)
    try:
        out = b""
        while chunk := bytes((await xl.readv(fd, 1 << 20, len(out), 0)).data):
            out += chunk
        return out
    finally:
        await xl.release(fd)


async def mkdir(xl: Translator, name: str, parent: Gfid = ROOT) -> Gfid:
    gfid = Gfid.random()
    await xl.mkdir(entry(name, parent), 0o755, 0, {GFID_REQ: bytes(gfid)})
    return gfid


def tree(root: Path) -> dict[str, tuple[str, bytes, str]]:
    """Everything under a brick root (its private directory left out): kind, content, gfid."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and ".mortar" in dirnames:
            dirnames.remove(".mortar")
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            gfid = os.getxattr(p, "trusted.mortar.gfid", follow_symlinks=False).hex()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p).encode(), gfid)
            elif p.is_dir():
                out[rel] = ("dir", b"", gfid)
            else:
                out[rel] = ("file", p.read_bytes(), gfid)
    return out
