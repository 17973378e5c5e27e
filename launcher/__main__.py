"""Command line: `python -m launcher [run] --hosts hosts.txt --config exp.yaml` and friends."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

DERIVED = {"sft": "launcher.commands.sft", "eval": "launcher.commands.evaluate", "filter": "launcher.commands.difficulty"}
COMMANDS = ("run", "actor", "attach", "status", "keys", "plot", "sft", "eval", "filter", "main", "config", "data")


OUR_PACKAGES = ("actors", "bus", "launcher", "policies", "tensors")
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bus_address(value: str) -> str:
    """--bus: a ZeroMQ endpoint; `127.0.0.1:5999` alone would reach zmq as a raw `Invalid argument`."""
    if "://" not in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a bus address: write it as tcp://{value} "
                                         "(the `bus tcp://HOST:PORT` the job's launcher printed)")
    return value


def _common_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (defaults apply to keys it leaves out)")
    p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. -o rollout.max_staleness=2 (repeatable)")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that sub-command's config-derived flags are built
    (they import the config, which imports torch: `status` and `keys` stay quick)."""
    ap = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = ap.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run an RL training job (the default command)")
    _common_config(run)
    run.add_argument("--hosts", help="hostfile: one host per line, `node-1 slots=8`; default localhost")
    run.add_argument("--slurm", action="store_true",
                     help="inside a Slurm allocation: its nodes are the hosts (this one the head), actors start as srun steps")
    run.add_argument("--ssh-config", help="ssh client config for the hosts (ssh -F FILE): keys, known hosts")
    run.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    run.add_argument("--dry-run", action="store_true", help="print the command lines, start nothing")
    run.add_argument("--quiet", action="store_true", help="do not echo the actors' logs")

    actor = sub.add_parser("actor", help="(internal) run one actor process")
    actor.add_argument("role")
    actor.add_argument("--name", required=True)
    actor.add_argument("--bus", required=True)
    actor.add_argument("--config", required=True)
    actor.add_argument("--start-step", type=int, default=0)
    actor.add_argument("--model-path", required=True)
    actor.add_argument("--checkpoint")
    actor.add_argument("--instances", type=int, default=1, help="simulated generators in this process")
    actor.add_argument("--keys", help="this host's bus key directory (the launcher ships it; default bus.keys_dir)")

    att = sub.add_parser("attach", help="add an actor (a generator) to a running job")
    att.add_argument("role", choices=["generator", "verifier", "rollout"])
    att.add_argument("--bus", required=True, type=bus_address, help="the job's bus, tcp://HOST:PORT")
    att.add_argument("--backend", choices=["torch", "sglang"])
    att.add_argument("--name")
    att.add_argument("--keys", help="CurveZMQ keys directory of a secured bus")
    att.add_argument("--leave-after", type=float, default=300.0, metavar="SECONDS",
                     help="leave once the job's broker has not answered for this long (the job has ended)")

    st = sub.add_parser("status", help="list the actors of a running job")
    st.add_argument("--bus", required=True, type=bus_address, help="the job's bus, tcp://HOST:PORT")
    st.add_argument("--keys")

    keys = sub.add_parser("keys", help="make CurveZMQ keys for a bus that listens beyond loopback")
    keys.add_argument("dir")
    keys.add_argument("--force", action="store_true")
    keys.add_argument("--attach", metavar="OUT", help="write OUT: DIR's keys for an attach host (a generator key only)")

    plot = sub.add_parser("plot", help="PNG of a run's reward, accuracy, truncation and throughput")
    plot.add_argument("run_dir")
    plot.add_argument("--out")

    # the flags of sft, eval and filter are derived from their config fields (launcher.config.flags)
    for name, add, about in [("sft", "add_sft_flags", "supervised fine-tuning on (prompt, response) JSONL"),
                             ("eval", "add_eval_flags", "pass@1 over k samples per problem"),
                             ("filter", "add_filter_flags", "drop problems the base model always solves")]:
        p = sub.add_parser(name, help=about)
        if command in (None, name):
            getattr(importlib.import_module(DERIVED[name]), add)(p)

    main = sub.add_parser("main", help="the demo: data, SFT, eval, RL, eval, before/after table")
    main.add_argument("--out", default="runs/main")
    main.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget for the whole demo")
    main.add_argument("--model", default="smollm2", help="smollm2 | tiny (a smoke run) | an HF directory")
    main.add_argument("--test-problems", type=int, default=96, help="in distribution (when the data is made)")
    main.add_argument("--heldout-problems", type=int, default=96,
                      help="held out: half the project's six templates, half gsm_symbolic's held-out ones")
    main.add_argument("--base-k", type=int, default=1,
                      help="samples per problem for the base model's row (SFT and RL: eval.k)")
    main.add_argument("--data", help="a data directory (`python -m launcher data`; made there when missing; "
                                     "default OUT/data)")
    main.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of configs/demo.yaml (e.g. -o train.steps=2)")

    data = sub.add_parser("data", help="train / SFT / test / held-out problems from reasoning-gym's generators")
    if command in (None, "data"):
        importlib.import_module("launcher.commands.data").add_data_flags(data)

    cfg = sub.add_parser("config", help="print the effective config")
    _common_config(cfg)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run"] + argv
    args = parser(argv[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from launcher.commands import commands
    return getattr(commands, f"cmd_{args.command}")(args)


def missing_module_hint(exc: ModuleNotFoundError) -> str | None:
    """The one line for a dependency this interpreter lacks (torch, zmq, ... outside .venv), else None:
    a module of our own that is missing is a bug to show in full."""
    name = (exc.name or "").partition(".")[0]
    if not name or name in OUR_PACKAGES:
        return None
    venv = os.path.join(PROJECT_DIR, ".venv")
    if os.path.realpath(sys.prefix) == os.path.realpath(venv):
        return (f"no module named {name!r} in {venv}: run `./run.sh setup` (it installs what pyproject.toml "
                f"lists), or `{venv}/bin/python -m pip install {name}` for an optional one")
    return (f"no module named {name!r} for {sys.executable}: run the launcher through ./run.sh (it sets up "
            f".venv and uses it: `./run.sh --config configs/tiny.yaml`), or `source .venv/bin/activate` first")


def entry() -> int:
    """`python -m launcher`: main() with a one-line error for a missing dependency, caught before the
    interpreter prints a traceback from deep inside an import of torch."""
    try:
        return main()
    except ModuleNotFoundError as exc:
        hint = missing_module_hint(exc)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
