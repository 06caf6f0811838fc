"""The job store on a real SQLite file: WAL, migrations, transactions, durability settings."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import apsw
import pytest

from aitbc_node.migrations import MIGRATIONS
from aitbc_node.store import Store
from tests.conftest import count_commits


def synchronous(store: Store) -> int:
    with store.write() as db:
        return db.one("PRAGMA synchronous")["synchronous"]


def test_a_new_store_is_wal_with_every_migration_recorded(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    try:
        assert store.read().one("PRAGMA journal_mode")["journal_mode"] == "wal"
        assert synchronous(store) == 2  # FULL
    finally:
        store.close()
    applied = [
        r[0]
        for r in sqlite3.connect(tmp_path / "node.db").execute(
            "SELECT name FROM _migrations ORDER BY name"
        )
    ]
    assert applied == [m.__name__ for m in MIGRATIONS]
    Store(tmp_path / "node.db").close()  # reopening runs nothing twice
    again = sqlite3.connect(tmp_path / "node.db").execute("SELECT count(*) FROM _migrations")
    assert again.fetchone() == (len(MIGRATIONS),)


def test_no_table_keeps_two_indexes_on_the_same_columns(tmp_path: Path) -> None:
    # Each index is written on every change of its columns: a duplicate is pure cost (m007
    # once repeated two of the jobs table's, each status change updating both copies).
    Store(tmp_path / "node.db").close()
    db = sqlite3.connect(tmp_path / "node.db")
    seen: dict[tuple[str, tuple[str, ...]], str] = {}
    indexes = db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")
    for name, table in indexes.fetchall():
        columns = tuple(r[2] for r in db.execute(f"PRAGMA index_info('{name}')"))
        assert (table, columns) not in seen, f"{name} repeats {seen[(table, columns)]}"
        seen[(table, columns)] = name
    assert ("jobs", ("status", "served_model", "seq")) in seen  # the queue's own is kept
    assert ("jobs", ("client", "status")) in seen


def test_rows_carry_their_statements_column_names_when_the_table_grows(tmp_path: Path) -> None:
    """Rows come back keyed by their columns, each statement's own, on the writer and on a
    reader; a column another connection adds while the store is open shows in `SELECT *`
    from then on (the names a statement had are not kept past a change of its width)."""
    store = Store(tmp_path / "node.db")
    try:
        with store.write() as db:
            db.execute("CREATE TABLE t (a INTEGER, b TEXT)")
            db.execute("INSERT INTO t VALUES (1, 'x'), (2, 'y')")
        for _ in range(2):  # the second time from the names kept
            assert store.read().execute("SELECT * FROM t ORDER BY a") == [
                {"a": 1, "b": "x"},
                {"a": 2, "b": "y"},
            ]
            assert store.read().one("SELECT b AS first, a FROM t WHERE a = 2") == {
                "first": "y",
                "a": 2,
            }
            with store.write() as db:
                assert db.one("SELECT * FROM t WHERE a = 1") == {"a": 1, "b": "x"}
        outside = sqlite3.connect(tmp_path / "node.db")
        outside.execute("ALTER TABLE t ADD COLUMN c TEXT DEFAULT 'new'")
        outside.commit()
        outside.close()
        assert store.read().one("SELECT * FROM t WHERE a = 1") == {"a": 1, "b": "x", "c": "new"}
        with store.write() as db:
            assert db.execute("SELECT * FROM t ORDER BY a")[1] == {"a": 2, "b": "y", "c": "new"}
    finally:
        store.close()


def test_a_failed_write_rolls_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    try:
        with pytest.raises(RuntimeError), store.write() as db:
            db.execute(
                "INSERT INTO miners (miner_id, capabilities, gpu_info, builtin, registered_ms,"
                " last_seen_ms) VALUES ('m', '[]', '{}', 0, 1, 1)"
            )
            raise RuntimeError("boom")
        assert store.read().one("SELECT count(*) AS n FROM miners")["n"] == 0
    finally:
        store.close()


def test_light_writes_leave_the_sync_setting_as_it_was(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    try:
        with store.write(durable=False) as db:
            db.execute("CREATE TABLE light (n INTEGER)")
        assert synchronous(store) == 2  # FULL for the writes that follow
        with pytest.raises(RuntimeError), store.write(durable=False):
            raise RuntimeError("boom")
        assert synchronous(store) == 2  # after a rollback too
    finally:
        store.close()
    normal = Store(tmp_path / "other.db", synchronous="NORMAL")
    try:
        assert synchronous(normal) == 1
    finally:
        normal.close()


def test_concurrent_writes_share_commits_and_each_returns_committed(tmp_path: Path) -> None:
    """Group commit: writes from many threads at once take fewer commits than writes, and
    each write returns only once its row is committed (another connection sees it)."""
    store = Store(tmp_path / "node.db")
    with store.write() as db:
        db.execute("CREATE TABLE items (n INTEGER PRIMARY KEY, thread TEXT)")
    commits = count_commits(store)
    seen_after_return: list[bool] = []
    lock = threading.Lock()

    def writer(t: int) -> None:
        # apsw, the store's own SQLite: the sqlite3 module's copy would drop the store's
        # file locks when this connection closes while other threads still write.
        outside = apsw.Connection(str(tmp_path / "node.db"))
        for i in range(50):
            n = t * 1000 + i
            with store.write() as db:
                db.execute("INSERT INTO items VALUES (?, ?)", (n, str(t)))
                time.sleep(0.0005)  # a write that takes a moment, as a receipt's signing does
            found = next(outside.execute("SELECT count(*) FROM items WHERE n = ?", (n,)))
            with lock:
                seen_after_return.append(found[0] == 1)
        outside.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(seen_after_return) and len(seen_after_return) == 400
        assert store.read().one("SELECT count(*) AS n FROM items")["n"] == 400
        assert len(commits) < 400, "some writes shared a commit"
    finally:
        store.close()


def test_a_failed_write_in_a_group_takes_back_only_its_own_changes(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    with store.write() as db:
        db.execute("CREATE TABLE items (n INTEGER PRIMARY KEY)")
    failures = 0

    def writer(t: int) -> None:
        nonlocal failures
        for i in range(40):
            try:
                with store.write() as db:
                    db.execute("INSERT INTO items VALUES (?)", (t * 1000 + i,))
                    if i % 2:
                        raise ValueError("this write fails")
            except ValueError:
                failures += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = [r["n"] for r in store.read().execute("SELECT n FROM items ORDER BY n")]
        assert failures == 120
        assert rows == sorted(t * 1000 + i for t in range(6) for i in range(0, 40, 2))
        # and no transaction was left open: another connection can write at once
        other = sqlite3.connect(tmp_path / "node.db", timeout=0)
        other.execute("INSERT INTO items VALUES (-1)")
        other.commit()
        other.close()
    finally:
        store.close()
