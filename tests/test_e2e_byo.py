"""Bring your own data and reward: a tiny job on a GSM8K-style parquet through the config keys alone."""
from __future__ import annotations

import math
import sys

import pytest

from launcher.job.metrics import read_metrics
from policies.data.records import Layout
from tests.launch_util import ROOT, expected_qids, launch, tiny_overrides

sys.path.insert(0, str(ROOT / "examples"))
import make_gsm8k_parquet  # noqa: E402

FAILING = '''
def fails_on_medium(prompt, response, reference, extra):
    if extra["difficulty"] == "medium":
        raise RuntimeError("medium rows are not graded")
    return 0.0
'''


GSM8K = Layout(prompt_key="question", answer_key="answer", answer_format="gsm8k")


def test_gsm8k_parquet_with_the_example_reward_and_a_failing_one(tmp_path):
    train = make_gsm8k_parquet.write(tmp_path / "gsm8k" / "train.parquet", n=12)
    bad = tmp_path / "failing_reward.py"
    bad.write_text(FAILING)
    fns = ("[{fn: examples/gsm8k_reward.py:correct_number, weight: 1.0}, "
           "{fn: examples/gsm8k_reward.py:brevity, weight: 0.1}, "
           f"{{fn: '{bad}:fails_on_medium', weight: 1.0}}]")
    run_dir = tmp_path / "run"
    r = launch(["--quiet", "--config", "configs/tiny.yaml", *tiny_overrides(run_dir, train, **{
        "train.steps": 2, "data.prompt_key": "question", "data.answer_key": "answer",
        "data.answer_format": "gsm8k", "data.system_prompt": "You are a careful solver.",
        "reward.fns": fns, "reward.on_error": -7.0,
        "ppo.warmup_steps": 2, "ppo.lr_schedule": "cosine", "ppo.normalize_advantages": "group",
        "ppo.kl_coef": 0.05, "data.test": str(train), "eval.every": 2, "eval.k": 1, "eval.max_new_tokens": 4})])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    rows = make_gsm8k_parquet.rows(12)
    medium = {f"train.parquet:{i}" for i, row in enumerate(rows) if row["difficulty"] == "medium"}
    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1]
    assert [m["lr"] for m in records] == [5e-5, 1e-4]          # tiny.yaml's 1e-4, warmed up over 2 steps
    assert "eval_pass@1" not in records[0] and 0.0 <= records[1]["eval_pass@1"] <= 1.0   # eval.every: 2
    assert records[1]["eval_truncation_rate"] == 1.0             # a random model never stops within 4 tokens
    # the KL to the frozen base model is reported; at step 0 the policy is that model (fp32 rounding apart)
    assert abs(records[0]["ref_kl"]) < 1e-3 and all(math.isfinite(m["ref_kl"]) for m in records)
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "KL penalty: kl_coef 0.05 (k1) against a frozen reference model" in learner_log
    for m in records:
        qids = expected_qids(train, batch_prompts=2, seed=1, step=m["step"], layout=GSM8K)
        assert sorted(set(m["qids"])) == qids
        n, n_err = len(m["qids"]), sum(q in medium for q in m["qids"])
        assert m["reward_errors"] == n_err        # counted per response, per step
        # the users' rewards, not the boxed +-5: correct_number in {-1, 1}, brevity in [0, 0.1], -7 on error
        lo, hi = (n_err * -7.0 + (n - n_err) * -1.0) / n, (n_err * -7.0 + (n - n_err) * 1.1) / n
        assert lo - 1e-6 <= m["reward_mean"] <= hi + 1e-6
    assert any(m["reward_errors"] for m in records) and not all(m["reward_errors"] == len(m["qids"]) for m in records)
    log = "".join(p.read_text() for p in (run_dir / "logs").glob("verifier*.log"))
    assert "RuntimeError: medium rows are not graded" in log


def test_an_unimportable_reward_function_stops_the_launch_naming_the_key(tmp_path, capsys):
    from launcher.__main__ import main     # in this process: the launch stops before any process starts
    train = make_gsm8k_parquet.write(tmp_path / "train.parquet", n=4)
    argv = ["--quiet", "--config", str(ROOT / "configs/tiny.yaml"), *tiny_overrides(tmp_path / "run", train, **{
        "reward.fns": f"[{{fn: '{ROOT}/examples/gsm8k_reward.py:no_such_function'}}]"})]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "reward.fns[0].fn: " in err and "has no attribute 'no_such_function'" in err
    assert not (tmp_path / "run" / "logs").exists()     # nothing started


def test_eval_every_needs_data_test(tmp_path):
    from launcher.config import ConfigError, check_trainable, load_config
    train = make_gsm8k_parquet.write(tmp_path / "train.parquet", n=2)
    with pytest.raises(ConfigError, match=r"^eval\.every: 3 needs data\.test"):
        check_trainable(load_config(overrides=[f"data.train={train}", "eval.every=3"]))
