"""Turn (role, config) into live actors: each role's builder (launcher.job.builders), chosen here.

Every actor process runs ``python -m launcher actor ROLE ...``, which lands in `build`. The learner's
process also hosts the weight broadcaster, so the broadcaster reads the weights by reference.
"""
from __future__ import annotations

import torch

from actors.base import Actor
from launcher.config.schema import ExperimentConfig
from launcher.job.builders import generator, learner, packer, rollout, sampler, verifier
from launcher.job.start import Start

BUILDERS = {"sampler": sampler.build, "generator": generator.build, "verifier": verifier.build,
            "packer": packer.build, "learner": learner.build, "rollout": rollout.build}


def tensor_options(cfg: ExperimentConfig, bus_address: str, role: str):
    """This process's tensor sockets: its host's address towards the bus, CurveZMQ with its role's key
    (every client key of the bus lets in)."""
    from tensors.channels import Curve, TensorOptions
    from bus.keys import load_keys
    keys = load_keys(cfg.bus.keys_dir) if cfg.bus.keys_dir else None
    curve = None if keys is None else Curve(*keys.pair_for(role), keys.authorized)
    return TensorOptions.for_bus(bus_address, bind=cfg.tensors.bind, curve=curve,
                                 max_frame_bytes=cfg.tensors.max_frame_bytes)


def build(role: str, name: str, cfg: ExperimentConfig, bus_address: str, start: Start,
          bus_kwargs: dict, instances: int = 1) -> list[Actor]:
    """The actors of one process (two for the learner: learner + broadcaster; ``instances``
    simulated generators, named on from ``name``'s number)."""
    if role not in BUILDERS:
        raise ValueError(f"unknown role {role!r}")
    torch.manual_seed(cfg.seed)
    bus_kwargs = {**bus_kwargs, "tensors": tensor_options(cfg, bus_address, role)}
    return BUILDERS[role](cfg, start, name, bus_address, bus_kwargs, instances)
