"""Difficulty filter: sample k solutions per problem with the base model, keep those not always solved.

Problems the model already solves every time carry no RL signal (all rewards equal), so the release
drops them before training.
"""
from __future__ import annotations

import sys
import json
from pathlib import Path

import torch

from policies.data.dataset import TABLE_SUFFIXES, write_jsonl
from launcher.commands.evaluate import EvalSettings, cli_device, cli_problems, evaluate


def keep_ids(per_problem: list[dict]) -> set[str]:
    return {r["id"] for r in per_problem if r["correct"] < r["k"]}


def run_filter_command(args) -> int:
    from policies.model.loading import load_model, load_tokenizer, model_path
    from policies.model.precision import resolve_dtype
    try:
        path = model_path(args.model)
        problems = cli_problems(args)
        s = EvalSettings(k=args.k, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                         system_prompt=args.system_prompt)
        device = cli_device(args)
        model = load_model(path, dtype=resolve_dtype(args.dtype, device), device=device)
        tok = load_tokenizer(path)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    result = evaluate(model, tok, problems, s, label="filter")
    keep = keep_ids(result["per_problem"])
    if Path(args.data).is_file() and Path(args.data).suffix.lower() not in TABLE_SUFFIXES:   # JSONL: lines as they were
        raw = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    else:  # a table: AReaL's JSONL layout, the references already cut out, the other columns kept
        raw = [{**p.extra, "query_id": p.id, "prompt": p.prompt, "solutions": p.answers} for p in problems]
    by_id = {p.id: r for p, r in zip(problems, raw)}
    write_jsonl(args.out, [by_id[p.id] for p in problems if p.id in keep])
    print(f"kept {len(keep)} of {len(problems)} problems (dropped {len(problems) - len(keep)} always solved "
          f"in {args.k} samples) -> {args.out}")
    return 0
