"""Verifier actor: scores a group's responses in the policies verifier's process pool."""
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
                 reward_cfg: RewardConfig | None = None, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.pool = VerifierPool(workers=workers, timeout=timeout)
        self.reward_cfg = reward_cfg or RewardConfig()

    async def on_stop(self) -> None:
        self.pool.close()

    @handler(P.SCORE)
    async def on_score(self, body: dict, src: str) -> None:
        texts = body["texts"]
        correct = await self.pool.score(texts, [body["answers"]] * len(texts))
        await self.bus.send(P.PACKER, P.SCORED, {
            "batch": body["batch"], "qid": body["qid"], "correct": correct,
            "rewards": [reward(c, self.reward_cfg) for c in correct],
            "rollout": body["rollout"], "generator": body["generator"], "stats": body["stats"]})
