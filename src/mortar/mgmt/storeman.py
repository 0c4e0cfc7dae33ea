"""Which configuration store this node uses, and the moves between them.

A node starts on its own SQLite file. When it probes a second host it becomes the first member of
an etcd cluster (`to_etcd`: start a member, copy everything over); a probed host `join`s that
cluster with a member of its own; `peer detach` makes a host `leave` (its member is removed and it
starts over on a fresh SQLite file). `WORKDIR/store.json` records the choice so a restarted
daemon reopens the same store: for etcd it restarts its member and keeps trying until the pool
has quorum again, answering "store unavailable" meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from mortar.mgmt.etcd import EtcdMember, EtcdStore
from mortar.mgmt.model import MgmtError
from mortar.mgmt.store import SqliteStore, Store, StoreError, copy_all

log = logging.getLogger(__name__)

ETCD_TIMEOUT = 5.0


@dataclass
class StoreConfig:
    kind: Literal["sqlite", "etcd"] = "sqlite"
    endpoints: list[str] = field(default_factory=list)
    client_url: str = ""
    peer_url: str = ""


class StoreHolder:
    """Owns the node's store (and etcd member); `store()` is what every operation reads and writes."""

    def __init__(self, workdir: Path, logdir: Path, node_uuid: str) -> None:
        self.workdir = workdir
        self.logdir = logdir
        self.node_uuid = node_uuid
        self.config_path = workdir / "store.json"
        self.config = StoreConfig()
        self.member: EtcdMember | None = None
        self._store: Store | None = None
        self._ready = asyncio.Event()
        #: bumped at every switch, so watchers know to start over on the new store
        self.generation = 0
        self._opener: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ---- access ------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.config.kind

    def store(self) -> Store:
        if self._store is None:
            raise MgmtError(
                "the pool's configuration store is not available yet (etcd has no quorum: "
                "are the other nodes' daemons running?)",
                503,
            )
        return self._store

    async def wait_ready(self) -> Store:
        await self._ready.wait()
        return self.store()

    # ---- open and close ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.config_path.exists():
            self.config = StoreConfig(**json.loads(self.config_path.read_text()))
        if self.config.kind == "sqlite":
            self._set(await SqliteStore.open(self.workdir / "store.db"))
        else:
            self.member = self._new_member(self.config.client_url, self.config.peer_url)
            self._opener = asyncio.get_running_loop().create_task(self._open_etcd(), name="etcd-open")

    async def _open_etcd(self) -> None:
        """Restart our member and connect; retried until the pool has quorum again."""
        member = self.member
        assert member is not None
        delay = 1.0
        while True:
            try:
                if not member.running and member.initialized:
                    await member.start(timeout=30)
                store = await EtcdStore.open(self._endpoints(), timeout=ETCD_TIMEOUT)
                await store.sync_endpoints()
                self._set(store)
                return
            except StoreError as exc:
                log.warning("etcd not available yet (%s); retrying in %gs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _endpoints(self) -> list[str]:
        mine = [self.config.client_url] if self.config.client_url else []
        return list(dict.fromkeys(mine + self.config.endpoints))

    def _set(self, store: Store) -> None:
        self._store = store
        self.generation += 1
        self._ready.set()
        log.info("configuration store: %s", self.describe())

    def describe(self) -> str:
        if self.config.kind == "sqlite":
            return f"sqlite {self.workdir / 'store.db'}"
        return f"etcd {', '.join(self._endpoints())}"

    def _save(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        os.replace(tmp, self.config_path)

    def _new_member(self, client_url: str, peer_url: str) -> EtcdMember:
        return EtcdMember(
            self.node_uuid,
            self.workdir / "etcd",
            client_url,
            peer_url,
            log_path=self.logdir / "etcd.log",
        )

    async def _drop_store(self) -> None:
        old, self._store = self._store, None
        self._ready.clear()
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opener
        await self._drop_store()
        if self.member is not None:
            await self.member.stop()

    # ---- moves ---------------------------------------------------------------------------------

    async def to_etcd(self, client_url: str, peer_url: str) -> None:
        """Become the first member of a new etcd cluster holding everything the SQLite file had."""
        async with self._lock:
            if self.config.kind == "etcd":
                return
            old = self.store()
            member = self._new_member(client_url, peer_url)
            await member.start_new_cluster(timeout=30)
            try:
                etcd = await EtcdStore.open([client_url], timeout=ETCD_TIMEOUT)
                await copy_all(old, etcd)
            except BaseException:
                await member.stop()
                raise
            self.member = member
            self.config = StoreConfig("etcd", [client_url], client_url, peer_url)
            self._save()
            await self._drop_store()
            _retire(self.workdir / "store.db", "migrated")
            self._set(etcd)
            log.info("the pool's configuration moved from SQLite to etcd (%s)", client_url)

    async def join(self, via: Sequence[str], client_url: str, peer_url: str) -> None:
        """Join the etcd cluster at `via` with a new member; this node's SQLite state is set aside."""
        async with self._lock:
            if self.config.kind == "etcd":
                raise MgmtError("this node already belongs to a pool", 409)
            member = self._new_member(client_url, peer_url)
            await member.join(list(via), timeout=60)
            try:
                etcd = await EtcdStore.open([client_url, *via], timeout=ETCD_TIMEOUT)
                await etcd.sync_endpoints()
            except BaseException:
                await member.remove(via)
                raise
            self.member = member
            self.config = StoreConfig("etcd", etcd.endpoints, client_url, peer_url)
            self._save()
            await self._drop_store()
            _retire(self.workdir / "store.db", "joined")
            self._set(etcd)

    async def leave(self, others: Sequence[str]) -> None:
        """Leave the etcd cluster (peer detach) and start over on an empty SQLite file."""
        async with self._lock:
            if self.config.kind != "etcd":
                return
            await self._drop_store()
            if self.member is not None:
                await self.member.remove(via=others, wipe=True)
                self.member = None
            self.config = StoreConfig()
            self._save()
            _retire(self.workdir / "store.db", "left")
            self._set(await SqliteStore.open(self.workdir / "store.db"))

    async def refresh_endpoints(self) -> None:
        """Follow membership changes so a restarted daemon can reach every member."""
        store = self._store
        if isinstance(store, EtcdStore):
            endpoints = await store.sync_endpoints()
            if sorted(endpoints) != sorted(self.config.endpoints):
                self.config.endpoints = endpoints
                self._save()


def _retire(path: Path, why: str) -> None:
    """Keep an SQLite file that is no longer used, out of the way (for the operator's eyes only)."""
    for suffix in ("", "-wal", "-shm", ".lock"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{path}.{why}-{int(time.time())}{suffix}"))
