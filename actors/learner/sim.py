"""The simulated learner: the real Learner actor whose PPO step is the cost model's sleep.

Everything around the step is the real code (step order, the exactly-once record, checkpoints of
its small real model, the weight broadcast), so a simulated run exercises the same control plane
as a real one. Its batch's response tokens count ``token_scale`` simulated tokens each, as the
simulated generators emitted them. Its weights are a token payload on the real channels (the
cost model charges the gigabytes).
"""
from __future__ import annotations

import time

import torch

from actors.learner.learner import Learner
from actors.weights.broadcaster import snapshot
from policies.cost_model import CostModel


class SimLearner(Learner):
    def __init__(self, *args, cost: CostModel, **kwargs):
        super().__init__(*args, **kwargs)
        self.cost = cost
        self._payload = snapshot(torch.nn.Linear(8, 8))

    def weights(self) -> dict:
        return self._payload

    def train_batch(self, batch, step: int) -> dict:
        response = int(batch.loss_mask.sum())
        prompt = batch.num_tokens - response
        seconds = self.cost.train_seconds(prompt, response * self.cost.token_scale)
        time.sleep(seconds)
        return {"sim_train_s": seconds}
