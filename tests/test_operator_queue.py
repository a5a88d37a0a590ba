"""The handlers' work queue: one reconcile per comparison at a time, bursts coalesced, failures retried."""

from __future__ import annotations

import asyncio

import pytest
from ftc_operator.handlers import WorkQueue, _comparison_of
from ftc_operator.kube import Conflict

pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_burst_for_one_key_is_coalesced_and_never_concurrent():
    async def main():
        calls, active, peak = [], 0, 0
        gate = asyncio.Event()

        async def process(key):
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            calls.append(key)
            await gate.wait()
            active -= 1

        q = WorkQueue(process, workers=4)
        q.start()
        for _ in range(50):
            q.add(("ns", "a"))
        await asyncio.sleep(0.05)
        for _ in range(50):
            q.add(("ns", "a"))  # while running: marks it dirty, one more pass afterwards
        gate.set()
        await asyncio.sleep(0.1)
        await q.stop()
        return calls, peak

    calls, peak = run(main())
    assert calls == [("ns", "a"), ("ns", "a")]
    assert peak == 1


def test_different_keys_run_in_parallel():
    async def main():
        started = set()
        both = asyncio.Event()

        async def process(key):
            started.add(key)
            if len(started) == 2:
                both.set()
            await both.wait()

        q = WorkQueue(process, workers=2)
        q.start()
        q.add("a")
        q.add("b")
        await asyncio.wait_for(both.wait(), 2)
        await q.stop()
        return started

    assert run(main()) == {"a", "b"}


@pytest.mark.parametrize("error", [RuntimeError("api down"), Conflict("changed")], ids=["error-backoff", "conflict"])
def test_failures_are_retried(error):
    async def main():
        calls = []
        done = asyncio.Event()

        async def process(key):
            calls.append(key)
            if len(calls) == 1:
                raise error
            done.set()

        q = WorkQueue(process, workers=1, max_backoff=0.2)
        q.start()
        q.add("k")
        await asyncio.wait_for(done.wait(), 3)
        await q.stop()
        return calls

    assert run(main()) == ["k", "k"]


@pytest.mark.parametrize(
    ("body", "name"),
    [
        ({"metadata": {"annotations": {"ftc.dev/comparison-name": "a-very-long-name"}}}, "a-very-long-name"),
        ({"metadata": {"ownerReferences": [{"kind": "FineTuneComparison", "name": "b"}]}}, "b"),
        ({"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "name": "c"}]}}, None),
    ],
    ids=["annotation", "owner-reference", "foreign"],
)
def test_events_map_to_their_comparison(body, name):
    assert _comparison_of(body) == name
