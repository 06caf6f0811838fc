"""One node per data directory: an exclusive lock on `DATA/node.lock`, held for the process's life.

Two nodes on one store would each believe they own the built-in miner's jobs (the second one's
start-up requeues what the first is running). `serve` therefore takes an exclusive `flock` on
`node.lock` before anything opens the store, and writes its PID into the file so a second
`serve` can say which process holds the directory. The kernel drops the lock when the process
exits, however it exits (a SIGKILL included), so there is never a stale lock to clean up. The
commands that only read the store or add keys do not take it: SQLite keeps them safe beside a
running node.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "node.lock"


class DataDirLocked(Exception):
    """Another process holds the data directory."""

    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"PID {pid}" if pid is not None else "another process"
        super().__init__(
            f"the data directory {path.parent} is in use by a running node ({holder}); "
            "stop it first, or give this one another --data-dir"
        )
        self.path = path
        self.pid = pid


class DataDirLock:
    """The exclusive lock on one data directory; `release()` (or exit) gives it up."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock, or raise `DataDirLocked` naming the holder's PID. Never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLocked(self.path, _holder_pid(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race a node that starts now)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _holder_pid(path: Path) -> int | None:
    """The PID the lock's holder wrote; it writes it just after locking, so wait a moment."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None
