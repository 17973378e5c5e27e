"""The verifier: verifier.* (process pool, per-answer deadline) and the reward section."""
from __future__ import annotations

from actors.base import Actor
from launcher.config.schema import ExperimentConfig
from launcher.job.start import Start


def build(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
          instances: int = 1) -> list[Actor]:
    from actors.verifier import Verifier
    return [Verifier(name, bus_address, workers=cfg.verifier.workers, timeout=cfg.verifier.timeout,
                     reward_cfg=cfg.reward, **bus_kwargs)]
