"""`eval.every: K`: pass@1 on data.test every K RL steps, inside the learner's process.

The learner holds the freshest weights, so it evaluates there, after the step's weights went out to
the generators (they sample on while it evaluates). Sampling runs on a separate copy of the model,
loaded once and refreshed from the trained weights each time: the engine re-homes its parameters
for fused matmuls, which the trained model and its optimizer must never see. The result lands in
that step's metrics as `eval_pass@1` and `eval_truncation_rate` (the \\boxed{} check, as the `eval`
command; `reward.fns` do not apply).
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("actors.learner.periodic_eval")


class PeriodicEval:
    """Callable on the trained model after step `step` (1-based count of steps done) when `due(step)`."""

    def __init__(self, cfg, model_path: str, tokenizer, *, device: str, dtype: torch.dtype):
        from launcher.commands.evaluate import EvalSettings
        from launcher.job.data import data_layout
        from policies.data.dataset import load_problems
        from policies.model.loading import load_model
        self.every = cfg.eval.every
        self.problems = load_problems(cfg.data.test, skip_malformed=cfg.data.skip_malformed, layout=data_layout(cfg))
        e = cfg.eval
        self.settings = EvalSettings(k=e.k, temperature=e.temperature, top_p=e.top_p, max_new_tokens=e.max_new_tokens,
                                     force_newline=e.force_newline, directive=cfg.data.prompt_directive,
                                     seed=cfg.seed, system_prompt=cfg.data.system_prompt)
        self.tokenizer = tokenizer
        self.model = load_model(model_path, dtype=dtype, device=device).requires_grad_(False).eval()

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0

    def __call__(self, trained) -> dict[str, float]:
        from launcher.commands.evaluate import evaluate
        t0 = time.monotonic()
        with torch.no_grad():
            own = dict(self.model.named_parameters())
            for name, p in trained.named_parameters():
                own[name].copy_(p)
        result = evaluate(self.model, self.tokenizer, self.problems, self.settings, label="eval.every")
        log.info("eval.every: pass@1 %.3f over %d problems x %d samples (%.0f s)", result["pass@1"],
                 result["problems"], self.settings.k, time.monotonic() - t0)
        return {"eval_pass@1": float(result["pass@1"]), "eval_truncation_rate": float(result["truncation_rate"])}
