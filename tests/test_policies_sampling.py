"""GenerationEngine: equivalence with the HF forward, sampling semantics, versions, abort, validation."""
import threading

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from policies.infer.llama_infer import CompactDecoder, UnsupportedModelError
from policies.model.loading import tiny_model
from policies.infer.sampling import GenerationEngine, SamplingParams, generate
from policies.infer.token_draw import inverse_cdf, sample_tokens, top_p_keep
from tests.hf_reference import hf_greedy, hf_logprobs, one_thread, random_prompts  # noqa: F401  (one_thread: autouse)

VOCAB = 49152


def tiny_llama(seed=0):
    # a wide init: with the default 0.02 a random tied-embedding model just repeats its last token
    return tiny_model(seed=seed, initializer_range=0.5).eval()


def tiny_qwen2(seed=0):
    cfg = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, eos_token_id=2, initializer_range=0.5)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to 0; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def prompts_for(model, lengths, seed=0):
    return random_prompts(model.config.vocab_size, lengths, seed)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


# ------------------------------------------------------------------ the forward

def tiny_llama_biases(seed=0):
    model = tiny_model(seed=seed, initializer_range=0.5, attention_bias=True, mlp_bias=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_llama_biases], ids=["llama", "qwen2", "llama-bias"])
def test_compact_forward_matches_hf_logits(make, fuse):
    model = make()
    dec = CompactDecoder(model, fuse=fuse)
    prompts = prompts_for(model, [7, 12, 3])
    cache = dec.new_cache()
    cache.reserve(3, 32, used_rows=0, used_positions=0)
    seqs = []
    with torch.inference_mode():
        logits, keys, values = dec.prefill([torch.tensor(p) for p in prompts])  # packed
        col = 0
        for row, p in enumerate(prompts):
            ref = model(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=0)
            cache.write_prompt(row, 1, keys, values, col, col + len(p))
            col += len(p)
            seqs.append(list(p))
        g = torch.Generator().manual_seed(1)
        for _ in range(6):  # rows of different lengths decode together
            tokens = torch.randint(0, model.config.vocab_size, (3,), generator=g)
            logits = dec.decode(tokens, torch.tensor([len(s) for s in seqs]), cache)
            for row, t in enumerate(tokens.tolist()):
                seqs[row].append(t)
                ref = model(torch.tensor([seqs[row]])).logits[0, -1]
                torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_greedy_engine_equals_hf_greedy(make):
    model = make()
    prompts = prompts_for(model, [5, 11])
    res = generate(model, prompts, 2, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    for p, group in zip(prompts, res):
        expected = hf_greedy(model, p, 12)
        assert [f.output_ids for f in group] == [expected, expected]


def test_fusion_keeps_parameters_and_sees_every_update():
    model, reference = tiny_llama(), tiny_llama()
    params = dict(model.named_parameters())
    ids = torch.tensor([prompts_for(model, [9])[0]])
    engine = GenerationEngine(model)  # re-homes q/k/v and gate/up into fused buffers
    assert dict(model.named_parameters()) == params  # the same Parameter objects ...
    for name, p in model.named_parameters():  # ... with the same values
        torch.testing.assert_close(p, reference.get_parameter(name), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    prompt = ids[0].tolist()
    params = SamplingParams(max_new_tokens=4, temperature=0.9, ignore_eos=True)

    def check(rid):
        engine.add(rid, prompt, 1, params)
        f = [f for _ in range(6) for f in engine.step()][0]
        torch.testing.assert_close(torch.tensor(f.logprobs), hf_logprobs(model, prompt, f.output_ids, 0.9),
                                   atol=1e-4, rtol=0)
        return f.logprobs

    before = check("a")
    new = tiny_llama(seed=1).state_dict()
    for name, p in model.named_parameters():  # an update that bypasses autograd's version counters
        p.data.copy_(new[name])
    after_copy = check("b")
    model.load_state_dict({k: v.clone() for k, v in tiny_llama(seed=2).state_dict().items()}, assign=True)
    after_assign = check("c")  # new storage: the layers are fused again
    assert before != after_copy != after_assign


def test_unsupported_architecture_is_refused_without_the_hf_fallback():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):
        GenerationEngine(gpt2, hf_fallback=False)


# ------------------------------------------------------------------ sampling semantics

def test_sample_tokens_inverse_cdf_and_top_p():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]] * 4))
    t = torch.ones(4)
    tokens, lp = sample_tokens(logits, t, torch.zeros(4, dtype=torch.long), torch.ones(4),
                               torch.tensor([0.1, 0.25, 0.6, 0.999]))
    assert tokens.tolist() == [0, 1, 2, 2]
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.2, 0.3, 0.5, 0.5])))
    # top_p=0.45 keeps only the 0.5 token; the recorded logprob is still the untruncated one
    tokens, lp = sample_tokens(logits, t, torch.zeros(4, dtype=torch.long), torch.full((4,), 0.45),
                               torch.tensor([0.0, 0.3, 0.6, 0.99]))
    assert tokens.tolist() == [2, 2, 2, 2]
    torch.testing.assert_close(lp, torch.log(torch.full((4,), 0.5)))
    # top_k=2 keeps 0.3 and 0.5 (renormalised to 0.375 / 0.625)
    tokens, _ = sample_tokens(logits, t, torch.full((4,), 2), torch.ones(4), torch.tensor([0.0, 0.37, 0.38, 0.99]))
    assert tokens.tolist() == [1, 1, 2, 2]
    # top_p=0.75 keeps 0.5 and 0.3; greedy rows (T=0) take the argmax, logprob at T=1
    tokens, lp = sample_tokens(logits, torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long),
                               torch.full((4,), 0.75), torch.tensor([0.5, 0.3, 0.0, 0.99]))
    assert tokens.tolist() == [2, 1, 2, 2]


def test_top_p_keep_equals_full_sort_nucleus():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0, 30.0] * 2)[:, None]  # flat rows need a full sort, peaked ones k=64
    logp = torch.log_softmax(torch.randn(10, 5000, generator=g) * scale, -1)
    top_p = torch.tensor([0.5, 0.9, 0.95, 0.99, 0.3, 0.999, 0.7, 0.95, 0.9, 0.01])
    sorted_lp, order = torch.sort(logp, -1, descending=True)
    probs = sorted_lp.exp()
    keep_sorted = (probs.cumsum(-1) - probs) < top_p[:, None]
    expected = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    keep = top_p_keep(logp, top_p)
    assert torch.equal(keep, expected)
    sizes = keep.sum(-1)
    assert sizes.min() == 1 and sizes.max() > 512  # both ends of the escalation ran


def test_inverse_cdf_picks_by_mass_and_skips_zero_probability():
    probs = torch.zeros(3, 1000)
    probs[:, [10, 300, 999]] = torch.tensor([0.25, 0.5, 0.25])
    u = torch.tensor([0.1, 0.5, 0.9999999])
    assert inverse_cdf(probs, u).tolist() == [10, 300, 999]
    assert inverse_cdf(probs, u, block=7).tolist() == [10, 300, 999]  # vocab not a multiple of the block
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 300, generator=g), -1)
    draws = inverse_cdf(p.expand(20000, -1), torch.rand(20000, generator=g, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=300) / 20000
    assert (freq - p[0]).abs().max() < 0.01


def test_logprobs_equal_hf_log_softmax_over_temperature(llama):
    prompts = prompts_for(llama, [4, 9, 6])
    engine = GenerationEngine(llama, seed=3)
    engine.add("a", prompts[0], 3, SamplingParams(max_new_tokens=10, temperature=0.7, ignore_eos=True))
    engine.add("b", prompts[1], 2, SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.9, ignore_eos=True))
    done = engine.step() + engine.step()
    engine.add("c", prompts[2], 2, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, ignore_eos=True))
    while engine.has_work():
        done += engine.step()
    temps = {"a": 0.7, "b": 1.3, "c": 1.0}
    prompt_of = dict(zip("abc", prompts))
    expected = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert sorted((f.rid, f.index) for f in done) == expected
    for f in done:
        ref = hf_logprobs(llama, prompt_of[f.rid], f.output_ids, temps[f.rid])
        torch.testing.assert_close(torch.tensor(f.logprobs), ref, atol=1e-4, rtol=0)


def test_seed_reproducible_and_samples_differ(llama):
    prompts = prompts_for(llama, [6, 8])
    params = SamplingParams(max_new_tokens=8, seed=7, ignore_eos=True)
    first = generate(llama, prompts, 3, params)
    again = generate(llama, prompts, 3, params)
    other = generate(llama, prompts, 3, SamplingParams(max_new_tokens=8, seed=8, ignore_eos=True))
    ids = lambda res: [[f.output_ids for f in g] for g in res]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert len({tuple(o) for o in ids(first)[0]}) == 3  # the G samples of a prompt are not copies
    assert ids(first)[0] != ids(first)[1]  # groups sharing a seed still get their own streams


def test_group_shares_one_prefill(llama):
    engine = GenerationEngine(llama, seed=0)
    for i, p in enumerate(prompts_for(llama, [5, 7, 9])):
        engine.add(str(i), p, 4, SamplingParams(max_new_tokens=3, ignore_eos=True))
    done = []
    while engine.has_work():
        done += engine.step()
    assert engine.stats.prefills == 3
    assert engine.stats.prefill_tokens == 5 + 7 + 9
    assert len(done) == 12 and all(len(f.output_ids) == 3 for f in done)


def test_prefill_chunks_give_the_same_result(llama):
    prompts = prompts_for(llama, [5, 7, 9, 3])
    params = SamplingParams(max_new_tokens=6, temperature=0.8, ignore_eos=True, seed=4)
    whole = generate(llama, prompts, 2, params)
    engine = GenerationEngine(llama, max_prefill_tokens=8)  # 5 | 7 | 9 | 3: one prompt per forward
    for i, p in enumerate(prompts):
        engine.add(str(i), p, 2, params)
    done = []
    while engine.has_work():
        done += engine.step()
    assert engine.stats.prefills == 4 and engine.num_active == 0
    chunked = sorted(done, key=lambda f: (int(f.rid), f.index))
    assert [f.output_ids for f in chunked] == [f.output_ids for g in whole for f in g]
    for f in chunked:
        torch.testing.assert_close(torch.tensor(f.logprobs), hf_logprobs(llama, prompts[int(f.rid)], f.output_ids, 0.8),
                                   atol=1e-4, rtol=0)


def test_stop_token_and_length(llama):
    prompt = prompts_for(llama, [6])[0]
    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    full = generate(llama, [prompt], 1, greedy)[0][0]
    assert full.finish_reason == "length" and full.truncated and len(full.output_ids) == 10
    one = generate(llama, [prompt], 2, SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True))[0]
    assert [(f.output_ids, f.finish_reason) for f in one] == [(full.output_ids[:1], "length")] * 2
    stop_at = full.output_ids[3]
    cut = full.output_ids.index(stop_at)
    stopped = generate(llama, [prompt], 1, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True,
                                                          stop_token_ids=(stop_at,)))[0][0]
    assert stopped.finish_reason == "stop" and not stopped.truncated
    assert stopped.output_ids == full.output_ids[: cut + 1]  # the stop token is kept
    assert len(stopped.logprobs) == len(stopped.versions) == cut + 1


def test_eos_from_generation_config_stops(llama):
    engine = GenerationEngine(llama)
    assert engine.eos_token_ids == (2,)
    prompt = prompts_for(llama, [6])[0]
    first = generate(llama, [prompt], 1, SamplingParams(max_new_tokens=5, temperature=0))[0][0].output_ids[0]
    res = generate(llama, [prompt], 2, SamplingParams(max_new_tokens=5, temperature=0), eos_token_ids=(first,))
    assert [(f.output_ids, f.finish_reason) for f in res[0]] == [([first], "stop")] * 2


def test_tiny_top_p_and_top_k_1_are_greedy(llama):
    prompts = prompts_for(llama, [5, 9])
    greedy = generate(llama, prompts, 1, SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    for params in (SamplingParams(max_new_tokens=8, top_p=1e-6, ignore_eos=True, seed=1),
                   SamplingParams(max_new_tokens=8, top_k=1, temperature=1.5, ignore_eos=True, seed=2)):
        res = generate(llama, prompts, 3, params)
        for g_ref, g in zip(greedy, res):
            assert all(f.output_ids == g_ref[0].output_ids for f in g)


def test_continuous_batching_matches_running_alone(llama):
    prompts = prompts_for(llama, [4, 10, 7])
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)  # noqa: E731
    alone = [generate(llama, [p], 1, greedy(n))[0][0].output_ids for p, n in zip(prompts, (9, 4, 6))]
    engine = GenerationEngine(llama, max_batch_size=4)
    engine.add("0", prompts[0], 2, greedy(9))
    done = engine.step()
    engine.add("1", prompts[1], 3, greedy(4))  # does not fit yet (2 + 3 > 4 rows): waits
    engine.add("2", prompts[2], 1, greedy(6))
    max_active = 0
    while engine.has_work():
        done += engine.step()
        max_active = max(max_active, engine.num_active)
    assert max_active <= 4
    for f in done:
        assert f.output_ids == alone[int(f.rid)], (f.rid, f.index)
    assert sorted((f.rid, f.index) for f in done) == [("0", 0), ("0", 1), ("1", 0), ("1", 1), ("1", 2), ("2", 0)]


# ------------------------------------------------------------------ weights, versions, abort

def test_update_weights_mid_generation_switches_version():
    model, old = tiny_llama(), tiny_llama()
    prompt = prompts_for(model, [6])[0]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, seed=5)
    engine = GenerationEngine(model)
    engine.add("r", prompt, 2, params)
    engine.step()
    engine.step()  # 3 tokens per sample from version 0 (prefill token + 2 decodes)
    # Only the final norm changes (scaled and negated), so the cached keys/values stay valid for the new
    # weights and every logprob can be checked exactly against the HF model of its version.
    engine.update_weights({"model.norm.weight": -3 * model.model.norm.weight}, version=1)
    done = []
    while engine.has_work():
        done += engine.step()
    for f in done:
        assert f.versions == [0, 0, 0] + [1] * 5
        lp = torch.tensor(f.logprobs)
        torch.testing.assert_close(lp[:3], hf_logprobs(old, prompt, f.output_ids)[:3], atol=1e-4, rtol=0)
        torch.testing.assert_close(lp[3:], hf_logprobs(model, prompt, f.output_ids)[3:], atol=1e-4, rtol=0)
        assert not torch.allclose(lp[3:], hf_logprobs(old, prompt, f.output_ids)[3:], atol=1e-2)


def test_update_weights_copies_in_place_and_is_used():
    model = tiny_llama()
    new_state = {k: v.clone() for k, v in tiny_llama(seed=1).state_dict().items()}
    engine = GenerationEngine(model)
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    engine.update_weights(new_state, version=2)
    assert engine.version == 2
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs  # no reallocation
    for k, p in model.named_parameters():
        torch.testing.assert_close(p, new_state[k], atol=0, rtol=0)
    prompt = prompts_for(model, [6])[0]
    engine.add("r", prompt, 1, SamplingParams(max_new_tokens=5, temperature=0.9, ignore_eos=True, seed=0))
    f = [f for _ in range(10) for f in engine.step()][0]
    assert f.versions == [2] * 5
    torch.testing.assert_close(torch.tensor(f.logprobs), hf_logprobs(model, prompt, f.output_ids, 0.9),
                               atol=1e-4, rtol=0)


def test_bf16_engine_takes_fp32_updates_and_samples_like_hf_bf16():
    """A bf16 generator fed by an fp32 learner: updates are cast on arrival, and its logprobs are
    those of the bf16 HF model to bf16 resolution (HF's own bf16 and fp32 forwards differ by up to
    ~0.5 nats per token on this random model, so the check is on the mean)."""
    model = tiny_llama().to(torch.bfloat16)
    learner = tiny_llama(seed=1)
    engine = GenerationEngine(model)
    engine.update_weights(dict(learner.named_parameters()), version=1)
    for k, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, learner.get_parameter(k).to(torch.bfloat16), atol=0, rtol=0)
    prompt = prompts_for(model, [7])[0]
    engine.add("r", prompt, 2, SamplingParams(max_new_tokens=6, temperature=0.9, ignore_eos=True, seed=0))
    out = [f for _ in range(12) for f in engine.step()]
    assert len(out) == 2 and all(f.versions == [1] * 6 for f in out)
    other = tiny_llama(seed=2).to(torch.bfloat16)
    for f in out:
        got = torch.tensor(f.logprobs)
        assert (got - hf_logprobs(model, prompt, f.output_ids, 0.9)).abs().mean() < 0.15
        assert (got - hf_logprobs(other, prompt, f.output_ids, 0.9)).abs().mean() > 0.5  # the check can fail


def test_update_weights_rejects_bad_input_and_changes_nothing(llama):
    engine = GenerationEngine(llama, version=3)
    w = llama.model.norm.weight.clone()
    with pytest.raises(ValueError, match="unknown tensor names"):
        engine.update_weights({"model.norm.weight": w + 1, "nope": w}, version=4)
    with pytest.raises(ValueError, match="shape mismatch"):
        engine.update_weights({"model.norm.weight": w + 1, "model.layers.0.input_layernorm.weight": w[:3]}, 4)
    with pytest.raises(ValueError, match="older than"):
        engine.update_weights({"model.norm.weight": w + 1}, version=2)
    torch.testing.assert_close(llama.model.norm.weight, w)
    assert engine.version == 3


def test_update_weights_from_another_thread_lands_between_steps(llama):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    engine = GenerationEngine(model)
    engine.add("r", prompts_for(model, [5])[0], 2, SamplingParams(max_new_tokens=30, ignore_eos=True, seed=0))
    done, seen = [], threading.Event()

    def updater():
        seen.wait(10)
        for v in range(1, 4):
            engine.update_weights(state, version=v)

    t = threading.Thread(target=updater)
    t.start()
    while engine.has_work():
        done += engine.step()
        seen.set()
    t.join(10)
    for f in done:  # versions never go backwards within a sample
        assert f.versions == sorted(f.versions) and f.versions[0] == 0


def test_add_and_has_work_do_not_wait_for_a_running_step(llama):
    engine = GenerationEngine(llama)
    results = []
    with engine._lock:  # what a step in progress holds
        def caller():
            results.append((engine.add("x", [5, 6], 2, SamplingParams(max_new_tokens=2)), engine.has_work()))

        t = threading.Thread(target=caller)
        t.start()
        t.join(5)
        assert results == [(None, True)]
    assert len([f for _ in range(3) for f in engine.step()]) == 2


def test_abort_returns_partial_output(llama):
    engine = GenerationEngine(llama, max_batch_size=2)
    p1, p2 = prompts_for(llama, [5, 6])
    engine.add("run", p1, 2, SamplingParams(max_new_tokens=50, ignore_eos=True))
    engine.add("queued", p2, 2, SamplingParams(max_new_tokens=50, ignore_eos=True))
    for _ in range(3):
        assert engine.step() == []
    out = engine.abort("run")
    assert [(f.rid, f.index, f.finish_reason) for f in out] == [("run", 0, "abort"), ("run", 1, "abort")]
    assert all(len(f.output_ids) == len(f.logprobs) == len(f.versions) == 4 for f in out)
    assert engine.abort("run") == [] and engine.abort("never-added") == []
    engine.step()  # "queued" is admitted now that rows are free
    out = engine.abort_all()
    assert [(f.rid, f.finish_reason, len(f.output_ids)) for f in out] == [("queued", "abort", 2)] * 2
    assert not engine.has_work()
    engine.add("queued", p2, 1, SamplingParams(max_new_tokens=2))  # the rid is free again
    assert engine.abort("queued")[0].output_ids == []


# ------------------------------------------------------------------ validation

@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(stop_token_ids=(1, -2)), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(seed=1.5), "seed"),
])
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_add_validation(llama):
    engine = GenerationEngine(llama, max_batch_tokens=100, max_batch_size=4)
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        engine.add("a", [], 1, ok)
    with pytest.raises(ValueError, match=f"not a token id in \\[0, {VOCAB}\\)"):
        engine.add("a", [1, VOCAB], 1, ok)
    with pytest.raises(ValueError, match="n=0"):
        engine.add("a", [1, 2], 0, ok)
    with pytest.raises(ValueError, match="does not fit"):
        engine.add("a", [1, 2], 5, ok)
    with pytest.raises(ValueError, match="does not fit"):
        engine.add("a", [1] * 60, 2, ok)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        GenerationEngine(llama).add("a", [1, 2], 1, SamplingParams(max_new_tokens=5000))
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add("a", [1, 2], 1, {"max_new_tokens": 3})
    engine.add("a", [1, 2], 1, ok)
    with pytest.raises(ValueError, match="already queued or running"):
        engine.add("a", [1, 2], 1, ok)
    assert engine.num_queued == 1


# ------------------------------------------------------------------ the real model

@pytest.mark.slow
def test_smollm2_forward_matches_hf():
    from policies.model.loading import load_model, smollm2_dir

    model = load_model(smollm2_dir()).eval()
    dec = CompactDecoder(model)
    prompt = list(range(100, 140))
    with torch.inference_mode():
        logits, keys, values = dec.prefill([torch.tensor(prompt)])
        logits = logits[0]
        torch.testing.assert_close(logits, model(torch.tensor([prompt])).logits[0, -1], atol=1e-4, rtol=0)
        cache = dec.new_cache()
        cache.reserve(1, 64, used_rows=0, used_positions=0)
        cache.write_prompt(0, 1, keys, values)
        seq = list(prompt)
        for _ in range(4):
            tok = int(logits.argmax())
            logits = dec.decode(torch.tensor([tok]), torch.tensor([len(seq)]), cache)[0]
            seq.append(tok)
            torch.testing.assert_close(logits, model(torch.tensor([seq])).logits[0, -1], atol=1e-4, rtol=0)
    res = generate(model, [prompt], 2, SamplingParams(max_new_tokens=6, temperature=0.8, ignore_eos=True, seed=0))
    for f in res[0]:
        torch.testing.assert_close(torch.tensor(f.logprobs), hf_logprobs(model, prompt, f.output_ids, 0.8),
                                   atol=1e-4, rtol=0)
