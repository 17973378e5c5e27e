"""The main job (`./run.sh`): the whole recipe end to end on one CPU machine, inside a time budget.

Build a local arithmetic dataset, evaluate the base model, SFT it on ~200 worked solutions, evaluate,
run the asynchronous RL loop through all six actors for as many steps as the budget allows,
evaluate again, and print the before/after table with the plot's path.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import torch

from actors.learner import checkpoint
from policies.data.dataset import load_problems, load_sft_pairs
from launcher.config import load_config
from policies.infer.evaluate import EvalConfig, evaluate
from launcher.mathdata import make_dataset
from launcher.plot import plot_run
from launcher.job.start import base_model_path
from launcher.job.run import run_job
from launcher.commands.sft import train_sft
from policies.model.loading import load_model, load_tokenizer, save_checkpoint
from policies.model.precision import resolve_dtype

log = logging.getLogger("launcher.commands.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _eval(path: str, problems, s: EvalConfig, seed: int, label: str) -> dict:
    model, tok = load_model(path, dtype=resolve_dtype(s.dtype, "cpu")), load_tokenizer(path)
    t0 = time.monotonic()
    r = evaluate(model, tok, problems, s, seed=seed, label=label)
    r["seconds"] = time.monotonic() - t0
    print(f"[main] {label}: pass@1 {r['pass@1']:.3f} over {r['problems']} problems x {s.k} "
          f"(truncated {r['truncation_rate']:.2f}, {r['seconds']:.0f} s)", flush=True)
    return r


def run_demo(args) -> int:
    t_start = time.monotonic()
    budget = args.minutes * 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(DEMO_CONFIG, [f"run_dir={out / 'rl'}", *args.overrides])
    data = Path(args.data) if args.data else out / "data"
    if args.data and not (data / "train.jsonl").exists():  # reasoning-gym's problems (python -m launcher data)
        from launcher.gymdata import make_gym_dataset
        make_gym_dataset(data, n_train=512, n_test=args.test_problems, n_sft=200, seed=cfg.seed)
    elif not (data / "train.jsonl").exists():
        make_dataset(data, n_train=512, n_test=args.test_problems, n_sft=200, seed=cfg.seed)
    test = load_problems(data / "test.jsonl")
    torch.manual_seed(cfg.seed)
    cfg.model.path = args.model
    base = base_model_path(cfg)  # "tiny" (a smoke run: every stage in seconds, learns nothing) lands in the run dir
    results = {"base": _eval(base, test, cfg.eval, cfg.seed, "base model")}

    sft_dir = out / "sft-model"
    if not (sft_dir / "config.json").exists():
        model, tok = load_model(base), load_tokenizer(base)
        pairs = load_sft_pairs(data / "sft.jsonl")
        t0 = time.monotonic()
        hist = train_sft(model, tok, pairs, cfg.sft, seed=cfg.seed)
        save_checkpoint(model, tok, sft_dir)
        print(f"[main] SFT: {len(hist)} steps on {len(pairs)} samples, loss {hist[0]['loss']:.3f} -> "
              f"{hist[-1]['loss']:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
        del model
    results["sft"] = _eval(str(sft_dir), test, cfg.eval, cfg.seed, "after SFT")

    # RL gets what is left of the budget, minus the final evaluation (about as long as the last one).
    rl_budget = budget - (time.monotonic() - t_start) - 1.3 * results["sft"]["seconds"] - 30
    cfg.model.path = str(sft_dir)
    cfg.data.train = str(data / "train.jsonl")
    print(f"[main] RL: up to {cfg.train.steps} steps within {max(0, rl_budget) / 60:.1f} min", flush=True)
    if rl_budget > 30:
        asyncio.run(run_job(cfg, hosts=None, resume=False, echo=False, deadline=rl_budget))
    ckpt = checkpoint.latest(out / "rl")
    if ckpt is not None:
        results["rl"] = _eval(str(ckpt / "model"), test, cfg.eval, cfg.seed, f"after RL ({ckpt.name})")
    plot = plot_run(out / "rl") if (out / "rl" / "metrics.jsonl").exists() else None

    print("\n| model | pass@1 | truncated | problems x k |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['pass@1']:.3f} | {r['truncation_rate']:.2f} | {r['problems']} x {r['k']} |")
    print(f"\nplot: {plot}\nresults: {out / 'results.json'}\ntotal time: "
          f"{(time.monotonic() - t_start) / 60:.1f} min")
    (out / "results.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk != "per_problem"} for k, v in results.items()}, indent=1))
    return 0
