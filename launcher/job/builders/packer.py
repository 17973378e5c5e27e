"""The packer: rollout.batch_prompts groups a step, from the start step on."""
from __future__ import annotations

from actors.base import Actor
from launcher.config.schema import ExperimentConfig, max_refills
from launcher.job.start import Start


def build(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
          instances: int = 1) -> list[Actor]:
    from actors.packer import Packer
    return [Packer(bus_address, batch_prompts=cfg.rollout.batch_prompts,
                   drop_uniform_groups=cfg.rollout.drop_uniform_groups,
                   dynamic_sampling=bool(cfg.rollout.dynamic_sampling), max_refills=max_refills(cfg),
                   start_step=start.step, name=name,
                   **bus_kwargs)]
