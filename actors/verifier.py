"""Verifier actor: scores a group's responses in the policies verifier's process pool.

A SCORE is acknowledged at once and scored in the background (a second copy of one being scored is
ignored); the result is delivered to the packer, so a broker restart loses none. With `reward.fns`
the pool runs the users' functions instead of the \\boxed{} check: a response on which one fails
gets `reward.on_error`, and the group's failures ride to the packer as SCORED's `reward_errors`.
"""
from __future__ import annotations

import logging

from actors import protocol as P
from actors.base import Actor, handler
from policies.verify.reward import RewardConfig, length_term, reward
from policies.verify.verifier import VerifierPool

log = logging.getLogger("actors.verifier")


class Verifier(Actor):
    role = P.VERIFIER

    def __init__(self, name: str, bus_address: str, *, workers: int = 2, timeout: float = 5.0,
                 reward_cfg: RewardConfig | None = None, deliver_timeout: float = 30.0, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.reward_cfg = reward_cfg or RewardConfig()
        self.pool = VerifierPool(workers=workers, timeout=timeout,
                                 reward_fns=[(f.fn, f.weight) for f in self.reward_cfg.fns])
        self.reward_errors = 0
        self.deliver_timeout = deliver_timeout
        self._active: set[tuple[int, str, str | None]] = set()

    async def on_stop(self) -> None:
        self.pool.close()

    @handler(P.SCORE, from_roles=(P.GENERATOR, P.ROLLOUT))
    async def on_score(self, body: dict, src: str) -> None:
        key = (int(body["step"]), body["qid"], body.get("epoch"))  # a job incarnation's copy is not another's
        if key not in self._active:
            self._active.add(key)
            self.spawn(self._score(key, body))

    async def _score(self, key: tuple[int, str], body: dict) -> None:
        try:
            # a rollout worker's SCORE carries its workflows' rewards: only those left None are scored here
            given = body.get("rewards") or [None] * len(body["texts"])
            todo = [i for i, r in enumerate(given) if r is None]
            texts = [body["texts"][i] for i in todo]
            if self.reward_cfg.fns:
                scored, errors = await self._user_rewards(key, {**body, "texts": texts})
                verdicts = [r > 0 for r in scored]
            else:
                verdicts = await self.pool.score(texts, [body["answers"]] * len(texts))
                scored, errors = [reward(c, self.reward_cfg) for c in verdicts], 0
            if self.reward_cfg.overlong is not None:  # DAPO's soft punishment by each response's length
                lengths = body["stats"]["response_tokens"]
                scored = [r + length_term(lengths[i], self.reward_cfg) for r, i in zip(scored, todo)]
            rewards, correct = [float(r) if r is not None else 0.0 for r in given], [r is not None and r > 0 for r in given]
            for i, r, c in zip(todo, scored, verdicts):
                rewards[i], correct[i] = r, c
            await self.deliver(P.PACKER, P.SCORED, {
                "step": body["step"], "qid": body["qid"], "rewards": rewards, "correct": correct,
                "reward_errors": errors, "rollout_ref": body["rollout_ref"], "generator": body["generator"],
                "stats": body["stats"], "epoch": body.get("epoch")},
                within=self.deliver_timeout)
        except Exception as exc:
            log.error("could not score %s: %s: %s", key, type(exc).__name__, exc)
            try:
                await self.deliver(P.SAMPLER, P.REJECTED, {"step": key[0], "qid": key[1], "epoch": body.get("epoch"),
                                                           "reason": f"{self.name}: {exc}"}, within=self.deliver_timeout)
            except Exception as exc2:  # the sampler deals it again after rollout.request_timeout
                log.error("could not tell the sampler that %s failed: %s", key, exc2)
        finally:
            self._active.discard(key)

    async def _user_rewards(self, key: tuple[int, str], body: dict) -> tuple[list[float], int]:
        """The reward functions' weighted sums; failures get reward.on_error, are counted and logged."""
        texts = body["texts"]
        problem = body.get("problem") or {}
        answers = body["answers"]
        reference = answers[0] if len(answers) == 1 else answers
        n = len(texts)
        outcomes = await self.pool.rewards([problem.get("prompt", "")] * n, texts, [reference] * n,
                                           [problem.get("extra") or {}] * n)
        rewards, errors = [], 0
        for o in outcomes:
            if o.value is None:
                errors += 1
                self.reward_errors += 1
                if self.reward_errors <= 5 or self.reward_errors % 100 == 0:
                    log.warning("reward function failed on %s (%d so far): %s", key, self.reward_errors, o.error)
                rewards.append(float(self.reward_cfg.on_error))
            else:
                rewards.append(float(o.value))
        return rewards, errors
