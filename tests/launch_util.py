"""Helpers for tests that run whole jobs: a small dataset, the launcher as a real subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from policies.data.order import batch_indices
from policies.data.dataset import load_problems
from launcher.mathdata import make_dataset

ROOT = Path(__file__).resolve().parent.parent


def dataset(tmp: Path, n_train: int = 24) -> Path:
    out = tmp / "data"
    make_dataset(out, n_train=n_train, n_test=4, n_sft=4, seed=0)
    return out / "train.jsonl"


def tiny_overrides(run_dir: Path, train: Path, **extra) -> list[str]:
    sets = {"run_dir": str(run_dir), "data.train": str(train), "data.test": "null", "bus.heartbeat_interval": 1.0, **extra}
    out = []
    for k, v in sets.items():
        out += ["-o", f"{k}={v}"]
    return out


def launch(args: list[str], *, timeout: float = 240, wait: bool = True, **kw):
    argv = [sys.executable, "-m", "launcher", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BOBA_TORCH_THREADS": "1"}
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, **kw)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def expected_qids(train: Path, batch_prompts: int, seed: int, step: int, layout=None) -> list[str]:
    problems = load_problems(train, layout=layout)
    return sorted(problems[i].id for i in batch_indices(len(problems), batch_prompts, seed, step))
