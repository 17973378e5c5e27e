"""Where and in what precision one actor process computes: its device, each role's dtype, its torch
threads, and whether the learner recomputes the proximal logprobs (which follows from the two dtypes)."""
from __future__ import annotations

import os

import torch

from launcher.config.schema import ExperimentConfig


def device_for(cfg: ExperimentConfig) -> str:
    if cfg.model.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.model.device


def dtype_for(cfg: ExperimentConfig, role: str = "learner") -> torch.dtype:
    """model.dtype, or for the generator actors.generator.dtype where set."""
    from policies.model.precision import resolve_dtype
    name = cfg.model.dtype
    if role == "generator" and cfg.actors.generator.dtype is not None:
        name = cfg.actors.generator.dtype
    return resolve_dtype(name, device_for(cfg))


def learner_recomputes(cfg: ExperimentConfig) -> tuple[bool, str]:
    """Whether the learner recomputes the proximal logprobs, and why (actors.learner.recompute_needed)."""
    from actors.learner.learner import recompute_needed
    from policies.model.precision import resolve_bf16
    learner_dtype = torch.bfloat16 if resolve_bf16(cfg.ppo.bf16, device_for(cfg)) else dtype_for(cfg)
    return recompute_needed(cfg.ppo.recompute_logprobs, max_staleness=cfg.rollout.max_staleness,
                            generator_backend=cfg.actors.generator.backend,
                            generator_dtype=dtype_for(cfg, "generator"), learner_dtype=learner_dtype)


def torch_threads() -> None:
    """BOBA_TORCH_THREADS if set; else the cores, shared among a host's BOBA_SLOTS generators."""
    slots = max(1, int(os.environ.get("BOBA_SLOTS", "1")))
    n = int(os.environ.get("BOBA_TORCH_THREADS", "0")) or max(1, (os.cpu_count() or 1) // slots)
    torch.set_num_threads(n)
