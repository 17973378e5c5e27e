"""The learner's process: the learner (plain, rank 0 of actors.learner.ranks, or simulated) and the
weight broadcaster beside it, which takes the learner's weights by reference."""
from __future__ import annotations

import functools
import logging

from actors.base import Actor
from launcher.config.schema import ExperimentConfig
from launcher.job.compute import device_for, dtype_for, learner_recomputes
from launcher.job.learner_state import join_ranks, learner_state
from launcher.job.start import Start, run_dir

log = logging.getLogger("launcher.job.builders.learner")


def sglang_weight_sync(cfg: ExperimentConfig):
    """The learner's weight-update session with SGLang servers (None unless their weights go
    over torch.distributed; a LoRA job's servers load adapters from files): nccl where the learner runs
    on CUDA, gloo elsewhere."""
    g = cfg.actors.generator
    if g.backend != "sglang" or g.sglang_weights != "distributed" or cfg.model.lora is not None:
        return None
    from actors.weights.sglang_distributed import SGLangWeightSync
    backend = "nccl" if device_for(cfg) == "cuda" else "gloo"
    log.info("sglang weights: over torch.distributed (%s) from the learner's process", backend)
    return SGLangWeightSync(backend=backend, master_address=g.sglang_master_address)


def settings(cfg: ExperimentConfig, start: Start, resumed: dict | None):
    """The learner's LearnerSettings from train.*, the start and the recompute decision (logged)."""
    from actors.learner.learner import LearnerSettings
    recompute, why = learner_recomputes(cfg)
    log.info("proximal logprobs: %s (%s)", "recomputed by the learner" if recompute else "the generator's", why)
    return LearnerSettings(run_dir=run_dir(cfg), total_steps=cfg.train.steps, start_step=start.step,
                           recompute=recompute, checkpoint_every=cfg.train.checkpoint_every,
                           keep_checkpoints=cfg.train.keep_checkpoints, resumed=resumed)


def build(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
          instances: int = 1) -> list[Actor]:
    from actors.learner.learner import Learner
    from actors.weights.broadcaster import WeightBroadcaster
    from policies.model.loading import load_tokenizer
    model, opt, ref_model, resumed = learner_state(cfg, start)
    kind, ranked = Learner, {}
    if cfg.actors.learner.ranks > 1:  # the bus side reads rank 0's whole copy: broadcaster, eval, checkpoints
        from actors.learner.ranks import RankedLearner
        ranks, world, sharded_opt, (model, opt) = join_ranks(cfg, model, opt)
        kind, ranked = RankedLearner, {"ranks": ranks, "world": world, "sharded_optimizer": sharded_opt}
    if cfg.actors.learner.mode == "sim":
        from actors.learner.sim import SimLearner
        kind = functools.partial(SimLearner, cost=cfg.sim)
    tok = load_tokenizer(start.model_path)
    periodic_eval = None
    if cfg.eval.every:
        from actors.learner.periodic_eval import PeriodicEval
        from launcher.job.data import load_test_problems
        periodic_eval = PeriodicEval(load_test_problems(cfg), cfg.eval, start.model_path, tok, device=device_for(cfg),
                                     dtype=dtype_for(cfg, "generator"), seed=cfg.seed,
                                     directive=cfg.data.prompt_directive, system_prompt=cfg.data.system_prompt)
    learner = kind(bus_address, model=model, tokenizer=tok, optimizer=opt, ppo=cfg.ppo,
                   settings=settings(cfg, start, resumed), name=name, ref_model=ref_model,
                   periodic_eval=periodic_eval, **ranked, **bus_kwargs)
    broadcaster = WeightBroadcaster(bus_address, weights=learner.weights(), version=start.step,
                                    sglang=sglang_weight_sync(cfg), **bus_kwargs)
    return [learner, broadcaster]
