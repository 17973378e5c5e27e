"""Which processes a job starts: each actor's command line, host, slot and environment, and the broker's.

Pure planning from the config and the hostfile (placement itself: launcher.job.hosts); launcher.job.run
starts what this plans, and `--dry-run` prints it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from actors import protocol as P
from launcher.config import ExperimentConfig
from launcher.job.hosts import Host, place, slot_env
from launcher.job.spawn import ProcessSpec
from launcher.job.start import Start, base_model_path, run_dir

PROJECT_DIR = str(Path(__file__).resolve().parents[2])


def bus_kwargs(cfg: ExperimentConfig) -> dict:
    from bus.keys import client_kwargs
    return {"heartbeat_interval": cfg.bus.heartbeat_interval, **client_kwargs(cfg.bus.keys_dir)}


def process_specs(cfg: ExperimentConfig, config_path: Path, address: str, start: Start,
                  hosts: list[Host] | None, dist_port: int | None = None) -> list[ProcessSpec]:
    """Every actor process; with actors.learner.ranks > 1 also the learner ranks > 0 (named learner-rank-R,
    role learner), each with its group's environment. `dist_port`: the group's port (config or picked)."""
    counts = {role: getattr(cfg.actors, role).count for role in P.ROLES}
    per_process = cfg.actors.generator.per_process  # simulated generators share processes
    counts["generator"] = -(-counts["generator"] // per_process)
    pinned = {role: getattr(cfg.actors, role).hosts for role in P.ROLES if getattr(cfg.actors, role).hosts}
    specs = []
    placed = place(counts, hosts, pinned)
    learner_host = next(h for r, _, h in placed if r == "learner")
    rank_hosts = learner_rank_hosts(cfg, learner_host, hosts)
    # the learner ranks keep their hosts' first slots (GPUs) where a host has more: generators start after them
    slots_taken: dict[Host, int] = {}
    for h in set(rank_hosts):
        n = rank_hosts.count(h)
        slots_taken[h] = n - 1 if h.slots > n else -1
    group_env = learner_group_env(cfg, learner_host, rank_hosts, dist_port)
    for role, index, host in placed:
        first = index * per_process if role == "generator" else index
        name = f"{role}-{first}" if role in ("generator", "verifier") else role
        argv = actor_argv(role, name, address, config_path, start)
        if role == "generator" and per_process > 1:
            argv += ["--instances", str(min(per_process, cfg.actors.generator.count - first))]
        env = {}
        if role == "generator":
            slot = slots_taken[host] = slots_taken.get(host, -1) + 1
            env = slot_env(host, slot)
        if role == "learner" and group_env:
            env = group_env[0]
        specs.append(ProcessSpec(name, role, argv, host, env))
    for rank in range(1, len(group_env)):
        name = f"learner-rank-{rank}"
        specs.append(ProcessSpec(name, "learner", actor_argv("learner", name, address, config_path, start),
                                 rank_hosts[rank], group_env[rank]))
    return specs


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
    envs = []
    for rank, host in enumerate(rank_hosts):
        local = rank_hosts[:rank].count(host)  # this rank's slot on its host
        envs.append({"MASTER_ADDR": master, "MASTER_PORT": str(port), "RANK": str(rank),
                     "WORLD_SIZE": str(len(rank_hosts)), **slot_env(host, local)})
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
    for spec in process_specs(cfg, run_dir(cfg) / "config.yaml", address, start, hosts, port):
        where = f"# {spec.name} on {spec.host.name if spec.host else 'localhost'}"
        command = spec.command(PROJECT_DIR)
        if "RANK" in spec.env:
            where += (f", learner rank {spec.env['RANK']} of {spec.env['WORLD_SIZE']} (group at "
                      f"{spec.env['MASTER_ADDR']}:{'<free port>' if not cfg.actors.learner.dist_port else port})")
        if spec.env:
            where += (f", slot {spec.env['BOBA_SLOT']} of {spec.env['BOBA_SLOTS']}: GPU "
                      f"{spec.env['CUDA_VISIBLE_DEVICES']}, or 1/{spec.env['BOBA_SLOTS']} of the cores on a CPU host")
            if command[0] != "ssh":  # a remote command carries its env inline already
                command = ["env", *(f"{k}={v}" for k, v in sorted(spec.env.items())), *command]
        lines.append(where + "\n" + shlex.join(command))
    return lines
