"""LoRA on the SGLang path: a generator whose server runs with --enable-lora takes the learner's adapter as
files (/load_lora_adapter), names it in every later /generate and retires the old one.

The fake server is launched as a process with the backend's own argv, so what it parses is what SGLang
would be given; it merges each adapter it loads into the base it read from --model-path (as SGLang's LoRA
layers compute it: base + alpha / r * B @ A) and writes those effective weights out (--dump-weights)."""
import asyncio
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from fake_sglang import fake_token  # noqa: E402
from fake_sglang_lora import weights_key  # noqa: E402

from actors.generator.sglang.backend import SGLangGeneratorBackend  # noqa: E402
from actors.generator.sglang.protocol import SGLangRefused  # noqa: E402
from actors.generator.sglang.server import SGLangLaunch, launch_argv  # noqa: E402
from actors.weights.sglang_distributed import free_port  # noqa: E402
from policies.model import lora  # noqa: E402
from policies.model.loading import tiny_model  # noqa: E402

LORA = lora.LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
ATOL = 1e-6  # fp32 on both sides; the fake and policies.model.lora round B @ A * scale alike (observed 0)
PROMPT = [5, 6, 7, 8]
SMALL = dict(vocab_size=512)  # the tiny model with a small vocabulary: quick to save and for the fake to read


def adapter(model, seed: int) -> dict[str, torch.Tensor]:
    """The learner's adapter after some 'training': every lora_A / lora_B set from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in lora.adapter_state(model).items()}


async def fetch(b, path):
    """One of the fake's introspection routes: /_fake/calls (every request, body and reply), /_fake/loras."""
    resp = await b._request("GET", path, path)
    return json.loads(resp.content)


async def calls(b, path):
    return [c for c in await fetch(b, "/_fake/calls") if c["path"] == path]


async def until_running(b, rid, within=10.0):
    """Until the fake got /generate ``rid`` (it logs a call when it starts serving it)."""
    for _ in range(int(within / 0.01)):
        if any(c["body"].get("rid") == [rid] for c in await calls(b, "/generate")):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{rid} never reached the fake")


async def test_adapter_updates_reach_sglang_as_files_and_generation_runs_on_base_plus_adapter(tmp_path):
    base_dir, dump = tmp_path / "base", tmp_path / "dump"
    learner = lora.wrap(tiny_model(seed=0, **SMALL), LORA)
    plain = tiny_model(seed=0, **SMALL)
    plain.save_pretrained(base_dir)
    base = {k: v.clone() for k, v in plain.state_dict().items()}
    launch = SGLangLaunch(model_path=str(base_dir), port=free_port(), lora_rank=LORA.r,
                          lora_target_modules=LORA.target_modules,
                          command=[sys.executable, str(Path(__file__).with_name("fake_sglang.py"))],
                          extra_args=["--dump-weights", str(dump), "--token-delay", "0.004"])
    argv = launch_argv(launch)
    i = argv.index("--enable-lora")
    assert argv[i:i + 7] == ["--enable-lora", "--max-lora-rank", "4", "--lora-target-modules",
                             "q_proj", "v_proj", "down_proj"]
    b = SGLangGeneratorBackend(launch=launch, model_path=str(base_dir), weights="distributed", lora=LORA,
                               health_timeout=30, request_timeout=30)
    assert b.capabilities["weights"] == "adapter"  # the broadcaster sends it tensors, never a weight group
    await b.start()
    try:
        # before any adapter: the base, no lora_path
        group = await b.generate_group("r0", PROMPT, 2, {"max_new_tokens": 3})
        assert [s.versions for s in group] == [[0] * 3] * 2

        # v1 while a long request runs: it is interrupted and resumed on adapter-v1 (interrupt_on_update)
        a1 = adapter(learner, 1)
        running = asyncio.create_task(b.generate_group("r1", PROMPT, 1, {"max_new_tokens": 400}))
        await until_running(b, "r1")
        await b.update_weights(a1, 1)
        (s,) = await running
        cut = s.versions.index(1)
        assert 0 < cut < 400 and s.versions == [0] * cut + [1] * (400 - cut) and s.resumes == 1, cut
        await b.adapters.settle()
        gens = await calls(b, "/generate")
        assert "lora_path" not in gens[0]["body"] and gens[-1]["body"]["lora_path"] == "adapter-v1"
        load = (await calls(b, "/load_lora_adapter"))[-1]
        assert load["body"] == {"lora_name": "adapter-v1", "lora_path": str(b.adapters.root / "adapter-v1"),
                                "pinned": False}
        assert (await calls(b, "/update_weight_version"))[-1]["body"] == {"new_version": "1", "abort_all_requests": True}

        # the server's effective weights are base + the learner's adapter, its tokens come from them
        def check_effective(name, a):
            served = load_file(dump / f"{name}.safetensors")
            ours = lora.merged_weights(base, a, LORA)
            learners = lora.effective_state(learner)
            assert set(served) == set(ours) == set(lora.target_weight_names(plain, LORA))
            for k in served:
                assert (served[k] - ours[k]).abs().max() <= ATOL, k
                assert (served[k] - learners[k]).abs().max() <= ATOL, k
                assert (served[k] - base[k]).abs().max() > 1e-3, k  # the adapter moved it
            return weights_key(served)

        key1 = check_effective("adapter-v1", a1)
        (s,) = await b.generate_group("r2", PROMPT, 1, {"max_new_tokens": 2})
        assert s.output_ids[0] == fake_token(PROMPT, key1, 32000, 0) and s.versions == [1, 1]

        # v2: loaded under its own name, v1 unloaded and its directory removed; a second copy is a no-op
        a2 = adapter(learner, 2)
        await b.update_weights(a2, 2)
        await b.update_weights(a2, 2)
        await b.adapters.settle()
        key2 = check_effective("adapter-v2", a2)
        assert key2 != key1
        assert await fetch(b, "/_fake/loras") == {"loaded": {"adapter-v2": str(b.adapters.root / "adapter-v2")},
                                                  "ever": ["adapter-v1", "adapter-v2"]}
        assert sorted(p.name for p in b.adapters.root.iterdir()) == ["adapter-v2"]
        assert [c["body"]["lora_name"] for c in await calls(b, "/load_lora_adapter")] == ["adapter-v1", "adapter-v2"]
        assert [c["body"]["lora_name"] for c in await calls(b, "/unload_lora_adapter")] == ["adapter-v1"]
        assert (await b.model_info())["weight_version"] == "2"

        # v3 with interrupt_on_update false: the running request ends on adapter-v2, all its tokens v2;
        # adapter-v2 is unloaded only after it ended
        b.interrupt_on_update = False
        a3 = adapter(learner, 3)
        running = asyncio.create_task(b.generate_group("r3", PROMPT, 1, {"max_new_tokens": 300}))
        await until_running(b, "r3")
        await b.update_weights(a3, 3)
        assert (await fetch(b, "/_fake/loras"))["loaded"].keys() == {"adapter-v2", "adapter-v3"}
        (s,) = await running
        assert s.versions == [2] * 300 and s.resumes == 0 and s.finish_reason == "length"
        await b.adapters.settle()
        assert (await fetch(b, "/_fake/loras"))["loaded"].keys() == {"adapter-v3"}
        assert sorted(p.name for p in b.adapters.root.iterdir()) == ["adapter-v3"]

        # refusals are clear, and generation goes on with the adapter it had
        r8 = lora.LoraSettings(r=8, alpha=8.0, target_modules=LORA.target_modules)
        a8 = adapter(lora.wrap(tiny_model(seed=0, **SMALL), r8), 4)
        with pytest.raises(ValueError, match=r"adapter v4: rank \[8\], but model.lora.r is 4"):
            await b.update_weights(a8, 4)
        b.adapters.lora = r8  # a job whose rank is over its server's --max-lora-rank (one given by URL)
        with pytest.raises(SGLangRefused, match="load_lora_adapter.*rank 8 is incompatible.*--max-lora-rank"):
            await b.update_weights(a8, 4)
        b.adapters.lora = LORA
        assert b.lora_name == "adapter-v3" and not (b.adapters.root / "adapter-v4").exists()
        with pytest.raises(ValueError, match="got full weights .*takes LoRA adapters"):
            await b.update_weights(base, 5)
        b.lora_name = "adapter-v9"  # a name the server never loaded
        with pytest.raises(SGLangRefused, match="HTTP 400.*never been loaded: adapter-v9"):
            await b.generate_group("r4", PROMPT, 1, {"max_new_tokens": 2})
        b.lora_name = "adapter-v1"  # unloaded, and its files are gone: SGLang's reload fails
        with pytest.raises(SGLangRefused, match="Failed to implicitly load LoRA adapter adapter-v1"):
            await b.generate_group("r5", PROMPT, 1, {"max_new_tokens": 2})
        b.lora_name = "adapter-v3"
        (s,) = await b.generate_group("r6", PROMPT, 1, {"max_new_tokens": 2})
        assert s.versions == [3, 3]

        # every LoRA body the backend sent is one sglang 0.5.23's request classes accept (where its source is)
        try:
            import test_sglang_backend_contract as contract
        except pytest.skip.Exception:
            contract = None
        if contract is not None:
            routes = contract.real_routes()
            used = {p: routes[p][1] for p in ("/load_lora_adapter", "/unload_lora_adapter", "/update_weight_version")}
            classes = contract.io_struct_classes(set(used.values()))
            for path, cls in used.items():
                for c in await calls(b, path):
                    contract.check_body(classes[cls], c["body"])
            contract.load_api_types().GenerateRequest.from_json_value((await calls(b, "/generate"))[-1]["body"])
    finally:
        root = b.adapters.root
        await b.close()
    assert not root.exists()


def test_a_lora_job_launches_its_servers_with_enable_lora_and_forms_no_weight_group(tmp_path):
    from actors.generator.sglang.backend import make_sglang_backend
    from launcher.config import load_config
    from launcher.job.builders.learner import sglang_weight_sync
    from launcher.job.plan import gpu_note
    from launcher.job.spawn import ProcessSpec
    from policies.settings import ConfigError
    over = ["actors.generator.backend=sglang", "rollout.interrupt_on_update=false",
            "model.lora={r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj]}"]
    cfg = load_config(None, over)  # no pause needed: requests in flight keep the adapter they named
    assert sglang_weight_sync(cfg) is None
    cfg.actors.generator.sglang_adapter_dir = str(tmp_path / "shared")
    b = make_sglang_backend(cfg.actors.generator, model_path="/m", step=3, seed=cfg.seed, request_timeout=60,
                            interrupt_on_update=False, lora=cfg.model.lora)
    argv = launch_argv(b._server.cfg)
    assert argv[argv.index("--enable-lora"):][:8] == ["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules",
                                                      "q_proj", "k_proj", "v_proj", "o_proj"]
    assert b.capabilities["weights"] == "adapter" and b.adapters.lora == cfg.model.lora
    assert b.adapters.root.parent == tmp_path / "shared"  # sglang_adapter_dir: a directory of its own in it
    b.adapters.close()
    assert not b.adapters.root.exists()
    spec = ProcessSpec("generator-0", "generator", [], None, {"CUDA_VISIBLE_DEVICES": "1"})
    assert gpu_note(cfg, spec, None).endswith("(tp 1, --enable-lora --max-lora-rank 8)")
    with pytest.raises(ValueError, match=r"model.lora.target_modules: SGLang 0.5.23 serves no adapter on \['attn'\]"):
        SGLangLaunch(model_path="/m", port=1, lora_rank=8, lora_target_modules=("attn",))
    with pytest.raises(ConfigError, match="rollout.interrupt_on_update: false"):
        load_config(None, over[:2])  # full weights over the group still need the pause
