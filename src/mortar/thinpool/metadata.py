"""Metadata store: SQLite in WAL mode, one explicit transaction per pool commit.

Why SQLite rather than LMDB: it is in the standard library (every brick process loads this, and
no binary dependency is added); a WAL commit is atomic and, with `synchronous=FULL`, durable when
COMMIT returns, at the price of one fsync of the WAL; and it writes only the rows that changed
(4 KiB leaf and space-map blobs), so committing every second stays cheap. LMDB's advantage is fast
point reads, but this engine reads its metadata once at open and then serves every lookup from
memory, so that advantage would buy nothing. Crash safety is SQLite's: after a kill or power loss
the database holds exactly the last committed transaction.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from dataclasses import astuple, dataclass
from typing import Any

from mortar.core.errors import FopError
from mortar.thinpool.mapping import Changes

_SCHEMA = """
CREATE TABLE pool (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE volumes (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, size INTEGER NOT NULL, top INTEGER NOT NULL,
    origin INTEGER, state INTEGER NOT NULL, ctime REAL NOT NULL);
CREATE TABLE top_entries (
    top INTEGER NOT NULL, idx INTEGER NOT NULL, leaf INTEGER NOT NULL, PRIMARY KEY (top, idx)) WITHOUT ROWID;
CREATE TABLE leaves (id INTEGER PRIMARY KEY, map BLOB NOT NULL);
CREATE TABLE spacemap (chunk INTEGER PRIMARY KEY, counts BLOB NOT NULL);
"""


@dataclass(slots=True)
class VolumeRow:
    id: int
    name: str
    size: int
    top: int
    origin: int | None
    state: int
    ctime: float


@dataclass
class Loaded:
    kv: dict[str, Any]
    volumes: list[VolumeRow]
    top_entries: list[tuple[int, int, int]]
    leaves: list[tuple[int, bytes]]
    chunks: list[tuple[int, bytes]]


class MetadataStore:
    """The pool's metadata file. Not thread-safe by itself: the pool serialises commits."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        if not create and not os.path.exists(path):
            raise FopError(errno.ENOENT, f"thin pool metadata {path} does not exist")
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if create:
                self._db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
        except sqlite3.DatabaseError as exc:
            raise FopError(errno.EUCLEAN, f"thin pool metadata {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def size(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return total

    def load(self) -> Loaded:
        db = self._db
        try:
            db.execute("BEGIN")
            kv = dict(db.execute("SELECT key, value FROM pool"))
            vols = [VolumeRow(*row) for row in db.execute("SELECT * FROM volumes ORDER BY id")]
            entries = list(db.execute("SELECT top, idx, leaf FROM top_entries"))
            leaves = list(db.execute("SELECT id, map FROM leaves"))
            chunks = list(db.execute("SELECT chunk, counts FROM spacemap"))
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise FopError(errno.EUCLEAN, f"thin pool metadata {self.path}: {exc}") from exc
        return Loaded(kv, vols, entries, leaves, chunks)

    def commit(
        self, kv: dict[str, Any], volumes: list[VolumeRow], dead_volumes: list[int], ch: Changes
    ) -> None:
        """Write one transaction; atomic and durable when it returns."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # delete first so renames within one transaction never trip the UNIQUE name
            db.executemany("DELETE FROM volumes WHERE id=?", [(i,) for i in dead_volumes])
            db.executemany("DELETE FROM volumes WHERE id=?", [(v.id,) for v in volumes])
            db.executemany("INSERT INTO volumes VALUES (?,?,?,?,?,?,?)", [astuple(v) for v in volumes])
            db.executemany("DELETE FROM top_entries WHERE top=?", [(t,) for t in ch.dead_tops])
            for top, entries in ch.tops_full:
                db.execute("DELETE FROM top_entries WHERE top=?", (top,))
                db.executemany("INSERT INTO top_entries VALUES (?,?,?)", [(top, i, lf) for i, lf in entries])
            db.executemany("INSERT OR REPLACE INTO top_entries VALUES (?,?,?)", ch.top_set)
            db.executemany("DELETE FROM top_entries WHERE top=? AND idx=?", ch.top_del)
            db.executemany("DELETE FROM leaves WHERE id=?", [(i,) for i in ch.dead_leaves])
            db.executemany("INSERT OR REPLACE INTO leaves VALUES (?,?)", ch.leaves)
            db.executemany("INSERT OR REPLACE INTO spacemap VALUES (?,?)", ch.chunks)
            db.executemany("INSERT OR REPLACE INTO pool VALUES (?,?)", list(kv.items()))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
