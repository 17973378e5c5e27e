"""The whole RL loop: six actors in separate processes on a real broker, a tiny random model."""
from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launcher.job.metrics import read_metrics
from tests.launch_util import dataset, expected_qids, launch, tiny_overrides


def run_tiny_job(tmp_path, **overrides):
    """The launcher on configs/tiny.yaml to the end: (training data, run dir, its stdout)."""
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    r = launch(["--quiet", "--config", "configs/tiny.yaml", *tiny_overrides(run_dir, train, **overrides)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return train, run_dir, r.stdout


def test_two_rl_steps_through_all_six_actors(tmp_path):
    # Without advantage normalisation the all-wrong rewards of a random model still move the weights.
    train, run_dir, out = run_tiny_job(tmp_path, **{"train.steps": 2, "ppo.normalize_advantages": "false"})
    assert "mode: synchronous (max_staleness=0)" in out

    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1]
    assert records[-1]["version"] == 2
    assert all(m["generators_updated"] == 1 and m["generators_failed"] == 0 for m in records)
    for m in records:  # every prompt of the step trained exactly once, G samples each
        expected = expected_qids(train, batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected
        assert len(m["qids"]) == 2 * len(expected)
        assert m["max_staleness_seen"] == 0
        assert "behav_logprob_gap" not in m  # fp32 sampling for an fp32 learner: the generator's logprobs stand

    ckpt = run_dir / "checkpoints" / "step-000002" / "model"
    model = AutoModelForCausalLM.from_pretrained(ckpt)  # a real HF checkpoint
    base = load_file(str(run_dir / "base-model" / "model.safetensors"))
    trained = model.state_dict()
    changed = [k for k, v in base.items() if k in trained and not torch.equal(v, trained[k])]
    assert changed, "two PPO steps left every weight unchanged"
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").iterdir())


def test_asynchronous_steps_train_on_recomputed_proximal_logprobs(tmp_path):
    _, run_dir, out = run_tiny_job(tmp_path, **{"train.steps": 3, "rollout.max_staleness": 1})
    assert "mode: asynchronous (max_staleness=1)" in out
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "proximal logprobs: recomputed by the learner (max_staleness=1" in learner_log

    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1, 2]
    assert all(m["max_staleness_seen"] <= 1 for m in records)
    # rollout.interrupt_on_update (default true): sequences an update reached are counted, versions per sequence
    assert all(m["interrupted_seqs"] >= 0 and 1 <= m["versions_per_seq_max"] <= 2 for m in records)
    # the learner's logprobs under its own weights, against the generator's: a gap exists and is reported
    assert all(0.0 <= m["behav_logprob_gap"] < 10.0 for m in records)
    assert any(m["behav_logprob_gap"] > 0.0 for m in records)
