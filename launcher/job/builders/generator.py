"""Generators, by actors.generator.backend: torch (the model in this process), sglang (a server,
launched here or running at sglang_url) or sim (``instances`` simulated ones on the cost model)."""
from __future__ import annotations

import zlib

from actors.base import Actor
from launcher.config.schema import ExperimentConfig
from launcher.job.compute import device_for, dtype_for
from launcher.job.start import Start, run_dir


def torch_backend(cfg: ExperimentConfig, start: Start, tok):
    from actors.generator.torch_backend import TorchBackend
    from policies.data.prompts import stop_ids
    from policies.model.loading import load_model
    model = load_model(start.model_path, dtype=dtype_for(cfg, "generator"), device=device_for(cfg))
    return TorchBackend(model, stop_token_ids=tuple(stop_ids(tok)), interrupt_on_update=cfg.rollout.interrupt_on_update,
                        version=start.step, lora=cfg.model.lora)


def sglang_backend(cfg: ExperimentConfig, start: Start, bus_address: str):
    """A server in the generator's dtype, keyed with the job's API key; where the bus is beyond loopback
    (a job across hosts) and a key exists, it listens on this host's address towards the bus."""
    from actors.generator.sglang.backend import make_sglang_backend
    from actors.generator.sglang.client import job_api_key
    from actors.generator.sglang.server import address_towards
    key = job_api_key()
    bus_host = bus_address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    bind = address_towards(bus_host) if key and bus_host not in ("*", "0.0.0.0", "::") else "127.0.0.1"
    dtype = {"torch.float32": "float32", "torch.bfloat16": "bfloat16"}.get(str(dtype_for(cfg, "generator")))
    return make_sglang_backend(cfg.actors.generator, model_path=start.model_path, step=start.step, seed=cfg.seed,
                               request_timeout=cfg.rollout.request_timeout,
                               interrupt_on_update=cfg.rollout.interrupt_on_update, dtype=dtype, bind=bind,
                               api_key=key, lora=cfg.model.lora)


def sim_generators(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
                   instances: int) -> list[Actor]:
    """``instances`` simulated generators, each its own actor on its own bus connection, numbered on
    from ``name`` (generator-8 with 4: generator-8 .. generator-11); one tokenizer for all."""
    from actors.generator.sim import SimBackend, SimGenerator
    from policies.model.loading import load_tokenizer
    tok = load_tokenizer(start.model_path)
    prefix, _, first = name.rpartition("-")
    if instances > 1 and not first.isdigit():
        raise ValueError(f"--instances {instances} needs a name ending in a number, got {name!r}")
    port = cfg.actors.generator.openai_port
    if instances > 1 and port:
        raise ValueError(f"actors.generator.openai_port: {port} cannot serve {instances} generators of one process; "
                         "use 0 (a free port each)")
    names = [name] if instances == 1 else [f"{prefix}-{int(first) + i}" for i in range(instances)]
    out: list[Actor] = []
    for n in names:
        backend = SimBackend(cfg.sim, tok, name=n, version=start.step, seed=zlib.crc32(f"{cfg.seed}:{n}".encode()),
                             interrupt_on_update=cfg.rollout.interrupt_on_update, report_dir=run_dir(cfg) / "sim")
        out.append(SimGenerator(n, bus_address, backend=backend, tokenizer=tok, openai_port=port, **bus_kwargs))
    return out


def build(cfg: ExperimentConfig, start: Start, name: str, bus_address: str, bus_kwargs: dict,
          instances: int = 1) -> list[Actor]:
    if cfg.actors.generator.backend == "sim":
        return sim_generators(cfg, start, name, bus_address, bus_kwargs, instances)
    from actors.generator.generator import Generator
    from policies.model.loading import load_tokenizer
    tok = load_tokenizer(start.model_path)
    if cfg.actors.generator.backend == "sglang":
        backend = sglang_backend(cfg, start, bus_address)
    else:
        backend = torch_backend(cfg, start, tok)
    # a group is given up (REJECTED, dealt again) no later than the sampler would deal it again itself
    return [Generator(name, bus_address, backend=backend, tokenizer=tok, generate_timeout=cfg.rollout.request_timeout,
                      openai_port=cfg.actors.generator.openai_port, **bus_kwargs)]
