"""PPO / SFT math against hand-computed values, and training steps on the tiny model."""
import copy
import math

import pytest
import torch

from policies.train import ppo
from policies.train.advantages import advantages_for, gae_advantages, kl_estimate, normalize_masked, token_rewards
from policies.train.losses import ppo_loss, sft_loss
from policies.model.loading import tiny_model
from policies.train.ppo import (PPOConfig, SFTConfig, make_optimizer, recompute_logprobs, sft_step,
                          train_step)
from tests.batches import synthetic_batch, with_behaviour_logprobs




def cu(*lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field,value", [("minibatches", 0), ("eps_clip", 1.5), ("dual_clip", 0.5),
                                         ("kl_estimator", "k2"), ("lr", 0.0), ("behaviour_imp_cap", 0.5),
                                         ("max_tokens_per_micro_batch", 0), ("temperature", 0.0), ("gamma", 1.5)])
def test_ppo_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


def test_config_defaults_are_the_release_recipe():
    cfg = PPOConfig()
    assert (cfg.minibatches, cfg.lr, cfg.adam_eps, cfg.eps_clip, cfg.gamma, cfg.lam, cfg.kl_coef) == \
        (4, 2e-5, 1e-5, 0.2, 1.0, 1.0, 0.0)
    assert PPOConfig(adam_betas=[0.9, 0.95]).adam_betas == (0.9, 0.95)
    with pytest.raises(ValueError, match="epochs"):
        SFTConfig(epochs=0)


# ----------------------------------------------------------------------------- advantages

def test_gae_gamma_lambda_one_gives_sequence_reward_on_every_response_token():
    # seq 0: 2 prompt + 3 response; seq 1: 1 prompt + 2 response; seq 2: prompt, response, prompt, response
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    c = cu(5, 3, 4)
    r = token_rewards(torch.tensor([5.0, -5.0, 2.0]), mask, c)
    assert r.tolist() == [0, 0, 0, 0, 5, 0, 0, -5, 0, 0, 0, 2]
    adv = gae_advantages(r, mask, c)
    assert adv.tolist() == [0, 0, 5, 5, 5, 0, -5, -5, 0, 2, 0, 2]


def test_gae_with_kl_and_discount_matches_hand_values():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    c = cu(5, 3)
    logp = torch.tensor([0, 0, 0.5, -1.0, 2.0, 0, -0.3, -0.7])
    ref = torch.tensor([9, 9, 0.0, 0.0, 0.0, 9, -0.3, -0.7])  # prompt values must not matter
    adv = advantages_for(torch.tensor([1.0, -5.0]), mask, c, gamma=0.5, lam=0.8, normalize=False,
                         logprobs=logp, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k1")
    # rewards: -0.1*kl = [-0.05, 0.1, -0.2 + 1] and [0, 0 - 5]; discount gamma*lam = 0.4
    want = [0, 0, -0.05 + 0.4 * (0.1 + 0.4 * 0.8), 0.1 + 0.4 * 0.8, 0.8, 0, 0.4 * -5, -5]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="kl_coef"):
        advantages_for(torch.tensor([1.0, -5.0]), mask, c, kl_coef=0.1)


def test_kl_estimators_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2), -math.log(2)]))
    # k3 = (r - 1) - log r with r = p_ref / p
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([-0.5 + math.log(2), 1.0 - math.log(2)]))
    assert kl_estimate(logp, logp, "k3").abs().max() == 0


def test_advantage_normalisation_is_over_all_response_tokens_of_the_batch():
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    c = cu(4, 3)
    adv = advantages_for(torch.tensor([1.0, -5.0]), mask, c, normalize=True)
    # response advantages [1, 1, 1, -5, -5]: mean -1.4, biased std sqrt(8.64)
    std = math.sqrt(8.64) + 1e-5
    want = [0, 2.4 / std, 2.4 / std, 2.4 / std, 0, -3.6 / std, -3.6 / std]
    torch.testing.assert_close(adv, torch.tensor(want), rtol=0, atol=1e-6)
    normed = normalize_masked(torch.tensor([3.0, 100.0, 5.0]), torch.tensor([True, False, True]))
    torch.testing.assert_close(normed, torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-5), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- losses

def test_token_level_normalisation_differs_from_mean_of_means():
    # seq A: one response token with logprob -1; seq B: three with -3 each
    logprobs = torch.tensor([0.0, -1.0, 0.0, -3.0, -3.0, -3.0])
    mask = torch.tensor([0, 1, 0, 1, 1, 1], dtype=torch.bool)
    token_level = sft_loss(logprobs, mask)
    assert token_level.item() == pytest.approx((1 + 9) / 4)
    mean_of_means = (1.0 + 3.0) / 2
    assert token_level.item() != pytest.approx(mean_of_means)
    # normalised by a larger (minibatch) token count, micro-batch losses add up
    assert (sft_loss(logprobs[:2], mask[:2], normalizer=4) + sft_loss(logprobs[2:], mask[2:], normalizer=4)).item() \
        == pytest.approx(2.5)


def test_sft_loss_hand_value():
    lp = torch.tensor([0.0, -1.0, -2.0, 0.0, -0.5])
    mask = torch.tensor([False, True, True, False, True])
    assert sft_loss(lp, mask).item() == pytest.approx(3.5 / 3)


def test_clipped_surrogate_hand_values():
    ratio = torch.tensor([1.5, 0.5, 0.9, 1.1, 100.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 7.0])
    mask = torch.tensor([True, True, True, True, False])  # the last token must not count
    prox = torch.full((5,), -2.0)
    logp = (prox + ratio.log()).requires_grad_()
    loss, st = ppo_loss(logp, prox, prox, adv, mask, eps_clip=0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), 0.8 (clipped), -0.9, 1.1
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.9 + 1.1) / 4)
    assert st["clipped"].item() == 2 and st["n_tokens"].item() == 4 and st["dual_clipped"].item() == 0
    loss.backward()
    # clipped tokens carry no gradient; others d/dlogp (-A r) / N
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.9 / 4, 1.1 / 4, 0.0]))
    half, _ = ppo_loss(logp.detach(), prox, prox, adv, mask, normalizer=8)
    assert half.item() == pytest.approx(loss.item() / 2)


def test_dual_clip_hand_values():
    ratio = torch.tensor([5.0, 5.0, 0.5])
    adv = torch.tensor([-1.0, 1.0, -1.0])
    prox = torch.zeros(3)
    mask = torch.ones(3, dtype=torch.bool)
    plain, _ = ppo_loss(ratio.log(), prox, prox, adv, mask, eps_clip=0.2)
    dual, st = ppo_loss(ratio.log(), prox, prox, adv, mask, eps_clip=0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx((5.0 - 1.2 + 0.8) / 3)
    assert dual.item() == pytest.approx((3.0 - 1.2 + 0.8) / 3)  # the A<0 token is bounded by -c A = 3
    assert st["dual_clipped"].item() == 1


def test_decoupled_objective_hand_values():
    behav = torch.tensor([-1.0, -1.0, -1.0])
    prox = behav + torch.tensor([2.0, 2.0, 10.0]).log()  # pi_prox / pi_behav = 2, 2, 10
    logp = (prox + torch.tensor([1.0, 1.5, 1.0]).log()).requires_grad_()  # pi / pi_prox
    adv = torch.ones(3)
    mask = torch.ones(3, dtype=torch.bool)
    loss, st = ppo_loss(logp, prox, behav, adv, mask, eps_clip=0.2, behaviour_imp_cap=5.0)
    # token 1: -1 * 1 * 2; token 2: clipped -1.2 * 2; token 3: weight 10 > cap -> dropped
    assert loss.item() == pytest.approx((-2.0 - 2.4 + 0.0) / 3)
    assert st["behav_masked"].item() == 1 and st["behav_imp_weight"].item() == pytest.approx(4.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-2.0 / 3, 0.0, 0.0]))
    uncapped, _ = ppo_loss(logp.detach(), prox, behav, adv, mask, eps_clip=0.2, behaviour_imp_cap=None)
    assert uncapped.item() == pytest.approx((-2.0 - 2.4 - 10.0) / 3)
    # no staleness (prox == behav): exactly standard PPO
    standard, _ = ppo_loss(logp.detach(), prox, prox, adv, mask, eps_clip=0.2)
    assert standard.item() == pytest.approx((-1.0 - 1.2 - 1.0) / 3)


# ----------------------------------------------------------------------------- training steps

def make_batch(model, n_seqs=8, seed=0):
    batch = synthetic_batch(n_seqs, seed, response_len=lambda i: 4 + (3 * i) % 7,
                            reward=lambda i: 5.0 if i % 3 == 0 else -5.0)
    return with_behaviour_logprobs(batch, recompute_logprobs(model, batch, PPOConfig()))  # on-policy


def test_advantages_on_a_packed_batch():
    batch = make_batch(tiny_model(seed=0))
    adv = advantages_for(batch.rewards, batch.loss_mask, batch.cu_seqlens, normalize=False)
    seq_of_token = torch.repeat_interleave(torch.arange(batch.num_seqs), batch.seqlens.long())
    want = torch.where(batch.loss_mask, batch.rewards[seq_of_token], 0.0)
    assert torch.equal(adv, want)
    normed = advantages_for(batch.rewards, batch.loss_mask, batch.cu_seqlens, normalize=True)
    assert abs(normed[batch.loss_mask].mean().item()) < 1e-5 and (normed[~batch.loss_mask] == 0).all()
    assert normed[batch.loss_mask].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_recompute_logprobs_equals_one_packed_forward():
    from policies.model.logprobs import packed_logprobs

    model = tiny_model(seed=0)
    batch = make_batch(model)
    got = recompute_logprobs(model, batch, PPOConfig(max_tokens_per_micro_batch=20, temperature=0.8))
    with torch.no_grad():
        want, _ = packed_logprobs(model, batch.input_ids, batch.cu_seqlens, temperature=0.8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_train_step_reduces_loss_and_changes_weights():
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    batch = make_batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PPOConfig(lr=1e-3, max_tokens_per_micro_batch=40)
    opt = make_optimizer(model, cfg)
    stats = [train_step(model, opt, batch, cfg) for _ in range(4)]
    losses = [s["loss"] for s in stats]
    assert losses[-1] < losses[0] - 0.05, losses
    first = stats[0]
    assert first["n_minibatches"] == 4 and first["n_micro_batches"] >= 4
    assert first["n_loss_tokens"] == batch.loss_mask.sum().item()
    assert abs(first["importance_ratio"] - 1.0) < 0.05 and first["behav_imp_weight"] == pytest.approx(1.0)
    assert 0 < first["entropy"] < math.log(49152) + 1e-3 and first["grad_norm"] > 0
    assert stats[-1]["clip_frac"] > 0 and stats[-1]["approx_kl"] > first["approx_kl"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_micro_batching_does_not_change_the_update():
    """Gradients accumulate with the minibatch's token count, so the split is invisible."""
    base = tiny_model(seed=4)
    batch = make_batch(base, seed=1)
    cfg_one = PPOConfig(minibatches=1, max_grad_norm=1e6, max_tokens_per_micro_batch=100_000)
    cfg_many = PPOConfig(minibatches=1, max_grad_norm=1e6, max_tokens_per_micro_batch=16)
    deltas, n_micro = [], []
    for cfg in (cfg_one, cfg_many):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = train_step(model, opt, batch, cfg)
        deltas.append(model.model.layers[1].mlp.down_proj.weight - base.model.layers[1].mlp.down_proj.weight)
        n_micro.append(stats["n_micro_batches"])
    assert n_micro[0] == 1 and n_micro[1] == len(ppo.micro_batches(batch.seqlens.tolist(), 16)) > 4
    assert deltas[0].abs().max() > 1e-4
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-4, atol=1e-7)


def test_train_step_decoupled_masks_stale_tokens_above_cap():
    model = tiny_model(seed=0)
    batch = make_batch(model)
    prox = batch.logprobs.clone()
    stale = batch.loss_mask.clone()
    stale[::2] = False  # every other loss token was generated by a much less likely policy
    batch = batch.with_fields(tokens={"logprobs": torch.where(stale, prox - 2.0, prox)})  # pi_prox/pi_behav = e^2
    cfg = PPOConfig(lr=1e-3, minibatches=2)
    stats = train_step(model, make_optimizer(model, cfg), batch, cfg, proximal_logprobs=prox)
    assert stats["behav_masked_frac"] == pytest.approx(stale.sum().item() / batch.loss_mask.sum().item())
    assert stats["behav_imp_weight"] == pytest.approx(1 - stats["behav_masked_frac"], rel=0.05)
    with pytest.raises(ValueError, match="proximal_logprobs"):
        train_step(model, make_optimizer(model, cfg), batch, cfg, proximal_logprobs=prox[:-1])
    with pytest.raises(ValueError, match="kl_coef"):
        train_step(model, make_optimizer(model, cfg), batch, PPOConfig(kl_coef=0.1))


def test_sft_step_reduces_loss():
    model = tiny_model(seed=2)
    batch = make_batch(model)
    cfg = SFTConfig(lr=1e-3, max_tokens_per_micro_batch=30)
    opt = make_optimizer(model, cfg)
    stats = [sft_step(model, opt, batch, cfg) for _ in range(4)]
    assert stats[0]["loss"] == pytest.approx(-batch.logprobs[batch.loss_mask].mean().item(), abs=1e-4)
    assert stats[-1]["loss"] < stats[0]["loss"] - 0.1
    assert stats[0]["n_micro_batches"] > 1
    batch = batch.with_fields(tokens={"loss_mask": torch.zeros_like(batch.loss_mask)})
    with pytest.raises(ValueError, match="no loss tokens"):
        sft_step(model, opt, batch, cfg)


def test_gradient_checkpointing_keeps_fewer_activations_and_makes_the_same_update():
    from policies.model.logprobs import packed_logprobs
    from policies.model.loading import checkpoint_layers
    plain = tiny_model(seed=0)
    ckpt = checkpoint_layers(copy.deepcopy(plain))
    batch = make_batch(plain)
    saved = {}
    for m in (plain, ckpt):  # bytes autograd keeps for backward: checkpointed layers keep only their input
        m.train()
        saved[id(m)] = 0

        def pack(t, key=id(m)):
            saved[key] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            packed_logprobs(m, batch.input_ids, batch.cu_seqlens)
    assert saved[id(ckpt)] < saved[id(plain)]
    cfg = PPOConfig(minibatches=1)
    stats = [train_step(m, make_optimizer(m, cfg), batch, cfg) for m in (plain, ckpt)]
    assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], abs=1e-6)
    assert stats[1]["grad_norm"] == pytest.approx(stats[0]["grad_norm"], rel=1e-5)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
