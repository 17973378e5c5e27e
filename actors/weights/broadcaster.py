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

Generators whose SGLang server takes weights over torch.distributed (capability ``weights:
distributed``) are not sent tensors: the broadcaster hands them, all together, to its ``sglang``
weight-update session (actors.weights.sglang_distributed), which broadcasts into their servers from this process.
"""
from __future__ import annotations

import asyncio
import logging

import torch

from actors import protocol as P
from actors.base import Actor, handler
from tensors.channels.shm import MAX_READERS as SHM_MAX_READERS

log = logging.getLogger("actors.broadcaster")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded HF names and tensors (what SGLang and our generators load)."""
    return {k: v.detach() for k, v in model.state_dict().items()}


class WeightBroadcaster(Actor):
    role = "broadcaster"

    def __init__(self, bus_address: str, *, model: torch.nn.Module, version: int = 0,
                 update_timeout: float = 120.0, attempt_timeout: float = 10.0, retry_attempts: int = 5,
                 retry_backoff: float = 1.0, name: str = P.BROADCASTER, sglang=None, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.sglang = sglang  # SGLangWeightSync for generators that take weights "distributed", or None
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

    async def on_stop(self) -> None:
        if self.sglang is not None:
            await self.sglang.close()

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

    async def _offer(self, gens: list, weights: dict[str, torch.Tensor], reads: int = 1) -> dict[str, dict]:
        """One send per channel kind, readable ``reads`` times by every generator that uses that kind."""
        by_kind: dict[str, list] = {}
        descs = {}
        for g in gens:
            if self._sglang_server(g) is not None:  # a copy: the learner trains on meanwhile
                descs[g.name] = {"sglang": {k: v.clone() for k, v in weights.items()}}
                continue
            by_kind.setdefault(self.channels.kind_for([g]), []).append(g)
        for kind, members in by_kind.items():
            # shm copies at send time; zero-copy kinds would otherwise serve tensors the learner keeps training
            payload = weights if kind == "shm" else {k: v.clone() for k, v in weights.items()}
            # a shm segment serves at most SHM_MAX_READERS reads: more generators on a host get more segments
            per = max(1, SHM_MAX_READERS // reads) if kind == "shm" else len(members)
            for i in range(0, len(members), per):
                chunk = members[i:i + per]
                desc = await self.channels.send(payload, chunk, timeout=self.update_timeout, reads=reads)
                descs.update({g.name: desc for g in chunk})
        return descs

    async def _push(self, gen, desc: dict, version: int, within: float | None = None) -> bool:
        if "sglang" in desc:
            return gen.name in await self._sync_sglang([gen], desc["sglang"], version)
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
            direct = [g for g in gens if self._sglang_server(g) is None]
            descs = await self._offer(direct, weights) if direct else {}
            pushed, synced = await asyncio.gather(
                asyncio.gather(*(self._push(g, descs[g.name], version) for g in direct)),
                self._sync_sglang([g for g in gens if g.name not in descs], weights, version))
            ok_direct = dict(zip((g.name for g in direct), pushed))
            results = [ok_direct[g.name] if g.name in ok_direct else g.name in synced for g in gens]
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
