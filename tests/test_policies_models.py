"""Model loading, GGUF conversion, tiny models and atomic checkpoints."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from policies.model import loading as models
from policies.model.loading import (ModelPathError, NotTrainableError, assert_trainable, load_model, load_tokenizer,
                             save_checkpoint, smollm2_dir, smollm2_gguf_path, tiny_model)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_dir())


def test_tiny_model_is_small_deterministic_and_uses_smollm2_vocab(tokenizer):
    a, b, c = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=1)
    assert a.config.vocab_size == len(tokenizer) == 49152
    assert a.config.hidden_size == 64 and a.config.num_hidden_layers == 2
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert tiny_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1).config.hidden_size == 32
    assert_trainable(a)  # does not raise


def test_checkpoint_round_trip_is_bitwise_and_loads_with_transformers(tmp_path, tokenizer):
    model = tiny_model(seed=3)
    out = save_checkpoint(model, tokenizer, tmp_path / "step_1")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # readable by transformers 4.x too

    for loaded in (load_model(out), AutoModelForCausalLM.from_pretrained(out)):
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    ids = torch.tensor([[1, 5, 9, 300]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert load_tokenizer(out)("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_overwriting_a_checkpoint_replaces_it_and_leaves_no_temp_dirs(tmp_path):
    dest = tmp_path / "latest"
    save_checkpoint(tiny_model(seed=0), None, dest)
    save_checkpoint(tiny_model(seed=1), None, dest)
    loaded = load_model(dest)
    assert torch.equal(loaded.model.embed_tokens.weight, tiny_model(seed=1).model.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_crash_mid_save_leaves_previous_checkpoint_usable(tmp_path, monkeypatch):
    dest = tmp_path / "latest"
    save_checkpoint(tiny_model(seed=0), None, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    crashing = tiny_model(seed=1)

    def half_written_then_crash(path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(crashing, "save_pretrained", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(crashing, None, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert torch.equal(load_model(dest).model.embed_tokens.weight, tiny_model(seed=0).model.embed_tokens.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_bad_model_paths_error_clearly(tmp_path):
    with pytest.raises(ModelPathError, match=r"does not exist"):
        load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPathError, match=r"empty.*missing config\.json, model\.safetensors"):
        load_model(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match=r"missing model\.safetensors") as e:
        load_model(empty)
    assert "config.json" not in str(e.value).split("missing")[1]
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    with pytest.raises(ModelPathError, match=r"weights\.bin.*is a file"):
        load_model(afile)
    with pytest.raises(ModelPathError, match=r"missing\.gguf.*does not exist"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelPathError, match=r"no tokenizer"):
        load_tokenizer(empty)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_root() == models.Path.home() / ".cache" / "boba-actors"


def test_quantized_flag_refuses_training_and_saving():
    from policies.train.ppo import PPOConfig, make_optimizer

    model = tiny_model()
    setattr(model, models.QUANTIZED_ATTR, "/x/model.Q4_1.gguf")
    with pytest.raises(NotTrainableError, match=r"model\.Q4_1\.gguf.*convert"):
        assert_trainable(model)
    with pytest.raises(NotTrainableError):
        make_optimizer(model, PPOConfig())


@pytest.mark.slow
def test_smollm2_gguf_is_refused_and_converted_copy_matches_and_generates(tmp_path):
    from policies.train.ppo import PPOConfig, make_optimizer

    converted = smollm2_dir()
    assert smollm2_dir() == converted  # cached: no second conversion
    assert not (converted / "config.json").read_text().count("quantization_config")
    gguf_model = load_model(smollm2_gguf_path())
    with pytest.raises(NotTrainableError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        make_optimizer(gguf_model, PPOConfig())
    with pytest.raises(NotTrainableError):
        save_checkpoint(gguf_model, None, tmp_path / "bad")

    model, tok = load_model(converted), load_tokenizer(converted)
    assert_trainable(model)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = enc["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=1e-5)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "5" in text, text
    assert os.listdir(converted.parent).count(converted.name) == 1


@pytest.mark.slow
def test_two_processes_converting_at_once_convert_once(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, os\n"
        "from policies.model import loading as models\n"
        "real = models.convert_gguf\n"
        "def counted(*a, **k):\n"
        "    open(os.path.join(sys.argv[1], 'conversions.log'), 'a').write('x')\n"
        "    return real(*a, **k)\n"
        "models.convert_gguf = counted\n"
        "print(models.smollm2_dir(sys.argv[1]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(tmp_path / models.SMOLLM2_NAME)
    assert (tmp_path / "conversions.log").read_text() == "x"
    models.check_model_dir(outs[0])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == \
        ["conversions.log", models.SMOLLM2_NAME]


def test_flash_attention_only_for_cuda_in_bf16_or_fp16(monkeypatch):
    import importlib.util

    import torch

    from policies.model.loading import default_attn_implementation
    from policies.model.packed_attention import PACKED_SDPA
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert default_attn_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert default_attn_implementation("cuda", torch.float16) == "flash_attention_2"
    assert default_attn_implementation("cuda", torch.float32) == PACKED_SDPA  # flash kernels refuse fp32
    assert default_attn_implementation("cpu", torch.bfloat16) == PACKED_SDPA
