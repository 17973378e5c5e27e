"""Verifier actor: scores a group's responses in the policies verifier's process pool.

A SCORE is acknowledged at once and scored in the background (a second copy of one being scored is
ignored); the result is delivered to the packer, so a broker restart loses none.
"""
from __future__ import annotations

import logging

from actors import protocol as P
from actors.base import Actor, handler
from policies.reward import RewardConfig, reward
from policies.verifier import VerifierPool

log = logging.getLogger("actors.verifier")


class Verifier(Actor):
    role = "verifier"

    def __init__(self, name: str, bus_address: str, *, workers: int = 2, timeout: float = 5.0,
                 reward_cfg: RewardConfig | None = None, deliver_timeout: float = 30.0, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.pool = VerifierPool(workers=workers, timeout=timeout)
        self.reward_cfg = reward_cfg or RewardConfig()
        self.deliver_timeout = deliver_timeout
        self._active: set[tuple[int, str]] = set()

    async def on_stop(self) -> None:
        self.pool.close()

    @handler(P.SCORE, from_roles=(P.GENERATOR,))
    async def on_score(self, body: dict, src: str) -> None:
        key = (int(body["batch"]), body["qid"])
        if key not in self._active:
            self._active.add(key)
            self.spawn(self._score(key, body))

    async def _score(self, key: tuple[int, str], body: dict) -> None:
        try:
            texts = body["texts"]
            correct = await self.pool.score(texts, [body["answers"]] * len(texts))
            await self.deliver(P.PACKER, P.SCORED, {
                "batch": body["batch"], "qid": body["qid"], "correct": correct,
                "rewards": [reward(c, self.reward_cfg) for c in correct],
                "rollout": body["rollout"], "generator": body["generator"], "stats": body["stats"]},
                within=self.deliver_timeout)
        except Exception as exc:
            log.error("could not score %s: %s: %s", key, type(exc).__name__, exc)
            try:
                await self.deliver(P.SAMPLER, P.REJECTED, {"batch": key[0], "qid": key[1],
                                                           "reason": f"{self.name}: {exc}"}, within=self.deliver_timeout)
            except Exception as exc2:  # the sampler deals it again after rollout.request_timeout
                log.error("could not tell the sampler that %s failed: %s", key, exc2)
        finally:
            self._active.discard(key)
