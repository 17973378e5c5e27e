"""logging.wandb: each step's scalars reach a W&B run (a stand-in module here: nothing is installed or sent)."""
from __future__ import annotations

import sys
import types

import pytest

from launcher.config import ConfigError, check_trainable, load_config
from launcher.config.schema import wandb_options
from launcher.job.metrics import MetricsError, MetricsWriter, read_metrics


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def test_metrics_reach_an_offline_wandb_run(tmp_path, fake_wandb):
    cfg = load_config(overrides=["logging.wandb=true", "name=byo"])
    opts = wandb_options(cfg)
    assert opts["mode"] == "offline" and opts["name"] == "byo" and opts["config"]["logging"]["wandb"] is True
    with MetricsWriter(tmp_path, tensorboard=False, wandb=opts) as w:
        w.write(0, {"reward_mean": -1.5, "reward_errors": 2, "groups_by_generator": {"g0": 2}, "note": "x"})
        w.write(1, {"reward_mean": 0.5})
    [run] = fake_wandb
    assert run.init["mode"] == "offline" and run.init["project"] == "boba-actors" and run.init["dir"] == str(tmp_path)
    assert run.logged == [(0, {"reward_mean": -1.5, "reward_errors": 2.0, "groups_by_generator/g0": 2.0}),
                          (1, {"reward_mean": 0.5})]
    assert run.finished and [r["step"] for r in read_metrics(tmp_path)] == [0, 1]
    assert wandb_options(load_config()) is None


def test_missing_wandb_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)       # import wandb raises ImportError
    with pytest.raises(MetricsError, match="logging.wandb: needs the wandb package"):
        MetricsWriter(tmp_path, tensorboard=False, wandb={"mode": "offline"})
    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "p", "answer": 1}\n')
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ConfigError, match=r"^logging\.wandb: true needs the wandb package"):
        check_trainable(load_config(overrides=["logging.wandb=true", f"data.train={train}"]))
