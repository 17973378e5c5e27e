"""Rollout workers (rollout.workflow): the workflow's processes under actors.rollout's limits, and the
settings of its sessions (rollout.max_turns, max_trajectory_tokens, workflow_timeout)."""
from __future__ import annotations

from actors.base import Actor
from launcher.config.schema import ExperimentConfig
from launcher.job.start import Start


def build(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
          instances: int = 1) -> list[Actor]:
    from actors.rollout.actor import RolloutSettings, RolloutWorker
    from actors.rollout.pool import WorkflowPool
    r, w = cfg.rollout, cfg.actors.rollout
    if r.workflow is None:
        raise ValueError("a rollout worker needs rollout.workflow (package.module:function), got null")
    pool = WorkflowPool(r.workflow, workers=w.workers, timeout=r.workflow_timeout, memory_limit_mb=w.memory_limit_mb)
    settings = RolloutSettings(max_turns=r.max_turns, max_trajectory_tokens=r.max_trajectory_tokens,
                               workflow_timeout=r.workflow_timeout, directive=cfg.data.prompt_directive,
                               system_prompt=cfg.data.system_prompt)
    return [RolloutWorker(name, bus_address, pool=pool, settings=settings, **bus_kwargs)]
