"""Packed logprobs vs the two usual baselines, measured in the same run.

    .venv/bin/python bench/bench_packed_logprobs.py [--model tiny|smollm2] [--seqs 16] [--max-len 256]

Baselines: one forward per sequence, and one right-padded batch forward. Prints tokens/s and the
packed speed as a ratio against each baseline (no grad, fp32, CPU unless CUDA is present).
"""
from __future__ import annotations

import argparse
import time

import torch

from policies.model.logprobs import packed_logprobs
from policies.model.loading import load_model, smollm2_dir, tiny_model


def per_sequence(model, seqs):
    out = []
    for s in seqs:
        logp = torch.log_softmax(model(s.unsqueeze(0)).logits[0].float(), -1)
        out.append(torch.cat([logp.new_zeros(1), logp[:-1].gather(-1, s[1:, None])[:, 0]]))
    return torch.cat(out)


def padded(model, seqs):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long, device=seqs[0].device)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = s, 1
    logp = torch.log_softmax(model(ids, attention_mask=attn).logits.float(), -1)
    picked = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.cat([picked.new_zeros(1), picked[i, :len(s) - 1]]) for i, s in enumerate(seqs)])


def timed(fn, repeats):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t) / repeats, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (tiny_model() if args.model == "tiny" else load_model(smollm2_dir())).to(device).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.max_len // 8, args.max_len + 1, (args.seqs,), generator=g).tolist()
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g).to(device) for n in lengths]
    ids = torch.cat(seqs)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    with torch.no_grad():
        t_seq, ref = timed(lambda: per_sequence(model, seqs), args.repeats)
        t_pad, pad = timed(lambda: padded(model, seqs), args.repeats)
        t_pack, (lp, _) = timed(lambda: packed_logprobs(model, ids, cu), args.repeats)
    tokens = sum(lengths)
    print(f"model={args.model} device={device} seqs={args.seqs} tokens={tokens} "
          f"padded_tokens={len(seqs) * max(lengths)}")
    print(f"max |packed - per-sequence| = {float((lp - ref).abs().max()):.2e}, "
          f"max |padded - per-sequence| = {float((pad - ref).abs().max()):.2e}")
    for name, t in (("per-sequence", t_seq), ("padded batch", t_pad), ("packed", t_pack)):
        print(f"{name:>13}: {t * 1e3:8.1f} ms  {tokens / t:9.0f} tok/s")
    print(f"packed speed-up: {t_seq / t_pack:.2f}x vs per-sequence, {t_pad / t_pack:.2f}x vs padded batch")


if __name__ == "__main__":
    main()
