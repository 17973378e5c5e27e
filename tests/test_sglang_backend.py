"""The SGLang client (and the generator backend that launches a server) against the fake SGLang
0.5.23 server, over real HTTP on loopback."""

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_sglang import FakeSGLang, fake_logprob, fake_token  # noqa: E402

from actors.generator.sglang.server import SGLangLaunch, launch_argv  # noqa: E402
from actors.weights.sglang_distributed import Server, SGLangWeightSync  # noqa: E402

from actors.generator.sglang.client import SGLangClient  # noqa: E402
from actors.generator.sglang.backend import SGLangGeneratorBackend  # noqa: E402
from actors.generator.sglang.protocol import (  # noqa: E402
    SGLangLaunchError, SGLangProtocolError, SGLangRefused,
    SGLangTimeout, SGLangUnreachable, TensorMeta, bucket_tensors, tensor_bytes,
    normalize_sampling, parse_result)

FAKE_CMD = [sys.executable, str(Path(__file__).with_name("fake_sglang.py"))]
VOCAB = 32000
META = [("model.embed_tokens.weight", "bfloat16", (64, 16)),  # 2048 bytes
        ("model.layers.0.self_attn.q_proj.weight", "bfloat16", (16, 16)),  # 512
        ("model.layers.0.self_attn.k_proj.weight", "bfloat16", (16, 16)),  # 512
        ("model.norm.weight", "float32", (16,)),  # 64
        ("lm_head.weight", "bfloat16", (64, 16))]  # 2048


def expected(prompt, versions, salt=0):
    """Tokens and logprobs the fake produces when token k is made under versions[k]."""
    ctx, toks, lps = list(prompt), [], []
    for k, v in enumerate(versions):
        s = salt if k == 0 else 0
        toks.append(fake_token(ctx, v, VOCAB, s))
        lps.append(fake_logprob(ctx, v, s))
        ctx.append(toks[-1])
    return toks, lps


async def wait_until(cond, timeout=5.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def fake():
    f = FakeSGLang(weight_version="0", token_delay=0.002)
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
async def backend(fake):
    async with SGLangClient(fake.url, request_timeout=20, control_timeout=5,
                             update_timeout=5) as b:
        assert [c["path"] for c in fake.calls] == ["/model_info"] and b.version == 0
        fake.calls.clear()
        yield b


@pytest.fixture
async def synced(fake):
    """A weight-update session whose gloo group with the fake is already formed (version 0)."""
    sync = SGLangWeightSync(backend="gloo", master_address="127.0.0.1", call_timeout=5,
                            collective_timeout=30, attempts=1)
    assert await sync.update([Server("g", fake.url)], {"w": torch.zeros(2, 2)}, 0) == {"g"}
    fake.calls.clear()
    yield sync
    await sync.close()


async def update(sync, fake, version, mode="abort"):
    sync.pause_mode = mode
    return await sync.update([Server("g", fake.url)], {"w": torch.full((2, 2), float(version))},
                             version)


# ---------------------------------------------------------------- generation


async def test_generate_groups_n_samples_per_prompt_with_logprobs_and_versions(fake, backend):
    prompts = [[1, 2, 3], [7, 8]]
    groups = await backend.generate(prompts, 3, {"max_new_tokens": 6, "temperature": 1.0,
                                                 "top_p": 1.0, "top_k": -1})
    body = fake.calls[-1]["body"]
    assert body["input_ids"] == prompts and body["return_logprob"] is True
    assert body["sampling_params"]["n"] == 3 and body["sampling_params"]["max_new_tokens"] == 6
    assert [len(g) for g in groups] == [3, 3]
    for p, group in zip(prompts, groups):
        for j, s in enumerate(group):  # SGLang orders results i*n + j
            toks, lps = expected(p, ["0"] * 6, salt=j)
            assert s.output_ids == toks and s.logprobs == pytest.approx(lps)
            assert s.versions == [0] * 6 and s.finish_reason == "length" and s.rid
        assert len({tuple(s.output_ids) for s in group}) == 3

    toks, _ = expected([1, 2, 3], ["0"] * 6)
    stop = toks[2]
    assert stop not in toks[:2]
    [[s]] = await backend.generate([[1, 2, 3]], 1, {"max_new_tokens": 6,
                                                    "stop_token_ids": [stop]})
    assert s.output_ids == toks[:3] and s.finish_reason == "stop"


async def test_bad_inputs_are_rejected_before_anything_is_sent(fake, backend):
    cases = [
        (dict(input_ids=[[1]], n=1, sampling={"temprature": 1.0}), "temprature"),
        (dict(input_ids=[[1]], n=1, sampling={"n": 2}), "pass n as the generate() argument"),
        (dict(input_ids=[[1]], n=1, sampling={"top_p": 0}), "sampling['top_p']=0"),
        (dict(input_ids=[[1], []], n=1, sampling={}), "input_ids[1]"),
        (dict(input_ids=[[1, -4]], n=1, sampling={}), "input_ids[0] holds -4"),
        (dict(input_ids=[[1]], n=0, sampling={}), "n=0"),
        (dict(input_ids=[[1], [2]], n=1, sampling={}, rids=["a"]), "rids has 1 entries"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            await backend.generate(**kwargs)
    with pytest.raises(ValueError, match="pause mode 'stop'"):
        await backend.pause("stop")
    with pytest.raises(ValueError, match="tensor 'w': dtype 'float13'"):
        await backend.update_bucket([("w", "float13", (2,))], 1)
    assert fake.calls == []


async def test_malformed_reply_names_the_field(fake, backend):
    def drop_logprobs(path, payload):
        if path == "/generate":
            del payload[0]["meta_info"]["output_token_logprobs"]
        return payload

    def swap_token(path, payload):
        if path == "/generate":
            payload[1]["meta_info"]["output_token_logprobs"][2][1] += 1
        return payload

    def bad_version(path, payload):
        if path == "/generate":
            payload[0]["meta_info"].pop("weight_versions")
            payload[0]["meta_info"]["weight_version"] = "v7"
        return payload

    for hook, field in [(drop_logprobs, "reply[0].meta_info.output_token_logprobs"),
                        (swap_token, "reply[1].meta_info.output_token_logprobs[2][1]"),
                        (bad_version, "reply[0].meta_info.weight_version")]:
        fake.reply_hook = hook
        with pytest.raises(SGLangProtocolError) as e:
            await backend.generate([[1], [2]], 1, {"max_new_tokens": 4})
        assert e.value.field == field and fake.url in str(e.value) and "generate" in str(e.value)

    for result, field in [({"meta_info": {}}, "r.output_ids"),
                          ({"output_ids": [1], "meta_info": {"finish_reason": {"type": "done"}}},
                           "r.meta_info.finish_reason")]:
        with pytest.raises(ValueError) as e:
            parse_result(result, "r")
        assert e.value.field == field


# ---------------------------------------------------------------- weight updates


async def test_updates_outside_a_session_are_refused(fake, backend):
    with pytest.raises(SGLangRefused) as e:
        await backend.update_bucket([("w", "bfloat16", (2, 2))], 1)
    assert e.value.status == 400 and fake.url in str(e.value)
    assert ("update_weights_from_distributed must run between begin_weight_update() and "
            "end_weight_update()") in str(e.value)
    assert fake.received == [] and fake.weight_version == "0"



async def test_flush_cache_retries_while_requests_run(fake, backend):
    fake.token_delay = 0.01
    gen = asyncio.create_task(backend.generate([[1, 2]], 1, {"max_new_tokens": 30}))
    await wait_until(lambda: fake.running)
    await backend.flush_cache(timeout=5)
    statuses = [c["status"] for c in fake.calls if c["path"] == "/flush_cache"]
    assert statuses[0] == 400 and statuses[-1] == 200 and len(statuses) >= 2
    assert gen.done()  # the flush could only succeed once the request had finished
    [[s]] = await gen
    assert len(s.output_ids) == 30

    gen = asyncio.create_task(backend.generate([[1, 2]], 1, {"max_new_tokens": 500}))
    await wait_until(lambda: fake.running)
    with pytest.raises(SGLangTimeout) as e:
        await backend.flush_cache(timeout=0.3)
    assert fake.url in str(e.value) and "flush_cache" in str(e.value)
    assert "Flush cache failed" in str(e.value)
    gen.cancel()  # dropping the connection makes the server abort the request
    await wait_until(lambda: not fake.running)


async def test_in_place_pause_cannot_flush_so_the_update_fails_but_the_server_resumes(
        fake, backend, synced, caplog):
    fake.token_delay = 0.01
    for link in synced._links.values():
        link.client.control_timeout = 0.5
    gen = asyncio.create_task(backend.generate([[3]], 1, {"max_new_tokens": 60}))
    await wait_until(lambda: fake.running)
    assert await update(synced, fake, 1, "in_place") == set()
    assert "flush_cache: timed out" in caplog.text
    assert not fake.session_open and fake.pause_mode is None
    [[s]] = await gen
    assert s.finish_reason == "length" and len(s.output_ids) == 60


async def test_pause_abort_then_resumable_generation_concatenates_partial_rollouts(
        fake, backend, synced):
    fake.token_delay = 0.01
    prompts = [[5, 6, 7], [9]]
    task = asyncio.create_task(backend.generate_resumable(prompts, 2, {"max_new_tokens": 60}))
    await wait_until(lambda: len(fake.running) == 4
                     and all(len(r.output) >= 3 for r in fake.running.values()))
    assert await update(synced, fake, 1) == {"g"}
    groups = await task

    resubmit = [c for c in fake.calls if c["path"] == "/generate"][1]["body"]
    for i, (p, group) in enumerate(zip(prompts, groups)):
        for j, s in enumerate(group):
            k = s.versions.count(0)
            assert 3 <= k < 60 and s.versions == [0] * k + [1] * (60 - k)
            toks, lps = expected(p, ["0"] * k + ["1"] * (60 - k), salt=j)
            assert s.output_ids == toks and s.logprobs == pytest.approx(lps)
            assert s.finish_reason == "length" and s.resumes == 1
            row = 2 * i + j  # resubmitted in order: prompt + tokens so far, remaining budget
            assert resubmit["input_ids"][row] == p + toks[:k]
            assert resubmit["sampling_params"][row] == {"max_new_tokens": 60 - k, "n": 1}


async def test_retract_pause_keeps_requests_and_reports_per_token_versions(
        fake, backend, synced):
    fake.token_delay = 0.01
    task = asyncio.create_task(backend.generate([[2, 3]], 1, {"max_new_tokens": 60}))
    await wait_until(lambda: fake.running and len(next(iter(fake.running.values())).output) >= 3)
    assert await update(synced, fake, 4, "retract") == {"g"}
    [[s]] = await task
    k = s.versions.count(0)
    assert s.resumes == 0 and 3 <= k < 60 and s.versions == [0] * k + [4] * (60 - k)
    assert s.output_ids == expected([2, 3], ["0"] * k + ["4"] * (60 - k))[0]


async def test_refused_update_from_disk_quotes_the_server_message(fake, backend, tmp_path):
    with pytest.raises(SGLangRefused) as e:
        await backend.update_weights_from_disk("/no/such/checkpoint", 3)
    assert e.value.status == 400 and "Failed to get weights iterator" in str(e.value)
    assert fake.url in str(e.value) and "update_weights_from_disk" in str(e.value)
    await backend.update_weights_from_disk(str(tmp_path), 3)
    assert fake.calls[-1]["body"] == {"model_path": str(tmp_path), "weight_version": "3", "abort_all_requests": False}
    assert await backend.weight_version() == 3 and backend.version == 3


def test_bucket_tensors_keeps_broadcast_order_within_the_byte_budget():
    buckets = bucket_tensors(META, 1024)
    assert [[m.name for m in b] for b in buckets] == [[META[0][0]], [META[1][0], META[2][0]],
                                                      [META[3][0]], [META[4][0]]]
    assert bucket_tensors([("a", "torch.float32", (3,))], 4) == [[TensorMeta("a", "float32",
                                                                               (3,))]]
    assert [m for b in bucket_tensors(META, 1 << 30) for m in b] == [TensorMeta(*m) for m in META]
    with pytest.raises(ValueError, match="tensor 'x': shape"):
        bucket_tensors([("x", "float32", (2, -1))], 10)
    # (moved from tests/test_tensors_wire.py with tensors/buckets.py, the second bucketing it tested)
    named = [(f"layer{i}", "float32", (i + 1,)) for i in range(10)]  # 4..40 bytes
    buckets = bucket_tensors(named, 60)
    assert [m.name for b in buckets for m in b] == [n for n, _, _ in named]
    assert all(sum(tensor_bytes(m) for m in b) <= 60 or len(b) == 1 for b in buckets)
    big = bucket_tensors([("a", "float32", (100,)), ("b", "float32", (1,))], 8)
    assert [[m.name for m in b] for b in big] == [["a"], ["b"]]
    with pytest.raises(ValueError, match="tensor 'a' appears twice"):
        bucket_tensors([("a", "float32", (1,)), ("a", "float32", (1,))], 100)


def test_normalize_sampling_fills_the_server_default():
    assert normalize_sampling({"temperature": 0.6, "top_k": None}) == {"max_new_tokens": 128,
                                                                       "temperature": 0.6}


async def test_generate_group_is_the_generator_backend_call(fake, backend):
    samples = await backend.generate_group("q7", [3, 1], 2, {"max_new_tokens": 5})
    assert fake.calls[-1]["body"]["rid"] == ["q7"] and len(samples) == 2
    for j, s in enumerate(samples):
        assert s.output_ids == expected([3, 1], ["0"] * 5, salt=j)[0] and s.versions == [0] * 5


# ---------------------------------------------------------------- launched servers


def fake_launch(port, *extra):
    return SGLangLaunch("fake-model", port, command=FAKE_CMD, extra_args=list(extra),
                        stop_timeout=3)


def test_launch_argv_builds_the_sglang_command_line():
    cfg = SGLangLaunch("/ckpt/qwen", 30001, tp_size=2, mem_fraction_static=0.8, random_seed=7,
                       extra_args=["--disable-radix-cache"])
    assert launch_argv(cfg) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/ckpt/qwen",
        "--host", "127.0.0.1", "--port", "30001", "--tp-size", "2", "--weight-version", "0",
        "--mem-fraction-static", "0.8", "--random-seed", "7", "--disable-radix-cache"]
    for bad, needle in [(dict(port=0), "port=0"), (dict(mem_fraction_static=1.5), "(0, 1)"),
                        (dict(tp_size=0), "tp_size=0")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            SGLangLaunch(**{"model_path": "/m", "port": 1, **bad})


async def test_launch_waits_through_503_then_serves_and_stops(caplog):
    caplog.set_level(logging.INFO, logger="actors.generator.sglang.client")
    port = free_port()
    b = SGLangGeneratorBackend(model_path="fake-model", launch=fake_launch(port, "--startup-delay", "1.0"), health_timeout=20,
                      progress_interval=0.2)
    async with b:
        url = f"http://127.0.0.1:{port}"
        assert b.url == url
        assert f"waiting for sglang at {url}: 503 starting" in caplog.text
        [[s]] = await b.generate([[1, 2]], 1, {"max_new_tokens": 3})
        assert s.versions == [0, 0, 0]  # launched with --weight-version 0
        assert b.returncode is None
    assert b.returncode is not None


async def test_health_timeout_names_the_url_and_stops_the_server():
    port = free_port()
    b = SGLangGeneratorBackend(model_path="fake-model", launch=fake_launch(port, "--startup-delay", "30"), health_timeout=3.0)
    with pytest.raises(SGLangTimeout) as e:
        await b.start()
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}" in msg and "health" in msg and "503 starting" in msg
    assert "fake sglang 0.5.23: serving fake-model" in msg  # the server's log tail
    assert b.returncode is not None


async def test_server_dying_before_healthy_quotes_its_last_log_lines():
    port = free_port()
    b = SGLangGeneratorBackend(model_path="fake-model", launch=fake_launch(port, "--no-such-flag"), health_timeout=20)
    t0 = time.monotonic()
    with pytest.raises(SGLangLaunchError) as e:
        await b.start()
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}" in msg and "exited with code 2" in msg
    assert "unrecognized arguments: --no-such-flag" in msg


async def test_server_killed_mid_request_is_a_clear_error_within_the_deadline():
    port = free_port()
    async with SGLangGeneratorBackend(model_path="fake-model", launch=fake_launch(port, "--token-delay", "0.05"),
                             request_timeout=30, health_timeout=20) as b:
        task = asyncio.create_task(b.generate([[1, 2, 3]], 1, {"max_new_tokens": 1000}))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        os.killpg(b.pid, signal.SIGKILL)  # the process group this test's backend started
        with pytest.raises(SGLangUnreachable) as e:
            await task
        assert time.monotonic() - t0 < 5
        assert f"http://127.0.0.1:{port}" in str(e.value) and "generate" in str(e.value)
        with pytest.raises(SGLangUnreachable):
            await b.health()
