"""The recipes' math (policies.train: aggregation, losses, advantages, mismatch; policies.verify.reward's
overlong punishment) against hand-computed numbers on tiny batches, and the presets' config rules.

Each expected value is written from the paper's formula (source named in each module's docstring), not
from our code; a sign error or a wrong aggregation changes it."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from launcher.config.schema import describe_recipe
from launcher.config.yaml_io import config_to_yaml, load_config, parse_yaml
from launcher.config.schema import ExperimentConfig
from policies.settings import ConfigError, from_dict
from policies.train.advantages import group_advantages
from policies.train.aggregation import token_weights
from policies.train.losses import cispo_loss, gspo_loss, ppo_loss
from policies.train.mismatch import mismatch_weights
from policies.train.ppo import PPOConfig, train_step
from policies.train.recipes import RECIPES
from policies.verify.reward import OverlongConfig, RewardConfig, reward


def cu(*lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# seq A: 1 prompt + 1 response token; seq B: 1 prompt + 3 response tokens
MASK = torch.tensor([0, 1, 0, 1, 1, 1], dtype=torch.bool)
CU = cu(2, 4)
LOSSES = torch.tensor([9.0, 4.0, 9.0, 1.0, 2.0, 3.0])  # per token; prompt values must not count


@pytest.mark.parametrize("mode,norm_len,want", [
    ("token_mean", None, (4 + 1 + 2 + 3) / 4),
    ("seq_mean_token_sum", None, (4 + 6) / 2),
    ("seq_mean_token_mean", None, (4 / 1 + 6 / 3) / 2),
    ("seq_mean_token_sum_norm", 5, (4 + 6) / (2 * 5)),   # Dr.GRPO: a constant, not the lengths
    ("seq_mean_token_sum_norm", None, (4 + 6) / (2 * 3)),
])
def test_loss_aggregation_hand_values(mode, norm_len, want):
    w = token_weights(MASK, CU, mode, norm_len)
    assert float((w * LOSSES).sum()) == pytest.approx(want)
    assert (w[~MASK] == 0).all()


def test_clip_higher_lets_a_positive_token_rise_past_the_low_clip():
    ratio = torch.tensor([1.25, 1.25, 0.7])
    adv = torch.tensor([1.0, -1.0, -1.0])
    mask = torch.ones(3, dtype=torch.bool)
    prox = torch.zeros(3)
    logp = ratio.log().requires_grad_()
    loss, st = ppo_loss(logp, prox, None, adv, mask, eps_clip=0.2, eps_clip_high=0.28)
    # token 0: 1.25 < 1.28 unclipped -> -1.25; token 1: A<0, ratio up: 1.25; token 2: A<0, 0.7 clipped to 0.8
    assert float(loss.detach()) == pytest.approx((-1.25 + 1.25 + 0.8) / 3)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1.25 / 3, 1.25 / 3, 0.0])
    assert float(st["clipped"]) == 1
    sym, st = ppo_loss(ratio.log(), prox, None, adv, mask, eps_clip=0.2)  # symmetric: token 0 clipped at 1.2
    assert float(sym) == pytest.approx((-1.2 + 1.25 + 0.8) / 3) and float(st["clipped"]) == 2


def test_gspo_clips_the_sequence_ratio_and_weighs_sequences_equally():
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    c = cu(3, 4)
    log_r = torch.tensor([0.0, 0.3, 0.1, 0.0, 0.0, 0.3, 0.3])  # seq A mean 0.2, seq B mean 0.2
    adv = torch.tensor([0.0, 1, 1, 0, -1, -1, -1])
    logp = log_r.clone().requires_grad_()  # proximal logprobs 0
    w = token_weights(mask, c, "seq_mean_token_mean")
    loss, st = gspo_loss(logp, torch.zeros(7), adv, mask, c, eps_clip_low=0.1, eps_clip_high=0.1, token_weights=w)
    s = math.exp(0.2)  # both sequences' ratio: 1.2214 > 1 + 0.1
    # A (A > 0): clipped at 1.1, no gradient; B (A < 0): unclipped s, each token's gradient s * w_t
    assert float(loss.detach()) == pytest.approx((-1.1 + s) / 2, rel=1e-6)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([0, 0, 0, 0, s / 6, s / 6, s / 6], rel=1e-5)
    assert float(st["clipped"]) == 2 and float(st["ratio"]) == pytest.approx(5 * s, rel=1e-6)
    # a token-level ratio would differ: token 2 (log ratio 0.1) alone is inside the clip
    tok, _ = ppo_loss(log_r, torch.zeros(7), None, adv, mask, eps_clip=0.1, token_weights=w)
    assert float(tok) != pytest.approx(float(loss), rel=1e-3)


def test_cispo_clips_the_weight_never_the_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.0], requires_grad=True)
    prox = torch.tensor([-1.2, -1.0, -0.5, -1.5])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    mask = torch.ones(4, dtype=torch.bool)
    loss, st = cispo_loss(logp, prox, adv, mask, eps_clip_low=1.0, eps_clip_high=0.28)
    r_hat = [math.exp(0.2), math.exp(-1.0), 1.0, 1.28]  # the last, e^0.5, clipped at 1 + 0.28
    want = sum(-rh * a * lp for rh, a, lp in zip(r_hat, [1, 1, -1, 1], [-1.0, -2.0, -0.5, -1.0])) / 4
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)
    loss.backward()
    # sg(r_hat) * A * grad log pi: the clipped token still learns (PPO would give it 0)
    assert logp.grad.tolist() == pytest.approx([-rh * a / 4 for rh, a in zip(r_hat, [1, 1, -1, 1])], rel=1e-5)
    assert float(st["clipped"]) == 1


def test_group_advantage_estimators_hand_values():
    # group 0: three sequences with returns 1, 2, 3 (the first has two response tokens); group 1: 4, 4
    mask = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.bool)
    c = cu(3, 2, 2, 2, 2)
    raw = torch.tensor([0, 1, 1, 0, 2, 0, 3, 0, 4, 0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    resp = lambda t: [round(v, 4) for v in t[mask].tolist()]  # noqa: E731
    std0 = math.sqrt(2 / 3)  # biased, over the group's three returns (not its four tokens)
    assert resp(group_advantages(raw, mask, c, groups, "grpo")) == \
        pytest.approx([-1 / std0, -1 / std0, 0, 1 / std0, 0, 0], abs=1e-3)
    assert resp(group_advantages(raw, mask, c, groups, "dr_grpo")) == [-1, -1, 0, 1, 0, 0]
    # RLOO: each return minus the mean of the group's others: 1 - 2.5, 2 - 2, 3 - 1.5
    assert resp(group_advantages(raw, mask, c, groups, "rloo")) == [-1.5, -1.5, 0, 1.5, 0, 0]
    # REINFORCE++-baseline: the dr_grpo values, then mean/std over the batch's six response tokens
    centred = torch.tensor([-1.0, -1, 0, 1, 0, 0])
    want = ((centred - centred.mean()) / centred.std(unbiased=False)).tolist()
    assert resp(group_advantages(raw, mask, c, groups, "reinforce_pp")) == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(raw, mask, c, None, "rloo")


LOG_RHO = torch.tensor([0.0, 0.5, 1.0, 0.0, -1.0, 0.1])  # seq A: rho e^.5, e^1; seq B: e^-1, e^.1
MMASK = torch.tensor([0, 1, 1, 0, 1, 1], dtype=torch.bool)
MCU = cu(3, 3)
E = math.exp


@pytest.mark.parametrize("mode,level,low,want_w,want_keep", [
    ("none", "token", None, [E(.5), 0, E(-1), E(.1)], [1, 1, 1, 1]),  # boba: cap 2, masked tokens stay
    ("tis", "token", None, [E(.5), 2, E(-1), E(.1)], [1, 1, 1, 1]),
    ("tis", "sequence", None, [2, 2, E(-.9), E(-.9)], [1, 1, 1, 1]),
    ("mis", "token", 0.5, [E(.5), 0, 0, E(.1)], [1, 0, 0, 1]),  # outside [0.5, 2]: out of the normaliser too
    ("mis", "sequence", 0.3, [0, 0, E(-.9), E(-.9)], [0, 0, 1, 1]),
    ("icepop", "token", None, [E(.5), 0, 0, E(.1)], [1, 1, 1, 1]),  # default band [1/2, 2]; stays in normaliser
])
def test_mismatch_corrections_hand_values(mode, level, low, want_w, want_keep):
    w, keep = mismatch_weights(LOG_RHO, torch.zeros(6), MMASK, MCU, mode=mode, level=level, threshold=2.0,
                               threshold_low=low, cap=2.0)
    assert w[MMASK].tolist() == pytest.approx(want_w, rel=1e-5)
    assert keep[MMASK].tolist() == [bool(k) for k in want_keep] and not keep[~MMASK].any()


def test_overlong_punishment_hand_values():
    cfg = RewardConfig(overlong=OverlongConfig(buffer=4, penalty=2.0, max_len=10))
    assert [reward(True, cfg, n) for n in (6, 7, 8, 10, 12)] == [5.0, 4.5, 4.0, 3.0, 3.0]
    scaled = RewardConfig(overlong=OverlongConfig(buffer=4, max_len=10))  # penalty: (5 - -5) / 2
    assert reward(False, scaled, 9) == pytest.approx(-5 - 5 * 3 / 4)
    assert reward(True, RewardConfig(), 10_000) == 5.0  # off by default


def test_presets_fill_only_what_the_user_left_unset_and_are_printed():
    assert PPOConfig().effective() == {"recipe": "boba", "loss": "ppo", "eps_clip_low": 0.2, "eps_clip_high": 0.2,
                                       "loss_agg": "token_mean", "advantage": "boba", "mismatch": "none",
                                       "mismatch_level": "token", "mismatch_threshold": 2.0}
    assert PPOConfig(eps_clip=0.1).eps_clip_high == 0.1
    dapo = PPOConfig(recipe="dapo", eps_clip_high=0.3)
    assert (dapo.eps_clip_low, dapo.eps_clip_high, dapo.advantage, dapo.mismatch) == (0.2, 0.3, "grpo", "tis")
    assert {r: PPOConfig(recipe=r).loss for r in RECIPES} == {"boba": "ppo", "grpo": "ppo", "dr_grpo": "ppo",
                                                              "dapo": "ppo", "gspo": "gspo", "cispo": "cispo"}
    cfg = load_config(None, ["ppo.recipe=dapo", "rollout.max_new_tokens=100"])
    assert cfg.rollout.dynamic_sampling is True and cfg.reward.overlong == OverlongConfig(20, None, 100)
    line = describe_recipe(cfg)
    assert line.startswith("dapo (") and "eps_clip_high=0.28" in line and "dynamic_sampling=true" in line
    assert from_dict(ExperimentConfig, parse_yaml(config_to_yaml(cfg))) == cfg  # the saved config reloads as is
    mine = load_config(None, ["ppo.recipe=dr_grpo", "rollout.dynamic_sampling=true", "ppo.loss_agg_norm=7"])
    assert mine.rollout.dynamic_sampling and mine.ppo.loss_agg_norm == 7 and mine.reward.overlong is None
    assert load_config(None, ["ppo.recipe=dr_grpo"]).ppo.loss_agg_norm == 256  # the generation budget
    boba = load_config(None, [])
    assert boba.rollout.dynamic_sampling is False and boba.reward.overlong is None
    with pytest.raises(ConfigError, match="ppo.recipe"):
        load_config(None, ["ppo.recipe=ppo2"])
    with pytest.raises(ConfigError, match="reward.overlong.buffer"):
        load_config(None, ["rollout.max_new_tokens=8", "reward.overlong={buffer: 9}"])


def test_train_step_aggregates_over_the_minibatch_whatever_the_micro_batches():
    """Sequence-level aggregation and a sequence ratio still add up across micro-batches; MIS drops tokens
    from the count."""
    from policies.model.loading import tiny_model
    from tests.test_policies_ppo import make_batch
    base = tiny_model(seed=4)
    batch = make_batch(base, n_seqs=6, seed=1)
    deltas = []
    for max_tokens in (100_000, 16):
        cfg = PPOConfig(recipe="gspo", minibatches=1, max_grad_norm=1e6, max_tokens_per_micro_batch=max_tokens,
                        eps_clip_low=0.5, eps_clip_high=0.5)
        model = copy.deepcopy(base)
        stats = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, cfg)
        deltas.append(model.model.layers[1].mlp.down_proj.weight - base.model.layers[1].mlp.down_proj.weight)
    assert stats["n_micro_batches"] > 4 and deltas[0].abs().max() > 1e-5
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-4, atol=1e-7)
    prox = batch.logprobs.clone()
    far = batch.loss_mask.clone()
    far[::2] = False
    batch = batch.with_fields(tokens={"logprobs": torch.where(far, prox - 2.0, prox)})  # rho = e^2 there
    model = copy.deepcopy(base)
    cfg = PPOConfig(mismatch="mis", minibatches=2)
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, cfg, proximal_logprobs=prox)
    n = int(batch.loss_mask.sum())
    assert stats["mismatch_dropped_frac"] == pytest.approx(int(far.sum()) / n)
    assert stats["n_loss_tokens"] == n - int(far.sum()) and stats["behav_imp_weight"] == pytest.approx(1.0)
