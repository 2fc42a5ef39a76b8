"""The expert pool's coalescer: batches that wait while the pool is busy go through together."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.deployments import Coalescer


def test_batches_waiting_behind_a_busy_pass_are_merged():
    release = threading.Event()
    passes: list[list[int]] = []

    def run(items):
        passes.append(list(items))
        if len(passes) == 1:
            release.wait(5)  # the first pass is "decoding" while others arrive
        return [item * 10 for item in items]

    async def scenario():
        coalescer = Coalescer(run, max_items=8)
        first = asyncio.create_task(coalescer.submit([1]))
        await asyncio.sleep(0.05)
        later = [asyncio.create_task(coalescer.submit(batch)) for batch in ([2, 3], [4], [5, 6, 7])]
        await asyncio.sleep(0.05)
        release.set()
        return await first, [await task for task in later]

    first, later = asyncio.run(scenario())
    assert first == [10] and later == [[20, 30], [40], [50, 60, 70]]
    assert passes == [[1], [2, 3, 4, 5, 6, 7]]


def test_a_pass_never_exceeds_max_items_and_errors_reach_their_callers():
    calls: list[int] = []

    def run(items):
        calls.append(len(items))
        if 99 in items:
            raise ValueError("bad row")
        return items

    async def scenario():
        coalescer = Coalescer(run, max_items=3)
        tasks = [asyncio.create_task(coalescer.submit(batch)) for batch in ([1, 2], [3, 4], [99], [5])]
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    assert calls == [2, 3, 1]  # [1,2] | [3,4]+[99] | [5]: never more than 3 items a pass
    assert results[0] == [1, 2] and results[3] == [5]
    # A pass that raises fails every caller in it (per-item isolation is the run function's
    # job: the pool's _generate_isolated returns item errors as values).
    assert isinstance(results[1], ValueError) and isinstance(results[2], ValueError)
