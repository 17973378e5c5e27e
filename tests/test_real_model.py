"""One full RL step on the real SmolLM2-135M-Instruct: six actors in separate processes, real weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launcher.job.metrics import read_metrics
from policies.model.loading import smollm2_dir
from tests.launch_util import dataset, expected_qids, launch, tiny_overrides

pytestmark = pytest.mark.slow


def test_one_rl_step_on_smollm2_reaches_the_generator_and_saves_a_loadable_checkpoint(tmp_path):
    base_dir = smollm2_dir()  # converted once from the bundled GGUF, then cached
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    # Without advantage normalisation even a group whose rewards are all equal moves the weights.
    overrides = tiny_overrides(run_dir, train, **{
        "model.path": "smollm2", "train.steps": 1, "rollout.batch_prompts": 2, "rollout.group_size": 2,
        "rollout.max_new_tokens": 24, "ppo.normalize_advantages": "false"})
    r = launch(["--quiet", "--config", "configs/tiny.yaml", *overrides], timeout=170)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    [m] = read_metrics(run_dir)
    assert m["step"] == 0
    assert m["version"] == 1 and m["generators_updated"] == 1 and m["generators_failed"] == 0
    assert sorted(set(m["qids"])) == expected_qids(train, batch_prompts=2, seed=1, step=0)
    assert len(m["qids"]) == 4  # 2 prompts x 2 samples, each trained once
    assert 4 <= m["response_tokens"] <= 4 * 24
    assert m["reward_mean"] in (-5.0, -2.5, 0.0, 2.5, 5.0)  # mean of four +-5 rewards

    ckpt = run_dir / "checkpoints" / "step-000001" / "model"
    model = AutoModelForCausalLM.from_pretrained(ckpt)  # a real HF checkpoint of the trained weights
    assert model.config.num_hidden_layers == 30  # SmolLM2-135M, not the tiny test model
    trained = model.state_dict()
    base = load_file(str(base_dir / "model.safetensors"))
    common = [k for k in base if k in trained]
    assert len(common) >= len(base) - 1, "the checkpoint lacks tensors of the base model"
    assert all(torch.isfinite(trained[k]).all() for k in common)
    changed = [k for k in common if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(common) // 2, f"one PPO step changed only {len(changed)} of {len(common)} tensors"
