"""Weight broadcaster: moves the learner's new weights to every live generator, then announces the version.

The learner asks it over the bus (PUBLISH_WEIGHTS {version, weights_ref}); it lives in the learner's
process, so the weights come by reference over the ``local`` tensor channel and the bus carries only
their descriptor. Its answer comes once every generator has the version or was dropped from it, and
the learner trains on only then: no weights are overwritten while they are read, and the version is
announced (WEIGHTS_VERSION) only after its weights went out.

It chooses the way per generator: over torch.distributed into SGLang servers that take weights
"distributed" (actors.weights.sglang_distributed, all of them together), else over a tensor channel
(actors.weights.channel_push; SGLang generators on the disk way load what they get from disk).

A generator that is dead or too slow is dropped from this update, never waited for past the deadline;
one that joins later gets the current weights at once. An update whose request or answer a broker
restart lost is sent again (a generator ignores a second copy; so does the broadcaster, per version).

A generator an update missed (its update failed, or it did not answer in time) but that is still
registered is pushed the same version again, ``retry_attempts`` times with doubling pauses from
``retry_backoff``, while the offered weights live (``update_timeout``); once it has them the version
is announced again, naming it. Without this the sampler, which deals only to the generators of the
announcement, would hold it out until the next version, and with a single generator that never comes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import torch

from actors import protocol as P
from actors.base import Actor, handler
from actors.weights.channel_push import ChannelPush
from policies.model.lora import adapter_state, has_adapter

log = logging.getLogger("actors.broadcaster")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded HF names and tensors (what SGLang and our generators load), by reference; a LoRA
    run's model (model.lora) gives its adapter only (policies.model.lora.adapter_state: PEFT's names,
    which tell a generator it is an adapter), a few MB instead of the model."""
    if has_adapter(model):
        return adapter_state(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def host_copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy in host memory: what a late joiner or a retry is sent while the learner trains on.
    Made once per version and shared; never a second whole model on the learner's GPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}


class WeightBroadcaster(Actor):
    role = "broadcaster"

    def __init__(self, bus_address: str, *, weights: dict[str, torch.Tensor], version: int = 0,
                 update_timeout: float = 120.0, attempt_timeout: float = 10.0, retry_attempts: int = 5,
                 retry_backoff: float = 1.0, name: str = P.BROADCASTER, sglang=None, **bus_kwargs):
        """``weights``: the version ``version`` ones (the learner's, by reference), sent at start."""
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.sglang = sglang  # SGLangWeightSync for generators that take weights "distributed", or None
        self.channel_push = ChannelPush(self, update_timeout=update_timeout, attempt_timeout=attempt_timeout)
        self.weights, self.version = weights, version
        self.update_timeout = update_timeout
        self.retry_attempts, self.retry_backoff = retry_attempts, retry_backoff
        self._retries: dict[str, asyncio.Task] = {}  # generator -> the task pushing it the version it missed
        self._published: tuple[int, asyncio.Future] | None = None  # the learner's last request, answered once
        self.announced: dict | None = None  # the last announcement: a version and who runs it
        self._lock = asyncio.Lock()
        self.current: set[str] = set()  # generators known to run self.version
        self._held: tuple[int, dict] | None = None  # (version, its host copy) for joiners and retries

    async def on_start(self) -> None:
        self.bus.subscribe(P.JOINED, self._on_joined)
        self.bus.subscribe(P.LEFT, self._on_left)
        await self.broadcast(self.version, self.weights)  # generators may hold other weights (a resumed run)

    async def on_stop(self) -> None:
        if self.sglang is not None:
            await self.sglang.close()

    @handler(P.PUBLISH_WEIGHTS, from_roles=(P.LEARNER,))
    async def on_publish(self, body: dict, src: str) -> dict:
        """The learner's new weights: {updated, failed, seconds} once they went out and were announced.
        A second copy of a request (its answer was lost) waits for the first one's result."""
        version = int(body["version"])
        if self._published is None or self._published[0] != version:
            weights = await self.channels.recv(body["weights_ref"], timeout=self.update_timeout)
            self._published = (version, asyncio.ensure_future(self.broadcast(version, weights)))
        return await asyncio.shield(self._published[1])

    async def _announce(self) -> None:
        self.announced = {"version": self.version, "generators": sorted(self.current)}
        await self.bus.publish(P.WEIGHTS_VERSION, self.announced)

    @handler(P.BROADCASTER_STATE)
    async def on_state(self, body: dict, src: str) -> dict:
        """The last announcement (mid-update, the new version is not yet served by anyone)."""
        return self.announced or {"version": -1, "generators": []}

    def _sglang_server(self, gen):
        """The SGLang server this generator's weights go to over torch.distributed, or None."""
        caps = gen.capabilities or {}
        if self.sglang is None or caps.get("weights") != "distributed":
            return None
        from actors.weights.sglang_distributed import Server
        return Server(gen.name, caps["sglang_url"], int(caps.get("sglang_tp_size", 1)))

    async def _sync_sglang(self, gens: list, weights: dict[str, torch.Tensor], version: int) -> set[str]:
        """The session's update for these generators' servers; the names that have ``version``."""
        if not gens:
            return set()
        try:
            return await self.sglang.update([self._sglang_server(g) for g in gens], weights, version)
        except Exception as exc:
            log.error("weight update v%d over torch.distributed to %s failed: %s: %s", version,
                      ", ".join(g.name for g in gens), type(exc).__name__, exc)
            return set()

    def _host_copy(self, version: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``version``'s weights in host memory, copied once however many joiners and retries need them."""
        if self._held is None or self._held[0] != version:
            self._held = (version, host_copy(weights))
        return self._held[1]

    async def _update(self, gens: list, weights: dict[str, torch.Tensor], version: int, *,
                      live: bool = False) -> list[bool]:
        """Each generator brought to ``weights`` as ``version`` its way -> whether it was, in order.
        ``live``: the learner may train meanwhile, so the SGLang servers are sent the host copy."""
        sglang = [g for g in gens if self._sglang_server(g) is not None]
        direct = [g for g in gens if self._sglang_server(g) is None]
        descs = await self.channel_push.offer(direct, weights) if direct else {}
        pushed, synced = await asyncio.gather(
            asyncio.gather(*(self.channel_push.push(g, descs[g.name], version) for g in direct)),
            self._sync_sglang(sglang, self._host_copy(version, weights) if live and sglang else weights, version))
        ok = {**dict(zip((g.name for g in direct), pushed)), **{g.name: g.name in synced for g in sglang}}
        return [ok[g.name] for g in gens]

    async def broadcast(self, version: int, weights: dict[str, torch.Tensor]) -> dict:
        """Push ``weights`` as ``version`` to all generators, then announce it -> {updated, failed, seconds}.
        The caller keeps ``weights`` unchanged until this returns."""
        for task in self._retries.values():  # this update reaches every generator anyway
            task.cancel()
        async with self._lock:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            self.version, self.weights = version, weights
            gens = await self.bus.actors(role="generator")
            if self.sglang is not None:  # servers of generators that left: their groups and clients go
                await self.sglang.retain({g.name for g in gens if self._sglang_server(g) is not None})
            results = await self._update(gens, weights, version)
            self.current = {g.name for g, ok in zip(gens, results) if ok}
            await self._announce()
            await self._retry_later([g for g, ok in zip(gens, results) if not ok], weights, version)
            ok = sum(results)
            log.info("weights v%d reached %d of %d generators", version, ok, len(gens))
            return {"updated": ok, "failed": len(gens) - ok, "seconds": loop.time() - t0}

    async def _on_joined(self, topic: str, body: dict, src: str) -> None:
        if body.get("role") != "generator":
            return
        gens = [g for g in await self.bus.actors(role="generator") if g.name == body["name"]]
        if gens:
            async with self._lock:
                if (await self._update(gens, self.weights, self.version, live=True))[0]:
                    log.info("late generator %s brought to v%d", body["name"], self.version)
                    self.current.add(body["name"])
                    await self._announce()
                else:
                    await self._retry_later(gens, self.weights, self.version)

    async def _on_left(self, topic: str, body: dict, src: str) -> None:
        self.current.discard(body.get("name"))
        if self.sglang is not None and body.get("name"):
            self.spawn(self.sglang.forget(body["name"]))
        task = self._retries.pop(body.get("name"), None)
        if task is not None:
            task.cancel()

    async def _retry_later(self, missed: list, weights: dict[str, torch.Tensor], version: int) -> None:
        """Hold ``weights`` (taken while the learner waits for this update, so they are ``version``'s)
        once more for the generators an update missed, and push them again in the background."""
        if not missed or self.retry_attempts < 1:
            return
        direct = [g for g in missed if self._sglang_server(g) is None]
        try:
            descs = await self.channel_push.offer(direct, weights, reads=self.retry_attempts) if direct else {}
            held = self._host_copy(version, weights) if len(direct) < len(missed) else {}  # the learner trains on
        except Exception as exc:
            log.error("weights v%d could not be offered again to %s (%s: %s); they wait for the next version",
                      version, ", ".join(g.name for g in missed), type(exc).__name__, exc)
            return
        for g in missed:
            old = self._retries.pop(g.name, None)
            if old is not None:
                old.cancel()
            if g.name in descs:
                def again(within, g=g, desc=descs[g.name]):
                    return self.channel_push.push(g, desc, version, within=within)
            else:
                async def again(within, g=g):
                    return g.name in await self._sync_sglang([g], held, version)
            self._retries[g.name] = self.spawn(self._catch_up(g, again, version))

    async def _catch_up(self, gen, again: Callable[[float], Awaitable[bool]], version: int) -> None:
        """Push ``version`` to ``gen`` again (``again(within)``), with backoff, until it takes it or the
        offer expires."""
        loop = asyncio.get_running_loop()
        expires, pause = loop.time() + self.update_timeout, self.retry_backoff
        try:
            for attempt in range(1, self.retry_attempts + 1):
                await asyncio.sleep(min(pause, max(0.0, expires - loop.time())))
                pause *= 2
                left = expires - loop.time()
                if self.version != version:
                    return  # a newer update took over
                if left <= 0:
                    break
                if gen.name not in {g.name for g in await self.bus.actors(role="generator")}:
                    return  # it left: nothing to catch up (it gets the weights when it joins again)
                log.info("weights v%d to %s again (attempt %d of %d)", version, gen.name, attempt,
                         self.retry_attempts)
                if await again(left) and self.version == version:
                    log.info("generator %s caught up to v%d", gen.name, version)
                    self.current.add(gen.name)
                    await self._announce()
                    return
            log.error("weights v%d never reached generator %s (%d more attempts in %.0f s failed); it gets no "
                      "prompts until the next version", version, gen.name, attempt, self.update_timeout)
        finally:
            if self._retries.get(gen.name) is asyncio.current_task():
                del self._retries[gen.name]
