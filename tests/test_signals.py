"""In-process wake-ups (`signals.py`): futures added from another thread before what they
wait for happens, and the key a wait for a job's end listens on."""

from __future__ import annotations

import asyncio
import threading

from aitbc_node.signals import Signals, Waiters, ended_key, job_key


def test_a_future_added_before_the_event_is_woken_by_it_without_a_first_check() -> None:
    """A write adds the waiter's future before its commit; the end, announced before the
    waiter starts waiting or while it waits, wakes it, and it checks only after the wake."""
    waiters = Waiters()
    announced: set[str] = set()
    checks: list[str] = []

    def announce(job_id: str) -> None:
        announced.add(job_id)
        waiters.notify(f"ended:{job_id}")

    async def wait_for_end(job_id: str, early: bool) -> str | None:
        added = asyncio.get_running_loop().create_future()
        # as the store's writer thread does, from another thread
        adder = threading.Thread(target=lambda: waiters.add(added, f"ended:{job_id}"))
        adder.start()
        adder.join()
        if early:
            announce(job_id)
        else:
            threading.Timer(0.2, announce, (job_id,)).start()

        async def check() -> str | None:
            checks.append(job_id)
            return "ended" if job_id in announced else None

        return await waiters.until(check, (f"ended:{job_id}",), 60, added=added)

    assert asyncio.run(wait_for_end("job-1", early=True)) == "ended"
    assert asyncio.run(wait_for_end("job-2", early=False)) == "ended"
    assert checks == ["job-1", "job-2"], "one check each, after the wake"


def test_a_wait_for_the_end_is_not_woken_by_other_changes() -> None:
    signals = Signals()

    async def main() -> tuple[bool, bool, bool]:
        ends = signals.waiters.register(ended_key("job-1"))
        changes = signals.waiters.register(job_key("job-1"))
        signals.job_changed("job-1")  # claimed, say
        await asyncio.sleep(0.05)
        claimed = (ends.done(), changes.done())
        signals.job_changed("job-1", finished=True)
        await asyncio.wait_for(ends, 60)
        return (*claimed, ends.done())

    assert asyncio.run(main()) == (False, True, True)


def test_a_future_added_after_the_close_is_resolved_at_once() -> None:
    waiters = Waiters()
    waiters.close()

    async def main() -> None:
        future = asyncio.get_running_loop().create_future()
        waiters.add(future, "ended:job-1")
        await asyncio.wait_for(future, 60)

    asyncio.run(main())
