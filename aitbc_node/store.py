"""The job store: one SQLite file in WAL mode, reached through apsw.

There is one writer connection, guarded by a lock, and every write runs inside an explicit
`BEGIN IMMEDIATE` transaction on it, so writers never deadlock on lock upgrades and a claim or
a state change is atomic. Reads use one connection per thread, which WAL lets run beside the
writer without blocking. Rows come back as dicts.

Callers (the API worker threads, the miner thread, the lease reaper) call these from ordinary
threads, never from the event loop, so a wait for the write lock or an fsync stalls no request
but the one that writes.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import apsw

from aitbc_node import migrations
from aitbc_node.errors import StorageFull

log = logging.getLogger("aitbc_node.store")

BUSY_TIMEOUT_MS = 10_000
Row = dict[str, Any]
# What a write gets from a full (or failing) disk: SQLITE_FULL, and SQLITE_IOERR, which is
# what SQLite reports when growing the WAL or its index fails for want of space.
STORAGE_ERRORS = (apsw.FullError, apsw.IOError)


def storage_full(exc: BaseException) -> StorageFull:
    """The API error for a write the disk refused."""
    return StorageFull(
        f"the node's disk refused a write ({exc}); nothing was written. Retry once space"
        " is freed on the node"
    )


def _dict_rows(cursor: apsw.Cursor, row: tuple[Any, ...]) -> Row:
    return {name: value for (name, _), value in zip(cursor.get_description(), row, strict=True)}


class Connection:
    """A thin wrapper over an apsw connection that returns rows as dicts."""

    def __init__(self, conn: apsw.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run one statement and return all its rows."""
        return list(self._conn.execute(sql, params))

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Row | None:
        """Run one statement and return its first row, or None."""
        for row in self._conn.execute(sql, params):
            return row
        return None

    def changes(self) -> int:
        """Rows changed by the last statement."""
        return self._conn.changes()


class Store:
    """The node's SQLite file: migrations at open, one locked writer, per-thread readers."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            migrations.apply(self.path)
        except sqlite3.OperationalError as e:
            if "full" in str(e) or "disk I/O" in str(e):
                raise storage_full(e) from e
            raise
        self._synchronous = synchronous
        self._write_lock = threading.Lock()
        self._writer = self._open()
        self._make_private()
        self._local = threading.local()
        self._readers: list[apsw.Connection] = []
        self._readers_lock = threading.Lock()

    def _make_private(self) -> None:
        """Mode 0600 for the database and its -wal and -shm files (they hold prompts and
        webhook secrets), whatever made them; SQLite gives later -wal and -shm files the
        database file's mode."""
        for suffix in ("", "-wal", "-shm"):
            # Missing, or not ours (a `verify` of another user's copy): leave it as it is.
            with suppress(OSError):
                Path(f"{self.path}{suffix}").chmod(0o600)

    def _open(self) -> apsw.Connection:
        conn = apsw.Connection(str(self.path))
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.set_row_trace(_dict_rows)
        return conn

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction (`BEGIN IMMEDIATE`), committed on success, rolled back on error.

        `durable=False` is for writes whose loss in a power cut costs nothing (a claim or a
        lease renewal: the job just goes back to pending): they skip the fsync even when
        the store syncs every commit. A later durable commit syncs them too.

        A write the disk refuses (full, or failing) raises `StorageFull` with nothing
        written, and leaves the writer ready for the next write once space is back.
        """
        light = not durable and self._synchronous == "FULL"
        with self._write_lock:
            try:
                if light:
                    self._writer.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._writer.execute("BEGIN IMMEDIATE")
                    try:
                        yield Connection(self._writer)
                    except BaseException:
                        self._rollback()
                        raise
                    try:
                        self._writer.execute("COMMIT")
                    except BaseException:
                        self._rollback()
                        raise
                finally:
                    if light:
                        self._writer.execute(f"PRAGMA synchronous={self._synchronous}")
            except STORAGE_ERRORS as e:
                self._recover_writer()
                raise storage_full(e) from e

    def _rollback(self) -> None:
        """End the open transaction, if SQLite has not already ended it: after SQLITE_FULL
        or SQLITE_IOERR it may have rolled back by itself, and a second ROLLBACK would hide
        the error that matters."""
        if self._writer.get_autocommit():
            return
        try:
            self._writer.execute("ROLLBACK")
        except apsw.Error:
            log.warning("rolling back a failed write failed", exc_info=True)

    def _recover_writer(self) -> None:
        """After a refused write: make sure the writer holds no transaction, and reopen it
        if it cannot give one up, so the next write starts clean."""
        if self._writer.get_autocommit():
            return
        with suppress(apsw.Error):
            self._writer.execute("ROLLBACK")
        if self._writer.get_autocommit():
            return
        log.warning("the store's writer is stuck in a failed transaction; reopening it")
        try:
            fresh = self._open()
        except apsw.Error:
            log.warning("reopening the store's writer failed; the next write tries again")
            return
        with suppress(apsw.Error):
            self._writer.close(force=True)
        self._writer = fresh

    def read(self) -> Connection:
        """This thread's read connection (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return Connection(conn)

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file (a PASSIVE checkpoint, never blocking readers)."""
        with self._write_lock:
            self._writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)

    def close(self) -> None:
        """Checkpoint and close every connection this store opened."""
        with self._write_lock:
            # On a full disk the checkpoint may not fit; the WAL keeps the data all the same.
            with suppress(apsw.BusyError, *STORAGE_ERRORS):
                self._writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._writer.close()
