"""The work queue (one reconcile per comparison at a time, bursts coalesced, failures retried) and the watched view."""

from __future__ import annotations

import asyncio

import pytest
from ftc_operator.cache import comparison_of
from ftc_operator.kube import Conflict
from ftc_operator.workqueue import WorkQueue

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


def test_an_urgent_key_goes_ahead_of_routine_ones_and_is_processed_once():
    async def main():
        order = []
        gate = asyncio.Event()

        async def process(key):
            if key == "busy":
                await gate.wait()
            order.append(key)

        q = WorkQueue(process, workers=1)
        q.start()
        q.add("busy")
        await asyncio.sleep(0.01)  # the one worker is busy: what follows queues up
        for key in ("progress-1", "progress-2", "new"):
            q.add(key)
        q.add("new", urgent=True)  # queued as routine, then made urgent: it moves ahead, and runs once
        q.add("newer", urgent=True)
        gate.set()
        await asyncio.sleep(0.1)
        await q.stop()
        return order, q.pending

    order, pending = run(main())
    assert order == ["busy", "new", "newer", "progress-1", "progress-2"]
    assert pending == {}


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
    assert comparison_of(body) == name


# ---------------------------------------------------------------------------------------------- the watched view


def _obj(uid: str, comparison: str | None, namespace: str = "ns", rv: str = "1", name: str | None = None) -> dict:
    labels = {"ftc.dev/comparison": comparison} if comparison else {}
    annotations = {"ftc.dev/comparison-name": comparison} if comparison else {}
    meta = {"uid": uid, "name": name or uid, "namespace": namespace, "resourceVersion": rv, "labels": labels}
    return {"metadata": meta | {"annotations": annotations}}


def test_the_store_groups_what_it_watches_by_comparison_and_follows_events():
    from ftc_operator.cache import Store

    store = Store()
    store.replace([_obj("a", "one"), _obj("b", "one"), _obj("c", "two"), _obj("d", None), _obj("e", "one", namespace="other")])
    assert sorted(o["metadata"]["uid"] for o in store.objects("ns", "one")) == ["a", "b"]
    assert store.keys() == [("ns", "one"), ("ns", "two"), ("other", "one")]  # an unlabelled object is not held
    store.apply("MODIFIED", _obj("a", "one", rv="2"))
    store.apply("DELETED", _obj("b", "one"))
    store.apply("ADDED", _obj("f", "two"))
    assert [o["metadata"]["resourceVersion"] for o in store.objects("ns", "one")] == ["2"]
    assert sorted(o["metadata"]["uid"] for o in store.objects("ns", "two")) == ["c", "f"]
    store.replace([])  # a relist replaces everything
    assert store.keys() == [] and store.objects("ns", "two") == []


def test_a_comparison_is_replaced_only_by_a_newer_version():
    from ftc_operator.cache import Comparisons

    held = Comparisons()
    held.seen(_obj("u", None, rv="10", name="c"))
    held.seen(_obj("u", None, rv="9", name="c"))  # a late event from before the operator's own write
    current = held.get("ns", "c")
    assert current is not None and current["metadata"]["resourceVersion"] == "10"
    held.seen(_obj("u", None, rv="11", name="c"))
    current = held.get("ns", "c")
    assert current is not None and current["metadata"]["resourceVersion"] == "11"
    held.forget("ns", "c")
    assert held.get("ns", "c") is None


def test_delayed_adds_keep_one_timer_per_key_the_soonest():
    """A pass that asks to look again at a deadline (an unschedulable pod's) every time piles up no timers."""

    async def main():
        seen: list[tuple[str, float]] = []
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def process(key):
            seen.append((key, loop.time() - started))

        q = WorkQueue(process, workers=1)
        q.start()
        for delay in (5.0, 0.3, 0.2, 0.4, 0.25):
            q.add("a", delay)
        timers = len(q.timers)
        await asyncio.sleep(0.5)
        await q.stop()
        return timers, seen

    timers, seen = run(main())
    assert timers == 1
    assert [k for k, _ in seen] == ["a"]  # once, at the soonest (0.2 s), not at each delay
    assert 0.15 < seen[0][1] < 0.3
