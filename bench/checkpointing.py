"""Peak memory of one PPO learner step on SmolLM2-135M with and without gradient checkpointing.

    python bench/checkpointing.py                      # 8 sequences x 1024 tokens, fp32
    python bench/checkpointing.py --seqs 16 --tokens 2048

Each variant runs in a fresh process (so one's allocations cannot hide the other's) and reports
the process's peak RSS (`ru_maxrss`: weights, gradients and Adam state included, the same on both
sides) and the activation bytes autograd kept for backward during the step's forward (what
checkpointing cuts), with the step time: the ratios are printed against the plain step of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_step(checkpointing: bool, seqs: int, tokens: int) -> dict:
    import torch

    from policies.model.logprobs import packed_logprobs
    from policies.model.loading import checkpoint_layers, load_model, smollm2_dir
    from policies.train.ppo import PPOConfig, make_optimizer, train_step
    from tensors.packed import PackedBatch

    torch.manual_seed(0)
    model = load_model(smollm2_dir(), dtype=torch.float32, device="cpu")
    if checkpointing:
        checkpoint_layers(model)
    prompt = tokens // 4
    rows = []
    for i in range(seqs):
        ids = torch.randint(0, model.config.vocab_size, (tokens,))
        mask = torch.arange(tokens) >= prompt
        rows.append(dict(input_ids=ids, loss_mask=mask, logprobs=torch.where(mask, -1.0, 0.0),
                         versions=torch.where(mask, 0, -1).int(), rewards=5.0 if i % 2 else -5.0, group_ids=i // 2))
    batch = PackedBatch.from_sequences(rows)
    cfg = PPOConfig(minibatches=1, max_tokens_per_micro_batch=seqs * tokens, share_prompts=False)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        packed_logprobs(model, batch.input_ids, batch.cu_seqlens, only=batch.loss_mask)
    t0 = time.perf_counter()
    train_step(model, make_optimizer(model, cfg), batch, cfg)
    seconds = time.perf_counter() - t0
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "activation_mib": saved[0] / 2**20, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (a quarter of them prompt)")
    ap.add_argument("--child", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_step(args.child == "checkpointed", args.seqs, args.tokens)))
        return
    res = {}
    for variant in ("plain", "checkpointed"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--seqs", str(args.seqs),
                              "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    p, c = res["plain"], res["checkpointed"]
    print(f"SmolLM2-135M, fp32, one PPO step of {args.seqs} x {args.tokens} tokens, {os.cpu_count()} cpus")
    print(f"{'':14} {'peak RSS MiB':>13} {'activations MiB':>16} {'step s':>8}")
    for name, r in res.items():
        print(f"{name:14} {r['peak_rss_mib']:>13.0f} {r['activation_mib']:>16.0f} {r['seconds']:>8.1f}")
    print(f"checkpointed / plain: peak RSS {c['peak_rss_mib'] / p['peak_rss_mib']:.2f}x, activations "
          f"{c['activation_mib'] / p['activation_mib']:.2f}x, step time {c['seconds'] / p['seconds']:.2f}x")


if __name__ == "__main__":
    main()
