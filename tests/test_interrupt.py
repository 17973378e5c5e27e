"""rollout.interrupt_on_update: a weight update reaching running sequences.

On (the default): the engine recomputes every running row's KV cache under the new weights, so the
tokens after the update are those a fresh engine with the new weights makes from the same prefix.
Off: the update waits for the running sequences (no new group starts meanwhile): one version each.
"""
import asyncio
import logging

import pytest
import torch

from actors.packer import ScoredGroup, batch_stats
from actors.generator.torch_backend import TorchBackend
from launcher.config import ConfigError, load_config
from policies.model.loading import tiny_model
from policies.infer.sampling import GenerationEngine, SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
WAIT = 30.0


def tiny(seed):
    # a wide init: with the default 0.02 a random tied-embedding model just repeats its last token
    return tiny_model(seed=seed, initializer_range=0.5).eval()


def new_weights():
    return {k: v.clone() for k, v in tiny(1).state_dict().items()}


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]


def hf_logprobs(model, prompt, output):
    ids = torch.tensor(prompt + output)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return logp[len(prompt) - 1:-1].gather(-1, torch.tensor(output)[:, None])[:, 0]


def run(engine):
    done = []
    while engine.has_work():
        done += engine.step()
    return sorted(done, key=lambda f: f.rid)


def test_an_update_recomputes_the_cache_of_running_rows():
    """Rows of two lengths, re-prefilled in several chunks (max_prefill_tokens): after the update every
    token and logprob is the new model's given the row's prefix, which a cache kept from the old
    weights (the former hybrid) does not give."""
    model, newer = tiny(0), tiny(1)
    ps = prompts([7, 12])
    engine = GenerationEngine(model, max_prefill_tokens=16)
    for i, p in enumerate(ps):
        engine.add(str(i), p, 1, GREEDY)
    for _ in range(3):  # 4 tokens per row from version 0 (the first step samples after its prefill and decodes)
        engine.step()
    engine.update_weights(new_weights(), version=1)
    done = run(engine)
    fresh = GenerationEngine(newer)
    for f, p in zip(done, ps):
        assert f.versions == [0] * 4 + [1] * 6
        fresh.add(f.rid, p + f.output_ids[:4], 1, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
        torch.testing.assert_close(torch.tensor(f.logprobs[4:]), hf_logprobs(newer, p, f.output_ids)[4:],
                                   atol=1e-4, rtol=0)
    for f, g in zip(done, run(fresh)):
        assert f.output_ids[4:] == g.output_ids
    assert [f.resumes for f in done] == [1, 1]
    assert engine.stats.interrupted == 2 and engine.stats.reprefill_tokens == (7 + 3) + (12 + 3)


def test_the_hf_fallback_decoder_continues_under_the_new_weights():
    """Models off the compact decoder keep token ids, not keys/values: the re-prefill path holds there too."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(seed):
        torch.manual_seed(seed)
        return MistralForCausalLM(MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=256, sliding_window=None,
                                                initializer_range=0.5)).eval()

    model, newer = mistral(0), mistral(1)
    p = torch.randint(3, 512, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = GenerationEngine(model)
    engine.add("r", p, 1, GREEDY)
    engine.step()
    engine.update_weights(dict(newer.named_parameters()), version=1)
    [f] = run(engine)
    assert f.versions == [0] * 2 + [1] * 8 and engine.stats.interrupted == 1
    rest = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    fresh, old = GenerationEngine(newer), GenerationEngine(mistral(0))
    fresh.add("r", p + f.output_ids[:2], 1, rest)
    old.add("r", p + f.output_ids[:2], 1, rest)
    assert run(fresh)[0].output_ids == f.output_ids[2:] != run(old)[0].output_ids


def test_rows_admitted_after_the_update_are_not_recomputed():
    engine = GenerationEngine(tiny(0))
    engine.update_weights(new_weights(), version=1)
    engine.add("r", prompts([5])[0], 2, GREEDY)
    done = run(engine)
    assert [f.versions for f in done] == [[1] * 10] * 2 and engine.stats.interrupted == 0


# ------------------------------------------------------------------ the torch backend


def noted(coro, order: list, label: str) -> asyncio.Future:
    """`coro` as a task that appends `label` to `order` when it finishes (which finished first)."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda _: order.append(label))
    return task


async def groups_and_update(first, second, update) -> tuple[list, list]:
    """Both groups' samples (within WAIT), once the weight update they straddle is done too."""
    got = await asyncio.wait_for(asyncio.gather(first, second), WAIT)
    await update
    return got


async def started(interrupt: bool, **kw) -> TorchBackend:
    backend = TorchBackend(tiny(0), interrupt_on_update=interrupt, eos_token_ids=(), **kw)
    await backend.start()
    return backend


async def tokens_out(backend: TorchBackend, at_least: int) -> None:
    async with asyncio.timeout(WAIT):
        while backend.engine.stats.generated_tokens < at_least:
            await asyncio.sleep(0.001)


SAMPLING = {"max_new_tokens": 40, "temperature": 0.9}


async def test_interrupt_on_a_running_group_continues_it_under_the_new_weights():
    backend = await started(True)
    try:
        group = asyncio.ensure_future(backend.generate_group("a", prompts([6])[0], 2, SAMPLING))
        await tokens_out(backend, 6)
        await backend.update_weights(new_weights(), 1)
        samples = await asyncio.wait_for(group, WAIT)
    finally:
        await backend.close()
    for s in samples:
        k = s.versions.count(0)
        assert 0 < k < 40 and s.versions == [0] * k + [1] * (40 - k) and s.resumes == 1
    assert backend.engine.stats.interrupted == 2


async def test_without_interrupt_the_update_waits_and_new_groups_start_after_it(caplog):
    caplog.set_level(logging.INFO, logger="actors.generator.torch_backend")
    backend = await started(False)
    order = []
    try:
        a = noted(backend.generate_group("a", prompts([6])[0], 2, SAMPLING), order, "a done")
        await tokens_out(backend, 6)
        update = noted(backend.update_weights(new_weights(), 1), order, "updated")
        await asyncio.sleep(0.01)
        got_a, got_b = await groups_and_update(a, backend.generate_group("b", prompts([5], seed=1)[0], 2, SAMPLING),
                                               update)
    finally:
        await backend.close()
    assert order[:2] == ["a done", "updated"]
    assert [s.versions for s in got_a] == [[0] * 40] * 2 and [s.versions for s in got_b] == [[1] * 40] * 2
    assert backend.engine.stats.interrupted == 0
    assert any("weight update v1 waits for 2 running sequences" in r.getMessage() for r in caplog.records)


async def test_without_interrupt_the_wait_has_a_deadline(caplog):
    backend = await started(False, update_wait_timeout=0.05)
    try:
        long = {"max_new_tokens": 3000, "temperature": 0.9}
        group = asyncio.ensure_future(backend.generate_group("a", prompts([6])[0], 1, long))
        await tokens_out(backend, 2)
        await asyncio.wait_for(backend.update_weights(new_weights(), 1), WAIT)
        assert backend.engine.version == 1 and not group.done()
        group.cancel()
    finally:
        await backend.close()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 sequences still running" in m and "interrupt_on_update=false" in m for m in said), said


def test_the_backend_refuses_bad_settings():
    with pytest.raises(ValueError, match="interrupt_on_update='no'"):
        TorchBackend(tiny(0), interrupt_on_update="no")
    with pytest.raises(ValueError, match="update_wait_timeout=0"):
        TorchBackend(tiny(0), update_wait_timeout=0)


# ------------------------------------------------------------------ config and metrics


def test_config_key_defaults_to_true_and_takes_only_booleans():
    assert load_config().rollout.interrupt_on_update is True
    assert load_config(overrides=["rollout.interrupt_on_update=false"]).rollout.interrupt_on_update is False
    with pytest.raises(ConfigError, match="rollout.interrupt_on_update: expected true or false, got 'sometimes'"):
        load_config(overrides=["rollout.interrupt_on_update=sometimes"])


def test_step_metrics_count_interrupted_sequences():
    def group(interrupted, per_seq):
        stats = {"truncated": [False], "response_tokens": [3], "version_min": 2, "version_max": 3,
                 "interrupted": interrupted, "versions_per_seq": per_seq}
        return ScoredGroup("q", rollout=type("B", (), {"num_seqs": 1})(), rewards=[0.0], correct=[True], stats=stats)

    m = batch_stats(3, [group(2, 2), group(0, 1), group(1, 3)], dropped=0)
    assert m["interrupted_seqs"] == 3 and m["versions_per_seq_max"] == 3


# ------------------------------------------------------------------ the sglang backend (fake server, disk weights)


@pytest.fixture
async def fake():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_sglang import FakeSGLang
    f = FakeSGLang(weight_version="0", token_delay=0.01)
    await f.start()
    yield f
    await f.stop()


async def sglang_backend(fake, tmp_path, interrupt: bool):
    from actors.generator.sglang.backend import SGLangGeneratorBackend
    b = SGLangGeneratorBackend(fake.url, model_path=str(tmp_path), weights="disk", interrupt_on_update=interrupt,
                               request_timeout=20, control_timeout=5, update_timeout=10)
    await b.start()
    return b


async def running(fake, tokens: int):
    async with asyncio.timeout(WAIT):
        while not (fake.running and all(len(r.output) >= tokens for r in fake.running.values())):
            await asyncio.sleep(0.005)


async def test_sglang_interrupt_aborts_and_resubmits_the_prefix_under_the_new_weights(fake, tmp_path):
    b = await sglang_backend(fake, tmp_path, True)
    try:
        group = asyncio.ensure_future(b.generate_group("a", [5, 6, 7], 2, {"max_new_tokens": 60}))
        await running(fake, 3)
        await b.update_weights({"w": torch.ones(2)}, 1)
        samples = await asyncio.wait_for(group, WAIT)
    finally:
        await b.close()
    for s in samples:
        k = s.versions.count(0)
        assert 3 <= k < 60 and s.versions == [0] * k + [1] * (60 - k) and s.resumes == 1
    resubmit = [c for c in fake.calls if c["path"] == "/generate"][1]["body"]
    assert resubmit["input_ids"] == [[5, 6, 7] + s.output_ids[:s.versions.count(0)] for s in samples]
    disk = [c for c in fake.calls if c["path"] == "/update_weights_from_disk"]
    assert [c["body"]["abort_all_requests"] for c in disk] == [True]


async def test_sglang_without_interrupt_the_update_waits_and_holds_new_requests(fake, tmp_path):
    b = await sglang_backend(fake, tmp_path, False)
    order = []
    try:
        a = noted(b.generate_group("a", [5, 6, 7], 2, {"max_new_tokens": 40}), order, "a done")
        await running(fake, 3)
        update = noted(b.update_weights({"w": torch.ones(2)}, 1), order, "updated")
        async with asyncio.timeout(WAIT):
            while not fake.writers_waiting:
                await asyncio.sleep(0.005)
        got_a, got_b = await groups_and_update(a, b.generate_group("b", [9], 2, {"max_new_tokens": 40}), update)
    finally:
        await b.close()
    assert order[:2] == ["a done", "updated"]
    assert [s.versions for s in got_a] == [[0] * 40] * 2 and [s.versions for s in got_b] == [[1] * 40] * 2


def test_sglang_distributed_weights_cannot_wait():
    with pytest.raises(ConfigError, match="rollout.interrupt_on_update: false .* needs actors.generator.sglang_weights "
                                          "disk"):
        load_config(overrides=["rollout.interrupt_on_update=false", "actors.generator.backend=sglang"])
    cfg = load_config(overrides=["rollout.interrupt_on_update=false", "actors.generator.backend=sglang",
                                 "actors.generator.sglang_weights=disk"])
    assert cfg.rollout.interrupt_on_update is False
