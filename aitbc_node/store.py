"""The job store: one SQLite file in WAL mode, reached through apsw.

There is one writer connection, and every write runs on it inside an explicit `BEGIN
IMMEDIATE` transaction, so writers never deadlock on lock upgrades and a claim or a state change
is atomic. Reads use one connection per thread, which WAL lets run beside the writer without
blocking. Rows come back as dicts.

Group commit: writes that queue for the writer while another is in progress share its
transaction, each inside its own savepoint, and one COMMIT (one fsync) ends them all. A write
returns only after the commit of its group, so what a caller acknowledges is on disk; a write
that raises rolls back to its savepoint and leaves the others of its group intact; a commit the
disk refuses fails every write of the group with `StorageFull`, nothing written. The first write
of a group leads it: once no other writer is waiting (or the group is full) it commits.

Callers (the API worker threads, the miner thread, the lease reaper) call these from ordinary
threads, never from the event loop, so a wait for the writer or an fsync stalls no request
but the ones that write.

The event loop hands its writes to the store's own writer thread instead (`run`): each
request's work is a function queued there, and the thread takes everything queued at once and
runs it in one transaction, each `write` in its own savepoint, then commits once and
answers them all with one wake-up of the loop. No request waits on a thread pool, and the
writes that queue while a commit's fsync runs form the next group by themselves. What such a
function would set off after its writes (a signal to long polls, a webhook wake-up) it hands
to `after_commit`, which holds it until the commit is on disk: nobody is woken to look for a
row not yet committed, nor for one a failed commit took back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import apsw

from aitbc_node import migrations
from aitbc_node.errors import StorageFull

log = logging.getLogger("aitbc_node.store")

BUSY_TIMEOUT_MS = 10_000
# The most writes one commit holds (a bound on how long the first of them waits).
MAX_GROUP = 128
Row = dict[str, Any]
T = TypeVar("T")
# What a write gets from a full (or failing) disk: SQLITE_FULL, and SQLITE_IOERR, which is
# what SQLite reports when growing the WAL or its index fails for want of space.
STORAGE_ERRORS = (apsw.FullError, apsw.IOError)


def storage_full(exc: BaseException) -> StorageFull:
    """The API error for a write the disk refused."""
    return StorageFull(
        f"the node's disk refused a write ({exc}); nothing was written. Retry once space"
        " is freed on the node"
    )


def lost_with_group(error: BaseException) -> Exception:
    """What a write raises when its group's transaction was lost to `error` (a refused
    commit, or another write's full disk), though the write itself went well."""
    if isinstance(error, STORAGE_ERRORS):
        return storage_full(error)
    return RuntimeError(f"this write was lost with its group: {error}")


# Statements whose column names are kept, per store (a bound: the node's statements are a
# fixed set, but a caller could build new texts without end).
MAX_KEPT_STATEMENTS = 1024


def _column_names(
    cursor: apsw.Cursor, sql: str, first: tuple[Any, ...], kept: dict[str, list[str]]
) -> list[str]:
    """The column names of the statement `sql` whose first row `cursor` just gave. Kept
    by the statement's text, in `kept`: apsw builds its description anew on every call, and
    a store's schema does not change while it is open (migrations run before it opens its
    connections). A row of another width (a column added to the file from outside) reads
    the names again."""
    names = kept.get(sql)
    if names is None or len(names) != len(first):
        names = [name for name, _ in cursor.get_description()]
        if len(kept) >= MAX_KEPT_STATEMENTS:
            kept.clear()
        kept[sql] = names
    return names


def _close(cursor: apsw.Cursor) -> None:
    """End the statement of a cursor whose row could not be read (a value that is not UTF-8,
    say): the traceback keeps the cursor alive, and a statement left in progress would stop
    the writer from releasing or opening any savepoint."""
    with suppress(apsw.Error):
        cursor.close(force=True)


class Connection:
    """A thin wrapper over an apsw connection that returns rows as dicts."""

    def __init__(self, conn: apsw.Connection, column_names: dict[str, list[str]]) -> None:
        self._conn = conn
        self._column_names = column_names  # the store's names by statement (`_column_names`)

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Run one statement and return all its rows."""
        cursor = self._conn.execute(sql, params)
        try:
            # The first row first: a statement without rows (an UPDATE) ends here, without
            # asking for its description, which raises then (and raising costs).
            first = next(cursor, None)
            if first is None:
                return []
            names = _column_names(cursor, sql, first, self._column_names)
            return [dict(zip(names, row, strict=True)) for row in itertools.chain((first,), cursor)]
        except BaseException:
            _close(cursor)
            raise

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Row | None:
        """Run one statement and return its first row, or None."""
        cursor = self._conn.execute(sql, params)
        try:
            row = next(cursor, None)
            if row is None:
                return None
            names = _column_names(cursor, sql, row, self._column_names)
        except BaseException:
            _close(cursor)
            raise
        return dict(zip(names, row, strict=True))

    def changes(self) -> int:
        """Rows changed by the last statement."""
        return self._conn.changes()


class _Group:
    """The writes sharing one open transaction, and how its commit went."""

    def __init__(self, *, light: bool) -> None:
        self.members = 0  # writes whose changes are in the transaction
        self.light = light  # committed without an fsync: it holds only writes that allow it
        self.leader_chosen = False
        self.committed = threading.Event()
        self.error: BaseException | None = None


class _Task:
    """A function the event loop queued for the writer thread (`Store.run`), and its outcome."""

    __slots__ = ("after", "error", "fn", "future", "groups", "result")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future
        self.groups: list[_Group] = []  # the groups its writes joined
        self.after: list[Callable[[], None]] = []  # what it set off, held for the commit
        self.result: Any = None
        self.error: BaseException | None = None

    def lost_with(self) -> BaseException | None:
        """The error of a group its writes were lost with, if any was."""
        return next((g.error for g in self.groups if g.error is not None), None)


def _settle(tasks: list[_Task]) -> None:
    """In the tasks' event loop: answer each awaiting request (unless it went away)."""
    for task in tasks:
        if task.future.done():
            continue
        if task.error is not None:
            task.future.set_exception(task.error)
        else:
            task.future.set_result(task.result)


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
        self._column_names: dict[str, list[str]] = {}
        # Who holds the writer connection (`_busy`), who waits for it, and the open group.
        self._writer_lock = threading.Lock()
        self._writer_free = threading.Condition(self._writer_lock)  # writers wait here
        self._writer_moved = threading.Condition(self._writer_lock)  # leaders wait here
        self._busy = False
        self._waiting = 0
        self._group: _Group | None = None
        self._writer = self._open()
        self._make_private()
        self._local = threading.local()
        self._readers: list[apsw.Connection] = []
        self._readers_lock = threading.Lock()
        # The event loop's writes (`run`): queued for one thread, started on first use.
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._batcher: threading.Thread | None = None
        self._batcher_lock = threading.Lock()

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
        return conn

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write, committed on success (with the writes queued beside it: see the module's
        docstring), rolled back on error; it returns once its commit is on disk.

        `durable=False` is for writes whose loss in a power cut costs nothing (a claim or a
        lease renewal: the job just goes back to pending): a group of only such writes is
        committed without an fsync even when the store syncs every commit.

        A write the disk refuses (full, or failing) raises `StorageFull` with nothing
        written, and leaves the writer ready for the next write once space is back.

        On the writer thread, inside a function queued by `run`, it joins the open group and
        returns at once: the thread commits the group when its functions are done.
        """
        task: _Task | None = getattr(self._local, "task", None)
        if task is not None:  # the writer thread holds the writer, and commits the group
            group = yield from self._savepoint(durable)
            task.groups.append(group)
            return
        self._take_writer()
        try:
            group = yield from self._savepoint(durable)
            leads = not group.leader_chosen
            group.leader_chosen = True
        finally:
            self._give_writer()
        if leads:
            self._lead(group)
        group.committed.wait()
        if group.error is not None:
            raise lost_with_group(group.error) from group.error

    def _savepoint(self, durable: bool) -> Generator[Connection, None, _Group]:
        """With the writer held: one write in its own savepoint of the open group (yielding
        the connection, as `write` does); taken back alone if it raises. Returns the group
        (delegated to with `yield from`)."""
        group = self._join_group(durable)
        try:
            yield Connection(self._writer, self._column_names)
        except BaseException as e:
            self._undo(group, e)
            if isinstance(e, STORAGE_ERRORS):
                raise storage_full(e) from e
            raise
        try:
            self._writer.execute("RELEASE write")
        except STORAGE_ERRORS as e:
            self._undo(group, e)
            raise storage_full(e) from e
        group.members += 1
        return group

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the store's writer thread, with the other functions queued beside it,
        and return what it returns (or raise what it raised) once its group's commit is on
        disk. Call from an event loop; `fn` may read, `write` and call `after_commit`."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._start_batcher()
        self._tasks.put(_Task(fn, future))
        return await future

    def after_commit(self, action: Callable[[], None]) -> None:
        """Do `action` once what this thread wrote is committed: now, except inside a
        function `run` queued, where it waits for that function's group (and is dropped if
        the group is lost)."""
        task: _Task | None = getattr(self._local, "task", None)
        if task is None:
            action()
        else:
            task.after.append(action)

    def _start_batcher(self) -> None:
        if self._batcher is not None:
            return
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = threading.Thread(
                    target=self._run_batches, name="store-writer", daemon=True
                )
                self._batcher.start()

    def _run_batches(self) -> None:
        """The writer thread: take everything queued (up to `MAX_GROUP`), run it as one
        group, answer it; until `close` queues None."""
        while True:
            first = self._tasks.get()
            if first is None:
                return
            tasks = [first]
            stopping = False
            while len(tasks) < MAX_GROUP:
                try:
                    task = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if task is None:
                    stopping = True
                    break
                tasks.append(task)
            try:
                self._run_batch(tasks)
            except BaseException as e:  # a bug here must not strand the waiting requests
                log.exception("the store's writer thread failed a batch")
                for task in tasks:
                    task.error = task.error or e
            self._answer(tasks)
            if stopping:
                return

    def _run_batch(self, tasks: list[_Task]) -> None:
        """With the writer held: each task's function, then one commit for all."""
        self._take_writer()
        try:
            for task in tasks:
                self._local.task = task
                try:
                    task.result = task.fn()
                except BaseException as e:
                    task.error = e
                finally:
                    self._local.task = None
            if self._group is not None:
                self._commit(self._group)
        finally:
            self._give_writer()

    def _answer(self, tasks: list[_Task]) -> None:
        """After a batch's commit: what each task set off, then its answer, in its loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Task]] = {}
        for task in tasks:
            lost = task.lost_with()
            if lost is not None:
                task.error = lost_with_group(lost)
            else:
                for action in task.after:
                    try:
                        action()
                    except Exception:
                        log.exception("an action after a commit failed")
            by_loop.setdefault(task.future.get_loop(), []).append(task)
        for loop, batch in by_loop.items():
            with suppress(RuntimeError):  # a loop already closed: nobody waits
                loop.call_soon_threadsafe(_settle, batch)

    def _take_writer(self) -> None:
        with self._writer_free:
            self._waiting += 1
            while self._busy:
                self._writer_free.wait()
            self._waiting -= 1
            self._busy = True

    def _give_writer(self) -> None:
        with self._writer_free:
            self._busy = False
            self._writer_free.notify()  # the next writer in line
            self._writer_moved.notify_all()  # a leader waiting for the line to empty

    def _join_group(self, durable: bool) -> _Group:
        """With the writer held: the open group (beginning one if none is open), and a
        savepoint for this write. A durable write does not join a light group: that one is
        committed first (SQLite fixes a transaction's sync level before it begins)."""
        try:
            if self._group is not None and self._group.light and durable:
                self._commit(self._group)
            if self._group is None:
                light = not durable and self._synchronous == "FULL"
                if light:
                    self._writer.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._writer.execute("BEGIN IMMEDIATE")
                except BaseException:
                    self._restore_sync(light)
                    raise
                self._group = _Group(light=light)
            self._writer.execute("SAVEPOINT write")
        except STORAGE_ERRORS as e:
            if self._group is not None:
                self._end_group(self._group, e)
            raise storage_full(e) from e
        return self._group

    def _undo(self, group: _Group, error: BaseException) -> None:
        """With the writer held, after a write raised: take back its changes alone, or, when
        SQLite ended the whole transaction (it may after SQLITE_FULL), fail the group."""
        if self._writer.get_autocommit():
            self._end_group(group, error)
            return
        try:
            self._writer.execute("ROLLBACK TO write")
            self._writer.execute("RELEASE write")
        except apsw.Error as e:
            log.warning("rolling back a failed write failed", exc_info=True)
            self._end_group(group, e)
            return
        if group.members == 0:
            # Nobody else's work is in it: end it now rather than hold the database's write
            # lock open until some later write commits it.
            self._end_group(group, None)

    def _end_group(self, group: _Group, error: BaseException | None) -> None:
        """With the writer held: roll the group's transaction back; its writes fail with
        `error` (when any had joined)."""
        self._rollback()
        if error is not None and isinstance(error, STORAGE_ERRORS):
            self._recover_writer()
        self._restore_sync(group.light)
        group.error = error if group.members else None
        self._group = None
        group.committed.set()

    def _lead(self, group: _Group) -> None:
        """Commit `group` once the writers waiting now have added their work (or it is
        full); then wake its writes."""
        try:
            with self._writer_moved:
                while (
                    self._group is group
                    and group.members < MAX_GROUP
                    and (self._busy or self._waiting)
                ):
                    self._writer_moved.wait()
            self._take_writer()
            try:
                if self._group is group:
                    self._commit(group)
            finally:
                self._give_writer()
        finally:
            group.committed.set()

    def _commit(self, group: _Group) -> None:
        """With the writer held: commit the open group; on failure roll it back and record
        the error for its writes."""
        try:
            self._writer.execute("COMMIT")
        except BaseException as e:  # each write of the group raises it (see `write`)
            self._end_group(group, e)
            return
        self._restore_sync(group.light)
        self._group = None
        group.committed.set()

    def _restore_sync(self, light: bool) -> None:
        """After a light transaction: the store's own sync level again."""
        if light:
            with suppress(apsw.Error):
                self._writer.execute(f"PRAGMA synchronous={self._synchronous}")

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
        """This thread's read connection (opened on first use). Inside a function `run`
        queued, the writer itself: it sees the writes of the group not yet committed."""
        if getattr(self._local, "task", None) is not None:
            return Connection(self._writer, self._column_names)
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return Connection(conn, self._column_names)

    def checkpoint(self) -> None:
        """Fold the WAL back into the main file (a PASSIVE checkpoint, never blocking readers)."""
        self._take_writer()
        try:
            self._commit_open_group()
            self._writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        finally:
            self._give_writer()

    def _commit_open_group(self) -> None:
        """With the writer held: commit the open group now, if there is one (its leader may
        still be waiting for more writes)."""
        if self._group is not None:
            self._commit(self._group)

    def close(self) -> None:
        """Finish the writes queued for the writer thread, then checkpoint and close every
        connection this store opened."""
        if self._batcher is not None:
            self._tasks.put(None)
            self._batcher.join()
            self._batcher = None
        self._take_writer()
        try:
            self._commit_open_group()
            # On a full disk the checkpoint may not fit; the WAL keeps the data all the same.
            with suppress(apsw.BusyError, *STORAGE_ERRORS):
                self._writer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._writer.close()
        finally:
            self._give_writer()
