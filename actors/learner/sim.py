"""The simulated learner: the real Learner actor whose PPO step is the cost model's sleep.

Everything around the step is the real code (step order, the exactly-once record, checkpoints of
its small real model, the weight broadcast), so a simulated run exercises the same control plane
as a real one. Its batch's response tokens count ``token_scale`` simulated tokens each, as the
simulated generators emitted them.
"""
from __future__ import annotations

import time

from actors.learner.learner import Learner
from policies.cost_model import CostModel


class SimLearner(Learner):
    def __init__(self, *args, cost: CostModel, **kwargs):
        super().__init__(*args, **kwargs)
        self.cost = cost

    def train_batch(self, batch, step: int) -> dict:
        response = int(batch.loss_mask.sum())
        prompt = batch.num_tokens - response
        seconds = self.cost.train_seconds(prompt, response * self.cost.token_scale)
        time.sleep(seconds)
        return {"sim_train_s": seconds}
