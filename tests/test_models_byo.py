"""Bring your own model: Qwen3 on the compact engine, any other causal LM on the HF fallback, pre-flight."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from launcher.config import load_config
from launcher.job.start import check_model_path
from policies.infer.hf_decoder import HFDecoder
from policies.infer.llama_infer import CompactDecoder
from policies.model.loading import ModelPathError
from policies.infer.sampling import GenerationEngine, SamplingParams, generate
from tests.hf_reference import hf_greedy, hf_logprobs, one_thread  # noqa: F401  (one_thread: autouse)
from tests.hf_reference import random_prompts as prompts

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, initializer_range=0.5)


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=False)).eval()
    with torch.no_grad():   # the q/k norms start at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.2, 3.0)
    return model


def tiny_mistral(seed=0):
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)).eval()


@pytest.mark.parametrize("make, decoder", [(tiny_qwen3, CompactDecoder), (tiny_mistral, HFDecoder)],
                         ids=["qwen3-engine", "mistral-hf-fallback"])
def test_engine_matches_hf_greedy_and_logprobs(make, decoder):
    model = make()
    engine = GenerationEngine(model)
    assert type(engine.decoder) is decoder
    ps = prompts(model.config.vocab_size, [5, 9, 3])
    greedy = generate(model, ps, 2, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    for p, group in zip(ps, greedy):
        assert [f.output_ids for f in group] == [hf_greedy(model, p, 10)] * 2
    sampled = generate(model, ps, 3, SamplingParams(max_new_tokens=8, temperature=0.8, ignore_eos=True, seed=1))
    for p, group in zip(ps, sampled):
        for f in group:
            torch.testing.assert_close(torch.tensor(f.logprobs), hf_logprobs(model, p, f.output_ids, 0.8),
                                       atol=1e-4, rtol=0)
    assert len({tuple(f.output_ids) for f in sampled[0]}) > 1   # the samples of a group differ


def test_qwen3_q_k_norms_are_applied():
    model = tiny_qwen3()
    p = prompts(model.config.vocab_size, [7])[0]
    before = generate(model, [p], 1, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0][0]
    with torch.no_grad():  # a weight update of the norms alone changes what the engine generates, as in HF
        for name, prm in model.named_parameters():
            if name.endswith("q_norm.weight"):
                prm.mul_(torch.linspace(0.1, 4.0, prm.numel()))
    after = generate(model, [p], 1, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0][0]
    assert after.output_ids == hf_greedy(model, p, 6)
    torch.testing.assert_close(torch.tensor(after.logprobs), hf_logprobs(model, p, after.output_ids), atol=1e-4,
                               rtol=0)
    assert after.logprobs != before.logprobs


def test_fallback_is_said_once_and_updates_are_seen(caplog):
    caplog.set_level(logging.WARNING, logger="policies.infer.hf_decoder")
    import policies.infer.hf_decoder as hf_decoder
    hf_decoder._FALLBACK_SAID.discard("MistralForCausalLM")
    model, other = tiny_mistral(0), tiny_mistral(1)
    engines = [GenerationEngine(model) for _ in range(2)]
    said = [r for r in caplog.records if "MistralForCausalLM runs on the HF forward" in r.getMessage()]
    assert len(said) == 1 and "model_type='mistral'" in said[0].getMessage()
    p = prompts(512, [6])[0]
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    engines[0].update_weights(dict(other.named_parameters()), version=3)
    engines[0].add("a", p, 1, params)
    out = [f for _ in range(8) for f in engines[0].step()]
    assert out[0].output_ids == hf_greedy(other, p, 5) and out[0].versions == [3] * 5


def test_preflight_names_a_missing_or_unsupported_model(tmp_path):
    tiny_mistral().save_pretrained(tmp_path / "mistral")
    (tmp_path / "mistral" / "tokenizer.json").write_text("{}")
    check_model_path(load_config(overrides=[f"model.path={tmp_path / 'mistral'}"]))   # any causal LM passes
    bad = tmp_path / "not_causal"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "vit"}')
    (bad / "model.safetensors").write_bytes(b"")
    (bad / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelPathError, match=r"model.path: .*not_causal.* model_type .vit. is not a causal LM"):
        check_model_path(load_config(overrides=[f"model.path={bad}"]))
    (bad / "config.json").write_text('{"model_type": "no_such_arch_xyz"}')
    with pytest.raises(ModelPathError, match=r"model_type 'no_such_arch_xyz' is unknown to transformers"):
        check_model_path(load_config(overrides=[f"model.path={bad}"]))
    with pytest.raises(ModelPathError, match=r"model.path: model path .*missing.* does not exist"):
        check_model_path(load_config(overrides=[f"model.path={tmp_path / 'missing'}"]))


@pytest.mark.parametrize("make", [tiny_qwen3, tiny_mistral], ids=["qwen3", "mistral"])
def test_the_learner_packed_logprobs_agree_with_hf(tmp_path, make):
    """What the learner computes (load_model's packed attention, several sequences in one row)."""
    from policies.model.logprobs import packed_logprobs
    from policies.model.loading import load_model
    make().save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m")
    seqs = prompts(model.config.vocab_size, [7, 12, 5])
    lp, _ = packed_logprobs(model, torch.tensor(sum(seqs, [])), torch.tensor([0, 7, 19, 24], dtype=torch.int32))
    expected = torch.cat([torch.cat([torch.zeros(1), hf_logprobs(model, s[:1], s[1:])]) for s in seqs])
    torch.testing.assert_close(lp.detach(), expected, atol=1e-4, rtol=0)
