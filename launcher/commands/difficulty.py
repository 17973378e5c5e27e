"""`python -m launcher filter`: sample k solutions per problem with the base model, keep those not always solved.

Problems the model already solves every time carry no RL signal (all rewards equal), so the release
drops them before training.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher.commands.evaluate import sample_and_score
from launcher.commands.inputs import add_model_flags, add_problem_flags
from launcher.config.flags import add_flags
from launcher.config.schema import ExperimentConfig
from policies.data.dataset import TABLE_SUFFIXES, write_jsonl
from policies.infer.evaluate import EvalConfig

FLAGS = ("k", "temperature", "max_new_tokens", "dtype")
SAMPLES = 8  # the release samples 8 solutions per problem to filter (eval.k's 32 is for pass@1)


def add_filter_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--out", required=True)
    add_flags(p, EvalConfig, *FLAGS, k=SAMPLES)
    add_flags(p, ExperimentConfig, "seed")
    add_problem_flags(p)


def keep_ids(per_problem: list[dict]) -> set[str]:
    return {r["id"] for r in per_problem if r["correct"] < r["k"]}


def run_filter_command(args) -> int:
    done = sample_and_score(args, FLAGS, label="filter")
    if isinstance(done, int):
        return done
    _, s, probs, result = done
    keep = keep_ids(result["per_problem"])
    if Path(args.data).is_file() and Path(args.data).suffix.lower() not in TABLE_SUFFIXES:   # JSONL: lines as they were
        raw = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    else:  # a table: AReaL's JSONL layout, the references already cut out, the other columns kept
        raw = [{**p.extra, "query_id": p.id, "prompt": p.prompt, "solutions": p.answers} for p in probs]
    by_id = {p.id: r for p, r in zip(probs, raw)}
    write_jsonl(args.out, [by_id[p.id] for p in probs if p.id in keep])
    print(f"kept {len(keep)} of {len(probs)} problems (dropped {len(probs) - len(keep)} always solved "
          f"in {s.k} samples) -> {args.out}")
    return 0
