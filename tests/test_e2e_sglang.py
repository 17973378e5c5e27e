"""The RL loop with `actors.generator.backend: sglang`: the generator launches an SGLang server
(the fake, tests/fake_sglang.py, standing in for `python -m sglang.launch_server` through
`actors.generator.sglang_command`), waits for /health before joining the bus, and the learner's
broadcaster sends every version into the server over a real gloo group (torch.distributed), as
it would over NCCL into a real server."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from launcher.job.metrics import read_metrics
from tests.launch_util import dataset, expected_qids, launch, tiny_overrides

FAKE = Path(__file__).with_name("fake_sglang.py")


def test_three_rl_steps_with_an_sglang_generator_and_weights_over_gloo(tmp_path):
    train = dataset(tmp_path)
    run_dir, dump = tmp_path / "run", tmp_path / "served"
    overrides = {
        "train.steps": 3, "ppo.normalize_advantages": "false",
        "actors.generator.backend": "sglang",
        "actors.generator.sglang_command": json.dumps([sys.executable, str(FAKE)]),
        "actors.generator.sglang_args": json.dumps(["--dump-weights", str(dump), "--token-delay", "0.001"]),
        "actors.generator.sglang_health_timeout": 60,
    }
    r = launch(["--quiet", "--config", "configs/tiny.yaml", *tiny_overrides(run_dir, train, **overrides)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1, 2]
    assert records[-1]["version"] == 3
    assert all(m["generators_updated"] == 1 and m["generators_failed"] == 0 for m in records)
    for m in records:  # every prompt of the step trained exactly once, G samples each
        expected = expected_qids(train, batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected
        assert len(m["qids"]) == 2 * len(expected)

    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "sglang weights: over torch.distributed (gloo)" in learner_log
    assert re.search(r"forming weight-update group weight_update_group_\d+_[0-9a-f]+ at tcp://", learner_log)
    assert "weights v3 reached 1 sglang server(s) over gloo" in learner_log
    gen_log = next((run_dir / "logs").glob("generator*.log")).read_text()
    assert "is healthy after" in gen_log
    assert gen_log.index("is healthy after") < gen_log.index("started on tcp://")  # /health, then the bus

    # what the server holds is what crossed the group: the learner's final weights, version 3
    served = dump / "weights.safetensors"
    with safe_open(str(served), "pt") as f:
        assert f.metadata()["version"] == "3"
    got = load_file(str(served))
    final = load_file(str(run_dir / "checkpoints" / "step-000003" / "model" / "model.safetensors"))
    base = load_file(str(run_dir / "base-model" / "model.safetensors"))
    assert set(final) <= set(got)
    for k, v in final.items():
        assert torch.equal(got[k], v), k
    assert any(not torch.equal(base[k], final[k]) for k in final), "three PPO steps changed nothing"
