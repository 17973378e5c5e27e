"""The RL job with two learner ranks (a gloo group) through every actor: checkpoint, --resume, faults."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launcher.job.metrics import read_metrics
from tests.launch_util import dataset, expected_qids, launch, tiny_overrides
from tests.live_job import LiveProcess, descendants

pytestmark = pytest.mark.timeout(900)  # two jobs in one test; every wait inside has its own deadline

# without advantage normalisation the all-wrong rewards of a random model still move the weights
RANKS = {"actors.learner.ranks": 2, "actors.learner.collective_timeout": 20.0, "bus.heartbeat_interval": 0.5,
         "ppo.normalize_advantages": "false"}


def test_two_learner_ranks_train_checkpoint_and_resume(tmp_path):
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    args = ["--quiet", "--config", "configs/tiny.yaml"]
    first = launch(args + tiny_overrides(run_dir, train, **RANKS, **{"train.steps": 2}), timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = launch(args + tiny_overrides(run_dir, train, **RANKS, **{"train.steps": 3}) + ["--resume"], timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "steps 2..3" in resumed.stdout

    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1, 2]
    for m in records:  # the prompts of each step, resumed or not, each trained once with its G samples
        expected = expected_qids(train, batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected and len(m["qids"]) == 2 * len(expected)
        assert m["n_micro_batches"] >= 1 and m["grad_norm"] > 0 and m["generators_updated"] == 1
    rank1 = (run_dir / "logs" / "learner-rank-1.log").read_text()
    assert "learner rank 1 of 2 joined the group" in rank1
    for step in (0, 1, 2):  # rank 1 trained its share of every step, the resumed one included
        assert re.search(rf"learner rank 1: step {step} done", rank1), rank1[-2000:]

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-000003" / "model")
    base = load_file(str(run_dir / "base-model" / "model.safetensors"))
    trained = model.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in base.items() if k in trained)


def _rank_pid(launcher_pid: int, name: str) -> int:
    for pid in descendants(launcher_pid):
        try:
            if f"--name\0{name}\0" in open(f"/proc/{pid}/cmdline").read():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process named {name} under the launcher")


def _signal_rank_1_mid_step(tmp_path, sig: int, wait_s: float, **overrides):
    """The two-rank job; `sig` to rank 1 once it trains step 1, then up to `wait_s` for the launcher to end.
    Returns (job, its exit code, seconds from the signal to the end, processes of the job left running)."""
    job = LiveProcess.launcher("--config", "configs/tiny.yaml",
                               *tiny_overrides(tmp_path / "run", dataset(tmp_path),
                                               **{**RANKS, "train.steps": 4, **overrides}))
    try:
        job.wait_for(r"\[learner-rank-1\] .*step 1: training its share", 300)
        os.kill(_rank_pid(job.proc.pid, "learner-rank-1"), sig)
        sent = time.monotonic()
        rc = job.wait(wait_s)
        took = time.monotonic() - sent
        left = descendants(job.proc.pid)
    finally:
        job.stop(signal.SIGKILL)
    return job, rc, took, left


def test_sigkill_of_learner_rank_1_mid_step_stops_the_run_naming_the_rank(tmp_path):
    job, rc, took, left = _signal_rank_1_mid_step(tmp_path, signal.SIGKILL, 60)
    assert rc != 0, job.output(40)
    assert re.search(r"learner-rank-1 exited with code -9", job.output()), job.output(40)
    assert took < 40, f"the launcher took {took:.1f} s to stop"
    assert not left, f"processes left running: {left}"
    print(f"rank 1 SIGKILLed: the launcher exited {took:.1f} s later")


def test_a_frozen_learner_rank_fails_the_collective_within_its_timeout(tmp_path):
    """SIGSTOP rank 1 mid-step: its process lives, so only actors.learner.collective_timeout ends rank 0's wait."""
    job, rc, took, left = _signal_rank_1_mid_step(tmp_path, signal.SIGSTOP, 90,
                                                  **{"actors.learner.collective_timeout": 8.0})
    assert rc != 0, job.output(40)
    assert re.search(r"learner rank 0 of 2: step [12] failed .*collective_timeout=8", job.output()), job.output(60)
    assert 8 <= took < 60, f"the launcher stopped {took:.1f} s after the freeze"
    assert not left, f"processes left running: {left}"
    print(f"rank 1 frozen: the launcher exited {took:.1f} s later")


def test_a_dead_learner_rank_restarts_the_run_from_its_last_checkpoint(tmp_path):
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    job = LiveProcess.launcher("--config", "configs/tiny.yaml", *tiny_overrides(run_dir, train, **RANKS, **{
        "train.steps": 4, "train.checkpoint_every": 1, "train.on_learner_death": "restart"}))
    try:
        job.wait_for(r"\[learner-rank-1\] .*step 2: training its share", 300)  # steps 0-1 checkpointed
        os.kill(_rank_pid(job.proc.pid, "learner-rank-1"), signal.SIGKILL)
        job.wait_for(r"learner-rank-1 exited with code -9.*restarting from the last checkpoint \(1/3\)", 30)
        job.wait_for(r"\[launcher\] mode: .*steps 2\.\.4", 60)
        assert job.wait(300) == 0, job.output(40)
    finally:
        job.stop(signal.SIGKILL)
    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1, 2, 3]
    for m in records:
        expected = expected_qids(train, batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected and len(m["qids"]) == 2 * len(expected)
