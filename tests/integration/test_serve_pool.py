"""The expert-pool deployment in-process (its class without Ray): streams end with their result, a
cancelled stream stops its decoding, and following the registry neither blocks the event loop
nor waits for a running generation. Orders of events come from the engine's step records and
from events the test holds, never from timing."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from experts.base_models import SMOLLM2_ID
from experts.types import GenerationRequest, GenerationResult
from tests._fixtures.experts import FRANCE, write_lora_expert

LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
SAMPLED = {"temperature": 1.5, "seed": 11}
"""Seeded sampling at a high temperature: a row that runs to its length limit (checked where used)."""
WAIT_S = 120
"""Safety net for awaits that must finish: a hang fails the test instead of stalling the run."""


def _req(expert="base", messages=FRANCE, **params) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {"expert": expert, "messages": messages, "params": {"max_new_tokens": 8, **params}}
    )


@pytest.fixture(scope="module")
def deployment(base_models, tmp_path_factory):
    from registry import Registry
    from registry.home import MoseHome
    from serve.config import load_config
    from serve.deployments import ExpertPoolDeployment

    home = MoseHome.from_env(tmp_path_factory.mktemp("pool-deployment-home"))
    experts = tmp_path_factory.mktemp("pool-deployment-experts")
    with Registry.open(home) as registry:
        for seed, name in enumerate(["law-a", "law-b"]):
            registry.add(write_lora_expert(experts, name, seed=seed), actor="tests")
            registry.activate(name, actor="tests")
        registry.add(write_lora_expert(experts, "law-late", seed=7), actor="tests")
    config = load_config(pool={"max_batch_size": 8, "batch_wait_timeout_s": 0.0, "torch_threads": 1})
    dep = ExpertPoolDeployment(
        str(home.root), SMOLLM2_ID, config.pool, config.limits.model_copy(update={"max_tokens": 64})
    )
    yield dep
    dep.pool.engine.observer = None
    dep.pool.close()


def _run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_S))


def test_a_stream_ends_with_its_result_and_generate_reports_its_batch(deployment):
    async def scenario():
        items = [item async for item in deployment.stream(_req("law-a", max_new_tokens=3))]
        return items, await deployment.generate(_req("law-a", max_new_tokens=3))

    items, (result, batch_size) = _run(scenario())
    *pieces, last = items
    assert isinstance(last, GenerationResult) and last.finish_reason == "length" and last.completion_tokens == 3
    assert all(isinstance(p, str) for p in pieces) and "".join(pieces) == last.text == result.text
    assert batch_size == 1


def test_a_cancelled_stream_stops_decoding_within_a_step(deployment):
    """Ray Serve cancels the replica's generator when the HTTP client goes away."""
    request = _req("law-b", LONG, max_new_tokens=64, **SAMPLED)
    assert _run(deployment.generate(request))[0].finish_reason == "length"
    steps, before = [], deployment.pool.engine.stats()["finished"]["cancelled"]
    deployment.pool.engine.observer = steps.append

    async def scenario():
        pieces = []

        async def consume():
            async for item in deployment.stream(request):
                pieces.append(item)
                if len(pieces) == 2:
                    reading.set()

        reading = asyncio.Event()
        task = asyncio.create_task(consume())
        await reading.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return len(steps)

    try:
        cancelled_at = _run(scenario())
        while deployment.pool.engine.stats()["running"]:  # the loop drops the row at its next step
            time.sleep(0.05)
    finally:
        deployment.pool.engine.observer = None
    row = next(row for s in steps for row in s.rows)  # the only row decoded meanwhile
    assert len([s for s in steps[cancelled_at:] if row in s.rows]) <= 2
    assert len([s for s in steps if row in s.rows]) < 63
    assert deployment.pool.engine.stats()["finished"]["cancelled"] == before + 1


def test_following_the_registry_waits_for_a_step_not_for_a_running_generation(deployment):
    """The engine is held between two steps of a long generation; meanwhile a newly activated
    expert is loaded (the pool's lock is free between steps) and the generation then finishes."""
    from registry import Registry

    long_request = _req("law-a", LONG, max_new_tokens=64, **SAMPLED)
    assert _run(deployment.generate(long_request))[0].finish_reason == "length"
    paused, resume, handles, decoded = threading.Event(), threading.Event(), [], []

    def hold_after_second_step(record):  # on the loop's thread, between two steps (pool lock free)
        if handles and handles[0].id in record.rows:
            decoded.append(record.step)
            if len(decoded) == 2:
                paused.set()
                resume.wait(WAIT_S)

    async def scenario():
        handle = deployment.pool.submit(long_request)
        handles.append(handle)
        await asyncio.to_thread(paused.wait, WAIT_S)
        with Registry.open(deployment.home) as registry:
            registry.activate("law-late", actor="tests")
        try:
            await asyncio.to_thread(deployment.sync_experts, True)  # loads law-late, the generation mid-way
            loaded = "law-late" in deployment.pool.experts()
            running = deployment.pool.engine.stats()["running"]
        finally:
            resume.set()
        return loaded, running, await handle.wait()

    deployment.pool.engine.observer = hold_after_second_step
    try:
        loaded, running, result = _run(scenario())
    finally:
        deployment.pool.engine.observer = None
        resume.set()
    assert loaded and running == 1
    assert result.finish_reason == "length" and result.completion_tokens == 64
    assert _run(deployment.generate(_req("law-late", max_new_tokens=2)))[0].completion_tokens == 2


def test_a_slow_registry_read_does_not_block_the_event_loop(deployment, monkeypatch):
    """While a registry sync is stuck in its worker thread, a request for a loaded expert that needs
    no newer catalog is answered on the same event loop."""
    entered, release = threading.Event(), threading.Event()
    real = deployment.registry.active_snapshot

    def stuck_snapshot():
        entered.set()
        release.wait(WAIT_S)
        return real()

    monkeypatch.setattr(deployment.registry, "active_snapshot", stuck_snapshot)
    monkeypatch.setattr(deployment.catalog, "poll_s", 3600.0)  # no periodic poll due while the test runs

    async def scenario():
        sync = asyncio.create_task(asyncio.to_thread(deployment.catalog.sync_now, None, True))  # a full re-read
        await asyncio.to_thread(entered.wait, WAIT_S)
        try:
            result, _ = await deployment.generate(_req("law-b", max_new_tokens=4))
            still_syncing = not sync.done()
        finally:
            release.set()
        await sync
        return result, still_syncing

    result, still_syncing = _run(scenario())
    assert still_syncing and result.completion_tokens == 4
