"""The torch generator backend: an async shell around policies.infer.sampling.GenerationEngine.

One decode step at a time runs in a worker thread; weight updates land between steps, in one of two
ways (``rollout.interrupt_on_update``):
- interrupt (default): at once; the engine recomputes the cache of every running sequence under
  the new weights at the next step, and the rest of each sequence carries the new version (AReaL's
  interrupt-and-continue: an update never waits for a long generation);
- wait: the update waits until the running sequences end, starting no new group meanwhile, so no
  sequence mixes versions; after ``update_wait_timeout`` (the generator's generate timeout: its
  running groups are given up by then) it is applied anyway, as an interrupt, said in the log.

A decode step that raises must not lock the generator: every pending group fails with the error
(the generator reports it as REJECTED, so the sampler deals the prompt again), the engine drops its
groups and the loop goes on. After ``max_step_failures`` failed steps in a row, or when the engine
cannot be cleared, the backend is ``failed`` and refuses new groups (the generator then leaves the bus).
"""
from __future__ import annotations

import asyncio
import logging

import torch

from actors.generator.generator import Sample
from policies.infer.sampling import GenerationEngine, SamplingParams

log = logging.getLogger("actors.generator.torch_backend")

_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids")


class TorchBackend:
    def __init__(self, model: torch.nn.Module, *, stop_token_ids: tuple[int, ...] = (), max_step_failures: int = 3,
                 interrupt_on_update: bool = True, update_wait_timeout: float = 3600.0, **engine_kwargs):
        if not isinstance(interrupt_on_update, bool):
            raise ValueError(f"interrupt_on_update={interrupt_on_update!r}: must be true or false")
        if not update_wait_timeout > 0:
            raise ValueError(f"update_wait_timeout={update_wait_timeout!r}: must be > 0 (seconds)")
        self.model = model
        self.engine = GenerationEngine(model, **engine_kwargs)
        self.stop_token_ids = tuple(stop_token_ids)
        self.max_step_failures = max_step_failures
        self.interrupt_on_update = interrupt_on_update
        self.update_wait_timeout = update_wait_timeout
        self._holding = 0  # updates waiting for the running sequences: no group is admitted meanwhile
        self._stepped = asyncio.Event()  # set after every decode step (an update waiting for rows to end)
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
        if self.interrupt_on_update:
            async with self._lock:
                await asyncio.to_thread(self.engine.update_weights, weights, version)
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        deadline, said = t0 + self.update_wait_timeout, False
        self._holding += 1
        try:
            while True:
                self._stepped.clear()
                async with self._lock:  # rows are counted where no step can admit one
                    running = self.engine.num_active
                    if not running or self.failed is not None or loop.time() >= deadline:
                        if running:
                            log.warning("weight update v%d: %d sequences still running after %.0f s "
                                        "(rollout.interrupt_on_update=false, deadline %g s); applying it now, "
                                        "they continue under the new weights", version, running,
                                        loop.time() - t0, self.update_wait_timeout)
                        await asyncio.to_thread(self.engine.update_weights, weights, version)
                        break
                if not said:
                    log.info("weight update v%d waits for %d running sequences to end "
                             "(rollout.interrupt_on_update=false); no new group starts meanwhile", version, running)
                    said = True
                self._wake.set()
                try:
                    await asyncio.wait_for(self._stepped.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    pass
        finally:
            self._holding -= 1
            self._wake.set()
        if said:
            log.info("weight update v%d applied after %.2f s of waiting", version, loop.time() - t0)

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
                admit = not self._holding
                if not (self.engine.has_work() if admit else self.engine.num_active):
                    self._wake.clear()
                    self._stepped.set()
                    continue
                try:
                    finished = await asyncio.to_thread(self.engine.step, admit)
                except Exception as exc:
                    failures += 1
                    log.error("decode step failed (%d in a row): %s: %s; failing the %d pending groups", failures,
                              type(exc).__name__, exc, len(self._groups), exc_info=exc)
                    self._fail_pending(exc)
                    self._stepped.set()
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
            self._stepped.set()
            for f in finished:
                entry = self._groups.get(f.rid)
                if entry is None:
                    continue
                fut, slots = entry
                slots[f.index] = f
                if all(s is not None for s in slots) and not fut.done():
                    fut.set_result(slots)
            await asyncio.sleep(0)  # let handlers (new prompts, updates) in between steps
