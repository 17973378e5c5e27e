"""Weight broadcaster: moves the learner's new weights to every live generator, then announces the version.

It lives in the learner's process (so it reads the weights by reference) and speaks to generators
over a tensor channel. A generator that is dead or too slow is dropped from this update, never
waited for past the deadline; one that joins later gets the current weights at once. An update whose
request or answer a broker restart lost is sent again (a generator ignores a second copy).
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
                 update_timeout: float = 120.0, attempt_timeout: float = 10.0, name: str = P.BROADCASTER,
                 **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.model, self.version = model, version
        self.update_timeout = update_timeout
        self.attempt_timeout = attempt_timeout  # an update unanswered this long is sent again
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

    async def _offer(self, gens: list, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
        """One send per channel kind, readable by every generator that uses that kind."""
        by_kind: dict[str, list] = {}
        for g in gens:
            by_kind.setdefault(self.channels.kind_for([g]), []).append(g)
        descs = {}
        for kind, members in by_kind.items():
            # shm copies at send time; zero-copy kinds would otherwise serve tensors the learner keeps training
            payload = weights if kind == "shm" else {k: v.clone() for k, v in weights.items()}
            desc = await self.channels.send(payload, members, timeout=self.update_timeout)
            descs.update({g.name: desc for g in members})
        return descs

    async def _push(self, gen, desc: dict, version: int) -> bool:
        try:
            reply = await self.request_until(gen.name, P.UPDATE_WEIGHTS, {"version": version, "weights": desc},
                                             within=self.update_timeout, attempt=self.attempt_timeout,
                                             gone_grace=min(5.0, self.update_timeout))
            return int(reply["version"]) == version
        except Exception as exc:
            log.warning("weight update v%d to %s failed, dropping it from this update: %s", version, gen.name, exc)
            return False

    async def broadcast(self, version: int) -> dict:
        """Push the model's weights as ``version`` to all generators; returns {updated, failed, seconds}."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            self.version = version
            gens = await self.bus.actors(role="generator")
            descs = await self._offer(gens, snapshot(self.model)) if gens else {}
            results = await asyncio.gather(*(self._push(g, descs[g.name], version) for g in gens))
            self.current = {g.name for g, ok in zip(gens, results) if ok}
            await self._announce()
            ok = sum(results)
            log.info("weights v%d reached %d of %d generators", version, ok, len(gens))
            return {"updated": ok, "failed": len(gens) - ok, "seconds": loop.time() - t0}

    async def _on_joined(self, topic: str, body: dict, src: str) -> None:
        if body.get("role") != "generator":
            return
        gens = [g for g in await self.bus.actors(role="generator") if g.name == body["name"]]
        if gens:
            async with self._lock:
                descs = await self._offer(gens, snapshot(self.model))
                if await self._push(gens[0], descs[gens[0].name], self.version):
                    log.info("late generator %s brought to v%d", body["name"], self.version)
                    self.current.add(body["name"])
                    await self._announce()

    async def _on_left(self, topic: str, body: dict, src: str) -> None:
        self.current.discard(body.get("name"))
