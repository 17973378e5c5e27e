"""Command line: `python -m launcher [run] --hosts hosts.txt --config exp.yaml` and friends."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

COMMANDS = ("run", "actor", "attach", "status", "keys", "plot", "sft", "eval", "filter", "main", "config")


def _data_args(p) -> None:
    """The data.* layout keys and a device, as flags of eval and filter (configs/example.yaml explains them)."""
    p.add_argument("--prompt-key", help="column with the prompt (default: prompt / question / problem)")
    p.add_argument("--answer-key", help="column with the reference (default: solutions / answer)")
    p.add_argument("--id-key", help="column with a unique id (default: query_id / id)")
    p.add_argument("--answer-format", choices=["raw", "boxed", "gsm8k"], default="raw",
                   help="gsm8k: the text after ####; boxed: the last \\boxed{}")
    p.add_argument("--split", default="train", help="the split of a saved DatasetDict directory")
    p.add_argument("--system-prompt", help="a system turn before each problem")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when present")


def _common_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (defaults apply to keys it leaves out)")
    p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. -o rollout.max_staleness=2 (repeatable)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launcher", description=__doc__)
    sub = ap.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run an RL training job (the default command)")
    _common_config(run)
    run.add_argument("--hosts", help="hostfile: one host per line, `node-1 slots=8`; default localhost")
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

    att = sub.add_parser("attach", help="add an actor (a generator) to a running job")
    att.add_argument("role", choices=["generator", "verifier"])
    att.add_argument("--bus", required=True, help="the job's bus, tcp://HOST:PORT")
    att.add_argument("--backend", choices=["torch", "sglang"])
    att.add_argument("--name")
    att.add_argument("--keys", help="CurveZMQ keys directory of a secured bus")

    st = sub.add_parser("status", help="list the actors of a running job")
    st.add_argument("--bus", required=True)
    st.add_argument("--keys")

    keys = sub.add_parser("keys", help="make CurveZMQ keys for a bus that listens beyond loopback")
    keys.add_argument("dir")
    keys.add_argument("--force", action="store_true")

    plot = sub.add_parser("plot", help="PNG of a run's reward, accuracy, truncation and throughput")
    plot.add_argument("run_dir")
    plot.add_argument("--out")

    sft = sub.add_parser("sft", help="supervised fine-tuning on (prompt, response) JSONL")
    sft.add_argument("--data", required=True)
    sft.add_argument("--model", default="smollm2")
    sft.add_argument("--out", required=True)
    sft.add_argument("--epochs", type=int, default=2)
    sft.add_argument("--lr", type=float, default=1e-5)
    sft.add_argument("--batch-size", type=int, default=16)
    sft.add_argument("--seed", type=int, default=1)
    sft.add_argument("--bf16", action="store_true", help="bf16 weights and compute, fp32 master weights in AdamW")
    sft.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (slow first step)")

    ev = sub.add_parser("eval", help="pass@1 over k samples per problem")
    ev.add_argument("--data", required=True)
    ev.add_argument("--model", default="smollm2")
    ev.add_argument("-k", type=int, default=32)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, default=512)
    ev.add_argument("--force-newline", action="store_true", help="responses begin with a newline")
    ev.add_argument("--limit", type=int, help="only the first N problems")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.add_argument("--seed", type=int, default=1)
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                    help="the sampling model's weights; auto = bfloat16 where it is native")

    _data_args(ev)

    flt = sub.add_parser("filter", help="drop problems the base model always solves")
    flt.add_argument("--data", required=True)
    flt.add_argument("--model", default="smollm2")
    flt.add_argument("-k", type=int, default=8)
    flt.add_argument("--out", required=True)
    flt.add_argument("--temperature", type=float, default=1.0)
    flt.add_argument("--max-new-tokens", type=int, default=512)
    flt.add_argument("--seed", type=int, default=1)
    flt.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                    help="the sampling model's weights; auto = bfloat16 where it is native")

    _data_args(flt)
    sft.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when present")

    main = sub.add_parser("main", help="the demo: data, SFT, eval, RL, eval, before/after table")
    main.add_argument("--out", default="runs/main")
    main.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget for the whole demo")
    main.add_argument("--model", default="smollm2", help="smollm2 | tiny (a smoke run) | an HF directory")
    main.add_argument("--test-problems", type=int, default=96)
    main.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of configs/demo.yaml (e.g. -o train.steps=2)")

    cfg = sub.add_parser("config", help="print the effective config")
    _common_config(cfg)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run"] + argv
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from launcher.commands import commands
    return getattr(commands, f"cmd_{args.command}")(args)


if __name__ == "__main__":
    sys.exit(main())
