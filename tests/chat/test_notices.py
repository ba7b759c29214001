"""The owner's other tabs hear of new replies in the background, a few notices at a time."""

from __future__ import annotations

import asyncio

from chat.consumers import _Notices


async def test_a_burst_of_notices_goes_out_a_few_at_a_time_in_order():
    notices = _Notices()
    release, full, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    running = 0
    most = 0
    sent: list[int] = []

    async def notice(n: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == _Notices.IN_FLIGHT:
            full.set()
        await release.wait()
        sent.append(n)
        running -= 1
        if len(sent) == 20:
            done.set()

    for n in range(20):
        notices.send(notice(n))  # returns at once: the sender does not wait
    await asyncio.wait_for(full.wait(), timeout=5)
    for _ in range(10):  # give any notice past the limit its chance to start
        await asyncio.sleep(0)
    assert running == _Notices.IN_FLIGHT and not sent
    release.set()
    await asyncio.wait_for(done.wait(), timeout=5)
    assert sent == list(range(20))
    assert most == _Notices.IN_FLIGHT


async def test_notices_cancelled_before_they_start_are_closed():
    """No "coroutine was never awaited" when the loop shuts down with notices queued."""
    notices = _Notices()
    hold = asyncio.Event()

    async def notice() -> None:
        await hold.wait()

    queued = [notice() for _ in range(_Notices.IN_FLIGHT + 3)]
    for coro in queued:
        notices.send(coro)
    await asyncio.sleep(0)  # the first IN_FLIGHT start; the rest wait for a slot
    tasks = list(notices._running)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert not notices._running
    # Started or not, every notice is finished with: none left to warn at exit.
    assert all(coro.cr_frame is None for coro in queued)
