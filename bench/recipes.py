"""pass@1 on the test set at equal RL time: the main job under `ppo.recipe: dapo` against boba, same run.

Both recipes start from one SFT model (the main job's data and SFT stage, built once under OUT/shared and
reused), then run the main job's RL loop (configs/demo.yaml: six actors, asynchronous, SmolLM2) for the same
wall-clock `--minutes`, and the last checkpoint of each is evaluated on the same test problems with the same
seed. What differs is only what `ppo.recipe` sets (printed per run: clip-higher, group advantages, dynamic
sampling that refills zero-variance groups instead of dropping them, the overlong punishment, token TIS).
Recipes run one after another on a shared machine, so contention may favour either: alternate --recipes
order across runs before trusting a small gap.

    .venv/bin/python bench/recipes.py [--minutes 20 --recipes boba dapo --test-problems 96 --out runs/bench-recipes]
    .venv/bin/python bench/recipes.py --model tiny --no-sft --minutes 0.5 --test-problems 4  # smoke: learns nothing
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.learner import checkpoint  # noqa: E402
from launcher.commands.demo import DEMO_CONFIG, _eval  # noqa: E402
from launcher.commands.sft import train_sft  # noqa: E402
from launcher.config import describe_recipe, load_config  # noqa: E402
from launcher.job.metrics import read_metrics  # noqa: E402
from launcher.job.run import run_job  # noqa: E402
from launcher.job.start import base_model_path  # noqa: E402
from launcher.mathdata import make_dataset  # noqa: E402
from policies.data.dataset import load_problems, load_sft_pairs  # noqa: E402
from policies.model.loading import load_model, load_tokenizer, save_checkpoint  # noqa: E402


def shared_start(out: Path, model: str, test_problems: int, overrides: list[str],
                 sft: bool = True) -> tuple[Path, Path, dict]:
    """The data and the SFT model both recipes start from (built once; the base model without `sft`), and
    its pass@1."""
    cfg = load_config(DEMO_CONFIG, [f"run_dir={out / 'base'}", *overrides])
    data, sft_dir = out / "data", out / "sft-model"
    if not (data / "train.jsonl").exists():
        make_dataset(data, n_train=512, n_test=test_problems, n_sft=200, seed=cfg.seed)
    cfg.model.path = model
    if not sft:
        sft_dir = Path(base_model_path(cfg))
    elif not (sft_dir / "config.json").exists():
        base = base_model_path(cfg)
        m, tok = load_model(base), load_tokenizer(base)
        torch.manual_seed(cfg.seed)
        train_sft(m, tok, load_sft_pairs(data / "sft.jsonl"), cfg.sft, seed=cfg.seed)
        save_checkpoint(m, tok, sft_dir)
    return data, sft_dir, _eval(str(sft_dir), load_problems(data / "test.jsonl"), cfg.eval, cfg.seed, "SFT start")


def rl_run(recipe: str, out: Path, data: Path, sft_dir: Path, minutes: float, overrides: list[str]) -> dict:
    cfg = load_config(DEMO_CONFIG, [f"run_dir={out / recipe}", f"ppo.recipe={recipe}", *overrides])
    cfg.model.path, cfg.data.train = str(sft_dir), str(data / "train.jsonl")
    print(f"[bench] {recipe}: {describe_recipe(cfg)}; RL for {minutes} min", flush=True)
    t0 = time.monotonic()
    asyncio.run(run_job(cfg, hosts=None, resume=False, echo=False, deadline=minutes * 60))
    seconds = time.monotonic() - t0
    ckpt = checkpoint.latest(out / recipe)
    records = read_metrics(out / recipe)
    row = {"recipe": recipe, "rl_seconds": seconds, "steps": len(records),
           "groups": sum(int(m.get("groups", 0)) for m in records),
           "dropped": sum(int(m.get("groups_dropped", 0)) for m in records), "pass@1": float("nan")}
    if ckpt is not None:
        r = _eval(str(ckpt / "model"), load_problems(data / "test.jsonl"), cfg.eval, cfg.seed, f"{recipe} ({ckpt.name})")
        row["pass@1"] = r["pass@1"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="RL wall-clock minutes per recipe")
    ap.add_argument("--recipes", nargs="+", default=["boba", "dapo"])
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny (a smoke run) | an HF directory")
    ap.add_argument("--test-problems", type=int, default=96)
    ap.add_argument("--out", default="runs/bench-recipes")
    ap.add_argument("--no-sft", action="store_true", help="start RL from the base model (a quick smoke run)")
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, sft_dir, start = shared_start(out, args.model, args.test_problems, args.overrides,
                                          sft=not args.no_sft)
    rows = [rl_run(r, out, data, sft_dir, args.minutes, args.overrides) for r in args.recipes]
    print(f"\nSFT start: pass@1 {start['pass@1']:.3f} over {start['problems']} problems x {start['k']}")
    print("| recipe | RL s | steps | groups dealt | dropped | pass@1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['rl_seconds']:.0f} | {r['steps']} | {r['groups']} | {r['dropped']} | "
              f"{r['pass@1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
