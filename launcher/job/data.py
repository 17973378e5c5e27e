"""The training data as the config's data.* keys describe it (read by the sampler's builder, the
preflight of `python -m launcher`, and the periodic eval)."""
from __future__ import annotations

from launcher.config.schema import ExperimentConfig


def data_layout(cfg: ExperimentConfig):
    """How rows of data.train are read (policies.data.dataset.Layout) from the data.* keys."""
    from policies.data.dataset import Layout
    d = cfg.data
    return Layout(prompt_key=d.prompt_key, answer_key=d.answer_key, id_key=d.id_key,
                  answer_format=d.answer_format, split=d.split)


def load_train_problems(cfg: ExperimentConfig):
    """data.train as `Problem`s (raises policies.data.dataset.DatasetError naming the file and the row)."""
    from policies.data.dataset import load_problems
    return load_problems(cfg.data.train, skip_malformed=cfg.data.skip_malformed, layout=data_layout(cfg))
