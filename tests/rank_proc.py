"""One learner rank training the equality test's PPO batch over a real gloo group.

`MASTER_ADDR=.. MASTER_PORT=.. RANK=r WORLD_SIZE=n BOBA_LEARNER_SECRET=.. python tests/rank_proc.py OUT N_SEQS
MINIBATCHES link|group [SLOW_S]`: rank 0 sends the step's command and batch (over the command link, or the
group as on GPU) as the learner does and writes its metrics, weights and gathered optimizer state after the
step to OUT; rank 1 serves as a launched rank does (SLOW_S: a busy one, asking for each command that late).
`setup()` is the batch and model the one-rank run uses too.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.learner.learner import train_ppo_batch  # noqa: E402
from policies.model.loading import tiny_model  # noqa: E402
from policies.train.ppo import PPOConfig, make_optimizer, recompute_logprobs  # noqa: E402
from tests.batches import synthetic_batch, with_behaviour_logprobs  # noqa: E402

# micro-batches of <= 24 tokens: 10 sequences in 2 minibatches give 2 ranks 2 micro-batches each; one
# sequence gives rank 1 only empty ones (it joins every gather and gradient sum with nothing)
CFG = PPOConfig(minibatches=2, lr=1e-3, max_tokens_per_micro_batch=24, max_grad_norm=0.5)


def config(n_seqs: int, minibatches: int) -> PPOConfig:
    """One sequence's advantage normalised over the batch is 0: unnormalised, it moves the weights."""
    return dataclasses.replace(CFG, minibatches=minibatches, normalize_advantages="batch" if n_seqs > 1 else "none")


def setup(n_seqs: int = 10, minibatches: int = 2):
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    batch = synthetic_batch(n_seqs, 1, response_len=lambda i: 4 + (5 * i) % 9, reward=lambda i: float((i * 7) % 5) - 2.0)
    lp = recompute_logprobs(model, batch, config(n_seqs, minibatches)) - 0.05  # slightly off-policy: ratios and clipping at work
    batch = with_behaviour_logprobs(batch, lp)
    return model, make_optimizer(model, CFG), batch


def train(n_seqs: int = 10, minibatches: int = 2):
    """One rank alone: the reference."""
    model, opt, batch = setup(n_seqs, minibatches)
    return model, opt, train_ppo_batch(model, opt, batch, config(n_seqs, minibatches), recompute=True, ref_model=None, lr=CFG.lr)


if __name__ == "__main__":
    import copy
    from actors.learner.ranks import join, serve
    from policies.train.data_parallel import World, whole_optimizer_state
    n_seqs, minibatches, batch_over = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    slow_s = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    ranks = join("cpu", timeout=60.0, batch_over=batch_over)
    model, _, batch = setup(n_seqs, minibatches)
    whole = copy.deepcopy(model)
    world = World.fsdp(model)
    opt = make_optimizer(model, CFG)  # over the shards
    cfg = config(n_seqs, minibatches)
    if ranks.rank > 0:  # as a launched rank does: whatever rank 0 says, with the batch it sends
        if slow_s:
            pull = ranks.next_command
            ranks.next_command = lambda: (time.sleep(slow_s), pull())[1]
        serve(ranks, world, optimizer=opt, ppo=cfg, recompute=True)
        sys.exit(0)
    # rank 0, as RankedLearner does: the step's command and batch, its share, the weights, the optimizer state
    ranks.post({"op": "train", "step": 0, "lr": CFG.lr}, batch)
    stats = train_ppo_batch(model, opt, batch, cfg, recompute=True, ref_model=None, lr=CFG.lr, world=world)
    world.gather_weights(whole)
    ranks.post({"op": "optimizer"})
    whole_opt = make_optimizer(whole, CFG)
    gathered = whole_optimizer_state(whole, whole_opt, world.full_optimizer_state(opt))  # what a checkpoint writes
    ranks.stop()
    # what this rank holds of AdamW's state: its shards only
    held = sum(t.to_local().numel() for st in opt.state.values() for k, t in st.items() if k == "exp_avg")
    torch.save({"stats": stats, "weights": whole.state_dict(), "optimizer": gathered, "held": held}, sys.argv[1])
