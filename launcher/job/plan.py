"""Which processes a job starts: each actor's command line, host, slot and environment, and the broker's.

Pure planning from the config and the hostfile (placement itself: launcher.job.hosts); launcher.job.run
starts what this plans, and `--dry-run` prints it.
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

from actors import protocol as P
from launcher.config import ExperimentConfig
from actors.generator.sglang.client import API_KEY_FILE_ENV
from actors.generator.sglang.server import NCCL_ENV
from launcher.job.hosts import Host, HostsError, place, slot_env
from launcher.job.placement import Demand, Inventory, assign, device_ids, inventory, local_gpus, server_hosts
from launcher.job.spawn import ProcessSpec
from launcher.job.start import Start, base_model_path, run_dir

PROJECT_DIR = str(Path(__file__).resolve().parents[2])


def bus_kwargs(cfg: ExperimentConfig, role: str) -> dict:
    """A bus client's keyword arguments for a member of `role` (its role's key on a keyed bus)."""
    from bus.keys import client_kwargs
    return {"heartbeat_interval": cfg.bus.heartbeat_interval, "heartbeat_liveness": cfg.bus.heartbeat_liveness,
            **client_kwargs(cfg.bus.keys_dir, role)}


def job_roles(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The roles a job runs: every role of actors.protocol.ROLES, rollout workers only with rollout.workflow."""
    return tuple(r for r in P.ROLES if r != P.ROLLOUT or cfg.rollout.workflow is not None)


def process_specs(cfg: ExperimentConfig, config_path: Path, address: str, start: Start,
                  hosts: list[Host] | None, dist_port: int | None = None) -> list[ProcessSpec]:
    """Every actor process; with actors.learner.ranks > 1 also the learner ranks > 0 (named learner-rank-R,
    role learner), each with its group's environment. `dist_port`: the group's port (config or picked).
    In a GPU job (launcher.job.placement) every learner rank and generator also gets its own devices."""
    counts = {role: getattr(cfg.actors, role).count for role in job_roles(cfg)}
    per_process = cfg.actors.generator.per_process  # simulated generators share processes
    counts["generator"] = -(-counts["generator"] // per_process)
    pinned = {role: getattr(cfg.actors, role).hosts for role in counts if getattr(cfg.actors, role).hosts}
    specs = []
    placed = place(counts, hosts, pinned)
    learner_host = next(h for r, _, h in placed if r == "learner")
    rank_hosts = learner_rank_hosts(cfg, learner_host, hosts)
    gpu_inventory = gpu_job_inventory(cfg, hosts or [learner_host], learner_host)
    g = cfg.actors.generator
    if gpu_inventory and g.backend == "sglang" and not g.sglang_url and not g.hosts:
        per_host = {h.name.lower(): rank_hosts.count(h) for h in set(rank_hosts)}
        pinned["generator"] = server_hosts(gpu_inventory, per_host, g.sglang_tp_size, counts["generator"],
                                           g.sglang_share_learner_gpu)
        placed = place(counts, hosts, pinned)
    # the learner ranks keep their hosts' first slots (GPUs) where a host has more: generators start after them
    slots_taken: dict[Host, int] = {}
    for h in set(rank_hosts):
        n = rank_hosts.count(h)
        slots_taken[h] = n - 1 if h.slots > n else -1
    group_env = learner_group_env(cfg, learner_host, rank_hosts, dist_port)
    key_file = sglang_key_file(cfg)
    key_env = {API_KEY_FILE_ENV: str(key_file)} if key_file else {}
    for role, index, host in placed:
        first = index * per_process if role == "generator" else index
        name = f"{role}-{first}" if role in P.SCALABLE_ROLES else role
        argv = actor_argv(role, name, address, config_path, start)
        if role == "generator" and per_process > 1:
            argv += ["--instances", str(min(per_process, cfg.actors.generator.count - first))]
        env = {}
        if role == "generator":
            slot = slots_taken[host] = slots_taken.get(host, -1) + 1
            env = slot_env(host, slot)
        if role == "learner" and group_env:
            env = group_env[0]
        if role in ("generator", "learner") and key_env:
            env = {**env, **key_env}
        specs.append(ProcessSpec(name, role, argv, host, env))
    for rank in range(1, len(group_env)):
        name = f"learner-rank-{rank}"
        specs.append(ProcessSpec(name, "learner", actor_argv("learner", name, address, config_path, start),
                                 rank_hosts[rank], group_env[rank]))
    if gpu_inventory:
        place_gpus(cfg, specs, gpu_inventory)
    return specs


def gpu_job_inventory(cfg: ExperimentConfig, hosts: list[Host], learner_host: Host) -> Inventory | None:
    """The GPUs of every host when this is a GPU job (model.device cuda, or auto with a GPU on the
    learner's host); None for a CPU job, which is planned by slots alone, as without GPUs."""
    if cfg.model.device == "cpu":
        return None
    if not inventory([learner_host], cfg.actors.gpus_per_host, gpu_job=cfg.model.device == "cuda")[0][1]:
        if cfg.model.device == "cuda":
            raise HostsError(f"model.device: cuda, but the learner's host {learner_host.name} has no GPU "
                             "(hostfile gpus=, actors.gpus_per_host)")
        return None
    listed = {h.name.lower() for h in hosts}
    return inventory(hosts if learner_host.name.lower() in listed else [learner_host, *hosts],
                     cfg.actors.gpus_per_host, gpu_job=True)


def place_gpus(cfg: ExperimentConfig, specs: list[ProcessSpec], inv: Inventory) -> None:
    """Give every learner rank and GPU generator its devices (CUDA_VISIBLE_DEVICES) and the NCCL
    settings the SGLang servers get too (actors.generator.sglang.server.NCCL_ENV)."""
    g = cfg.actors.generator
    kind = {"sglang": "sglang", "torch": "torch"}.get(g.backend)
    demands = []
    for s in specs:
        host = s.host.name if s.host else "localhost"
        if s.role == "learner":
            demands.append(Demand(s.name, host, 1, "learner"))
        elif s.role == "generator" and kind and not (kind == "sglang" and g.sglang_url):
            demands.append(Demand(s.name, host, g.sglang_tp_size if kind == "sglang" else 1, kind))
    devices = assign(inv, demands, share_learner_gpu=g.sglang_share_learner_gpu)
    counts = {h.lower(): n for h, n in inv}
    for s in specs:
        if s.name in devices:
            host = s.host or Host("localhost")
            ids = device_ids(host, counts.get(host.name.lower(), 0))
            if devices[s.name]:  # a torch generator on a host without GPUs stays as the CPU plan has it
                s.env = {**s.env, **NCCL_ENV, "CUDA_VISIBLE_DEVICES": ",".join(ids[i] for i in devices[s.name])}


def sglang_key_file(cfg: ExperimentConfig) -> Path | None:
    """Where the job's SGLang API key lives (beside its config in the run directory) when it launches
    servers; every generator and learner process reads it (actors.generator.sglang.client.job_api_key)."""
    g = cfg.actors.generator
    if g.backend != "sglang" or g.sglang_url:
        return None
    return (run_dir(cfg) / "secrets" / "sglang_api_key").resolve()


def check_nccl_parity(cfg: ExperimentConfig) -> None:
    """A GPU job whose servers run from another Python (sglang_command, e.g. .venv-sglang) must load the
    learner's NCCL, or every weight update fails: gpu_env.ParityError names both versions. This assumes
    every host has the head's environments (the same paths), as the actors' command lines do."""
    g = cfg.actors.generator
    if (g.backend != "sglang" or g.sglang_url or g.sglang_weights != "distributed" or not g.sglang_command
            or cfg.model.lora is not None):  # a LoRA job's adapters go by file, not NCCL
        return
    from launcher.job.compute import device_for
    if device_for(cfg) != "cuda":
        return
    from launcher.job import gpu_env
    gpu_env.check_parity(gpu_env.probe(), gpu_env.probe(g.sglang_command[0]),
                         f"actors.generator.sglang_command: {g.sglang_command[0]}")


def write_sglang_key(cfg: ExperimentConfig) -> None:
    """A fresh per-job key (0600 in a 0700 directory), never printed; a resumed job gets a new one
    (its servers start anew)."""
    import os
    import secrets
    path = sglang_key_file(cfg)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))


def actor_argv(role: str, name: str, address: str, config_path: Path, start: Start) -> list[str]:
    argv = [sys.executable, "-m", "launcher", "actor", role, "--name", name, "--bus", address,
            "--config", str(config_path), "--start-step", str(start.step), "--model-path", start.model_path]
    return argv + (["--checkpoint", start.checkpoint] if start.checkpoint else [])


def learner_rank_hosts(cfg: ExperimentConfig, learner_host: Host, hosts: list[Host] | None) -> list[Host]:
    """The host of every learner rank: round-robin over actors.learner.hosts where pinned, else the learner's."""
    pinned = cfg.actors.learner.hosts
    if not pinned:
        return [learner_host] * cfg.actors.learner.ranks
    by_name = {h.name.lower(): h for h in hosts or []}
    return [by_name.get(pinned[r % len(pinned)].lower(), learner_host) for r in range(cfg.actors.learner.ranks)]


def learner_group_env(cfg: ExperimentConfig, learner_host: Host, rank_hosts: list[Host],
                      dist_port: int | None) -> list[dict[str, str]]:
    """Each learner rank's torch.distributed environment and device slot; [] for one rank (no group).
    The rendezvous is on rank 0's host: the bus host when it runs there (the head), else its name."""
    if cfg.actors.learner.ranks == 1:
        return []
    master = cfg.bus.host if learner_host.is_local else learner_host.name
    port = dist_port if dist_port is not None else cfg.actors.learner.dist_port
    from actors.learner.rank_link import SECRET_ENV
    secret = secrets.token_hex(32)  # this launch's ranks only: they prove it and key their command link with it
    envs = []
    for rank, host in enumerate(rank_hosts):
        local = rank_hosts[:rank].count(host)  # this rank's slot on its host
        envs.append({"MASTER_ADDR": master, "MASTER_PORT": str(port), "RANK": str(rank),
                     "WORLD_SIZE": str(len(rank_hosts)), SECRET_ENV: secret,
                     **slot_env(host, local)})
    return envs


def broker_spec(cfg: ExperimentConfig, bind: str) -> ProcessSpec:
    argv = [sys.executable, "-m", "bus.broker", "--bind", bind,
            "--heartbeat-interval", str(cfg.bus.heartbeat_interval),
            "--heartbeat-liveness", str(cfg.bus.heartbeat_liveness),
            "--max-message-bytes", str(cfg.bus.max_message_bytes)]
    if cfg.bus.keys_dir:
        argv += ["--keys", cfg.bus.keys_dir]
    if cfg.bus.stats_every:
        argv += ["--stats-every", str(cfg.bus.stats_every)]
    return ProcessSpec("broker", "broker", argv)


def dry_run(cfg: ExperimentConfig, hosts: list[Host] | None) -> list[str]:
    """The command lines the launcher would run, without running anything."""
    import shlex
    address = f"tcp://{cfg.bus.host}:{cfg.bus.port or '<free port>'}"  # bus.port 0: the job picks one at start
    start = Start(0, base_model_path(cfg, create=False))
    lines = [shlex.join(broker_spec(cfg, address).command(PROJECT_DIR))]
    port = cfg.actors.learner.dist_port or 29500  # the job picks a free one
    specs = process_specs(cfg, run_dir(cfg) / "config.yaml", address, start, hosts, port)
    learner_gpu = next(((s.host, s.env.get("CUDA_VISIBLE_DEVICES")) for s in specs if s.name == "learner"), None)
    for spec in specs:
        where = f"# {spec.name} on {spec.host.name if spec.host else 'localhost'}"
        command = spec.command(PROJECT_DIR)
        if "RANK" in spec.env:
            where += (f", learner rank {spec.env['RANK']} of {spec.env['WORLD_SIZE']} (group at "
                      f"{spec.env['MASTER_ADDR']}:{'<free port>' if not cfg.actors.learner.dist_port else port})")
        if NCCL_ENV.keys() <= spec.env.keys():  # a GPU job's process
            where += gpu_note(cfg, spec, learner_gpu)
        elif "BOBA_SLOT" in spec.env:
            where += (f", slot {spec.env['BOBA_SLOT']} of {spec.env['BOBA_SLOTS']}: GPU "
                      f"{spec.env['CUDA_VISIBLE_DEVICES']}, or 1/{spec.env['BOBA_SLOTS']} of the cores on a CPU host")
        if spec.env:
            if spec.host is None or spec.host.is_local:  # a remote command carries its env already
                from actors.learner.rank_link import SECRET_ENV
                command = ["env", *(f"{k}={'<per-launch secret>' if k == SECRET_ENV else v}"
                                    for k, v in sorted(spec.env.items())), *command]
        lines.append(where + "\n" + shlex.join(command))
    return lines


def gpu_note(cfg: ExperimentConfig, spec: ProcessSpec, learner_gpu: tuple) -> str:
    """What --dry-run says of a GPU job's process: its devices, and for a server how it gets them."""
    ids = spec.env["CUDA_VISIBLE_DEVICES"]
    note = f", GPU{'s' if ',' in ids else ''} {ids}"
    g = cfg.actors.generator
    if spec.role == "generator" and g.backend == "sglang":
        note += f" for its SGLang server (tp {g.sglang_tp_size}"
        if g.sglang_mem_fraction_static is not None:
            note += f", --mem-fraction-static {g.sglang_mem_fraction_static}"
        if cfg.model.lora is not None:  # the adapter way: actors.generator.sglang.adapters
            note += f", --enable-lora --max-lora-rank {cfg.model.lora.r}"
        note += ")"
        if (spec.host, ids) == learner_gpu:
            note += ", shared with learner rank 0"
    return note
