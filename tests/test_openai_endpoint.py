"""A generator's OpenAI endpoint end to end: a torch generator on a real broker, a session opened over the
bus by a rollout-role client, three chat turns by an agent that knows only the `openai` package, and the
closed session's segment checked token by token (loss mask exactly on the sampled tokens; logprobs equal
an fp32 recompute of the weights version each token carries); wrong keys, unknown sessions, bad requests,
retries and concurrent copies."""
from __future__ import annotations

import asyncio

import pytest
import torch

from actors import protocol as P
from bus.client import BusClient
from bus.errors import RemoteError
from tensors.channels import Channels, TensorOptions

pytestmark = pytest.mark.timeout(120)
HB = 0.2
TOL = 1e-4  # fp32 KV-cache decode vs one packed fp32 forward on CPU (measured ~1e-6)


# ---------------------------------------------------------------- the agent: only the openai package
async def agent(base_url: str, api_key: str) -> list:
    import openai
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": "What is 2+3? Use the calculator."}]
    replies = []
    for turn, tool_output in enumerate(["5", "yes, 5", None]):
        stream = turn == 2
        r = await client.chat.completions.create(model="policy", messages=messages, logprobs=True, stream=stream,
                                                 **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = [c async for c in r]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            replies.append((text, usage.prompt_tokens, usage.completion_tokens, None))
        else:
            text = r.choices[0].message.content
            lps = [t.logprob for t in r.choices[0].logprobs.content]
            replies.append((text, r.usage.prompt_tokens, r.usage.completion_tokens, lps))
        messages.append(r.choices[0].message.model_dump() if not stream else {"role": "assistant", "content": text})
        if tool_output is not None:
            messages += [{"role": "tool", "content": tool_output}, {"role": "user", "content": "Sure?"}]
        if turn == 0:  # the generator's weights move on between turns: nothing waits for the trajectory
            await AFTER_FIRST_TURN()
    return replies


AFTER_FIRST_TURN = None


async def test_a_session_over_the_bus_records_exactly_what_the_agent_was_sampled(broker):
    import openai

    from actors.generator.chat_template import ChatTemplate
    from actors.generator.generator import Generator
    from actors.generator.torch_backend import TorchBackend
    from policies.model.loading import load_tokenizer, tiny_dir, tiny_model
    from policies.model.logprobs import packed_logprobs

    global AFTER_FIRST_TURN
    tok = load_tokenizer(tiny_dir())
    refs = {0: tiny_model(seed=0).eval(), 1: tiny_model(seed=1).eval()}
    backend = TorchBackend(tiny_model(seed=0), stop_token_ids=(2,))
    gen = Generator("generator-0", broker.address, backend=backend, tokenizer=tok, heartbeat_interval=HB)
    rollout = BusClient(broker.address, "rollout-0", P.ROLLOUT, heartbeat_interval=HB)
    await gen.start()
    await rollout.connect(timeout=5)

    async def update():
        await backend.update_weights(dict(refs[1].state_dict()), 1)
    AFTER_FIRST_TURN = update
    try:
        sid = "3:q7#1/0"  # a URL-unsafe sid works (quoted in base_url)
        body = {"sid": sid, "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6},
                "max_tokens": 100, "deadline_s": 60.0, "epoch": "e1"}
        opened = await rollout.request("generator-0", P.OPEN_SESSION, body, timeout=5)
        assert opened["base_url"].startswith(f"http://{gen.channels.host}:{gen.openai.port}/s/3%3Aq7%231%2F0/v1")
        assert await rollout.request("generator-0", P.OPEN_SESSION, body, timeout=5) == opened  # a second copy
        url, key = opened["base_url"], opened["api_key"]

        # refusals: wrong key, unknown session, a field the session cannot honour, no other role opens one
        bad = openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            await bad.chat.completions.create(model="p", messages=[{"role": "user", "content": "x"}])
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        other = openai.AsyncOpenAI(base_url=url.replace("%2F0/v1", "%2F9/v1"), api_key=key, max_retries=0)
        with pytest.raises(openai.NotFoundError, match="no open session"):
            await other.chat.completions.create(model="p", messages=[{"role": "user", "content": "x"}])
        good = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        with pytest.raises(openai.BadRequestError, match="temperature") as e:
            await good.chat.completions.create(model="p", messages=[{"role": "user", "content": "x"}],
                                               temperature=0.3)
        assert e.value.param == "temperature"
        sampler = BusClient(broker.address, "sampler", P.SAMPLER, heartbeat_interval=HB)
        await sampler.connect(timeout=5)
        with pytest.raises(Exception, match="rollout"):
            await sampler.request("generator-0", P.OPEN_SESSION, {**body, "sid": "x"}, timeout=5)
        await sampler.close()

        replies = await asyncio.wait_for(agent(url, key), 60)

        # a retry of turn 1 (same body) and two concurrent copies of a new request: answered once each
        m1 = [{"role": "user", "content": "What is 2+3? Use the calculator."}]
        again = await good.chat.completions.create(model="policy", messages=m1, logprobs=True)
        assert again.choices[0].message.content == replies[0][0] and again.id.endswith("-1")
        m4 = m1 + [{"role": "user", "content": "concurrent"}]
        a, b = await asyncio.gather(*[good.chat.completions.create(model="policy", messages=m4) for _ in range(2)])
        assert a.id == b.id and a.choices[0].message.content == b.choices[0].message.content

        out = await rollout.request("generator-0", P.CLOSE_SESSION, {"sid": sid}, timeout=10)
        assert await rollout.request("generator-0", P.CLOSE_SESSION, {"sid": sid}, timeout=10) == out
        rx = Channels(TensorOptions(host="127.0.0.1"))  # the tokens come over a tensor channel, once
        segments = [{k: v.tolist() for k, v in s.items()}
                    for s in (await rx.recv(out["segments_ref"], timeout=5)).sequences()]
        await rx.close()
        with pytest.raises(RemoteError, match="no open session 'nope'"):
            await rollout.request("generator-0", P.CLOSE_SESSION, {"sid": "nope"}, timeout=5)
        with pytest.raises(openai.NotFoundError):
            await good.chat.completions.create(model="p", messages=m1)
    finally:
        await rollout.close()
        await gen.stop()

    # the trajectory (3 turns) is one segment; the concurrent request (a rewritten history) a second one
    assert out["turns"] == 4 and out["sequences"] == len(segments) == 2
    seg = segments[0]
    (_, p1, c1, lp1), (_, p2, c2, lp2), (_, p3, c3, _) = replies
    assert out["completion_tokens"] == c1 + c2 + c3 + sum(segments[1]["loss_mask"])
    assert seg["loss_mask"] == [False] * p1 + [True] * c1 + [False] * (p2 - p1 - c1) + [True] * c2 + \
        [False] * (p3 - p2 - c2) + [True] * c3
    ids = seg["input_ids"]
    assert ids[:p1] == ChatTemplate(tok).prompt_ids(m1)
    mask = torch.tensor(seg["loss_mask"])
    versions = torch.tensor(seg["versions"])
    assert versions[mask].tolist() == [0] * c1 + [1] * (c2 + c3) and set(versions[~mask].tolist()) == {-1}
    got = torch.tensor(seg["logprobs"])
    assert set(got[~mask].tolist()) == {0.0}
    assert got[p1:p1 + c1].tolist() == pytest.approx(lp1) and got[p2:p2 + c2].tolist() == pytest.approx(lp2)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32)
    with torch.no_grad():
        recompute = {v: packed_logprobs(m, torch.tensor(ids), cu, temperature=1.0)[0] for v, m in refs.items()}
    want = torch.where(versions == 0, recompute[0], recompute[1])
    assert (got[mask] - want[mask]).abs().max().item() < TOL


@pytest.mark.parametrize("kind", ["sim", "sglang"])
async def test_sessions_work_on_the_sim_and_sglang_backends(kind):
    """The same session path over the simulated backend and an SGLang server (the fake, over HTTP): each
    turn's tokens with the backend's logprobs and versions, the budget held where a backend ignores
    max_new_tokens (sim)."""
    import sys
    from pathlib import Path

    import openai

    from actors.generator.generator import Generator
    from actors.generator.sim import SimBackend
    from policies.cost_model import CostModel
    from policies.model.loading import load_tokenizer, tiny_dir

    tok = load_tokenizer(tiny_dir())
    fake = None
    if kind == "sim":
        backend = SimBackend(CostModel(decode_step_s=0.0005, response_median=40.0, response_sigma=0.0,
                                       prefill_s_per_token=0.0), tok)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from fake_sglang import FakeSGLang

        from actors.generator.sglang.client import SGLangClient
        fake = FakeSGLang(weight_version="0", token_delay=0.001, vocab_size=len(tok))
        await fake.start()
        backend = SGLangClient(fake.url, request_timeout=20, control_timeout=5, update_timeout=5)
    gen = Generator("generator-0", "tcp://127.0.0.1:9", backend=backend, tokenizer=tok)  # no bus needed here
    await backend.start()
    await gen.openai.start()
    try:
        opened = await gen.on_open_session({"sid": "s", "sampling": {"max_new_tokens": 5}, "max_tokens": 8,
                                            "deadline_s": 30.0}, "rollout-0")
        client = openai.AsyncOpenAI(base_url=opened["base_url"], api_key=opened["api_key"], max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        got = []
        for _ in range(2):
            r = await client.chat.completions.create(model="p", messages=messages, logprobs=True)
            got.append(r)
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "and?"}]
        with pytest.raises(openai.BadRequestError, match="token budget") as e:
            await client.chat.completions.create(model="p", messages=messages)
        assert e.value.code == "session_budget"
        out = gen.openai.close_session("s")  # in process: the segments as lists
    finally:
        await gen.openai.close()
        await backend.close()
        if fake is not None:
            await fake.stop()
    assert [r.usage.completion_tokens for r in got] == [5, 3] and out["finish"] == "budget"
    assert got[1].choices[0].finish_reason == "length"
    (seg,) = out["segments"]
    mask = seg["loss_mask"]
    assert sum(mask) == 8 and len(seg["input_ids"]) == got[1].usage.prompt_tokens + 3
    sampled_lp = [lp for lp, m in zip(seg["logprobs"], mask) if m]
    assert sampled_lp == pytest.approx([t.logprob for r in got for t in r.choices[0].logprobs.content])
    assert [v for v, m in zip(seg["versions"], mask) if m] == [0] * 8
    if kind == "sglang":
        assert all(lp < 0 for lp in sampled_lp) and len(fake.calls) >= 2


@pytest.mark.parametrize("interrupt", [True, False])
async def test_a_weight_update_reaches_a_turn_as_interrupt_on_update_says_and_never_waits_for_a_trajectory(
        interrupt):
    """interrupt_on_update true: a turn in flight goes on under the new weights (its tokens carry both
    versions); false: the update waits for the running turn only (one version per turn), and an update
    between two turns of an open session applies at once."""
    import time

    import openai

    from actors.generator.generator import Generator
    from actors.generator.torch_backend import TorchBackend
    from policies.model.loading import load_tokenizer, tiny_dir, tiny_model

    tok = load_tokenizer(tiny_dir())
    backend = TorchBackend(tiny_model(seed=0), interrupt_on_update=interrupt, update_wait_timeout=30.0)
    step = backend.engine.step

    def slow_step(*a):  # ~20 ms a token, so an update lands mid-turn
        time.sleep(0.02)
        return step(*a)
    backend.engine.step = slow_step
    weights = dict(tiny_model(seed=1).state_dict())
    gen = Generator("generator-0", "tcp://127.0.0.1:9", backend=backend, tokenizer=tok)
    await backend.start()
    await gen.openai.start()
    try:
        opened = await gen.on_open_session({"sid": "s", "sampling": {"max_new_tokens": 30}, "max_tokens": 200,
                                            "deadline_s": 60.0}, "rollout-0")
        client = openai.AsyncOpenAI(base_url=opened["base_url"], api_key=opened["api_key"], max_retries=0)
        m = [{"role": "user", "content": "hi"}]
        turn = asyncio.ensure_future(client.chat.completions.create(model="p", messages=m))
        while backend.engine.num_active == 0:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        await asyncio.wait_for(backend.update_weights(weights, 1), 30)
        if interrupt:
            assert not turn.done()  # applied mid-turn
        r = await turn
        m += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "go"}]
        await asyncio.wait_for(backend.update_weights(weights, 2), 5)  # between turns: at once
        await client.chat.completions.create(model="p", messages=m)
        out = gen.openai.close_session("s")
        if not interrupt:  # closing a session stops its turn in flight and frees the engine's rows
            opened = await gen.on_open_session({"sid": "s2", "sampling": {"max_new_tokens": 30}, "max_tokens": 200,
                                                "deadline_s": 60.0}, "rollout-0")
            client = openai.AsyncOpenAI(base_url=opened["base_url"], api_key=opened["api_key"], max_retries=0)
            turn = asyncio.ensure_future(client.chat.completions.create(model="p", messages=m))
            while backend.engine.num_active == 0:
                await asyncio.sleep(0.005)
            assert (await gen.on_close_session({"sid": "s2"}, "rollout-0"))["turns"] == 0
            with pytest.raises(openai.BadRequestError, match="closed while this turn ran"):
                await turn
            await asyncio.sleep(0.2)
            assert backend.engine.num_active == 0
    finally:
        await gen.openai.close()
        await backend.close()
    (seg,) = out["segments"]
    sampled = [v for v, k in zip(seg["versions"], seg["loss_mask"]) if k]
    first, second = sampled[:r.usage.completion_tokens], sampled[r.usage.completion_tokens:]
    assert set(second) == {2}
    assert set(first) == ({0, 1} if interrupt else {0})
