"""The main job (`./run.sh`): the whole recipe end to end on one CPU machine, inside a time budget.

Make the data (reasoning-gym's generators, launcher.gymdata), evaluate the base model, SFT it on ~200
worked solutions, evaluate, run the asynchronous RL loop through all six actors for as many steps as
the budget allows, evaluate again, and print the before/after table with the plot's path. Every
evaluation has two columns: the test split (in distribution) and the held-out split (templates no
stage trains on), the latter also by part, so the table says whether the skill was learned or the phrasing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from actors.learner import checkpoint
from policies.data.dataset import load_problems, load_sft_pairs
from launcher.config import load_config
from policies.settings import to_dict
from policies.infer.evaluate import EvalConfig, evaluate
from launcher.gymdata import make_gym_dataset
from launcher.plot import plot_run
from launcher.job.start import base_model_path
from launcher.job.run import run_job
from launcher.commands.sft import train_sft
from policies.model.loading import load_model, load_tokenizer, save_checkpoint
from policies.model.precision import resolve_dtype

log = logging.getLogger("launcher.commands.demo")

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


HELDOUT_PARTS = {"mathdata": "held out: six templates", "gsm_symbolic": "held out: gsm_symbolic"}


def _stamp(path: str | Path) -> list:
    """What identifies a file's or model directory's contents cheaply: path, size, mtime."""
    p = Path(path).resolve()
    f = p / "model.safetensors" if p.is_dir() else p
    st = f.stat() if f.exists() else None
    return [str(p), st and st.st_size, st and st.st_mtime_ns]


def _eval(path: str, splits: dict, s: EvalConfig, seed: int, label: str, cache: Path) -> dict:
    """pass@1 on each split ({"test": (file, problems), "heldout": ...}), the held-out one also by part.
    A result already in `cache` for the same model, file, settings and seed is reused: a main job run
    again (interrupted, or with a longer --minutes) spends its time on what is not done yet."""
    known = json.loads(cache.read_text()) if cache.exists() else {}
    model = tok = None
    out = {}
    for split, (file, problems) in splits.items():
        key = json.dumps([_stamp(path), _stamp(file), to_dict(s), seed])
        if key in known:
            out[split] = known[key]
            print(f"[main] {label}, {split}: pass@1 {out[split]['pass@1']:.3f} (measured before: {cache})", flush=True)
            continue
        if model is None:
            model, tok = load_model(path, dtype=resolve_dtype(s.dtype, "cpu")), load_tokenizer(path)
        t0 = time.monotonic()
        r = evaluate(model, tok, problems, s, seed=seed, label=f"{label}, {split}")
        r["seconds"] = time.monotonic() - t0
        source = {p.id: p.extra.get("source") for p in problems}
        for part in sorted(set(source.values()) & set(HELDOUT_PARTS)) if split == "heldout" else ():
            mine = [q for q in r["per_problem"] if source[q["id"]] == part]
            r[part] = sum(q["correct"] / q["k"] for q in mine) / len(mine)
        print(f"[main] {label}, {split}: pass@1 {r['pass@1']:.3f} over {r['problems']} problems x {s.k} "
              f"(truncated {r['truncation_rate']:.2f}, {r['seconds']:.0f} s)"
              + "".join(f"; {HELDOUT_PARTS[k]} {r[k]:.3f}" for k in HELDOUT_PARTS if k in r), flush=True)
        out[split] = known[key] = r
        cache.write_text(json.dumps(known))
    return out


def _table(results: dict) -> str:
    parts = [k for k in HELDOUT_PARTS if any(k in r.get("heldout", {}) for r in results.values())]
    cols = ["in distribution (test)"] + (["held out"] if any("heldout" in r for r in results.values()) else [])
    cols += [HELDOUT_PARTS[k] for k in parts]
    first = next(iter(results.values()))
    ks = {name: r["test"]["k"] for name, r in results.items()}
    k = f"{first['test']['k']}" if len(set(ks.values())) == 1 else ", ".join(f"{n} {v}" for n, v in ks.items())
    lines = [f"pass@1, {k} samples per problem, T {first['test']['temperature']}, top-p "
             f"{first['test']['top_p']}; " + ", ".join(f"{k}: {r['problems']} problems" for k, r in first.items()),
             "", "| model | " + " | ".join(cols) + " | truncated (test) |", "|---" * (len(cols) + 2) + "|"]
    for name, r in results.items():
        cells = [r["test"]["pass@1"]] + ([r["heldout"]["pass@1"]] if "heldout" in r else [])
        cells += [r["heldout"][k] for k in parts]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells)
                     + f" | {r['test']['truncation_rate']:.2f} |")
    return "\n".join(lines)


def run_demo(args) -> int:
    if args.base_k < 1:
        print(f"error: --base-k {args.base_k}: expected an int >= 1", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    budget = args.minutes * 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(DEMO_CONFIG, [f"run_dir={out / 'rl'}", *args.overrides])
    data = Path(args.data) if args.data else out / "data"
    if not (data / "train.jsonl").exists():
        make_gym_dataset(data, n_train=512, n_test=args.test_problems, n_sft=200, n_heldout=args.heldout_problems,
                         seed=cfg.seed)
        print(f"[main] data: reasoning-gym's problems in {data} (what made them: {data / 'manifest.json'})",
              flush=True)
    # a directory of other problems (python -m launcher.mathdata, a user's own) may have no held-out split
    splits = {name: (data / f"{name}.jsonl", load_problems(data / f"{name}.jsonl")) for name in ("test", "heldout")
              if name == "test" or (data / f"{name}.jsonl").exists()}
    cache = out / "evaluations.json"
    torch.manual_seed(cfg.seed)
    cfg.model.path = args.model
    base = base_model_path(cfg)  # "tiny" (a smoke run: every stage in seconds, learns nothing) lands in the run dir
    # the base row is a reference (the base model hardly ever writes \boxed{}): --base-k samples leave RL the time
    results = {"base": _eval(base, splits, dataclasses.replace(cfg.eval, k=args.base_k), cfg.seed, "base model",
                             cache)}

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
    results["sft"] = _eval(str(sft_dir), splits, cfg.eval, cfg.seed, "after SFT", cache)

    # RL gets what is left of the budget, minus the final evaluation (about as long as the last one).
    rl_budget = budget - (time.monotonic() - t_start) - 1.3 * sum(r["seconds"] for r in results["sft"].values()) - 30
    cfg.model.path = str(sft_dir)
    cfg.data.train = str(data / "train.jsonl")
    print(f"[main] RL: up to {cfg.train.steps} steps within {max(0, rl_budget) / 60:.1f} min", flush=True)
    if rl_budget > 30:
        asyncio.run(run_job(cfg, hosts=None, resume=False, echo=False, deadline=rl_budget))
    ckpt = checkpoint.latest(out / "rl")
    if ckpt is not None:
        results["rl"] = _eval(str(ckpt / "model"), splits, cfg.eval, cfg.seed, f"after RL ({ckpt.name})", cache)
    plot = plot_run(out / "rl") if (out / "rl" / "metrics.jsonl").exists() else None

    print("\n" + _table(results))
    print(f"\nplot: {plot}\nresults: {out / 'results.json'}\ntotal time: "
          f"{(time.monotonic() - t_start) / 60:.1f} min")
    (out / "results.json").write_text(json.dumps(
        {stage: {split: {k: v for k, v in r.items() if k != "per_problem"} for split, r in by_split.items()}
         for stage, by_split in results.items()}, indent=1))
    return 0
