"""Training knobs: the learning-rate schedule, per-group advantage normalisation, kl_coef refused."""
from __future__ import annotations

import math

import pytest
import torch

from launcher.config import ConfigError, load_config
from policies.train.advantages import advantages_for, normalize_advantages
from policies.train.ppo import PPOConfig, train_step
from policies.train.schedule import lr_at, scheduled_lr


def test_warmup_then_constant_linear_and_cosine():
    lrs = [lr_at(s, lr=1.0, total_steps=10, warmup_steps=4) for s in range(10)]
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    lin = [lr_at(s, lr=1.0, total_steps=6, schedule="linear", warmup_steps=2) for s in range(6)]
    assert lin == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = [lr_at(s, lr=2.0, total_steps=4, schedule="cosine", min_lr_ratio=0.1) for s in range(4)]
    assert cos[0] == pytest.approx(2.0)
    assert cos[2] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] > 0.2
    assert lr_at(99, lr=1.0, total_steps=10, schedule="linear", min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule='step'"):
        lr_at(0, lr=1.0, total_steps=3, schedule="step")


def test_schedule_keys_are_checked_and_reach_the_optimizer():
    cfg = load_config(overrides=["ppo.lr_schedule=cosine", "ppo.warmup_steps=2", "ppo.lr=1e-3"]).ppo
    assert scheduled_lr(cfg, 0, 10) == pytest.approx(5e-4)
    for o, msg in [("ppo.lr_schedule=step", r"ppo\.lr_schedule: expected one of 'constant', 'linear', 'cosine'"),
                   ("ppo.warmup_steps=-1", r"ppo\.warmup_steps: expected an integer >= 0"),
                   ("ppo.min_lr_ratio=2", r"ppo\.min_lr_ratio: expected a number in \[0, 1\]"),
                   ("ppo.normalize_advantages=token", r"ppo\.normalize_advantages: expected")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(overrides=[o])


def test_kl_coef_is_a_valid_key_and_negative_is_refused():
    assert load_config(overrides=["ppo.kl_coef=0.1"]).ppo.kl_coef == 0.1
    with pytest.raises(ConfigError, match=r"ppo\.kl_coef: expected a number >= 0"):
        load_config(overrides=["ppo.kl_coef=-0.1"])


def _two_groups():
    # 4 sequences of [prompt, prompt, r, r(, r)], groups {0, 1} and {2, 3}
    cu = torch.tensor([0, 4, 9, 13, 17], dtype=torch.int32)
    mask = torch.zeros(17, dtype=torch.bool)
    for a, b in [(2, 4), (6, 9), (11, 13), (15, 17)]:
        mask[a:b] = True
    return torch.tensor([1.0, 3.0, 10.0, 10.0]), mask, cu, torch.tensor([7, 7, 9, 9])


def test_group_normalisation_is_per_prompt_and_sequence_weighted():
    rewards, mask, cu, groups = _two_groups()
    adv = advantages_for(rewards, mask, cu, normalize="group", group_ids=groups)
    # group 7: returns 1 and 3 (mean 2, std 1) -> -1 and +1 on every response token, whatever its length
    assert adv[2:4].tolist() == pytest.approx([-1.0, -1.0], abs=1e-4)
    assert adv[6:9].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    assert adv[11:].abs().max() < 1e-6          # a uniform group carries no signal
    assert adv[~mask].abs().max() == 0
    batch = advantages_for(rewards, mask, cu, normalize="batch")
    assert not torch.allclose(batch, adv)       # batch mode sees the 10s: the 1 and 3 both go negative
    assert batch[2] < 0 and batch[6] < 0
    assert torch.equal(advantages_for(rewards, mask, cu, normalize="none"), advantages_for(rewards, mask, cu,
                                                                                          normalize=False))
    with pytest.raises(ValueError, match="needs the batch's group_ids"):
        advantages_for(rewards, mask, cu, normalize="group")


def test_raw_advantages_normalised_afterwards_are_the_normalised_ones():
    """What train_step reports (raw) and trains on (normalised) come from one computation."""
    rewards, mask, cu, groups = _two_groups()
    raw = advantages_for(rewards, mask, cu, normalize="none")
    for mode in ("batch", "group", "none", True, False):
        once = normalize_advantages(raw, mask, cu, mode, groups)
        assert torch.equal(once, advantages_for(rewards, mask, cu, normalize=mode, group_ids=groups)), mode
    with pytest.raises(ValueError, match="needs the batch's group_ids"):
        normalize_advantages(raw, mask, cu, "group")
    with pytest.raises(ValueError, match="normalize='sometimes'"):
        normalize_advantages(raw, mask, cu, "sometimes")


def _tiny(seed=0):
    from policies.model.loading import tiny_model
    return tiny_model(seed=seed, num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1)


def test_train_step_uses_the_given_lr_and_group_ids():
    from tensors.packed import PackedBatch
    torch.manual_seed(0)
    model = _tiny()
    seqs = []
    for i, r in enumerate([1.0, -1.0, 1.0, 1.0]):
        ids = torch.randint(5, 100, (6,))
        mask = torch.tensor([False, False, True, True, True, True])
        seqs.append(dict(input_ids=ids, loss_mask=mask, logprobs=torch.full((6,), -4.0) * mask,
                         versions=torch.where(mask, 0, -1).int(), rewards=torch.tensor(r),
                         group_ids=torch.tensor(i // 2)))
    batch = PackedBatch.from_sequences(seqs)
    cfg = PPOConfig(minibatches=1, normalize_advantages="group")
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    stats = train_step(model, opt, batch, cfg, lr=1e-4)
    assert stats["lr"] == pytest.approx(1e-4) and opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert stats["grad_norm"] > 0       # group 0 (+1 / -1) carries a gradient; group 1 (uniform) none


def test_kl_penalty_against_a_frozen_reference_model():
    """The learner's path for kl_coef > 0: the reference's logprobs (micro-batched) enter the advantages."""
    from policies.train.ppo import recompute_logprobs
    from tensors.packed import PackedBatch
    torch.manual_seed(0)
    seqs = []
    for r in [1.0, -1.0]:
        ids = torch.randint(5, 100, (8,))
        mask = torch.tensor([False] * 3 + [True] * 5)
        seqs.append(dict(input_ids=ids, loss_mask=mask, logprobs=torch.zeros(8), rewards=torch.tensor(r),
                         versions=torch.where(mask, 0, -1).int(), group_ids=torch.tensor(0)))
    batch = PackedBatch.from_sequences(seqs)
    cfg = PPOConfig(minibatches=1, kl_coef=0.5, max_tokens_per_micro_batch=8, normalize_advantages=False)
    ref_model, policy = _tiny(seed=1).requires_grad_(False), _tiny(seed=0)
    ref = recompute_logprobs(ref_model, batch, cfg, loss_tokens_only=True)
    own = recompute_logprobs(policy, batch, cfg, loss_tokens_only=True)
    batch = batch.with_fields(tokens={"logprobs": own})
    assert ref[batch.loss_mask].abs().min() > 0 and not torch.allclose(ref, own)
    stats = train_step(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), batch, cfg, ref_logprobs=ref)
    kl = (own - ref)[batch.loss_mask]
    assert stats["ref_kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    # advantages carry -kl_coef * KL on every response token: the mean moves by it from the plain reward's
    assert stats["advantage_mean"] != pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="kl_coef"):
        train_step(policy, torch.optim.AdamW(policy.parameters()), batch, cfg)     # no reference given
