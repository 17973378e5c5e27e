"""`python -m launcher eval`: pass@1 of a model over k samples per problem (policies.infer.evaluate)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from launcher.commands.inputs import add_model_flags, add_problem_flags, failed, load_inputs, problems
from launcher.config.flags import add_flags, settings_from
from launcher.config.schema import ExperimentConfig
from policies.infer.evaluate import EvalConfig, evaluate

FLAGS = ("k", "temperature", "top_p", "max_new_tokens", "force_newline", "dtype")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_flags(p, EvalConfig, *FLAGS)
    add_flags(p, ExperimentConfig, "seed")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--out", help="write the results as JSON here")
    add_problem_flags(p)


def sample_and_score(args, flags: tuple[str, ...], label: str = "eval"):
    """What `eval` and `filter` share: the settings from `flags`, the model and the problems (the first
    --limit), then pass@1 -> (model path, settings, problems, result), or the exit code of a bad input."""
    try:
        s = settings_from(args, EvalConfig, *flags)
        path, model, tok, probs = load_inputs(args, problems, s.dtype)
    except (ValueError, OSError) as exc:
        return failed(exc)
    probs = probs[:args.limit] if getattr(args, "limit", None) else probs
    torch.manual_seed(args.seed)
    return path, s, probs, evaluate(model, tok, probs, s, seed=args.seed, system_prompt=args.system_prompt,
                                    label=label)


def run_eval_command(args) -> int:
    done = sample_and_score(args, FLAGS)
    if isinstance(done, int):
        return done
    path, s, _, result = done
    print(f"{'model':<40} {'problems':>8} {'k':>4} {'pass@1':>8} {'truncated':>9}")
    print(f"{path[-40:]:<40} {result['problems']:>8} {s.k:>4} {result['pass@1']:>8.3f} "
          f"{result['truncation_rate']:>9.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": path, **result}, indent=1))
        print(f"results written to {args.out}")
    return 0
