"""The cost model of simulated compute: how long generation, training and weight sync would take.

Simulated generators and the simulated learner (actors.generator.sim, actors.learner.sim) sleep what
this says, so the real control plane (bus, sampler, verifier, packer, launcher) runs at the pace of a
cluster without its GPUs. Pure arithmetic: no actors, no sockets.

Generation is continuous batching: one decode step gives every running sequence one token and takes
``decode_step_s`` while at most ``max_running`` sequences run, proportionally longer beyond (the
compute-bound regime). Response lengths are log-normal (median, sigma), capped at
``max_response_tokens`` (the release's 27K). ``token_scale`` simulated tokens make one emitted token,
so a long-tailed 27K response travels as a few hundred real tokens; every time is charged on the
simulated tokens. ``time_scale`` multiplies every duration (a bench squeezes a step into seconds).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from policies.settings import Checked, at_least_one, closed_unit, non_negative, opt, positive


@dataclass
class CostModel(Checked):
    prefill_s_per_token: float = opt(2e-5, check=non_negative, expect=">= 0",
                                     doc="a prompt (or a prefix re-read after an interrupting update)")
    decode_step_s: float = opt(0.03, check=positive, expect="> 0",
                               doc="one decode step of up to max_running sequences")
    max_running: int = opt(64, check=at_least_one, expect=">= 1",
                           doc="sequences one decode step serves at decode_step_s")
    response_median: float = opt(2000.0, check=positive, expect="> 0", doc="simulated tokens")
    response_sigma: float = opt(1.0, check=non_negative, expect=">= 0", doc="of log(length): the tail")
    max_response_tokens: int = opt(27000, check=at_least_one, expect=">= 1",
                                   doc='the cap; a capped response is truncated ("length")')
    learner_s_per_token: float = opt(2e-5, check=non_negative, expect=">= 0",
                                     doc="one PPO step, per simulated token of the batch")
    weight_gb: float = opt(14.0, check=non_negative, expect=">= 0", doc="the weights a sync moves (7B in bf16)")
    sync_s_per_gb: float = opt(0.05, check=non_negative, expect=">= 0",
                               doc="generators pause this long per GB while weights arrive")
    accuracy: float = opt(0.5, check=closed_unit, expect="in [0, 1]",
                          doc="chance a response boxes the reference answer")
    token_scale: int = opt(1, check=at_least_one, expect=">= 1", doc="simulated tokens per emitted token")
    time_scale: float = opt(1.0, check=positive, expect="> 0", doc="multiplies every duration")

    # ---- lengths ---------------------------------------------------------------------------
    def response_length(self, rng: random.Random) -> int:
        """One response's simulated length: log-normal, at least 1, capped."""
        n = int(round(self.response_median * math.exp(self.response_sigma * rng.gauss(0.0, 1.0))))
        return max(1, min(self.max_response_tokens, n))

    def emitted(self, length: int) -> int:
        """Tokens that stand for ``length`` simulated ones on the wire."""
        return max(1, -(-length // self.token_scale))

    def mean_response_tokens(self) -> float:
        """E[min(L, cap)] of the log-normal, in closed form."""
        mu, s, cap = math.log(self.response_median), self.response_sigma, self.max_response_tokens
        if s == 0:
            return min(self.response_median, cap)
        phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
        lc = math.log(cap)
        return math.exp(mu + s * s / 2) * phi((lc - mu - s * s) / s) + cap * (1 - phi((lc - mu) / s))

    # ---- durations (seconds, time_scale applied) -----------------------------------------
    def prefill_seconds(self, tokens: float) -> float:
        return self.time_scale * self.prefill_s_per_token * tokens

    def decode_step_seconds(self, running: int) -> float:
        return self.time_scale * self.decode_step_s * max(1.0, running / self.max_running)

    def train_seconds(self, prompt_tokens: float, response_tokens: float) -> float:
        """One PPO step on a batch with these simulated token counts."""
        return self.time_scale * self.learner_s_per_token * (prompt_tokens + response_tokens)

    def sync_seconds(self) -> float:
        return self.time_scale * self.sync_s_per_gb * self.weight_gb

    # ---- the ideal ---------------------------------------------------------------------------
    def batch_makespan(self, rng: random.Random, groups: int, group_size: int, generators: int,
                       prompt_tokens: int) -> float:
        """Seconds to generate one batch from empty generators (the synchronous case): groups dealt
        evenly, each generator prefills its prompts then decodes all its sequences together, the
        step speeding up as sequences finish; the slowest generator sets the time."""
        loads: list[list[int]] = [[] for _ in range(generators)]
        for g in range(groups):
            loads[g % generators].extend(self.response_length(rng) for _ in range(group_size))
        worst = 0.0
        for lens in loads:
            if not lens:
                continue
            lens.sort()
            t = self.prefill_seconds(prompt_tokens * (len(lens) // group_size))
            prev = 0
            for i, n in enumerate(lens):
                t += (n - prev) * self.decode_step_seconds(len(lens) - i)
                prev = n
            worst = max(worst, t)
        return worst

    def ideal(self, *, batch_prompts: int, group_size: int, generators: int, prompt_tokens: int,
              max_staleness: int, trials: int = 16, seed: int = 0) -> dict:
        """Seconds per step the cost model allows, with its parts.

        generate: the expected makespan of one batch on idle generators (its longest responses set
        it); train: one PPO step on it (responses charged as emitted, token_scale each); sync: the
        weight update, which the learner waits for. A batch is admitted once the learner is at most k
        versions behind, then generated and trained, so k+1 steps take at least generate + train +
        sync; the learner takes train + sync a step; the generators no less than ``saturated`` (the
        batch's tokens at every generator's full rate) plus the sync. Synchronous (k = 0): the sum;
        balanced (generate == train) and k >= 1: the slower of generation and training, plus the sync.
        """
        seqs = batch_prompts * group_size
        mean = self.mean_response_tokens()
        saturated = (seqs * mean * self.decode_step_seconds(self.max_running) / self.max_running
                     + self.prefill_seconds(batch_prompts * prompt_tokens)) / generators
        train = self.train_seconds(seqs * prompt_tokens, seqs * (mean + (self.token_scale - 1) / 2))
        sync = self.sync_seconds()
        rng = random.Random(seed)
        generate = sum(self.batch_makespan(rng, batch_prompts, group_size, generators, prompt_tokens)
                       for _ in range(trials)) / trials
        step = max(train + sync, (generate + train + sync) / (max_staleness + 1), saturated + sync)
        return {"generate": generate, "saturated": saturated, "train": train, "sync": sync, "step": step}
