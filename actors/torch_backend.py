"""The torch generator backend: an async shell around policies.sampling.GenerationEngine.

One decode step at a time runs in a worker thread; weight updates are applied between steps, so
an update never waits for a whole generation and later tokens carry the new version.
"""
from __future__ import annotations

import asyncio
import logging

import torch

from actors.generator import Sample
from policies.sampling import GenerationEngine, SamplingParams

log = logging.getLogger("actors.torch_backend")

_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids")


class TorchBackend:
    def __init__(self, model: torch.nn.Module, *, stop_token_ids: tuple[int, ...] = (), **engine_kwargs):
        self.model = model
        self.engine = GenerationEngine(model, **engine_kwargs)
        self.stop_token_ids = tuple(stop_token_ids)
        self._groups: dict[str, tuple[asyncio.Future, list]] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # a decode step or a weight update, never both
        self._loop_task: asyncio.Task | None = None

    @property
    def version(self) -> int:
        return self.engine.version

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        for fut, _ in self._groups.values():
            if not fut.done():
                fut.set_exception(RuntimeError("generator backend closed"))

    def _params(self, sampling: dict) -> SamplingParams:
        kw = {k: sampling[k] for k in _SAMPLING_KEYS if sampling.get(k) is not None}
        kw["stop_token_ids"] = tuple(kw.get("stop_token_ids") or self.stop_token_ids)
        return SamplingParams(**kw)

    async def generate_group(self, rid: str, prompt_ids: list[int], n: int, sampling: dict) -> list[Sample]:
        fut = asyncio.get_running_loop().create_future()
        self._groups[rid] = (fut, [None] * n)
        async with self._lock:
            self.engine.add(rid, list(prompt_ids), n, self._params(sampling))
        self._wake.set()
        try:
            return await fut
        finally:
            self._groups.pop(rid, None)

    async def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self.engine.update_weights, weights, version)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            async with self._lock:
                if not self.engine.has_work():
                    self._wake.clear()
                    continue
                finished = await asyncio.to_thread(self.engine.step)
            for f in finished:
                entry = self._groups.get(f.rid)
                if entry is None:
                    continue
                fut, slots = entry
                slots[f.index] = Sample(list(f.output_ids), list(f.logprobs), list(f.versions), f.finish_reason)
                if all(s is not None for s in slots) and not fut.done():
                    fut.set_result(slots)
            await asyncio.sleep(0)  # let handlers (new prompts, updates) in between steps
