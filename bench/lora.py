"""LoRA RL against full fine-tuning on SmolLM2-135M-Instruct, same run: bytes per weight update and step time.

Each arm is actors.rl_step's synchronous step in one process (generate -> score -> pack -> train -> update),
the learner and the generator on their own copies of the weights as in two processes: full fine-tuning
publishes the whole state dict, LoRA (model.lora: r 16, alpha 32, every attention and MLP projection) only
its adapter, which the torch engine merges into its base copy (base + alpha/r * B @ A). Bytes per update
are what the tensor channels carry (tensors.wire: header + buffers), time per step is the mean over the
steps after a warm-up; the arms alternate step by step so a busy machine slows both alike.

    nice -n 10 .venv/bin/python bench/lora.py [--steps 4 --prompts 4 --samples 4 --new-tokens 64 --r 16]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.rl_step import rl_step  # noqa: E402
from actors.weights.broadcaster import snapshot  # noqa: E402
from launcher.mathdata import make_dataset  # noqa: E402
from policies.data.dataset import load_problems  # noqa: E402
from policies.data.prompts import DIRECTIVE, build_prompt  # noqa: E402
from policies.infer.sampling import GenerationEngine, SamplingParams  # noqa: E402
from policies.model import lora  # noqa: E402
from policies.model.loading import load_model, load_tokenizer, smollm2_dir  # noqa: E402
from policies.train.ppo import PPOConfig, make_optimizer  # noqa: E402
from tensors import wire  # noqa: E402


def wire_bytes(weights: dict[str, torch.Tensor]) -> int:
    header, buffers = wire.encode(weights)
    return len(header) + sum(b.nbytes for b in buffers)


def arm(path: Path, cfg: PPOConfig, settings: lora.LoraSettings | None, total_steps: int) -> dict:
    """rl_step's arguments for one arm (learner model + optimizer, generator engine on its own copy)."""
    model = load_model(path, dtype=torch.float32)
    gen = copy.deepcopy(model).eval()
    if settings is not None:
        lora.wrap(model, settings)
    return dict(engine=GenerationEngine(gen, seed=0, lora=settings), model=model,
                optimizer=make_optimizer(model, cfg), ppo=cfg, total_steps=total_steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per arm (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = smollm2_dir()
    tok = load_tokenizer(path)
    import tempfile
    data = make_dataset(Path(tempfile.mkdtemp(prefix="bench-lora-")), n_train=args.prompts * (args.steps + 1),
                        n_test=0, n_sft=0, seed=0)["train"]
    problems = load_problems(data)
    settings = lora.LoraSettings(r=args.r, alpha=args.alpha)
    cfg = PPOConfig(minibatches=2, lr=2e-5)
    total = args.steps + 1
    arms = {"full": arm(path, cfg, None, total), f"lora r{args.r}": arm(path, cfg, settings, total)}
    sampling = SamplingParams(max_new_tokens=args.new_tokens, seed=0)
    trainable = {k: sum(p.numel() for p in a["model"].parameters() if p.requires_grad) for k, a in arms.items()}
    print(f"SmolLM2-135M-Instruct fp32, {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new "
          f"tokens, {args.steps} timed steps after 1 warm-up, {args.threads} threads, CPU "
          f"{torch.backends.cpu.get_cpu_capability()}; LoRA r {args.r} alpha {args.alpha:g} on "
          f"{', '.join(settings.target_modules)}", flush=True)
    times = {k: [] for k in arms}
    sync = {k: [] for k in arms}
    for step in range(total):
        batch = problems[step * args.prompts:(step + 1) * args.prompts]
        ids = [build_prompt(tok, p.prompt, DIRECTIVE) for p in batch]
        for name in (list(arms) if step % 2 == 0 else list(arms)[::-1]):
            t = time.perf_counter()
            m = rl_step(step, batch, ids, tokenizer=tok, sampling=sampling, group_size=args.samples,
                        **arms[name]).metrics
            if step:  # step 0 warms allocator, kernels and the optimizer state
                times[name].append(time.perf_counter() - t)
                sync[name].append(m["time_sync_s"])
    rows = {}
    for name, a in arms.items():
        nbytes = wire_bytes(snapshot(a["model"]))
        rows[name] = (nbytes, sum(times[name]) / len(times[name]), sum(sync[name]) / len(sync[name]))
        print(f"  {name:<10} trainable {trainable[name] / 1e6:8.2f} M params | {nbytes / 2**20:8.2f} MiB per weight "
              f"update | {rows[name][1]:6.2f} s/step (of which the update {rows[name][2] * 1e3:6.1f} ms)", flush=True)
    (fb, ft, _), (lb, lt, _) = rows.values()
    print(f"ratio full / LoRA: {fb / lb:.1f}x the bytes per weight update; step time LoRA / full {lt / ft:.2f}")


if __name__ == "__main__":
    main()
