"""The problems the config's data.* keys name (read by the sampler's builder, the preflight of
`python -m launcher`, and the learner's periodic eval)."""
from __future__ import annotations

from launcher.config.schema import ExperimentConfig


def load_train_problems(cfg: ExperimentConfig):
    """data.train as `Problem`s (raises policies.data.dataset.DatasetError naming the file and the row)."""
    return _load(cfg, cfg.data.train)


def load_test_problems(cfg: ExperimentConfig):
    """data.test as `Problem`s, read as data.train is."""
    return _load(cfg, cfg.data.test)


def _load(cfg: ExperimentConfig, path: str):
    from policies.data.dataset import load_problems
    return load_problems(path, skip_malformed=cfg.data.skip_malformed, layout=cfg.data.layout())
