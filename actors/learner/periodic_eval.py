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

from policies.data.dataset import Problem
from policies.data.prompts import DIRECTIVE
from policies.infer.evaluate import EvalConfig, evaluate
from policies.model.lora import effective_state, has_adapter

log = logging.getLogger("actors.learner.periodic_eval")


class PeriodicEval:
    """Callable on the trained model after step `step` (1-based count of steps done) when `due(step)`.

    `problems` (data.test) and `cfg` (eval.*) come from the launcher; `seed`, `directive` and
    `system_prompt` build the prompts as the rollouts' are built."""

    def __init__(self, problems: list[Problem], cfg: EvalConfig, model_path: str, tokenizer, *, device: str,
                 dtype: torch.dtype, seed: int = 1, directive: str = DIRECTIVE, system_prompt: str | None = None):
        from policies.model.loading import load_model
        self.problems, self.cfg, self.tokenizer = problems, cfg, tokenizer
        self.prompting = {"seed": seed, "directive": directive, "system_prompt": system_prompt}
        self.model = load_model(model_path, dtype=dtype, device=device).requires_grad_(False).eval()

    def due(self, steps_done: int) -> bool:
        return self.cfg.every > 0 and steps_done % self.cfg.every == 0

    def __call__(self, trained) -> dict[str, float]:
        t0 = time.monotonic()
        with torch.no_grad():
            own = dict(self.model.named_parameters())
            weights = effective_state(trained) if has_adapter(trained) else dict(trained.named_parameters())
            for name, p in weights.items():
                if name in own:  # a LoRA model's state also names tied weights twice
                    own[name].copy_(p)
        result = evaluate(self.model, self.tokenizer, self.problems, self.cfg, label="eval.every", **self.prompting)
        log.info("eval.every: pass@1 %.3f over %d problems x %d samples (%.0f s)", result["pass@1"],
                 result["problems"], self.cfg.k, time.monotonic() - t0)
        return {"eval_pass@1": float(result["pass@1"]), "eval_truncation_rate": float(result["truncation_rate"])}
