"""LoRA RL (model.lora) in one process: rl_step's learner trains only a PEFT adapter, publishes only the
adapter, the torch engine generates on base + adapter, checkpoints hold the adapter in PEFT's layout, and
a resumed run ends with the uninterrupted run's adapter."""
from __future__ import annotations

import copy

import pytest
import torch

from actors.learner import checkpoint
from actors.rl_step import rl_step
from actors.weights.broadcaster import snapshot
from policies.data.dataset import Problem
from policies.data.order import batch_indices
from policies.data.prompts import DIRECTIVE, build_prompt
from policies.infer.sampling import GenerationEngine, SamplingParams
from policies.model import lora
from policies.model.loading import load_tokenizer, smollm2_dir, tiny_model
from policies.train.ppo import PPOConfig, make_optimizer

PROBLEMS = [Problem(f"q{i}", f"What is {i} + 3?", [str(i + 3)]) for i in range(4)]
G, STEPS, SEED = 2, 3, 7
LORA = lora.LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))
# a random model is always wrong: unnormalised -5 rewards move the adapter; lr 2e-2 so that B @ A is far
# above the tolerances below (a wrong scale or a missing merge shows by orders of magnitude)
PPO = PPOConfig(minibatches=2, normalize_advantages=False, lr=2e-2)
MERGE_ATOL = 1e-6  # fp32: PEFT's merge and ours round (B @ A) * scale in another order (observed ~1e-8)
RESUME_ATOL = 1e-6  # the resumed run replays the same steps on the same state: observed bit-identical


def learner():
    torch.manual_seed(1)  # the adapter's A init
    model = lora.wrap(tiny_model(seed=0), LORA)
    return model, make_optimizer(model, PPO)


def engine(version: int = 0):
    return GenerationEngine(tiny_model(seed=0).eval(), seed=0, lora=LORA, version=version)


def step(i, model, opt, eng, tok):
    """Step i on batch i of the data order (as the sampler deals it); seeded per group, not per engine."""
    probs = [PROBLEMS[j] for j in batch_indices(len(PROBLEMS), 2, SEED, i)]
    ids = [build_prompt(tok, p.prompt, DIRECTIVE) for p in probs]
    return rl_step(i, probs, ids, engine=eng, tokenizer=tok, sampling=SamplingParams(max_new_tokens=5, seed=SEED),
                   group_size=G, model=model, optimizer=opt, ppo=PPO, total_steps=STEPS)


def peft_merged(base: torch.nn.Module, adapter_dir) -> dict[str, torch.Tensor]:
    """PEFT's own merge of a saved adapter (the reference that ours must equal)."""
    from peft import PeftModel
    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload().state_dict()


def test_lora_rl_trains_the_adapter_publishes_it_generates_on_base_plus_adapter_and_resumes(tmp_path):
    tok = load_tokenizer(smollm2_dir())
    base = tiny_model(seed=0)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    targets = set(lora.target_weight_names(base, LORA))
    model, opt = learner()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(targets) == 2 * 4 * base.config.num_hidden_layers
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    eng = engine()
    full_bytes = sum(t.numel() * t.element_size() for t in base_state.values())
    qids = []
    for i in range(STEPS):
        res = step(i, model, opt, eng, tok)
        qids.append(res.metrics["qids"])
        published = snapshot(model)  # what the learner hands the broadcaster
        assert lora.is_adapter_state(published) and len(published) == len(trainable)
        assert sum(t.numel() * t.element_size() for t in published.values()) < full_bytes / 50
        # the base never moves on the learner
        plain, _ = lora.split_state(model.state_dict())
        assert all(torch.equal(plain[k], base_state[k]) for k in base_state)
        # the generator's effective weights = base + the learner's adapter, by PEFT's own merge
        lora.save_adapter(tmp_path / f"pub-{i}", published, LORA)
        want, gen = peft_merged(base, tmp_path / f"pub-{i}"), eng.model.state_dict()
        assert eng.version == i + 1
        diff = max(float((gen[k] - want[k]).abs().max()) for k in base_state)
        moved = min(float((gen[k] - base_state[k]).abs().max()) for k in targets)
        print(f"step {i}: generator vs base + adapter max |diff| {diff:.2e}; smallest target move {moved:.2e}")
        assert diff <= MERGE_ATOL and moved > 1e3 * MERGE_ATOL
        assert all(torch.equal(gen[k], base_state[k]) for k in base_state if k not in targets)
        eff = lora.effective_state(model)  # what the periodic eval copies from the learner
        assert max(float((eff[k] - want[k]).abs().max()) for k in base_state) <= MERGE_ATOL
        assert all(v == i for s in res.samples for v in s.versions)
        if i == 0:  # the checkpoint a resumed run starts from (after 1 of STEPS steps)
            ckpt = checkpoint.save(tmp_path / "run", 1, model, tok, opt)

    # the checkpoint: PEFT's layout, loadable by PEFT, and what the learner held after step 0
    assert checkpoint.verify(ckpt)["lora"] is True and not (ckpt / "model").exists()
    saved, cfg, _ = lora.load_adapter(ckpt / "adapter")
    assert cfg == lora.LoraSettings(r=4, alpha=8.0, target_modules=tuple(sorted(LORA.target_modules)))
    from peft import PeftModel
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(ckpt / "adapter"))
    assert all(torch.equal(lora.adapter_state(peft)[k], saved[k]) for k in saved)

    # resume from it (fresh learner, fresh generator brought to the adapter as the broadcaster does at start)
    model2, opt2 = learner()
    checkpoint.restore_adapter(ckpt, model2)
    checkpoint.restore_optimizer(ckpt, opt2)
    checkpoint.restore_rng(ckpt)
    assert checkpoint.state_digest(model2, opt2) == checkpoint.load_state(ckpt)["digest"]
    eng2 = engine(version=1)
    eng2.update_weights(snapshot(model2), 1)
    qids2 = [step(i, model2, opt2, eng2, tok).metrics["qids"] for i in range(1, STEPS)]
    assert qids2 == qids[1:]  # the data order goes on where it stopped
    a, b = snapshot(model), snapshot(model2)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resumed vs uninterrupted adapter after {STEPS} steps: max |diff| {gap:.2e}")
    assert gap <= RESUME_ATOL

    # `eval --adapter DIR` merges as PEFT does
    import argparse
    from launcher.commands.evaluate import _adapter, merge_adapter
    args = argparse.Namespace(model="tiny", adapter=str(ckpt / "adapter"))
    evaluated = tiny_model(seed=0)
    merge_adapter(evaluated, *_adapter(args)[1:])
    want = peft_merged(base, ckpt / "adapter")
    assert max(float((evaluated.state_dict()[k] - want[k]).abs().max()) for k in want) <= MERGE_ATOL

    # a generator made without lora= refuses an adapter by name; a LoRA setting that names no layer is named
    with pytest.raises(ValueError, match="without lora="):
        GenerationEngine(tiny_model(seed=0)).update_weights(a, 9)
    with pytest.raises(ValueError, match="rank 4, model.lora.r is 8"):  # the scale would be wrong
        lora.BaseCopy(base, lora.LoraSettings(r=8, alpha=8.0, target_modules=LORA.target_modules)).merged(a)
    with pytest.raises(lora.LoraError, match="model.lora.target_modules"):
        lora.wrap(tiny_model(seed=0), lora.LoraSettings(target_modules=("nope_proj",)))
