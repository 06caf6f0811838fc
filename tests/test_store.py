"""The job store on a real SQLite file: WAL, migrations, transactions, durability settings."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aitbc_node.migrations import MIGRATIONS
from aitbc_node.store import Store


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


def test_light_writes_skip_the_sync_and_restore_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    try:
        with store.write(durable=False) as db:
            assert db.one("PRAGMA synchronous")["synchronous"] == 1  # NORMAL, for this one
        assert synchronous(store) == 2
        with pytest.raises(RuntimeError), store.write(durable=False):
            raise RuntimeError("boom")
        assert synchronous(store) == 2  # restored after a rollback too
    finally:
        store.close()
    normal = Store(tmp_path / "other.db", synchronous="NORMAL")
    try:
        assert synchronous(normal) == 1
    finally:
        normal.close()
