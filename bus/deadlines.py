"""Request deadlines on one event-loop timer.

Arming a loop timer per request costs ~5 us on uvloop (a libuv timer each); pushing onto a heap
costs ~0.3 us. Entries of answered requests stay in the heap until they come due or the heap is
rebuilt from the live ones, and the timer never fires more often than every `granularity`
seconds, so a timeout is reported at most that much late.
"""
from __future__ import annotations

import asyncio
import heapq
from typing import Callable, Mapping, Protocol


class HasDeadline(Protocol):
    deadline: float


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, live: Mapping[int, HasDeadline],
                 on_expire: Callable[[int], None], granularity: float = 0.005):
        self.loop, self.live, self.on_expire, self.granularity = loop, live, on_expire, granularity
        self.heap: list[tuple[float, int]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.armed_at = float("inf")

    def add(self, key: int, deadline: float) -> None:
        """Call on_expire(key) at loop time `deadline` unless `key` has left `live` by then."""
        heapq.heappush(self.heap, (deadline, key))
        if deadline < self.armed_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = when
        self.timer = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self.timer, self.armed_at = None, float("inf")
        now, heap, live = self.loop.time(), self.heap, self.live
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            if key in live:
                self.on_expire(key)
        if len(heap) > 2 * len(live) + 1024:  # mostly answered requests: keep memory bounded
            self.heap = heap = [(p.deadline, k) for k, p in live.items()]
            heapq.heapify(heap)
        if heap:
            self._arm(max(heap[0][0], now + self.granularity))

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.armed_at, self.heap = None, float("inf"), []
