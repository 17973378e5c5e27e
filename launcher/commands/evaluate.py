"""`python -m launcher eval`: pass@1 of a model over k samples per problem (policies.infer.evaluate).

A LoRA adapter (PEFT's layout: a LoRA run's checkpoints/step-N/adapter) is evaluated on its base, merged:
`--adapter DIR` with `--model BASE`, or `--model DIR` alone when DIR holds adapter_config.json (the base
is the one it names). `--workflow SPEC` samples each answer through a multi-turn workflow, as RL with
rollout.workflow does (actors.rollout.evaluate); --max-new-tokens is then per turn."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from launcher.commands.inputs import add_model_flags, add_problem_flags, failed, load_inputs, problems
from launcher.config.flags import add_flags, settings_from
from launcher.config.schema import ExperimentConfig, RolloutConfig
from policies.infer.evaluate import EvalConfig, evaluate

FLAGS = ("k", "temperature", "top_p", "max_new_tokens", "force_newline", "dtype")
WORKFLOW_FLAGS = ("workflow", "max_turns", "max_trajectory_tokens", "workflow_timeout")


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    add_flags(p, EvalConfig, *FLAGS)
    add_flags(p, ExperimentConfig, "seed")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT's layout) to merge into --model")
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--out", help="write the results as JSON here")
    add_flags(p, RolloutConfig, *WORKFLOW_FLAGS)
    add_problem_flags(p)


def sample_and_score(args, flags: tuple[str, ...], label: str = "eval"):
    """What `eval` and `filter` share: the settings from `flags`, the model and the problems (the first
    --limit), then pass@1 -> (model path, settings, problems, result), or the exit code of a bad input."""
    try:
        s = settings_from(args, EvalConfig, *flags)
        w = _workflow(args)
        adapter = _adapter(args)
        path, model, tok, probs = load_inputs(args, problems, s.dtype)
        if adapter is not None:
            path = f"{path} + {adapter[0]}"
            merge_adapter(model, adapter[1], adapter[2])
    except (ValueError, OSError) as exc:
        return failed(exc)
    probs = probs[:args.limit] if getattr(args, "limit", None) else probs
    torch.manual_seed(args.seed)
    if w is None:
        return path, s, probs, evaluate(model, tok, probs, s, seed=args.seed, system_prompt=args.system_prompt,
                                        label=label)
    from actors.rollout.evaluate import evaluate_workflow
    try:
        return path, s, probs, evaluate_workflow(
            model, tok, probs, s, w.workflow, max_turns=w.max_turns, max_tokens=w.max_trajectory_tokens,
            timeout=w.workflow_timeout, seed=args.seed, system_prompt=args.system_prompt, label=label)
    except RuntimeError as exc:  # the workflow processes did not start
        return failed(exc)


def _workflow(args) -> RolloutConfig | None:
    """The --workflow settings, the workflow imported and checked (WorkflowError names it), or None."""
    if getattr(args, "workflow", None) is None:
        return None
    from actors.rollout.workflow import WorkflowError, load_workflow
    w = settings_from(args, RolloutConfig, *WORKFLOW_FLAGS)
    try:
        load_workflow(w.workflow)
    except WorkflowError as exc:
        raise ValueError(f"--workflow: {exc}") from None
    return w


def _adapter(args):
    """(dir, tensors, settings) of the adapter to merge, or None; with an adapter directory as --model,
    args.model becomes the base it names. LoraError (a ValueError) names what is wrong."""
    from policies.model.loading import model_path
    from policies.model.lora import LoraError, is_adapter_dir, load_adapter
    where = getattr(args, "adapter", None)
    if where is None and args.model not in ("smollm2", "tiny") and is_adapter_dir(args.model):
        where = args.model
        base = load_adapter(where)[2]
        if not base:
            raise LoraError(f"--model {where}: a LoRA adapter whose adapter_config.json names no base model "
                            "(base_model_name_or_path): give the base as --model and the adapter as --adapter")
        args.model = base
    elif where is not None and not is_adapter_dir(where):
        raise LoraError(f"--adapter {where}: not a LoRA adapter directory (no adapter_config.json)")
    if where is None:
        return None
    if is_adapter_dir(model_path(args.model)):
        raise LoraError(f"--model {args.model}: an adapter, not a base model")
    state, settings, _ = load_adapter(where)
    return str(where), state, settings


def merge_adapter(model, state, settings) -> None:
    """The base model's targets set to base + scale * B @ A in place (LoraError naming a mismatch)."""
    from policies.model.lora import merged_weights
    merged = merged_weights(model.state_dict(), state, settings)
    own = model.state_dict()
    with torch.no_grad():
        for name, t in merged.items():
            own[name].copy_(t)


def run_eval_command(args) -> int:
    done = sample_and_score(args, FLAGS)
    if isinstance(done, int):
        return done
    path, s, _, result = done
    multi = "turns" in result  # --workflow: turns per sample and failed workflows too
    print(f"{'model':<40} {'problems':>8} {'k':>4} {'pass@1':>8} {'truncated':>9}" + (" turns failed" if multi else ""))
    extra = f" {result['turns']:>5.2f} {result['workflow_errors']:>6}" if multi else ""
    print(f"{path[-40:]:<40} {result['problems']:>8} {s.k:>4} {result['pass@1']:>8.3f} "
          f"{result['truncation_rate']:>9.3f}{extra}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": path, **result}, indent=1))
        print(f"results written to {args.out}")
    return 0
