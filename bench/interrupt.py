"""rollout.interrupt_on_update on one torch engine: generated tokens/s with weight updates arriving
mid-sequence, interrupting (re-prefill every running row) against waiting (the batch drains, no new
group starts until the update is applied), same run, same groups.

A stream of groups (G samples each) with long-tailed response lengths (lognormal, capped at
--max-new-tokens, eos ignored so both modes make exactly the same tokens) runs through a
GenerationEngine with --max-batch-size rows; every --update-every decode steps a weight update
(the same values, so both modes compute the same thing) arrives. Printed per mode: seconds,
tokens/s, decode steps, sequences interrupted, tokens re-prefilled, mean rows per step; then the
ratio interrupt / wait. The modes alternate per repeat; the best time of each is taken (shared machine).

    .venv/bin/python bench/interrupt.py [--model tiny|smollm2 --groups 24 --samples 4 --max-new-tokens 256
                                         --update-every 32 --max-batch-size 32 --repeats 2 --threads 2]
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import bench_parser  # noqa: E402
from policies.model.loading import load_model, smollm2_dir, tiny_model  # noqa: E402
from policies.infer.sampling import GenerationEngine, SamplingParams  # noqa: E402


def lengths(n: int, cap: int, seed: int) -> list[int]:
    """Long-tailed response lengths: lognormal with the median at cap / 6, capped at cap."""
    rng = random.Random(seed)
    return [max(1, min(cap, int(rng.lognormvariate(0, 1) * cap / 6))) for _ in range(n)]


def run(model, groups, samples: int, update_every: int, max_batch_size: int, interrupt: bool) -> dict:
    engine = GenerationEngine(model, max_batch_size=max_batch_size, seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for i, (prompt, new) in enumerate(groups):
        engine.add(str(i), prompt, samples, SamplingParams(max_new_tokens=new, ignore_eos=True, seed=i))
    pending, rows, t0 = False, 0, time.perf_counter()
    while engine.has_work():
        if pending and (interrupt or engine.num_active == 0):
            engine.update_weights(weights, engine.version + 1)
            pending = False
        engine.step(admit=not pending)
        rows += engine.num_active
        if engine.stats.decode_steps % update_every == 0:
            pending = True
    seconds = time.perf_counter() - t0
    s = engine.stats
    return {"seconds": seconds, "tok_s": s.generated_tokens / seconds, "steps": s.decode_steps,
            "interrupted": s.interrupted, "reprefill_tokens": s.reprefill_tokens, "rows": rows / s.decode_steps,
            "updates": engine.version}


def main() -> None:
    ap = bench_parser(__doc__, samples=4, repeats=2, threads=2)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--update-every", type=int, default=32, help="decode steps between weight updates")
    ap.add_argument("--max-batch-size", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = (tiny_model(seed=0, initializer_range=0.5) if a.model == "tiny"
             else load_model(str(smollm2_dir()), dtype=torch.float32, device="cpu")).eval()
    g = torch.Generator().manual_seed(0)
    groups = [(torch.randint(3, model.config.vocab_size, (a.prompt_tokens,), generator=g).tolist(), n)
              for n in lengths(a.groups, a.max_new_tokens, seed=0)]
    best: dict[str, dict] = {}
    for r in range(a.repeats):
        for mode in (["interrupt", "wait"] if r % 2 == 0 else ["wait", "interrupt"]):
            out = run(model, groups, a.samples, a.update_every, a.max_batch_size, mode == "interrupt")
            if mode not in best or out["seconds"] < best[mode]["seconds"]:
                best[mode] = out
    print(f"model {a.model}, {a.groups} groups x {a.samples} samples, prompt {a.prompt_tokens} tokens, responses "
          f"lognormal capped at {a.max_new_tokens}, an update every {a.update_every} decode steps, "
          f"max_batch_size {a.max_batch_size}, {a.threads} threads, best of {a.repeats}")
    print(f"{'mode':<10} {'s':>8} {'tok/s':>8} {'steps':>6} {'updates':>7} {'interrupted':>11} {'re-prefilled':>12} "
          f"{'rows/step':>9}")
    for mode, m in best.items():
        print(f"{mode:<10} {m['seconds']:8.2f} {m['tok_s']:8.0f} {m['steps']:6d} {m['updates']:7d} "
              f"{m['interrupted']:11d} {m['reprefill_tokens']:12d} {m['rows']:9.1f}")
    print(f"interrupt / wait tokens/s: {best['interrupt']['tok_s'] / best['wait']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
