"""What every learner rank loads before it trains: the model, its optimizer (restored and checked on a
resume), the KL reference model; with actors.learner.ranks > 1 the group it joins and the shards it
trains. Rank 0 builds the bus's learner from it (launcher.job.builders.learner); ranks > 0 `serve_rank`."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from actors.learner import checkpoint
from launcher.config.schema import ExperimentConfig
from launcher.job.compute import device_for, dtype_for, learner_recomputes
from launcher.job.start import Start, base_model_path

log = logging.getLogger("launcher.job.learner_state")


def learner_state(cfg: ExperimentConfig, start: Start):
    """The learner's model, optimizer (restored and checked against the checkpoint's digest on a resume),
    KL reference model (or None) and the `resumed` record (or None): what every learner rank loads."""
    from policies.model.loading import load_model
    from policies.train.ppo import make_optimizer
    from policies.model.precision import resolve_bf16
    bf16 = resolve_bf16(cfg.ppo.bf16, device_for(cfg))  # fp32 masters, bf16 compute (make_optimizer)
    if bf16 and cfg.actors.learner.ranks > 1:
        from launcher.config.schema import RANKS_BF16, ConfigError
        raise ConfigError(RANKS_BF16.format(ranks=cfg.actors.learner.ranks, bf16=f"{cfg.ppo.bf16} (bf16 here)"))
    model = load_model(start.model_path, dtype=dtype_for(cfg), device=device_for(cfg),
                       compute_dtype=torch.bfloat16 if bf16 else None)
    if cfg.model.lora is not None:  # only the adapter trains (the optimizer takes what requires grad)
        from policies.model.lora import wrap
        wrap(model, cfg.model.lora)
        trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model.lora: r %d alpha %g on %s: %.2f M of %.2f M parameters train", cfg.model.lora.r,
                 cfg.model.lora.alpha, ",".join(cfg.model.lora.target_modules), trains / 1e6,
                 sum(p.numel() for p in model.parameters()) / 1e6)
        if bf16:  # the frozen base computes in bf16 too; it needs no fp32 masters, it never moves
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    opt = make_optimizer(model, cfg.ppo)
    if cfg.ppo.gradient_checkpointing:
        from policies.model.loading import checkpoint_layers
        checkpoint_layers(model)
    if cfg.ppo.compile:
        from policies.model.loading import compile_layers
        compile_layers(model)
    resumed = None
    if start.checkpoint:
        resumed = _restore(Path(start.checkpoint), start.step, model, opt)
    ref_model = None
    if cfg.ppo.kl_coef > 0:   # the KL's reference is the run's base model, also after a resume
        ref_model = load_model(base_model_path(cfg), dtype=dtype_for(cfg), device=device_for(cfg))
        ref_model.requires_grad_(False).eval()
        log.info("KL penalty: kl_coef %g (%s) against a frozen reference model, %s", cfg.ppo.kl_coef,
                 cfg.ppo.kl_estimator, base_model_path(cfg))
    return model, opt, ref_model, resumed


def _restore(ckpt: Path, step: int, model, opt) -> dict:
    """The optimizer and RNG state of ``ckpt`` (and a LoRA run's adapter), checked against its digest -> the
    `resumed` record."""
    checkpoint.restore_adapter(ckpt, model)
    checkpoint.restore_optimizer(ckpt, opt)
    checkpoint.restore_rng(ckpt)
    saved = checkpoint.load_state(ckpt).get("digest")
    digest = checkpoint.state_digest(model, opt)
    if saved is not None and digest != saved:
        raise checkpoint.CheckpointError(f"checkpoint {ckpt}: the model and optimizer loaded from it "
                                         f"differ from what was saved (digest {digest[:12]} != {saved[:12]})")
    log.info("resumed from %s at step %d; model+optimizer digest %s %s", ckpt, step, digest[:12],
             "matches the saved one" if saved else "(the checkpoint records none to compare)")
    return {"checkpoint": str(ckpt), "step": step, "digest": digest}


def join_ranks(cfg: ExperimentConfig, model, optimizer):
    """Join the learner group (actors.learner.ranks) and shard the loaded model and optimizer state over
    it (FSDP2, policies.train.data_parallel) -> (ranks, world, the sharded optimizer, rank 0's whole copy as
    (model, optimizer) or None elsewhere). The copy's optimizer is filled from the shards at checkpoints."""
    import copy
    from actors.learner.ranks import join
    from policies.train.data_parallel import World, optimizer_state_by_name
    from policies.train.ppo import make_optimizer
    ranks = join(device_for(cfg), cfg.actors.learner.collective_timeout)
    whole = None
    if ranks.rank == 0:
        copied = copy.deepcopy(model)
        whole = (copied, make_optimizer(copied, cfg.ppo))
    state = optimizer_state_by_name(model, optimizer) if optimizer.state else None  # resumed
    try:
        world = World.fsdp(model)
        sharded = make_optimizer(model, cfg.ppo)  # over the shards
        if state is not None:
            world.load_optimizer_state(sharded, state)
    except RuntimeError as exc:
        raise ranks.fail("sharding the model", exc) from exc
    return ranks, world, sharded, whole


def serve_rank(cfg: ExperimentConfig, start: Start) -> None:
    """A learner rank > 0: load what rank 0 loads, then train its share of rank 0's steps until told to stop."""
    from actors.learner.ranks import serve
    torch.manual_seed(cfg.seed)
    model, opt, ref_model, _ = learner_state(cfg, start)
    ranks, world, sharded, _ = join_ranks(cfg, model, opt)
    serve(ranks, world, optimizer=sharded, ppo=cfg.ppo, recompute=learner_recomputes(cfg)[0], ref_model=ref_model)
