"""Evaluation: pass@1 estimated from k samples per problem (the release's protocol).

pass@1 = mean over problems of (correct samples / k). Generation uses the torch engine (prompts
share one prefill per group), scoring uses the verifier pool, so a pathological answer costs at most
the verifier timeout.
"""
from __future__ import annotations

import sys
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from policies.data.dataset import Problem, load_problems

from policies.data.prompts import DIRECTIVE, build_prompt, stop_ids
from policies.infer.sampling import GenerationEngine, SamplingParams
from policies.verify.verifier import VerifierPool

log = logging.getLogger("launcher.eval")


@dataclass
class EvalSettings:
    k: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    force_newline: bool = False
    directive: str = DIRECTIVE
    seed: int = 1
    system_prompt: str | None = None
    max_active_sequences: int = 64  # samples decoded at once; bounds memory on small machines

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k: expected >= 1, got {self.k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")


def sample_answers(model, tokenizer, problems: list[Problem], s: EvalSettings, *, label: str = "eval"):
    """k responses per problem: returns (texts per problem, truncated flags per problem)."""
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            stop_token_ids=tuple(stop_ids(tokenizer)), seed=s.seed)
    engine = GenerationEngine(model, max_batch_size=s.max_active_sequences)
    prompts = [build_prompt(tokenizer, p.prompt, s.directive, s.force_newline, system_prompt=s.system_prompt)
               for p in problems]
    texts: list[list[str | None]] = [[None] * s.k for _ in problems]
    truncated: list[list[bool]] = [[False] * s.k for _ in problems]
    for i, ids in enumerate(prompts):  # the engine admits groups as room frees up
        engine.add(str(i), ids, s.k, params)
    t0 = last = time.monotonic()
    done, total = 0, len(problems) * s.k
    with torch.inference_mode():
        while engine.has_work():
            for f in engine.step():
                i = int(f.rid)
                texts[i][f.index] = tokenizer.decode(f.output_ids, skip_special_tokens=True)
                truncated[i][f.index] = f.finish_reason == "length"
                done += 1
            if time.monotonic() - last > 15:
                last = time.monotonic()
                log.info("%s: %d/%d samples (%.0f s)", label, done, total, last - t0)
    return texts, truncated


def evaluate(model, tokenizer, problems: list[Problem], s: EvalSettings, *, pool: VerifierPool | None = None,
             label: str = "eval") -> dict:
    texts, truncated = sample_answers(model, tokenizer, problems, s, label=label)
    own_pool = pool is None
    pool = pool or VerifierPool(workers=2, timeout=5.0)
    try:
        flat = [t for row in texts for t in row]
        refs = [p.answers for p in problems for _ in range(s.k)]
        correct = pool.score_sync(flat, refs)
    finally:
        if own_pool:
            pool.close()
    per_problem = []
    for i, p in enumerate(problems):
        c = correct[i * s.k:(i + 1) * s.k]
        per_problem.append({"id": p.id, "correct": int(sum(c)), "k": s.k})
    pass1 = sum(r["correct"] / s.k for r in per_problem) / max(1, len(per_problem))
    trunc = sum(sum(row) for row in truncated) / max(1, len(problems) * s.k)
    return {"pass@1": pass1, "k": s.k, "problems": len(problems), "truncation_rate": trunc,
            "temperature": s.temperature, "top_p": s.top_p, "per_problem": per_problem,
            "sample": texts[0][0] if texts else None}


def cli_device(args) -> str:
    """--device: auto = cuda when present."""
    device = getattr(args, "device", "auto") or "auto"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return device


def cli_problems(args) -> list[Problem]:
    """--data read through the layout flags (--prompt-key, --answer-key, --id-key, --answer-format, --split)."""
    from policies.data.dataset import Layout
    layout = Layout(prompt_key=args.prompt_key, answer_key=args.answer_key, id_key=args.id_key,
                    answer_format=args.answer_format, split=args.split)
    return load_problems(args.data, layout=layout)


def run_eval_command(args) -> int:
    from policies.model.loading import load_model, load_tokenizer, model_path
    from policies.model.precision import resolve_dtype
    try:
        path = model_path(args.model)
        problems = cli_problems(args)
        s = EvalSettings(k=args.k, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, force_newline=args.force_newline, seed=args.seed,
                         system_prompt=args.system_prompt)
        device = cli_device(args)
        model = load_model(path, dtype=resolve_dtype(args.dtype, device), device=device)
        tok = load_tokenizer(path)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        problems = problems[:args.limit]
    torch.manual_seed(args.seed)
    result = evaluate(model, tok, problems, s)
    print(f"{'model':<40} {'problems':>8} {'k':>4} {'pass@1':>8} {'truncated':>9}")
    print(f"{path[-40:]:<40} {result['problems']:>8} {s.k:>4} {result['pass@1']:>8.3f} "
          f"{result['truncation_rate']:>9.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": path, **result}, indent=1))
        print(f"results written to {args.out}")
    return 0
