"""One function per sub-command; each turns bad input into a one-line error and an exit code."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from bus.broker import is_loopback_host
from launcher.config import ConfigError, ExperimentConfig, describe_mode, load_config
from policies.settings import from_dict

log = logging.getLogger("launcher")


def _die(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _load(args) -> ExperimentConfig | None:
    return load_config(args.config, args.overrides)


def cmd_config(args) -> int:
    from launcher.config.printer import print_config
    return print_config(args.config, args.overrides)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Make the config's relative paths absolute, as meant where the launcher was started.

    Actor processes start in the project directory (on every host), so a relative run_dir or
    data path would otherwise name another file there, or none.
    """
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().absolute())
    cfg.run_dir = absolute(cfg.run_dir)
    if cfg.data.train is not None:
        cfg.data.train = absolute(cfg.data.train)
    if cfg.data.test is not None:
        cfg.data.test = absolute(cfg.data.test)
    if cfg.model.path not in ("smollm2", "tiny"):  # the built-in names, not paths
        cfg.model.path = absolute(cfg.model.path)
    if cfg.bus.keys_dir:
        cfg.bus.keys_dir = absolute(cfg.bus.keys_dir)
    from policies.verify.reward_fns import is_file_spec
    fns = tuple(replace(f, fn=absolute(f.fn.rpartition(":")[0]) + ":" + f.fn.rpartition(":")[2])
                if is_file_spec(f.fn) else f for f in cfg.reward.fns)
    if fns != cfg.reward.fns:
        cfg.reward = replace(cfg.reward, fns=fns)
    return cfg


MATH_DATA_DIR = "arith"  # configs/tiny.yaml and example.yaml read data/arith/{train,test}.jsonl
GYM_DATA_DIR = "gym"     # configs/gym.yaml reads data/gym/{train,test}.jsonl (python -m launcher data)


def make_math_data(cfg: ExperimentConfig) -> None:
    """Write the problems a config names under .../arith/ (or .../gym/) when they are not there yet, as
    `python -m launcher.mathdata DIR` (`python -m launcher data DIR`) does: a fresh clone's first
    `--config configs/tiny.yaml` (configs/gym.yaml) runs."""
    train = Path(cfg.data.train) if cfg.data.train else None
    if train is None or train.exists() or train.parent.name not in (MATH_DATA_DIR, GYM_DATA_DIR) \
            or train.name != "train.jsonl":
        return
    if cfg.data.test is not None and Path(cfg.data.test) != train.parent / "test.jsonl":
        return
    if train.parent.name == GYM_DATA_DIR:
        from launcher.gymdata import make_gym_dataset
        make_gym_dataset(train.parent, 512, 96, seed=0)
        print(f"[launcher] {train} was missing: wrote reasoning-gym's problems there "
              f"(python -m launcher data {train.parent} --seed 0)", flush=True)
        return
    from launcher.mathdata import make_dataset
    make_dataset(train.parent, 512, 64)
    print(f"[launcher] {train} was missing: wrote the arithmetic problems there "
          f"(python -m launcher.mathdata {train.parent})", flush=True)


def check_bus_keys(cfg: ExperimentConfig) -> None:
    """A bus beyond loopback without keys is refused by the broker at start; refuse it here, before
    anything starts (and in --dry-run, which shows what the launch would run)."""
    if not cfg.bus.keys_dir and not is_loopback_host(cfg.bus.host):
        raise ConfigError(f"bus.host: {cfg.bus.host} listens beyond loopback but bus.keys_dir is not set: make keys "
                          f"with `python -m launcher keys keys/` and add -o bus.keys_dir=keys/")


def cmd_run(args) -> int:
    # The Rust tokenizers' thread pool costs seconds at interpreter exit on a busy machine; the
    # launcher and its actors encode prompts one at a time, so it buys nothing here.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from actors.learner.checkpoint import CheckpointError
    from policies.data.dataset import DatasetError
    from launcher.job.hosts import HostsError, parse_hosts
    from launcher.job.data import load_train_problems
    from launcher.job.start import check_model_path
    from launcher.job.plan import dry_run
    from launcher.job.run import RunFailed, run_job
    try:
        cfg = absolute_paths(_load(args))
        if args.slurm and args.hosts:
            raise HostsError("--slurm and --hosts: the allocation's nodes are the hosts; give one of them")
        hosts = parse_hosts(args.hosts, args.ssh_config) if args.hosts else None
        if args.slurm:
            from launcher.job.engines.slurm import prepare
            hosts = prepare(cfg, make_keys=not args.dry_run)
        make_math_data(cfg)
        check_bus_keys(cfg)
        from launcher.config import check_trainable
        check_trainable(cfg)
        check_model_path(cfg)
        load_train_problems(cfg)  # a bad line or row stops us here, named
    except (ConfigError, HostsError, DatasetError, OSError) as exc:
        return _die(str(exc))
    if hosts and any(not h.is_local for h in hosts) and is_loopback_host(cfg.bus.host):
        return _die(f"{args.hosts} names remote hosts but bus.host is {cfg.bus.host}: set bus.host to an "
                    f"address they can reach, and bus.keys_dir (python -m launcher keys DIR) to secure it")
    if args.dry_run:
        print(f"# mode: {describe_mode(cfg)}")
        try:
            print("\n".join(dry_run(cfg, hosts)))
        except HostsError as exc:  # a placement that cannot work, naming the config key
            return _die(str(exc))
        return 0
    try:
        asyncio.run(run_job(cfg, hosts=hosts, resume=args.resume, echo=not args.quiet))
    except RunFailed as exc:
        return _die(f"run failed: {exc}", 1)
    except (CheckpointError, HostsError) as exc:
        return _die(str(exc))
    return 0


def cmd_actor(args) -> int:
    from launcher.job.compute import torch_threads
    from launcher.job.roles import build
    from launcher.job.plan import bus_kwargs
    from launcher.job.start import Start
    cfg = load_config(args.config)
    if args.keys:
        cfg.bus.keys_dir = args.keys
    torch_threads()
    start = Start(args.start_step, args.model_path, args.checkpoint)
    if args.role == "learner" and cfg.actors.learner.ranks > 1:
        from actors.learner.ranks import RankError, env_rank
        if env_rank() > 0:  # a plain process in the learner group, not on the bus
            from launcher.job.learner_state import serve_rank
            try:
                serve_rank(cfg, start)
            except RankError as exc:
                print(f"[{args.name}] {exc}", file=sys.stderr, flush=True)
                _exit_now(1)
            _exit_now(0)
    actors = build(args.role, args.name, cfg, args.bus, start, bus_kwargs(cfg, args.role), instances=args.instances)
    from actors.base import run
    run(*actors)
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Leave an actor process at once: its actors are stopped and their resources released, and the
    interpreter's teardown of torch/transformers takes seconds of CPU (5 s per process on 2 cores)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_attach(args) -> int:
    from actors import protocol as P
    from launcher.job.compute import torch_threads
    from launcher.job.roles import build
    from launcher.job.start import Start

    try:
        reply = _with_tool_client(args, "attach", lambda c: c.request(P.LAUNCHER, P.CONFIG, {}, timeout=10.0))
    except Exception as exc:
        return _die(f"could not get the job's config from {args.bus}: {exc}")
    cfg = from_dict(ExperimentConfig, reply["config"])
    if args.backend:
        cfg.actors.generator.backend = args.backend
    if args.keys:
        cfg.bus.keys_dir = args.keys
    name = args.name or f"{args.role}-{socket.gethostname()}-{os.getpid()}"
    torch_threads()
    from launcher.job.plan import bus_kwargs
    try:
        actors = build(args.role, name, cfg, args.bus, Start(reply["step"], reply["model_path"]),
                       bus_kwargs(cfg, args.role))
    except (OSError, ValueError) as exc:  # e.g. the job's model directory is not on this host
        return _die(f"could not build a {args.role} from the job's model {reply['model_path']}: {exc}")
    _announce_first_work(actors[0], P.SCORE if args.role == "verifier" else P.GENERATE)
    print(f"[attach] {name} joining {args.bus}", flush=True)
    from actors.base import run
    if run(*actors, leave_after=args.leave_after):
        print(f"[attach] {name} left: the job's broker at {args.bus} has not answered for {args.leave_after:g}s "
              f"(the job has ended)", flush=True)
    return 0


def _announce_first_work(actor, kind: str) -> None:
    """Print once when the attached actor is first given work: the sign that it serves the job."""
    from actors.base import declared_handlers
    serve = getattr(actor, declared_handlers(type(actor))[kind])
    said = False

    async def first(body, src):
        nonlocal said
        if not said:
            said = True
            print(f"[attach] {actor.name} got its first {kind!r} (step {body.get('step')}) from {src}", flush=True)
        return await serve(body, src)
    actor.bus.on(kind, first)


def _with_tool_client(args, kind: str, use):
    """`await use(client)` with a short-lived tool client on `args.bus` (keys from `args.keys`), closed after."""
    from bus.client import BusClient
    from bus.keys import client_kwargs

    async def go():
        client = BusClient(args.bus, f"{kind}-{uuid.uuid4().hex[:8]}", "tool", **client_kwargs(args.keys))
        await client.connect()
        try:
            return await use(client)
        finally:
            await client.close()
    return asyncio.run(go())


def cmd_status(args) -> int:
    async def listing(client):
        return [a for a in await client.actors() if a.name != client.name]  # not this listing's own client

    try:
        actors = _with_tool_client(args, "status", listing)
    except Exception as exc:
        return _die(f"could not list the actors on {args.bus}: {exc}")
    import time
    print(f"{'name':<28} {'role':<12} {'host':<20} {'pid':>8} {'heartbeat':>10}")
    for a in sorted(actors, key=lambda a: (a.role, a.name)):
        age = f"{time.time() - a.last_heartbeat:.1f}s ago" if a.last_heartbeat else "-"
        print(f"{a.name:<28} {a.role:<12} {a.host:<20} {a.pid:>8} {age:>10}")
    return 0


def cmd_keys(args) -> int:
    """Make the head node's key directory, or (--attach OUT) a generator-only one for an attach host."""
    from bus.keys import generate_keys, write_subset
    try:
        if args.attach:
            path = write_subset(args.dir, ["generator"], args.attach)
            print(f"generator keys for an attach host written to {path}: copy it there and run "
                  f"`python -m launcher attach generator --bus ... --keys {path}`")
            return 0
        path = generate_keys(args.dir, overwrite=args.force)
    except FileExistsError:
        return _die(f"{args.dir}: keys already exist there: pass --force to replace them (every host of a running job "
                    f"then needs the new directory)")
    except (OSError, ValueError, RuntimeError) as exc:  # ValueError: a bad directory; RuntimeError: libzmq without CURVE
        return _die(str(exc))
    print(f"CurveZMQ keys written to {path}: keep it on the head node (it holds the broker's secret) and set "
          f"bus.keys_dir to it; the launcher hands each host the keys of its own roles only")
    return 0


def cmd_plot(args) -> int:
    from launcher.plot import plot_run
    try:
        print(plot_run(args.run_dir, args.out))
    except (OSError, ValueError) as exc:
        return _die(str(exc))
    return 0


def cmd_sft(args) -> int:
    from launcher.commands.sft import run_sft
    return run_sft(args)


def cmd_eval(args) -> int:
    from launcher.commands.evaluate import run_eval_command
    return run_eval_command(args)


def cmd_filter(args) -> int:
    from launcher.commands.difficulty import run_filter_command
    return run_filter_command(args)


def cmd_data(args) -> int:
    from launcher.commands.data import run_data_command
    return run_data_command(args)


def cmd_main(args) -> int:
    from launcher.commands.demo import run_demo
    return run_demo(args)
