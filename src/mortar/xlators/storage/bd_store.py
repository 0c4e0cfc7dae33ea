"""The attribute store of a `storage/bd` brick: what a file system keeps in inodes, beside the pool.

A thin pool knows volumes by name, size and blocks; a brick must also answer for each file its
gfid, mode, owner, times and extended attributes (user xattrs, and the `trusted.*` counters that
replication keeps with `xattrop`), and for the pool itself which volume it belongs to. They live
in a small SQLite file (WAL mode), keyed by the pool's stable volume id, so renames touch only the
pool. Everything is also held in memory: reads never touch the file.

Durability: each change is its own transaction, in the WAL as soon as it returns, so it survives
the process being killed; `sync` (run by fsync) checkpoints the WAL, which fsyncs it. Times changed
by writes are saved lazily (at flush, fsync, release and setattr): after a crash a file may show
an older mtime, never a wrong size, owner or xattr.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

from mortar.core.errors import FopError
from mortar.core.gfid import Gfid

_SCHEMA = """
CREATE TABLE kv (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE objects (
    vkey TEXT PRIMARY KEY, gfid BLOB NOT NULL UNIQUE, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
    gid INTEGER NOT NULL, atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE xattrs (
    vkey TEXT NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (vkey, name)
) WITHOUT ROWID;
"""

ROOT_KEY = ""  # the pool directory itself


@dataclass(slots=True)
class Meta:
    """The inode-like record of one object; `mode` holds permission bits only (no file type)."""

    vkey: str
    gfid: Gfid
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    times_dirty: bool = False

    def row(self) -> tuple[Any, ...]:
        return (
            self.vkey,
            bytes(self.gfid),
            self.mode,
            self.uid,
            self.gid,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
        )


class AttrStore:
    """The SQLite file; thread-safe (one lock around the connection)."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        if not create and not os.path.exists(path):
            raise FopError(errno.ENOENT, f"bd attribute store {path} does not exist")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if create:
                self._db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
        except sqlite3.DatabaseError as exc:
            raise FopError(errno.EUCLEAN, f"bd attribute store {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run the statements as one transaction."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    db.execute(sql, args)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise FopError(errno.EIO, f"bd attribute store {self.path}: {exc}") from exc

    def load(self) -> tuple[dict[str, Any], dict[str, Meta]]:
        """(pool-level keys, records by volume key)."""
        with self._lock:
            try:
                kv = dict(self._db.execute("SELECT key, value FROM kv"))
                metas = {
                    row[0]: Meta(row[0], Gfid(row[1]), *row[2:])
                    for row in self._db.execute("SELECT * FROM objects")
                }
                for vkey, name, value in self._db.execute("SELECT vkey, name, value FROM xattrs"):
                    if vkey in metas:
                        metas[vkey].xattrs[name] = bytes(value)
            except (sqlite3.Error, ValueError) as exc:
                raise FopError(errno.EUCLEAN, f"bd attribute store {self.path}: {exc}") from exc
        return kv, metas

    def set_kv(self, key: str, value: Any) -> None:
        self._write([("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, value))])

    def put(self, meta: Meta) -> None:
        """Insert or replace a whole record, its xattrs included."""
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT OR REPLACE INTO objects VALUES (?,?,?,?,?,?,?,?)", meta.row()),
            ("DELETE FROM xattrs WHERE vkey=?", (meta.vkey,)),
        ]
        stmts += [("INSERT INTO xattrs VALUES (?,?,?)", (meta.vkey, k, v)) for k, v in meta.xattrs.items()]
        self._write(stmts)
        meta.times_dirty = False

    def save_attrs(self, metas: list[Meta]) -> None:
        """Mode, owner and times of existing records."""
        sql = "UPDATE objects SET mode=?, uid=?, gid=?, atime_ns=?, mtime_ns=?, ctime_ns=? WHERE vkey=?"
        self._write(
            [(sql, (m.mode, m.uid, m.gid, m.atime_ns, m.mtime_ns, m.ctime_ns, m.vkey)) for m in metas]
        )
        for m in metas:
            m.times_dirty = False

    def set_xattrs(self, meta: Meta, values: dict[str, bytes]) -> None:
        """Store `values` (already applied to `meta.xattrs` by the caller) with the record's times."""
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            ("INSERT OR REPLACE INTO xattrs VALUES (?,?,?)", (meta.vkey, k, bytes(v)))
            for k, v in values.items()
        ]
        stmts.append(("UPDATE objects SET ctime_ns=? WHERE vkey=?", (meta.ctime_ns, meta.vkey)))
        self._write(stmts)

    def remove_xattr(self, meta: Meta, name: str) -> None:
        self._write(
            [
                ("DELETE FROM xattrs WHERE vkey=? AND name=?", (meta.vkey, name)),
                ("UPDATE objects SET ctime_ns=? WHERE vkey=?", (meta.ctime_ns, meta.vkey)),
            ]
        )

    def delete(self, vkeys: list[str]) -> None:
        stmts: list[tuple[str, tuple[Any, ...]]] = []
        for vkey in vkeys:
            stmts += [
                ("DELETE FROM objects WHERE vkey=?", (vkey,)),
                ("DELETE FROM xattrs WHERE vkey=?", (vkey,)),
            ]
        if stmts:
            self._write(stmts)

    def sync(self) -> None:
        """Make every committed change durable against power loss (a checkpoint fsyncs the WAL)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                raise FopError(errno.EIO, f"bd attribute store {self.path}: {exc}") from exc
