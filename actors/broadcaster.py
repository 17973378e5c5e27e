"""Weight broadcaster: moves the learner's new weights to every live generator, then announces the version.

It lives in the learner's process (so it reads the weights by reference) and speaks to generators
over a tensor channel. A generator that is dead or too slow is dropped from this update, never
waited for past the deadline; one that joins later gets the current weights at once. An update whose
request or answer a broker restart lost is sent again (a generator ignores a second copy).

A generator an update missed (its update failed, or it did not answer in time) but that is still
registered is pushed the same version again, ``retry_attempts`` times with doubling pauses from
``retry_backoff``, while the offered weights live (``update_timeout``); once it has them the version
is announced again, naming it. Without this the sampler, which deals only to the generators of the
announcement, would hold it out until the next version, and with a single generator that never comes.
"""
from __future__ import annotations

import asyncio
import logging

import torch

from actors import protocol as P
from actors.base import Actor, handler

log = logging.getLogger("actors.broadcaster")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded HF names and tensors (what SGLang and our generators load)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


class WeightBroadcaster(Actor):
    role = "broadcaster"

    def __init__(self, bus_address: str, *, model: torch.nn.Module, version: int = 0,
                 update_timeout: float = 120.0, attempt_timeout: float = 10.0, retry_attempts: int = 5,
                 retry_backoff: float = 1.0, name: str = P.BROADCASTER, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.model, self.version = model, version
        self.update_timeout = update_timeout
        self.attempt_timeout = attempt_timeout  # an update unanswered this long is sent again
        self.retry_attempts, self.retry_backoff = retry_attempts, retry_backoff
        self._retries: dict[str, asyncio.Task] = {}  # generator -> the task pushing it the version it missed
        self.announced: dict | None = None  # the last announcement: a version and who runs it
        self._lock = asyncio.Lock()
        self.current: set[str] = set()  # generators known to run self.version

    async def on_start(self) -> None:
        self.bus.subscribe(P.JOINED, self._on_joined)
        self.bus.subscribe(P.LEFT, self._on_left)
        await self.broadcast(self.version)  # generators may hold other weights (a resumed run)

    async def _announce(self) -> None:
        self.announced = {"version": self.version, "generators": sorted(self.current)}
        await self.bus.publish(P.WEIGHTS_VERSION, self.announced)

    @handler("broadcaster_state")
    async def on_state(self, body: dict, src: str) -> dict:
        """The last announcement (mid-update, the new version is not yet served by anyone)."""
        return self.announced or {"version": -1, "generators": []}

    async def _offer(self, gens: list, weights: dict[str, torch.Tensor], reads: int = 1) -> dict[str, dict]:
        """One send per channel kind, readable ``reads`` times by every generator that uses that kind."""
        by_kind: dict[str, list] = {}
        for g in gens:
            by_kind.setdefault(self.channels.kind_for([g]), []).append(g)
        descs = {}
        for kind, members in by_kind.items():
            # shm copies at send time; zero-copy kinds would otherwise serve tensors the learner keeps training
            payload = weights if kind == "shm" else {k: v.clone() for k, v in weights.items()}
            desc = await self.channels.send(payload, members, timeout=self.update_timeout, reads=reads)
            descs.update({g.name: desc for g in members})
        return descs

    async def _push(self, gen, desc: dict, version: int, within: float | None = None) -> bool:
        within = self.update_timeout if within is None else within
        try:
            reply = await self.request_until(gen.name, P.UPDATE_WEIGHTS, {"version": version, "weights": desc},
                                             within=within, attempt=min(self.attempt_timeout, within),
                                             gone_grace=min(5.0, within))
            return int(reply["version"]) == version
        except Exception as exc:
            log.warning("weight update v%d to %s failed, dropping it from this update: %s", version, gen.name, exc)
            return False

    async def broadcast(self, version: int) -> dict:
        """Push the model's weights as ``version`` to all generators; returns {updated, failed, seconds}."""
        for task in self._retries.values():  # this update reaches every generator anyway
            task.cancel()
        async with self._lock:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            self.version = version
            gens = await self.bus.actors(role="generator")
            weights = snapshot(self.model)
            descs = await self._offer(gens, weights) if gens else {}
            results = await asyncio.gather(*(self._push(g, descs[g.name], version) for g in gens))
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
                weights = snapshot(self.model)
                descs = await self._offer(gens, weights)
                if await self._push(gens[0], descs[gens[0].name], self.version):
                    log.info("late generator %s brought to v%d", body["name"], self.version)
                    self.current.add(body["name"])
                    await self._announce()
                else:
                    await self._retry_later(gens, weights, self.version)

    async def _on_left(self, topic: str, body: dict, src: str) -> None:
        self.current.discard(body.get("name"))
        task = self._retries.pop(body.get("name"), None)
        if task is not None:
            task.cancel()

    async def _retry_later(self, missed: list, weights: dict[str, torch.Tensor], version: int) -> None:
        """Offer ``weights`` (taken while the learner waits for this update, so they are ``version``'s)
        once more to the generators an update missed, and push them again in the background."""
        if not missed or self.retry_attempts < 1:
            return
        try:
            descs = await self._offer(missed, weights, reads=self.retry_attempts)
        except Exception as exc:
            log.error("weights v%d could not be offered again to %s (%s: %s); they wait for the next version",
                      version, ", ".join(g.name for g in missed), type(exc).__name__, exc)
            return
        for g in missed:
            old = self._retries.pop(g.name, None)
            if old is not None:
                old.cancel()
            self._retries[g.name] = self.spawn(self._catch_up(g, descs[g.name], version))

    async def _catch_up(self, gen, desc: dict, version: int) -> None:
        """Push ``version`` to ``gen`` again, with backoff, until it takes it or the offer expires."""
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
                if await self._push(gen, desc, version, within=left) and self.version == version:
                    log.info("generator %s caught up to v%d", gen.name, version)
                    self.current.add(gen.name)
                    await self._announce()
                    return
            log.error("weights v%d never reached generator %s (%d more attempts in %.0f s failed); it gets no "
                      "prompts until the next version", version, gen.name, attempt, self.update_timeout)
        finally:
            if self._retries.get(gen.name) is asyncio.current_task():
                del self._retries[gen.name]
