"""Evaluation: pass@1 estimated from k samples per problem (the release's protocol).

pass@1 = mean over problems of (correct samples / k). Generation uses the torch engine (prompts
share one prefill per group), scoring uses the verifier pool, so a pathological answer costs at most
the verifier timeout. `EvalConfig` is the `eval.*` config section and the flags of the `eval` and
`filter` commands; the `eval` command, the main job and the learner's `eval.every` all call `evaluate`.
"""
from __future__ import annotations

import logging
import time
import typing
from dataclasses import dataclass
from typing import Literal

import torch

from policies.data.prompts import DIRECTIVE, build_prompt, stop_ids
from policies.settings import Checked, at_least_one, non_negative, opt, positive, unit_interval

if typing.TYPE_CHECKING:   # the config section alone is imported with every config: keep it light
    from policies.data.dataset import Problem
    from policies.verify.verifier import VerifierPool

log = logging.getLogger("policies.infer.evaluate")

MAX_ACTIVE_SEQUENCES = 64  # samples decoded at once; bounds memory on small machines


@dataclass
class EvalConfig(Checked):
    k: int = opt(32, check=at_least_one, expect=">= 1", doc="samples per problem for pass@1")
    temperature: float = opt(1.0, check=positive, expect="> 0",
                             doc="0.6 for SFT models, 1.0 for RL models (release notes)")
    top_p: float = opt(1.0, check=unit_interval, expect="in (0, 1]", doc="0.95 for SFT models")
    max_new_tokens: int = opt(512, check=at_least_one, expect=">= 1", doc="the longest response")
    force_newline: bool = opt(False, doc="responses begin with a newline")
    dtype: Literal["float32", "bfloat16", "auto"] = opt(
        "float32", doc="the sampling model's weights; auto = bfloat16 where it is native")
    every: int = opt(0, check=non_negative, expect=">= 0 (0 = never)",
                     doc="during an RL run, pass@1 on data.test every K steps, in the step's metrics")


def sample_answers(model, tokenizer, problems: list[Problem], cfg: EvalConfig, *, seed: int = 1,
                   directive: str = DIRECTIVE, system_prompt: str | None = None, label: str = "eval"):
    """k responses per problem: returns (texts per problem, truncated flags per problem)."""
    from policies.infer.sampling import GenerationEngine, SamplingParams
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=tuple(stop_ids(tokenizer)), seed=seed)
    engine = GenerationEngine(model, max_batch_size=MAX_ACTIVE_SEQUENCES)
    prompts = [build_prompt(tokenizer, p.prompt, directive, cfg.force_newline, system_prompt=system_prompt)
               for p in problems]
    k = cfg.k
    texts: list[list[str | None]] = [[None] * k for _ in problems]
    truncated: list[list[bool]] = [[False] * k for _ in problems]
    for i, ids in enumerate(prompts):  # the engine admits groups as room frees up
        engine.add(str(i), ids, k, params)
    t0 = last = time.monotonic()
    done, total = 0, len(problems) * k
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


def evaluate(model, tokenizer, problems: list[Problem], cfg: EvalConfig, *, seed: int = 1,
             directive: str = DIRECTIVE, system_prompt: str | None = None, pool: VerifierPool | None = None,
             label: str = "eval") -> dict:
    """pass@1, the truncation rate and each problem's count of correct samples (`per_problem`)."""
    texts, truncated = sample_answers(model, tokenizer, problems, cfg, seed=seed, directive=directive,
                                      system_prompt=system_prompt, label=label)
    return summarise(problems, texts, truncated, cfg, pool=pool)


def summarise(problems: list[Problem], texts: list[list[str | None]], truncated: list[list[bool]], cfg: EvalConfig,
              *, pool: VerifierPool | None = None, judged: list[bool | None] | None = None) -> dict:
    """The result of `evaluate` from k texts per problem; `judged` (flat, k per problem) holds verdicts
    already known (a workflow's reward), None where the verifier scores the text."""
    from policies.verify.verifier import VerifierPool
    k = cfg.k
    flat = [t for row in texts for t in row]
    judged = judged or [None] * len(flat)
    ask = [i for i, v in enumerate(judged) if v is None]
    own_pool = pool is None and bool(ask)
    pool = pool or (VerifierPool(workers=2, timeout=5.0) if ask else None)
    try:
        scored = pool.score_sync([flat[i] for i in ask], [problems[i // k].answers for i in ask]) if ask else []
    finally:
        if own_pool:
            pool.close()
    correct = list(judged)
    for i, c in zip(ask, scored):
        correct[i] = c
    per_problem = []
    for i, p in enumerate(problems):
        c = correct[i * k:(i + 1) * k]
        per_problem.append({"id": p.id, "correct": int(sum(c)), "k": k})
    pass1 = sum(r["correct"] / k for r in per_problem) / max(1, len(per_problem))
    trunc = sum(sum(row) for row in truncated) / max(1, len(problems) * k)
    return {"pass@1": pass1, "k": k, "problems": len(problems), "truncation_rate": trunc,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "per_problem": per_problem,
            "sample": texts[0][0] if texts else None}
