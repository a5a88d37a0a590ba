"""The work queue: one reconcile per comparison at a time, bursts coalesced, failures retried with backoff.

Level-triggered: a key in the queue means "look at this comparison again", never "this changed"; the
reconcile reads the whole state afresh, so any number of events for one comparison collapse into one pass.
A key that changes while it is being processed is queued again once the pass ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from . import metrics
from .kube import Conflict

log = logging.getLogger("ftc.operator")


class WorkQueue:
    """A deduplicating queue: a key is processed by one worker at a time; events during processing re-queue it.

    Two priorities: an urgent key (a comparison the operator has not acted on yet, or whose spec changed) goes
    ahead of the routine ones (progress, a Job's or pod's change, the resync), so a new comparison's first Job
    does not wait behind a burst of progress events."""

    def __init__(self, process: Callable[[Any], Awaitable[float | None]], workers: int, max_backoff: float = 60.0):
        self.process = process
        self.workers = workers
        self.max_backoff = max_backoff
        self.queue: asyncio.PriorityQueue[tuple[int, int, Hashable]] = asyncio.PriorityQueue()
        self.pending: dict[Hashable, int] = {}  # key -> the priority it is queued at (0: urgent)
        self.running: set[Hashable] = set()
        self.dirty: set[Hashable] = set()
        self.failures: dict[Hashable, int] = {}
        self.tasks: list[asyncio.Task] = []
        self._order = itertools.count()
        self.timers: dict[Hashable, asyncio.TimerHandle] = {}  # key -> its pending delayed add

    def _fire(self, key: Hashable) -> None:
        self.timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._worker(), name=f"ftc-worker-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def add(self, key: Hashable, delay: float = 0.0, urgent: bool = False) -> None:
        if delay > 0:  # one timer per key, the soonest: a deadline asked for at every pass does not pile up timers
            loop = asyncio.get_running_loop()
            timer = self.timers.get(key)
            if timer is not None and not timer.cancelled() and timer.when() <= loop.time() + delay:
                return
            if timer is not None:
                timer.cancel()
            self.timers[key] = loop.call_later(delay, self._fire, key)
            return
        priority = 0 if urgent else 1
        if key in self.running:
            self.dirty.add(key)
        elif priority < self.pending.get(key, 2):  # not queued, or queued as routine and now urgent
            self.pending[key] = priority
            self.queue.put_nowait((priority, next(self._order), key))
        metrics.QUEUE_DEPTH.set(len(self.pending))

    async def _next(self) -> Hashable:
        """The next key to process; an entry superseded by an urgent one for the same key is skipped."""
        while True:
            priority, _, key = await self.queue.get()
            if self.pending.get(key) == priority:
                del self.pending[key]
                return key

    async def _worker(self) -> None:
        while True:
            key = await self._next()
            self.running.add(key)
            retry = 0.0
            try:
                retry = await self.process(key) or 0.0  # a held-back progress write: look again then
                self.failures.pop(key, None)
            except Conflict:
                retry = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as e:  # retried with backoff; the error is counted and logged
                n = self.failures[key] = self.failures.get(key, 0) + 1
                retry = min(self.max_backoff, 0.5 * 2**n)
                metrics.RECONCILE_ERRORS.labels(kind=type(e).__name__).inc()
                log.warning("reconcile %s failed (%s: %s); retrying in %.1fs", key, type(e).__name__, e, retry)
            finally:
                self.running.discard(key)
                metrics.QUEUE_DEPTH.set(len(self.pending))
            if key in self.dirty:
                self.dirty.discard(key)
                self.add(key)
            elif retry:
                self.add(key, retry)
