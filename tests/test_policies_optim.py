"""bf16 training on fp32 master weights, and compiled training: what they promise."""
import copy

import pytest
import torch

from actors.learner import checkpoint
from policies.model.logprobs import _compiled_softmax_stats, _softmax_stats, packed_logprobs
from policies.model.loading import compile_layers, load_model, tiny_model
from policies.train.optim import MasterWeightAdamW, full_precision_state, make_optimizer
from policies.train.ppo import PPOConfig, SFTConfig, sft_step, train_step
from tests.test_policies_ppo import make_batch


def test_bf16_model_trains_on_fp32_masters():
    model = tiny_model(seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch(model)
    cfg = PPOConfig(lr=1e-3, bf16=True)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, MasterWeightAdamW)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(m, start[n]) for (n, _), m in zip(model.named_parameters(), opt.masters))
    stats = train_step(model, opt, batch, cfg)
    assert stats["grad_norm"] > 0 and stats["n_minibatches"] == 4
    for (name, p), m in zip(model.named_parameters(), opt.masters):
        assert m.dtype == torch.float32 and p.grad is None
        assert torch.equal(p, m.to(torch.bfloat16)), name  # the model is its masters, rounded
    assert not torch.equal(opt.masters[0], start["model.embed_tokens.weight"])


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    """lr 1e-6 moves a weight of ~0.02 by less than half a bf16 ulp (~6e-5): bf16 AdamW would lose
    every step; the masters keep them."""
    model = tiny_model(seed=1)
    batch = make_batch(model)
    cfg = PPOConfig(lr=1e-6, minibatches=1, bf16=True)
    opt = make_optimizer(model, cfg)
    q = model.model.layers[0].self_attn.q_proj.weight
    master = opt.masters[[p is q for p in opt.params].index(True)]
    bf16_before, master_before = q.detach().clone(), master.detach().clone()
    train_step(model, opt, batch, cfg)
    moved = (master - master_before).abs()
    assert moved.max() > 5e-7  # each master weight moved by about lr
    assert (q != bf16_before).float().mean() < 0.05  # while almost none of the bf16 weights could


def test_micro_batch_split_does_not_change_the_bf16_update():
    """Gradients of the micro-batches accumulate into the fp32 master gradients. With adam_eps far
    above |g| the AdamW update is ~ -lr * g, so the update compares the summed gradients."""
    base = tiny_model(seed=4)
    batch = make_batch(base, seed=1)
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    deltas, n_micro = [], []
    for max_tokens in (100_000, 16):
        model = copy.deepcopy(base)
        cfg = PPOConfig(minibatches=1, lr=1.0, adam_eps=10.0, max_grad_norm=1e6, bf16=True,
                        max_tokens_per_micro_batch=max_tokens)
        opt = make_optimizer(model, cfg)
        n_micro.append(train_step(model, opt, batch, cfg)["n_micro_batches"])
        deltas.append(torch.cat([m.detach().flatten() for m in opt.masters]) - start)
    assert n_micro[0] == 1 and n_micro[1] > 3
    scale = deltas[0].abs().max()
    assert scale > 1e-4
    torch.testing.assert_close(deltas[1], deltas[0], rtol=0, atol=0.02 * float(scale))


def test_bf16_config_needs_the_master_weight_optimizer():
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="bf16=True.*make_optimizer"):
        train_step(model, torch.optim.AdamW(model.parameters()), make_batch(model), PPOConfig(bf16=True))


@pytest.mark.parametrize("native", [True, False])
def test_auto_bf16_trains_in_bf16_only_where_bf16_is_native(monkeypatch, native):
    from policies.model import precision
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: native)
    model = tiny_model(seed=0)
    cfg = PPOConfig(lr=1e-3, bf16="auto")
    opt = make_optimizer(model, cfg)
    assert getattr(opt, "master_weights", False) is native
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16 if native else torch.float32}
    train_step(model, opt, make_batch(model), cfg)  # the step agrees with the optimiser on the precision


def test_master_state_round_trips_and_names_a_mismatch(tmp_path):
    model = tiny_model(seed=0)
    cfg = PPOConfig(lr=1e-3, bf16=True)
    opt = make_optimizer(model, cfg)
    train_step(model, opt, make_batch(model), cfg)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = tiny_model(seed=5)
    other_opt = make_optimizer(other, cfg)
    other_opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    for a, b in zip(opt.masters, other_opt.masters):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert checkpoint.state_digest(model, opt) == checkpoint.state_digest(other, other_opt)
    plain = torch.optim.AdamW(tiny_model(seed=0).parameters()).state_dict()
    with pytest.raises(ValueError, match="fp32 master weights"):
        other_opt.load_state_dict(plain)


def test_checkpoints_hold_the_fp32_masters(tmp_path):
    model = tiny_model(seed=0)
    cfg = PPOConfig(lr=1e-3, bf16=True)
    opt = make_optimizer(model, cfg)
    train_step(model, opt, make_batch(model), cfg)
    state = full_precision_state(model, opt)
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]  # tied: saved once
    ckpt = checkpoint.save(tmp_path, 1, model, None, opt)
    loaded = load_model(ckpt / "model", dtype=torch.float32)
    for (name, p), m in zip(model.named_parameters(), opt.masters):
        assert torch.equal(loaded.get_parameter(name), m), name
    assert full_precision_state(model, torch.optim.AdamW(tiny_model().parameters())) is None


def test_release_after_sft_gives_the_model_its_masters():
    model = tiny_model(seed=2)
    batch = make_batch(model)
    cfg = SFTConfig(lr=1e-3, bf16=True)
    opt = make_optimizer(model, cfg)
    losses = [sft_step(model, opt, batch, cfg)["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    masters = [m.detach().clone() for m in opt.masters]
    opt.release()
    assert all(p.dtype == torch.float32 and torch.equal(p, m) for p, m in zip(model.parameters(), masters))


def test_compiled_head_math_equals_eager():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 501, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 501, (37,), generator=g)
    for temperature in (1.0, 0.7):
        want = _softmax_stats(logits, targets, temperature, True, True)
        got = _compiled_softmax_stats(logits, targets, temperature, True, True)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[2].float(), want[2].float(), rtol=1e-2, atol=1e-6)
        assert got[2].dtype == torch.bfloat16


def test_compiled_layers_train_like_eager():
    base = tiny_model(seed=3)
    batch = make_batch(base, seed=2)
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        cfg = PPOConfig(lr=1e-3, minibatches=2, compile=compiled)
        opt = make_optimizer(model, cfg)
        if compiled:
            compile_layers(model)
            assert set(model.state_dict()) == set(base.state_dict())  # names untouched: checkpoints load
        stats = train_step(model, opt, batch, cfg)
        with torch.no_grad():
            lp, _ = packed_logprobs(model, batch.input_ids, batch.cu_seqlens)
        results.append((stats, lp))
    (eager, lp_eager), (comp, lp_comp) = results
    assert comp["loss"] == pytest.approx(eager["loss"], abs=1e-4)
    assert comp["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-3)
    torch.testing.assert_close(lp_comp, lp_eager, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="compile"):
        PPOConfig(compile="yes")
