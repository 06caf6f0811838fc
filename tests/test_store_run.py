"""The store's writer thread (`Store.run`): the event loop's writes, grouped into shared
commits, each answered only once committed; a failing one alone taken back; what they set off
(`after_commit`) done only after the commit, and never for a commit that was lost."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import apsw
import pytest

from aitbc_node.store import Store
from tests.conftest import count_commits

WRITES = 200


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "node.db")
    with store.write() as db:
        db.execute("CREATE TABLE items (n INTEGER PRIMARY KEY, source TEXT)")
    yield store
    store.close()


def committed(path: Path, n: int) -> bool:
    """Whether another connection sees item `n`. Through apsw, the store's own SQLite: a
    second SQLite library in the process (the sqlite3 module's) would drop the store's file
    locks whenever it closes a connection, and lose its commits."""
    outside = apsw.Connection(str(path))
    try:
        return next(outside.execute("SELECT count(*) FROM items WHERE n = ?", (n,)))[0] == 1
    finally:
        outside.close()


def insert(store: Store, n: int, source: str = "loop") -> int:
    with store.write() as db:
        db.execute("INSERT INTO items VALUES (?, ?)", (n, source))
    return n


def test_loop_writes_share_commits_and_each_is_answered_committed(store: Store) -> None:
    """Writes queued together from the loop take far fewer commits than writes, every one is
    on disk when its await returns, and writes from ordinary threads go on beside them."""
    commits = count_commits(store)
    seen: list[bool] = []

    async def one(n: int) -> None:
        assert await store.run(lambda: insert(store, n)) == n
        seen.append(committed(store.path, n))

    def from_a_thread() -> None:
        for i in range(50):
            insert(store, 100_000 + i, "thread")

    async def main() -> None:
        thread = threading.Thread(target=from_a_thread)
        thread.start()
        await asyncio.gather(*(one(n) for n in range(WRITES)))
        await asyncio.to_thread(thread.join)

    asyncio.run(main())
    assert seen == [True] * WRITES
    rows = store.read().execute("SELECT source, count(*) AS n FROM items GROUP BY source")
    assert {r["source"]: r["n"] for r in rows} == {"loop": WRITES, "thread": 50}
    assert len(commits) < (WRITES + 50) / 2, "writes queued together shared commits"


def test_a_failing_function_takes_back_only_its_own_writes(store: Store) -> None:
    """In a group, a function whose write raises gets its error and leaves nothing; the
    others of the group are committed; a read inside a function sees the group's writes."""
    read_back: list[int] = []

    def write_then_maybe_fail(n: int) -> int:
        with store.write() as db:
            db.execute("INSERT INTO items VALUES (?, 'loop')", (n,))
            mine = store.read().one("SELECT n FROM items WHERE n = ?", (n,))
            read_back.append(mine["n"] if mine else -1)
            if n % 3 == 0:
                raise ValueError(f"job {n} fails")
        return n

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(
            *(store.run(lambda n=n: write_then_maybe_fail(n)) for n in range(60)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    for n, outcome in enumerate(outcomes):
        if n % 3 == 0:
            assert isinstance(outcome, ValueError) and str(outcome) == f"job {n} fails"
        else:
            assert outcome == n
    assert sorted(read_back) == list(range(60))
    rows = [r["n"] for r in store.read().execute("SELECT n FROM items ORDER BY n")]
    assert rows == [n for n in range(60) if n % 3]
    # no transaction was left open: another connection can write at once
    other = apsw.Connection(str(store.path))
    other.execute("INSERT INTO items VALUES (-1, 'other')")
    other.close()


def test_after_commit_waits_for_the_commit(store: Store) -> None:
    """An action a write sets off runs when the row is committed (another connection sees
    it), after the function returned, and before the request is answered."""
    order: list[str] = []
    visible: list[bool] = []

    def write_and_announce(n: int) -> None:
        insert(store, n)
        store.after_commit(lambda: visible.append(committed(store.path, n)))
        store.after_commit(lambda: order.append(f"announced {n}"))
        order.append(f"returned {n}")

    async def one(n: int) -> None:
        await store.run(lambda: write_and_announce(n))
        order.append(f"answered {n}")

    async def main() -> None:
        await asyncio.gather(*(one(n) for n in range(20)))

    asyncio.run(main())
    assert visible == [True] * 20
    for n in range(20):
        assert (
            order.index(f"returned {n}")
            < order.index(f"announced {n}")
            < order.index(f"answered {n}")
        )
    # Outside a function `run` queued, the action is done at once.
    done: list[int] = []
    store.after_commit(lambda: done.append(1))
    assert done == [1]


def test_a_lost_commit_fails_its_group_and_announces_nothing(store: Store) -> None:
    """When the group's commit fails, every write of it is answered with an error, nothing
    is stored, nothing it set off is done, and the next writes go through."""
    announced: list[int] = []
    store._writer.set_commit_hook(lambda: True)  # turn the next commit into a rollback

    def write_and_announce(n: int) -> int:
        insert(store, n)
        store.after_commit(lambda: announced.append(n))
        return n

    async def group() -> list[int | BaseException]:
        return await asyncio.gather(
            *(store.run(lambda n=n: write_and_announce(n)) for n in range(10)),
            return_exceptions=True,
        )

    outcomes = asyncio.run(group())
    assert all(isinstance(o, RuntimeError) and "lost with its group" in str(o) for o in outcomes)
    assert announced == []
    assert store.read().one("SELECT count(*) AS n FROM items")["n"] == 0

    store._writer.set_commit_hook(None)
    assert asyncio.run(store.run(lambda: write_and_announce(99))) == 99
    assert announced == [99] and committed(store.path, 99)


def test_close_finishes_what_was_queued(tmp_path: Path) -> None:
    """Closing the store runs the writes already queued before it closes the connections."""
    store = Store(tmp_path / "node.db")
    with store.write() as db:
        db.execute("CREATE TABLE items (n INTEGER PRIMARY KEY, source TEXT)")

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(store.run(lambda n=n: insert(store, n))) for n in range(30)]
        await asyncio.sleep(0)  # queued, maybe not yet run
        await asyncio.to_thread(store.close)
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == list(range(30))
    reopened = Store(tmp_path / "node.db")
    try:
        assert reopened.read().one("SELECT count(*) AS n FROM items")["n"] == 30
    finally:
        reopened.close()
