"""Turn (role, config) into live actors: the only place that knows how each actor is built.

Every actor process runs ``python -m launcher actor ROLE ...``, which lands here. The learner's
process also hosts the weight broadcaster, so the broadcaster reads the weights by reference.
"""
from __future__ import annotations

import functools
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.learner import checkpoint
from actors.base import Actor
from launcher.config.schema import ExperimentConfig
from policies.data.prompts import stop_ids

log = logging.getLogger("launcher.job.roles")


@dataclass
class Start:
    """Where a (possibly resumed) run starts: one step number for every actor, one set of weights."""
    step: int
    model_path: str
    checkpoint: str | None = None


def run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run_dir or f"runs/{cfg.name}")


def base_model_path(cfg: ExperimentConfig, *, create: bool = True) -> str:
    """The base model as a directory every process can load, made once by the launcher
    (``create=False``: only where it will be, e.g. for --dry-run)."""
    from policies.model.loading import SMOLLM2_NAME, cache_root, save_checkpoint, smollm2_dir, tiny_model
    if cfg.model.path == "smollm2":
        return str(smollm2_dir()) if create else str(cache_root() / SMOLLM2_NAME)
    if cfg.model.path == "tiny":
        out = run_dir(cfg) / "base-model"
        if create and not (out / "config.json").exists():
            from policies.model.loading import load_tokenizer
            save_checkpoint(tiny_model(seed=cfg.seed), load_tokenizer(smollm2_dir()), out)
        return str(out)
    return cfg.model.path


def resolve_start(cfg: ExperimentConfig, resume: bool) -> Start:
    """Step 0, or with ``resume`` the newest checkpoint that is whole (a damaged one is skipped, named).

    Raises CheckpointError when there are checkpoints but none is usable: starting over from step 0
    would silently throw the run's progress away.
    """
    if resume:
        found = checkpoint.list_checkpoints(run_dir(cfg))
        damaged = []
        for ckpt in reversed(found):
            try:
                state = checkpoint.verify(ckpt)
            except checkpoint.CheckpointError as exc:
                log.warning("--resume: skipping a damaged checkpoint: %s", exc)
                damaged.append(str(exc))
                continue
            if damaged:
                log.warning("--resume: falling back to %s", ckpt)
            return Start(int(state["step"]), str(ckpt / "model"), str(ckpt))
        if damaged:
            raise checkpoint.CheckpointError("--resume: no usable checkpoint under "
                                             f"{run_dir(cfg) / 'checkpoints'}: " + "; ".join(damaged))
        log.warning("--resume: no checkpoint under %s, starting from step 0", run_dir(cfg))
    return Start(0, base_model_path(cfg))


def load_train_problems(cfg: ExperimentConfig):
    """data.train as `Problem`s (raises policies.data.dataset.DatasetError naming the file and the row)."""
    from policies.data.dataset import load_problems
    return load_problems(cfg.data.train, skip_malformed=cfg.data.skip_malformed, layout=cfg.data.layout())


def check_model_path(cfg: ExperimentConfig) -> None:
    """Fail before any process starts when model.path is not a model (ModelPathError names it)."""
    if cfg.model.path in ("smollm2", "tiny"):
        return
    from policies.infer.llama_infer import SUPPORTED_MODEL_TYPES
    from policies.model.loading import ModelPathError, check_causal_lm, check_model_dir
    path = Path(cfg.model.path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelPathError(f"model.path: GGUF file {str(path)!r} does not exist")
        return
    try:
        check_model_dir(path)
        model_type = check_causal_lm(path)
    except ModelPathError as exc:
        raise ModelPathError(f"model.path: {exc}") from None
    if model_type not in SUPPORTED_MODEL_TYPES and cfg.actors.generator.backend == "torch":
        log.warning("model.path: model_type %r generates on HF's forward, slower than the torch engine "
                    "(which runs %s)", model_type, ", ".join(SUPPORTED_MODEL_TYPES))
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelPathError(f"model.path: {str(path)!r} has no tokenizer (missing tokenizer.json)")


def device_for(cfg: ExperimentConfig) -> str:
    if cfg.model.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.model.device


def _dtype(cfg: ExperimentConfig, role: str = "learner") -> torch.dtype:
    from policies.model.precision import resolve_dtype
    name = cfg.model.dtype
    if role == "generator" and cfg.actors.generator.dtype is not None:
        name = cfg.actors.generator.dtype
    return resolve_dtype(name, device_for(cfg))


def learner_recomputes(cfg: ExperimentConfig) -> tuple[bool, str]:
    """Whether the learner recomputes the proximal logprobs, and why (actors.learner.recompute_needed)."""
    from actors.learner.learner import recompute_needed
    from policies.model.precision import resolve_bf16
    learner_dtype = torch.bfloat16 if resolve_bf16(cfg.ppo.bf16, device_for(cfg)) else _dtype(cfg)
    return recompute_needed(cfg.ppo.recompute_logprobs, max_staleness=cfg.rollout.max_staleness,
                            generator_backend=cfg.actors.generator.backend,
                            generator_dtype=_dtype(cfg, "generator"), learner_dtype=learner_dtype)


def sampling_params(cfg: ExperimentConfig, stop_token_ids: list[int]) -> dict:
    r = cfg.rollout
    return {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
            "stop_token_ids": stop_token_ids}


def tensor_options(cfg: ExperimentConfig, bus_address: str):
    """This process's tensor sockets: its host's address towards the bus, CurveZMQ with the bus's keys."""
    from tensors.channels import Curve, TensorOptions
    from bus.keys import load_keys
    keys = load_keys(cfg.bus.keys_dir) if cfg.bus.keys_dir else None
    curve = None if keys is None else Curve(*keys.client_keys, keys.authorized)
    return TensorOptions.for_bus(bus_address, bind=cfg.tensors.bind, curve=curve,
                                 max_frame_bytes=cfg.tensors.max_frame_bytes)


def build(role: str, name: str, cfg: ExperimentConfig, bus_address: str, start: Start,
          bus_kwargs: dict, instances: int = 1) -> list[Actor]:
    """The actors of one process (two for the learner: learner + broadcaster; ``instances``
    simulated generators, named on from ``name``'s number)."""
    from policies.data.prompts import build_prompt
    from policies.model.loading import load_model, load_tokenizer

    bus_kwargs = {**bus_kwargs, "tensors": tensor_options(cfg, bus_address)}

    seed = cfg.seed
    torch.manual_seed(seed)
    if role == "sampler":
        from actors.sampler.sampler import PromptSampler, SamplerConfig
        tok = load_tokenizer(start.model_path)
        problems = load_train_problems(cfg)
        prompt_ids = [build_prompt(tok, p.prompt, cfg.data.prompt_directive, cfg.rollout.force_newline,
                                   system_prompt=cfg.data.system_prompt)
                      for p in problems]
        too_long = [p.id for p, ids in zip(problems, prompt_ids) if len(ids) > cfg.data.max_prompt_tokens]
        if too_long:
            raise ValueError(f"{cfg.data.train}: {len(too_long)} prompts exceed data.max_prompt_tokens="
                             f"{cfg.data.max_prompt_tokens} (first: {too_long[0]})")
        sc = SamplerConfig(batch_prompts=cfg.rollout.batch_prompts, group_size=cfg.rollout.group_size,
                           max_staleness=cfg.rollout.max_staleness, total_batches=cfg.train.steps, seed=seed,
                           sampling=sampling_params(cfg, stop_ids(tok)),
                           request_timeout=cfg.rollout.request_timeout)
        return [PromptSampler(bus_address, problems=problems, prompt_ids=prompt_ids, cfg=sc,
                              start_batch=start.step, name=name, **bus_kwargs)]
    if role == "generator" and cfg.actors.generator.backend == "sim":
        return sim_generators(name, cfg, bus_address, start, bus_kwargs, instances)
    if role == "generator":
        from actors.generator.generator import Generator
        tok = load_tokenizer(start.model_path)
        if cfg.actors.generator.backend == "sglang":
            from actors.generator.sglang.backend import make_sglang_backend
            backend = make_sglang_backend(cfg, start)
        else:
            from actors.generator.torch_backend import TorchBackend
            model = load_model(start.model_path, dtype=_dtype(cfg, "generator"), device=device_for(cfg))
            backend = TorchBackend(model, stop_token_ids=tuple(stop_ids(tok)),
                                   interrupt_on_update=cfg.rollout.interrupt_on_update)
            backend.engine.version = start.step
        return [Generator(name, bus_address, backend=backend, tokenizer=tok, **bus_kwargs)]
    if role == "verifier":
        from actors.verifier import Verifier
        return [Verifier(name, bus_address, workers=cfg.verifier.workers, timeout=cfg.verifier.timeout,
                         reward_cfg=cfg.reward, **bus_kwargs)]
    if role == "packer":
        from actors.packer import Packer
        return [Packer(bus_address, batch_prompts=cfg.rollout.batch_prompts,
                       drop_uniform_groups=cfg.rollout.drop_uniform_groups, start_step=start.step, name=name,
                       **bus_kwargs)]
    if role == "learner":
        from actors.weights.broadcaster import WeightBroadcaster
        from actors.learner.learner import Learner
        model, opt, ref_model, resumed = learner_state(cfg, start)
        kind, ranked = Learner, {}
        if cfg.actors.learner.ranks > 1:  # the bus side reads rank 0's whole copy: broadcaster, eval, checkpoints
            from actors.learner.ranks import RankedLearner
            ranks, world, sharded_opt, (model, opt) = join_ranks(cfg, model, opt)
            kind, ranked = RankedLearner, {"ranks": ranks, "world": world, "sharded_optimizer": sharded_opt}
        tok = load_tokenizer(start.model_path)
        periodic_eval = None
        if cfg.eval.every:
            from actors.learner.periodic_eval import PeriodicEval
            from policies.data.dataset import load_problems
            test = load_problems(cfg.data.test, skip_malformed=cfg.data.skip_malformed, layout=cfg.data.layout())
            periodic_eval = PeriodicEval(test, cfg.eval, start.model_path, tok, device=device_for(cfg),
                                         dtype=_dtype(cfg, "generator"), seed=seed,
                                         directive=cfg.data.prompt_directive, system_prompt=cfg.data.system_prompt)
        sim = cfg.actors.learner.mode == "sim"
        # simulated weights: a token payload on the real channels, the cost model charges the GBs
        bc = WeightBroadcaster(bus_address, model=torch.nn.Linear(8, 8) if sim else model, version=start.step,
                               sglang=sglang_weight_sync(cfg), **bus_kwargs)
        recompute, why = learner_recomputes(cfg)
        log.info("proximal logprobs: %s (%s)", "recomputed by the learner" if recompute else "the generator's", why)
        if sim:
            from actors.learner.sim import SimLearner
            kind = functools.partial(SimLearner, cost=cfg.sim)
        learner = kind(bus_address, model=model, tokenizer=tok, optimizer=opt, ppo=cfg.ppo, broadcaster=bc,
                          run_dir=run_dir(cfg), total_steps=cfg.train.steps, start_step=start.step,
                          max_staleness=cfg.rollout.max_staleness, recompute_logprobs=recompute,
                          checkpoint_every=cfg.train.checkpoint_every,
                          keep_checkpoints=cfg.train.keep_checkpoints, resumed=resumed, name=name,
                          ref_model=ref_model, periodic_eval=periodic_eval, **ranked, **bus_kwargs)
        return [learner, bc]
    raise ValueError(f"unknown role {role!r}")


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
    model = load_model(start.model_path, dtype=_dtype(cfg), device=device_for(cfg),
                       compute_dtype=torch.bfloat16 if bf16 else None)
    opt = make_optimizer(model, cfg.ppo)
    if cfg.ppo.gradient_checkpointing:
        from policies.model.loading import checkpoint_layers
        checkpoint_layers(model)
    if cfg.ppo.compile:
        from policies.model.loading import compile_layers
        compile_layers(model)
    resumed = None
    if start.checkpoint:
        ckpt = Path(start.checkpoint)
        checkpoint.restore_optimizer(ckpt, opt)
        checkpoint.restore_rng(ckpt)
        saved = checkpoint.load_state(ckpt).get("digest")
        digest = checkpoint.state_digest(model, opt)
        if saved is not None and digest != saved:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt}: the model and optimizer loaded from it "
                                             f"differ from what was saved (digest {digest[:12]} != {saved[:12]})")
        resumed = {"checkpoint": str(ckpt), "step": start.step, "digest": digest}
        log.info("resumed from %s at step %d; model+optimizer digest %s %s", ckpt, start.step, digest[:12],
                 "matches the saved one" if saved else "(the checkpoint records none to compare)")
    ref_model = None
    if cfg.ppo.kl_coef > 0:   # the KL's reference is the run's base model, also after a resume
        ref_model = load_model(base_model_path(cfg), dtype=_dtype(cfg), device=device_for(cfg))
        ref_model.requires_grad_(False).eval()
        log.info("KL penalty: kl_coef %g (%s) against a frozen reference model, %s", cfg.ppo.kl_coef,
                 cfg.ppo.kl_estimator, base_model_path(cfg))
    return model, opt, ref_model, resumed


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


def sim_generators(name: str, cfg: ExperimentConfig, bus_address: str, start: Start, bus_kwargs: dict,
                   instances: int) -> list[Actor]:
    """``instances`` simulated generators, each its own actor on its own bus connection, numbered on
    from ``name`` (generator-8 with 4: generator-8 .. generator-11); one tokenizer for all."""
    from actors.generator.sim import SimBackend, SimGenerator
    from policies.model.loading import load_tokenizer
    tok = load_tokenizer(start.model_path)
    prefix, _, first = name.rpartition("-")
    if instances > 1 and not first.isdigit():
        raise ValueError(f"--instances {instances} needs a name ending in a number, got {name!r}")
    names = [name] if instances == 1 else [f"{prefix}-{int(first) + i}" for i in range(instances)]
    interrupt = getattr(cfg.rollout, "interrupt_on_update", True)
    out: list[Actor] = []
    for n in names:
        backend = SimBackend(cfg.sim, tok, name=n, version=start.step, seed=zlib.crc32(f"{cfg.seed}:{n}".encode()),
                             interrupt_on_update=interrupt, report_dir=run_dir(cfg) / "sim")
        out.append(SimGenerator(n, bus_address, backend=backend, tokenizer=tok, **bus_kwargs))
    return out


def sglang_weight_sync(cfg: ExperimentConfig):
    """The learner's weight-update session with SGLang servers (None unless their weights go
    over torch.distributed): nccl where the learner runs on CUDA, gloo elsewhere."""
    g = cfg.actors.generator
    if g.backend != "sglang" or g.sglang_weights != "distributed":
        return None
    from actors.weights.sglang_distributed import SGLangWeightSync
    backend = "nccl" if device_for(cfg) == "cuda" else "gloo"
    log.info("sglang weights: over torch.distributed (%s) from the learner's process", backend)
    return SGLangWeightSync(backend=backend, master_address=g.sglang_master_address)


def torch_threads() -> None:
    """BOBA_TORCH_THREADS if set; else the cores, shared among a host's BOBA_SLOTS generators."""
    slots = max(1, int(os.environ.get("BOBA_SLOTS", "1")))
    n = int(os.environ.get("BOBA_TORCH_THREADS", "0")) or max(1, (os.cpu_count() or 1) // slots)
    torch.set_num_threads(n)
