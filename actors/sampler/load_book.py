"""The sampler's book of generators and the prompts each holds, with the least-loaded one at hand.

Dealing a prompt picks the generator with the fewest in flight (ties: the one dealt to least
recently, then by name). A scan of every generator per prompt made a 512-prompt batch among 512
generators a quarter-million comparisons in one turn of the sampler's loop, a stall every control
message behind it waited out; a heap with stale entries skipped makes each deal O(log n).
"""
from __future__ import annotations

import heapq


class LoadBook(dict):
    """name -> prompts in flight (a dict: set, delete and pop as usual); ``deal()`` takes the least loaded."""

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[int, int, str]] = []
        self._last: dict[str, int] = {}  # name -> number of the last deal it got
        self._deals = 0

    def __setitem__(self, name: str, load: int) -> None:
        super().__setitem__(name, load)
        heapq.heappush(self._heap, (load, self._last.get(name, -1), name))
        if len(self._heap) > 4 * len(self) + 64:  # mostly stale entries: start afresh
            self._heap = [(n, self._last.get(g, -1), g) for g, n in self.items()]
            heapq.heapify(self._heap)

    def deal(self) -> str:
        """The least-loaded name (KeyError when empty), counted one more in flight and dealt to last."""
        while True:
            if not self._heap:
                raise KeyError("no generator to deal to")
            load, last, name = self._heap[0]
            if self.get(name) == load and self._last.get(name, -1) == last:
                break
            heapq.heappop(self._heap)
        self._deals += 1
        self._last[name] = self._deals
        self[name] = load + 1
        return name
