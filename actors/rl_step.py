"""One RL step, in one process, top to bottom: read this first.

    generate -> score -> pack -> train -> update the generator's weights

`rl_step` calls the same functions the actors call, in the order one synchronous step
(`rollout.max_staleness: 0`) runs them; the actors split it across processes and the bus:

- generate: the generator actor (actors.generator, torch backend actors.generator.torch_backend) runs the
  GenerationEngine over the groups the prompt sampler deals it (actors.sampler: which prompts, how many
  samples, under the staleness bound) and ships each group's tensors (`rollout_batch`, `rollout_stats`);
- score: the verifier actor (actors.verifier) runs the same \\boxed{} check in a process pool, each
  answer under a deadline, or users' reward functions (`reward.fns`, not run here);
- pack: the packer actor (actors.packer) gathers the step's scored groups and calls `pack_step`;
- train: the learner actor (actors.learner) calls `train_ppo_batch` in `Learner.train_batch`, then
  records, checkpoints and publishes the step's metrics;
- update: the learner hands `snapshot(model)` to the weight broadcaster (actors.weights), which sends it to
  every generator (its way: a tensor channel, torch.distributed into SGLang, or disk); a torch generator
  loads it with `GenerationEngine.update_weights`: version = steps trained
  (actors.protocol).

Used by bench/rl_step.py (the in-process side of its comparison) and tests/test_rl_step.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from actors.weights.broadcaster import snapshot
from policies.data.dataset import Problem
from actors.generator.generator import rollout_batch, rollout_stats
from actors.learner.learner import train_ppo_batch
from actors.packer import ScoredGroup, pack_step
from policies.train.ppo import PPOConfig
from policies.verify.reward import RewardConfig, reward
from policies.infer.sampling import GenerationEngine, Sample, SamplingParams
from policies.train.schedule import scheduled_lr
from policies.verify.verifier import is_correct
from tensors.packed import PackedBatch


@dataclass
class StepResult:
    metrics: dict  # the learner's record of the step: the packer's stats, the loss etc., qids, times
    batch: PackedBatch | None  # what the learner trained on (None: no group kept)
    samples: list[Sample]  # every response, in prompt order, G per prompt


def rl_step(step: int, problems: list[Problem], prompt_ids: list[list[int]], *, engine: GenerationEngine,
            tokenizer, sampling: SamplingParams, group_size: int, model: torch.nn.Module, optimizer,
            ppo: PPOConfig, total_steps: int, recompute: bool = False, ref_model=None,
            reward_cfg: RewardConfig = RewardConfig(), drop_uniform_groups: bool = False) -> StepResult:
    """Step ``step`` (0-based) of ``total_steps`` on these problems: ``engine`` generates on the generator's
    weights, ``model`` and ``optimizer`` are the learner's (the same module is allowed)."""
    if len(problems) != len(prompt_ids) or not problems:
        raise ValueError(f"rl_step: {len(problems)} problems and {len(prompt_ids)} prompt_ids: need as many, >= 1")
    if reward_cfg.fns:
        raise ValueError("rl_step: reward_cfg.fns is set; users' reward functions run in the verifier actor only")
    if engine.has_work():
        raise ValueError("rl_step: the engine still has groups of another caller queued or running")
    t0 = time.perf_counter()
    # 1. generate (generator): G samples per prompt, all groups in one continuous batch
    for p, ids in zip(problems, prompt_ids):
        engine.add(f"{step}:{p.id}", ids, group_size, sampling)
    groups: dict[str, list] = {p.id: [None] * group_size for p in problems}
    while engine.has_work():
        for s in engine.step():
            groups[s.rid.split(":", 1)[1]][s.index] = s
    t1 = time.perf_counter()
    # 2. score (verifier): the boxed answer against the references -> sequence reward
    scored = []
    for p, ids in zip(problems, prompt_ids):
        samples = groups[p.id]
        correct = [is_correct(tokenizer.decode(s.output_ids, skip_special_tokens=True), p.answers) for s in samples]
        rewards = [reward(c, reward_cfg, len(s.output_ids)) for c, s in zip(correct, samples)]
        scored.append(ScoredGroup(p.id, rollout_batch(ids, samples), rewards, correct,
                                  rollout_stats(samples, engine.version)))
    t2 = time.perf_counter()
    # 3. pack (packer): one PackedBatch, no padding, rewards, group ids and qids; groups without signal dropped if
    # asked (the actors' rollout.dynamic_sampling also deals other prompts in their place: not done here)
    packed, stats = pack_step(step, scored, drop_uniform=drop_uniform_groups)
    t3 = time.perf_counter()
    # 4. train (learner): PPO minibatches on the packed batch at the scheduled learning rate
    train = {}
    if packed is not None:
        train = train_ppo_batch(model, optimizer, packed, ppo, lr=scheduled_lr(ppo, step, total_steps),
                                recompute=recompute, ref_model=ref_model)
    t4 = time.perf_counter()
    # 5. update (broadcaster -> generator): the learner's full state dict (LoRA: the adapter, which the engine
    # merges into its base); version = steps trained
    engine.update_weights(snapshot(model), step + 1)
    t5 = time.perf_counter()
    metrics = {"step": step, "version": step + 1, **stats,
               **{k: float(v) for k, v in train.items() if isinstance(v, (int, float))},
               "train_tokens": packed.num_tokens if packed is not None else 0,
               "qids": list(packed.meta["qids"]) if packed is not None else [],
               "time_generate_s": t1 - t0, "time_score_s": t2 - t1, "time_pack_s": t3 - t2,
               "time_train_s": t4 - t3, "time_sync_s": t5 - t4}
    return StepResult(metrics, packed, [s for p in problems for s in groups[p.id]])
