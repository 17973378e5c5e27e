"""Generated tokens/s: policies.infer.sampling.GenerationEngine vs HF `model.generate`, same run, same prompts.

Both sample (temperature 1, no top-k / top-p), with G samples per prompt and exactly
max_new_tokens tokens per sample (eos ignored: `min_new_tokens` for HF, `ignore_eos` for the
engine), on SmolLM2-135M-Instruct, for each --dtypes value (both sides load the same dtype; bf16
runs on the CPU's AMX / AVX512-BF16 units where it has them). HF gets the prompts left-padded and
num_return_sequences=G (its usual batched sampling path). The runs alternate (order flipped each
repeat); the figure is the best of each (the machine is shared) and the median is printed too.
CPU seconds of the process are printed as well: with --threads 1 they are a contention-robust
measure of the work each side does (with 2 threads, OpenMP spin-waiting inflates them).

    .venv/bin/python bench/generate.py [--prompts 8 --samples 4 --new-tokens 64 --repeats 3 --threads 2
                                        --dtypes float32 bfloat16]
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import bench_parser  # noqa: E402
from policies.model.loading import load_model, load_tokenizer, smollm2_dir  # noqa: E402
from policies.infer.sampling import GenerationEngine, SamplingParams  # noqa: E402

DIRECTIVE = "Please reason step by step, and enclose your final answer in \\boxed{}."
PROBLEMS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
    "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
    "How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "Albert buys 2 large pizzas and 2 small pizzas. A large pizza has 16 slices and a small pizza has 8 slices. "
    "If he eats it all, how many pieces does he eat that day?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Tina makes $18.00 an hour. If she works more than 8 hours per shift, she is eligible for overtime, "
    "which is paid by your hourly wage + 1/2 your hourly wage. If she works 10 hours every day for 5 days, "
    "how much money does she make?",
    "Mark has a garden with flowers. He planted plants of three different colors in it. Ten of them are yellow, "
    "and there are 80% more of those in purple. There are only 25% as many green flowers as there are yellow "
    "and purple flowers. How many flowers does Mark have in his garden?",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [PROBLEMS[i % len(PROBLEMS)] + " " + DIRECTIVE for i in range(n)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True,
                                      return_dict=False)
        for t in texts
    ]


def run_hf(model, tokenizer, prompts, samples, new_tokens) -> tuple[float, float, int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=samples, pad_token_id=pad,
        )
    return time.perf_counter() - t0, time.process_time() - c0, (out.shape[1] - width) * out.shape[0]


def run_engine(model, prompts, samples, new_tokens) -> tuple[float, float, int]:
    engine = GenerationEngine(model, seed=0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, p in enumerate(prompts):
        engine.add(str(i), p, samples, params)
    tokens = 0
    while engine.has_work():
        tokens += sum(len(f.output_ids) for f in engine.step())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert engine.stats.prefills == len(prompts)
    return wall, cpu, tokens


def compare(model, tokenizer, prompts, args) -> dict[str, list[float]]:
    """Alternating runs of both sides; returns the tok/s of each run by side."""
    run_hf(model, tokenizer, prompts[:2], 2, 4)  # warm-up both paths
    run_engine(model, prompts[:2], 2, 4)
    runs = {
        "hf generate": lambda: run_hf(model, tokenizer, prompts, args.samples, args.new_tokens),
        "engine": lambda: run_engine(model, prompts, args.samples, args.new_tokens),
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    cpu_rates: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in sorted(runs, reverse=bool(r % 2)):
            wall, cpu, n = runs[name]()
            rates[name].append(n / wall)
            cpu_rates[name].append(n / cpu)
            print(f"  repeat {r}: {name:<11} {n} tokens in {wall:6.2f} s = {n / wall:6.1f} tok/s "
                  f"({cpu:6.2f} CPU s = {n / cpu:6.1f} tok/CPU-s)", flush=True)
    for name in runs:
        print(f"  {name:<11} : best {max(rates[name]):.1f} tok/s, median {statistics.median(rates[name]):.1f}; "
              f"best {max(cpu_rates[name]):.1f} tok/CPU-s")
    hf, eng = rates["hf generate"], rates["engine"]
    print(f"  ratio engine/hf: {max(eng) / max(hf):.2f}x (best), "
          f"{statistics.median(eng) / statistics.median(hf):.2f}x (median), "
          f"{max(cpu_rates['engine']) / max(cpu_rates['hf generate']):.2f}x (CPU time, best); goal >= 2x", flush=True)
    return rates


def main() -> None:
    ap = bench_parser(__doc__, samples=4, repeats=3, threads=2)
    ap.add_argument("--model", default=None, help="HF model dir (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    path = args.model or smollm2_dir()
    tokenizer = load_tokenizer(path)
    prompts = chat_prompts(tokenizer, args.prompts)
    results = {}
    for dtype in args.dtypes:
        model = load_model(path, dtype=getattr(torch, dtype)).eval()
        print(f"model {path}: {args.prompts} prompts (len {min(map(len, prompts))}-{max(map(len, prompts))}) x "
              f"{args.samples} samples x {args.new_tokens} new tokens, {dtype}, {args.threads} threads", flush=True)
        results[dtype] = compare(model, tokenizer, prompts, args)
    print("\nsummary (median tok/s):")
    for dtype, rates in results.items():
        hf, eng = statistics.median(rates["hf generate"]), statistics.median(rates["engine"])
        print(f"  {dtype:<9} hf generate {hf:6.1f}   engine {eng:6.1f}   engine/hf {eng / hf:.2f}x")
    if {"float32", "bfloat16"} <= results.keys():
        hf32 = statistics.median(results["float32"]["hf generate"])
        eng16 = statistics.median(results["bfloat16"]["engine"])
        print(f"  engine bf16 vs hf generate fp32 (a plain loop's default): {eng16 / hf32:.2f}x")


if __name__ == "__main__":
    main()
