"""Checkpoint files load without unpickling: a planted pickle is refused, a round trip is exact."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.learner import checkpoint
from actors.learner.checkpoint import CheckpointError
from policies.model.loading import tiny_model
from policies.train.ppo import PPOConfig, make_optimizer, train_step
from tests.test_policies_ppo import make_batch


class _RunsCode:
    """Unpickling this calls os.system: what a planted optimizer.pt / rng.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _trained(seed: int = 0):
    model = tiny_model(seed=seed)
    cfg = PPOConfig(lr=1e-3, minibatches=2)
    opt = make_optimizer(model, cfg)
    train_step(model, opt, make_batch(model), cfg)
    return model, opt


def test_resume_round_trip_restores_optimizer_and_rng_exactly(tmp_path):
    model, opt = _trained()
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    np.random.standard_normal()  # a cached gaussian is part of numpy's state too
    ckpt = checkpoint.save(tmp_path, 1, model, None, opt)
    want = (torch.rand(4), np.random.rand(4), np.random.standard_normal(), random.random(), random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)

    other, other_opt = _trained(seed=5)
    other.load_state_dict(model.state_dict())
    checkpoint.restore_optimizer(ckpt, other_opt)
    checkpoint.restore_rng(ckpt)
    got = (torch.rand(4), np.random.rand(4), np.random.standard_normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]
    assert checkpoint.state_digest(other, other_opt) == checkpoint.state_digest(model, opt)
    assert checkpoint.verify(ckpt)["step"] == 1


@pytest.mark.parametrize("name, restore", [("optimizer.pt", "restore_optimizer"), ("rng.pt", "restore_rng")])
def test_a_checkpoint_file_holding_a_code_running_pickle_is_refused(tmp_path, name, restore):
    model, opt = _trained()
    ckpt = checkpoint.save(tmp_path, 1, model, None, opt)
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, ckpt / name)
    with pytest.raises(CheckpointError, match=rf"{name} holds pickled objects .* refused") as info:
        getattr(checkpoint, restore)(ckpt, opt) if restore == "restore_optimizer" else checkpoint.restore_rng(ckpt)
    assert str(ckpt) in str(info.value)
    assert not marker.exists(), "the pickle ran"


def test_an_old_format_rng_file_is_named(tmp_path):
    model, opt = _trained()
    ckpt = checkpoint.save(tmp_path, 1, model, None, opt)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               ckpt / "rng.pt")  # how checkpoints were written before: a pickled numpy array
    with pytest.raises(CheckpointError, match=r"rng.pt holds pickled objects"):
        checkpoint.restore_rng(ckpt)


_SAVE_AND_DIE = r"""
import os, signal, sys, torch
from actors.learner import checkpoint
from actors.learner.trained_log import TrainedLog
from policies.model.loading import tiny_model
from policies.train.ppo import PPOConfig, make_optimizer
run_dir = sys.argv[1]
model = tiny_model(seed=0)
opt = make_optimizer(model, PPOConfig())
log = TrainedLog(run_dir, 0)
for step in (0, 1):
    log.record({"step": step, "qids": [f"q{step}"] * 2})
checkpoint.save(run_dir, 2, model, None, opt, keep=1)
print(checkpoint.state_digest(model, opt), flush=True)
real_replace = os.replace
def replace(src, dst):
    if str(src).endswith(".tmp"):  # the new copy about to take its place: the old one is out of the way
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
opt.step()
checkpoint.save(run_dir, 2, model, None, opt, keep=1)  # step 2 again (a CHECKPOINT request at the same step)
"""


def test_a_kill_while_saving_the_same_step_again_leaves_the_last_good_checkpoint(tmp_path):
    """keep 1, the same step saved again, SIGKILLed between the old copy's removal and the new one's
    rename: the old copy used to be removed first, leaving no checkpoint, and --resume started at step
    0 and emptied trained.jsonl."""
    import subprocess
    import sys

    from actors.learner.trained_log import TrainedLog, read_trained
    from launcher.config import load_config
    from launcher.job.start import resolve_start

    run_dir = tmp_path / "run"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE, str(run_dir)], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == -9, done.stderr[-2000:]  # killed at the injected point
    digest = done.stdout.split()[0]
    [ckpt] = checkpoint.list_checkpoints(run_dir)
    assert checkpoint.verify(ckpt)["digest"] == digest  # the first save of step 2, whole
    train = tmp_path / "train.jsonl"
    train.write_text('{"id": "q0", "prompt": "1+1?", "answer": "2"}\n')
    cfg = load_config(root / "configs" / "tiny.yaml", [f"run_dir={run_dir}", f"data.train={train}"])
    start = resolve_start(cfg, resume=True)
    assert (start.step, start.checkpoint) == (2, str(ckpt))
    TrainedLog(run_dir, start.step)  # what the resumed learner does first
    assert [r["step"] for r in read_trained(run_dir)] == [0, 1]
    model = tiny_model(seed=1)  # the learner saves step 2 again: the copy moved aside is cleared
    checkpoint.save(run_dir, 2, model, None, make_optimizer(model, PPOConfig()), keep=1)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
