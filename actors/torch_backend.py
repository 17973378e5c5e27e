"""The torch generator backend: an async shell around policies.sampling.GenerationEngine.

One decode step at a time runs in a worker thread; weight updates are applied between steps, so
an update never waits for a whole generation and later tokens carry the new version.

A decode step that raises must not lock the generator: every pending group fails with the error
(the generator reports it as REJECTED, so the sampler deals the prompt again), the engine drops its
groups and the loop goes on. After ``max_step_failures`` failed steps in a row, or when the engine
cannot be cleared, the backend is ``failed`` and refuses new groups (the generator then leaves the bus).
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
    def __init__(self, model: torch.nn.Module, *, stop_token_ids: tuple[int, ...] = (), max_step_failures: int = 3,
                 **engine_kwargs):
        self.model = model
        self.engine = GenerationEngine(model, **engine_kwargs)
        self.stop_token_ids = tuple(stop_token_ids)
        self.max_step_failures = max_step_failures
        self.failed: BaseException | None = None  # why the decode loop stopped for good
        self._groups: dict[str, tuple[asyncio.Future, list]] = {}
        self._aborted: set[str] = set()  # groups nobody waits for any more: dropped between steps
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
        try:
            async with self._lock:
                if self.failed is not None:
                    raise RuntimeError(f"the torch engine stopped ({type(self.failed).__name__}: {self.failed}); "
                                       "it takes no more prompts")
                self.engine.add(rid, list(prompt_ids), n, self._params(sampling))
            self._wake.set()
            return await fut
        except asyncio.CancelledError:  # the caller gave up (deadline): free the engine's rows for others
            self._aborted.add(rid)
            self._wake.set()
            raise
        finally:
            self._groups.pop(rid, None)

    async def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self.engine.update_weights, weights, version)

    def _fail_pending(self, exc: BaseException) -> None:
        for fut, _ in self._groups.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"decode step failed: {type(exc).__name__}: {exc}"))

    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception as exc:  # outside a decode step (a bug): nobody may wait for this loop any more
            log.error("the decode loop failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self.failed = exc
            self._fail_pending(exc)

    async def _serve(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            async with self._lock:
                while self._aborted:
                    self.engine.abort(self._aborted.pop())
                if not self.engine.has_work():
                    self._wake.clear()
                    continue
                try:
                    finished = await asyncio.to_thread(self.engine.step)
                except Exception as exc:
                    failures += 1
                    log.error("decode step failed (%d in a row): %s: %s; failing the %d pending groups", failures,
                              type(exc).__name__, exc, len(self._groups), exc_info=exc)
                    self._fail_pending(exc)
                    try:
                        self.engine.abort_all()  # their rows and rids, so a re-dealt copy can be added again
                    except Exception as exc2:
                        log.error("the engine cannot drop its groups (%s: %s)", type(exc2).__name__, exc2)
                        failures = self.max_step_failures
                    if failures >= self.max_step_failures:
                        self.failed = exc
                        log.error("the torch engine stops: %d decode steps failed in a row", failures)
                        return
                    continue
            failures = 0
            for f in finished:
                entry = self._groups.get(f.rid)
                if entry is None:
                    continue
                fut, slots = entry
                slots[f.index] = f
                if all(s is not None for s in slots) and not fut.done():
                    fut.set_result(slots)
            await asyncio.sleep(0)  # let handlers (new prompts, updates) in between steps
