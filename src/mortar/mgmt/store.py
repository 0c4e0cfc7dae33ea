"""The node daemon's configuration store: one interface, an embedded SQLite file or an etcd cluster.

A single-node pool keeps its configuration in SQLite; when a second host joins, the pool moves to
etcd (see `mortar.mgmt.etcd`) with `copy_all`. Both implementations follow etcd's data model so that
callers cannot tell them apart: a store-wide revision that grows by one per write transaction, a
per-key create/mod revision and version, compare-and-swap transactions, watches that replay history
from a revision, and a pool-wide mutex whose key lives in the keyspace (so a txn can be fenced on it).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")

LOCK_PREFIX = "/_locks/"
"""Lock keys live under this prefix (`/_locks/NAME/OWNER`); `copy_all` skips them."""


class StoreError(Exception):
    """A store operation failed (bad request, closed store, corrupt file...)."""


class StoreUnavailable(StoreError):
    """The store cannot serve the request within its bound (etcd lost quorum or is unreachable)."""


class StoreCompacted(StoreError):
    """A watch asked for history that has been compacted away; re-read the state and watch again."""

    def __init__(self, compact_revision: int) -> None:
        self.compact_revision = compact_revision
        super().__init__(f"revision history compacted up to {compact_revision}")


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key with its value and etcd-style bookkeeping (revisions are store-wide)."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes | None  # None for a delete
    revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """One guard of a transaction. Build with the class methods; a value compare on an absent key fails."""

    key: str
    target: Literal["value", "mod", "create"]
    op: Literal["==", "!="]
    operand: bytes | int

    @classmethod
    def value(cls, key: str, value: bytes) -> Compare:
        return cls(key, "value", "==", value)

    @classmethod
    def absent(cls, key: str) -> Compare:
        return cls(key, "create", "==", 0)

    @classmethod
    def exists(cls, key: str) -> Compare:
        return cls(key, "create", "!=", 0)

    @classmethod
    def mod_revision(cls, key: str, revision: int) -> Compare:
        """The key was last modified at `revision` (0: the key is absent)."""
        return cls(key, "mod", "==", revision)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


@dataclass(frozen=True, slots=True)
class DeletePrefix:
    prefix: str


Op = Put | Delete | DeletePrefix


@dataclass(slots=True)
class LockHandle:
    """A held pool-wide lock. `key` exists in the store while the lock is held: fence writes with
    `Compare.exists(handle.key)`. `lost` is set if the lease could not be kept alive."""

    name: str
    key: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key.startswith("/") or "\x00" in key:
        raise ValueError(f"store keys are absolute paths like /volumes/NAME/info, got {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    if prefix != "":
        check_key(prefix)
    return prefix


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix` (etcd's range_end); b"\\0" means no end."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\x00"


def compare_holds(c: Compare, kv: KeyValue | None) -> bool:
    """Evaluate a compare as etcd does; shared so both stores agree."""
    if c.target == "value":
        if kv is None:
            return False
        equal = kv.value == c.operand
    elif c.target == "mod":
        equal = (kv.mod_revision if kv else 0) == c.operand
    else:
        equal = (kv.create_revision if kv else 0) == c.operand
    return equal if c.op == "==" else not equal


def lock_key_prefix(name: str) -> str:
    if not name or "\x00" in name:
        raise ValueError(f"bad lock name {name!r}")
    return LOCK_PREFIX + name.strip("/")


class Watch(abc.ABC):
    """Events under a prefix, in revision order, after a given revision.

    Iterate it directly (the stream is set up on the first `__anext__`) or use `async with` to set it
    up eagerly, so that with `after=None` every write made after `__aenter__` returns is seen.
    """

    def __init__(self, prefix: str, after: int | None) -> None:
        self.prefix = check_prefix(prefix)
        self.after = after
        self._started = False
        self._closed = False

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _next(self) -> WatchEvent: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            await self.start()
        return await self._next()

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self._start()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Store(abc.ABC):
    """The configuration store interface (asyncio). Keys are absolute str paths, values bytes."""

    @abc.abstractmethod
    async def get_with_revision(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under `prefix` (sorted) and the revision of this view: read, then watch after it."""

    @abc.abstractmethod
    async def txn(
        self, compares: Sequence[Compare], on_success: Sequence[Op], on_failure: Sequence[Op] = ()
    ) -> bool:
        """Atomically run `on_success` if every compare holds, else `on_failure`; True if they held."""

    @abc.abstractmethod
    async def revision(self) -> int: ...

    @abc.abstractmethod
    def watch(self, prefix: str, after: int | None = None) -> Watch:
        """Events under `prefix` with revision > `after` (None: from when the watch is set up)."""

    @abc.abstractmethod
    def lock(
        self, name: str, ttl: float = 10.0, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[LockHandle]:
        """A pool-wide mutex, freed `ttl` s after its holder dies; TimeoutError after `timeout`."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def get(self, key: str) -> bytes | None:
        kv = await self.get_with_revision(key)
        return kv.value if kv else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return (await self.snapshot(prefix))[0]

    async def put(self, key: str, value: bytes) -> None:
        await self.txn((), (Put(key, value),))

    async def delete(self, key: str) -> bool:
        return await self._delete_count(Delete(key)) > 0

    async def delete_prefix(self, prefix: str) -> int:
        return await self._delete_count(DeletePrefix(prefix))

    @abc.abstractmethod
    async def _delete_count(self, op: Delete | DeletePrefix) -> int: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def copy_all(
    src: Store, dst: Store, prefix: str = "", batch: int = 100, batch_bytes: int = 1 << 20
) -> int:
    """Copy every key under `prefix` from `src` to `dst` (a pool moving from SQLite to etcd).

    Keys already in `dst` are overwritten, others left alone; lock keys are skipped (their leases
    belong to the source). Batches stay under etcd's default limits (128 ops and 1.5 MiB per txn).
    Returns the number of keys copied. Revisions are not preserved: watchers must start from `dst`'s.
    """
    items, _ = await src.snapshot(prefix)
    ops: list[Op] = []
    size = copied = 0
    for key, value in items.items():
        if key.startswith(LOCK_PREFIX):
            continue
        if ops and (len(ops) >= batch or size + len(key) + len(value) > batch_bytes):
            await dst.txn((), ops)
            ops, size = [], 0
        ops.append(Put(key, value))
        size += len(key) + len(value)
        copied += 1
    if ops:
        await dst.txn((), ops)
    log.info("copied %d keys under %r to the new store", copied, prefix or "/")
    return copied


# --------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY, value BLOB NOT NULL,
    create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER NOT NULL, idx INTEGER NOT NULL, kind TEXT NOT NULL, key BLOB NOT NULL, value BLOB,
    PRIMARY KEY (rev, idx));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
"""


class SqliteStore(Store):
    """The store of a single-node pool: one SQLite file, one daemon (an exclusive flock enforces it).

    All SQL runs on one private thread, which also serializes writers. Every write transaction is
    appended to an event log (the last `history` revisions are kept) so a watch can replay from a
    revision; live watchers are fed in-process after each commit.
    """

    def __init__(self, path: Path, history: int = 10000) -> None:
        self.path = Path(path)
        self.history = history
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="mortar-store")
        self._db: sqlite3.Connection | None = None
        self._lockfd = -1
        self._watchers: set[_SqliteWatch] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    async def open(cls, path: str | os.PathLike[str], history: int = 10000) -> SqliteStore:
        store = cls(Path(path), history)
        try:
            await store._run(store._open)
        except BaseException:
            await store.close()
            raise
        return store

    def _open(self) -> None:
        self._lockfd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            self._lockfd = -1
            raise StoreError(f"{self.path} is open by another daemon") from None
        self._db = db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        # Lock rows left by a previous incarnation of this daemon: their holder is dead.
        lo = LOCK_PREFIX.encode()
        stale = db.execute("SELECT 1 FROM kv WHERE key >= ? AND key < ?", (lo, prefix_end(lo))).fetchone()
        if stale:
            self._apply((), (DeletePrefix(LOCK_PREFIX),), ())
        log.info("store %s open at revision %d", self.path, self._meta("revision"))

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._executor is None:
            raise StoreError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is closed")
        return self._db

    def _meta(self, name: str) -> int:
        return int(self._conn().execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])

    def _row(self, key: bytes) -> KeyValue | None:
        row = (
            self._conn()
            .execute("SELECT value, create_rev, mod_rev, version FROM kv WHERE key = ?", (key,))
            .fetchone()
        )
        return KeyValue(key.decode(), bytes(row[0]), row[1], row[2], row[3]) if row else None

    def _range(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        end = prefix_end(prefix)
        if end == b"\x00":
            rows = self._conn().execute("SELECT key, value FROM kv WHERE key >= ? ORDER BY key", (prefix,))
        else:
            rows = self._conn().execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key", (prefix, end)
            )
        return [(bytes(k), bytes(v)) for k, v in rows]

    async def get_with_revision(self, key: str) -> KeyValue | None:
        return await self._run(self._row, check_key(key).encode())

    async def snapshot(self, prefix: str) -> tuple[dict[str, bytes], int]:
        p = check_prefix(prefix).encode()

        def read() -> tuple[dict[str, bytes], int]:
            return {k.decode(): v for k, v in self._range(p)}, self._meta("revision")

        return await self._run(read)

    async def revision(self) -> int:
        return await self._run(self._meta, "revision")

    async def txn(
        self, compares: Sequence[Compare], on_success: Sequence[Op], on_failure: Sequence[Op] = ()
    ) -> bool:
        ok, _ = await self._write(compares, on_success, on_failure)
        return ok

    async def _delete_count(self, op: Delete | DeletePrefix) -> int:
        _, events = await self._write((), (op,), ())
        return len(events)

    async def _write(
        self, compares: Sequence[Compare], on_success: Sequence[Op], on_failure: Sequence[Op]
    ) -> tuple[bool, list[WatchEvent]]:
        for c in compares:
            check_key(c.key)
        for op in (*on_success, *on_failure):
            if isinstance(op, DeletePrefix):
                check_prefix(op.prefix)
            else:
                check_key(op.key)
        ok, events = await self._run(self._apply, compares, on_success, on_failure)
        if events:
            for w in list(self._watchers):
                w.feed(events)
        return ok, events

    def _apply(
        self, compares: Sequence[Compare], on_success: Sequence[Op], on_failure: Sequence[Op]
    ) -> tuple[bool, list[WatchEvent]]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            ok = all(compare_holds(c, self._row(c.key.encode())) for c in compares)
            rev = self._meta("revision") + 1
            events: list[WatchEvent] = []
            for op in on_success if ok else on_failure:
                events.extend(self._apply_op(db, op, rev))
            if events:
                db.executemany(
                    "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                    [(rev, i, e.kind, e.key.encode(), e.value) for i, e in enumerate(events)],
                )
                db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
                if rev % 100 == 0:
                    self._compact(db, rev)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ok, events

    def _apply_op(self, db: sqlite3.Connection, op: Op, rev: int) -> list[WatchEvent]:
        if isinstance(op, Put):
            k = op.key.encode()
            old = self._row(k)
            db.execute(
                "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?)",
                (k, bytes(op.value), old.create_revision if old else rev, rev, old.version + 1 if old else 1),
            )
            return [WatchEvent("put", op.key, bytes(op.value), rev)]
        if isinstance(op, Delete):
            keys = [op.key.encode()] if self._row(op.key.encode()) else []
        else:
            keys = [k for k, _ in self._range(op.prefix.encode())]
        db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])
        return [WatchEvent("delete", k.decode(), None, rev) for k in keys]

    def _compact(self, db: sqlite3.Connection, rev: int) -> None:
        keep_from = rev - self.history
        if keep_from > self._meta("compacted"):
            db.execute("DELETE FROM events WHERE rev < ?", (keep_from,))
            db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (keep_from,))

    def _history(self, prefix: bytes, after: int) -> tuple[list[WatchEvent], int]:
        """Events under `prefix` with revision > `after`, and the current revision."""
        compacted = self._meta("compacted")
        if after + 1 < compacted:
            raise StoreCompacted(compacted)
        rows = self._conn().execute(
            "SELECT rev, kind, key, value FROM events WHERE rev > ? ORDER BY rev, idx", (after,)
        )
        events = [
            WatchEvent(kind, bytes(k).decode(), None if v is None else bytes(v), r)
            for r, kind, k, v in rows
            if bytes(k).startswith(prefix)
        ]
        return events, self._meta("revision")

    def watch(self, prefix: str, after: int | None = None) -> Watch:
        return _SqliteWatch(self, prefix, after)

    @contextlib.asynccontextmanager
    async def lock(
        self, name: str, ttl: float = 10.0, timeout: float | None = None
    ) -> AsyncIterator[LockHandle]:
        """In-process mutex plus a lock row; `ttl` has no use here (the holder is this process)."""
        if ttl <= 0:
            raise ValueError("lock ttl must be positive")
        base = lock_key_prefix(name)
        mutex = self._locks.setdefault(base, asyncio.Lock())
        async with asyncio.timeout(timeout):
            await mutex.acquire()
        try:
            handle = LockHandle(name, f"{base}/{secrets.token_hex(8)}")
            await self.put(handle.key, b"")
            try:
                yield handle
            finally:
                if self._db is not None:
                    await self.delete(handle.key)
        finally:
            mutex.release()

    async def close(self) -> None:
        for w in list(self._watchers):
            w.feed(None)
        self._watchers.clear()
        if self._executor is None:
            return

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lockfd >= 0:
                os.close(self._lockfd)  # releases the flock
                self._lockfd = -1

        executor, self._executor = self._executor, None
        await asyncio.get_running_loop().run_in_executor(executor, shut)
        executor.shutdown(wait=True)


class _SqliteWatch(Watch):
    def __init__(self, store: SqliteStore, prefix: str, after: int | None) -> None:
        super().__init__(prefix, after)
        self._store = store
        self._queue: asyncio.Queue[list[WatchEvent] | None] = asyncio.Queue()
        self._pending: list[WatchEvent] = []
        self._seen = 0  # highest revision already delivered or queued from history

    def feed(self, events: list[WatchEvent] | None) -> None:
        self._queue.put_nowait(events)

    async def _start(self) -> None:
        # Subscribe first, then read history on the store thread (which orders it against writes);
        # live batches at or below the history's revision are dropped as duplicates.
        self._store._watchers.add(self)
        try:
            if self.after is None:
                self._seen = await self._store.revision()
            else:
                history, current = await self._store._run(
                    self._store._history, self.prefix.encode(), self.after
                )
                self._pending = history
                self._seen = max(current, self.after)  # a future `after` skips events up to it
        except BaseException:
            self._store._watchers.discard(self)
            raise

    async def _next(self) -> WatchEvent:
        while not self._pending:
            batch = await self._queue.get()
            if batch is None:
                self._closed = True
                raise StopAsyncIteration
            if batch[0].revision <= self._seen:
                continue
            self._seen = batch[0].revision
            self._pending = [e for e in batch if e.key.startswith(self.prefix)]
        return self._pending.pop(0)

    async def _close(self) -> None:
        self._store._watchers.discard(self)
        self._queue.put_nowait(None)
