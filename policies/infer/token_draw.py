"""Drawing the next token from logits: temperature, top-k / top-p (the nucleus) and an inverse-CDF draw.

Pure tensor math with the caller's uniforms, so a group's draws are reproducible from its own seed
(policies.infer.sampling keeps the generators and the rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def top_p_keep(logp: Tensor, top_p: Tensor, first_k: int = 64) -> Tensor:
    """Boolean [B, V]: each row's nucleus, the fewest most likely tokens whose mass reaches top_p
    (mass before a token < top_p; the argmax always stays).

    A full sort of the vocabulary costs ~100x a softmax on CPU, so the nucleus is searched within
    the top-k for k = 64, 512, ... and only rows whose top-k mass falls short go to a larger k.
    """
    b, v = logp.shape
    keep = torch.zeros_like(logp, dtype=torch.bool)
    pending = torch.arange(b, device=logp.device)
    k = first_k
    while pending.numel():
        k = min(k, v)
        vals, idx = torch.topk(logp[pending], k, dim=-1)  # sorted, descending
        probs = vals.exp()
        cum = probs.cumsum(-1)
        p = top_p[pending, None]
        done = cum[:, -1] >= p[:, 0] if k < v else torch.ones_like(cum[:, -1], dtype=torch.bool)
        keep_sorted = (cum - probs) < p
        keep_sorted[:, 0] = True
        rows = pending[done]
        keep[rows] = torch.zeros_like(keep[rows]).scatter_(-1, idx[done], keep_sorted[done])
        pending = pending[~done]
        k = k * 8 if k * 8 <= v // 8 else v  # past that a full sort is as cheap
    return keep


def filter_top_k_top_p(logp: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Set to -inf the log-probs outside each row's top-k, then outside the top-p nucleus of the
    renormalised top-k distribution (the HF / vLLM order). Always keeps the argmax.

    logp [B, V] (normalised), top_k [B] (0 = off), top_p [B] (1 = off).
    """
    out = logp
    k_rows = top_k > 0
    if bool(k_rows.any()):
        k = top_k.clamp(min=1, max=logp.shape[-1])
        best = torch.topk(logp, int(k.max()), dim=-1).values
        kth = torch.where(k_rows, best.gather(-1, (k - 1)[:, None])[:, 0], float("-inf"))
        out = logp.masked_fill(logp < kth[:, None], float("-inf"))
    p_rows = (top_p < 1).nonzero()[:, 0]
    if p_rows.numel():
        sub = out[p_rows]
        if bool(k_rows.any()):
            sub = torch.log_softmax(sub, dim=-1)
        keep = top_p_keep(sub, top_p[p_rows])
        out = out.clone() if out is logp else out
        out[p_rows] = out[p_rows].masked_fill(~keep, float("-inf"))
    return out


def inverse_cdf(probs: Tensor, uniform: Tensor, block: int = 256) -> Tensor:
    """Token per row such that its cumulative (unnormalised) mass first exceeds uniform * total.

    Two levels (block sums, then a cumsum inside the chosen block) because a cumsum over the whole
    vocabulary is a slow sequential scan on CPU. Never returns a zero-probability token.
    """
    b, v = probs.shape
    nb = -(-v // block)
    if nb * block != v:
        probs = F.pad(probs, (0, nb * block - v))
    blocks = probs.view(b, nb, block)
    cum_blocks = blocks.sum(-1).cumsum(-1)  # [B, nb]
    target = uniform.to(probs.dtype)[:, None] * cum_blocks[:, -1:]
    bi = torch.searchsorted(cum_blocks, target, right=True).clamp_(max=nb - 1)  # [B, 1]
    before = torch.where(bi > 0, cum_blocks.gather(-1, (bi - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks[torch.arange(b, device=probs.device), bi[:, 0]].cumsum(-1)  # [B, block]
    # rounding between the block sum and the inner cumsum must not push past the block's last mass
    ceiling = torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:]))
    ti = torch.searchsorted(inner, torch.minimum((target - before).clamp(min=0), ceiling), right=True)
    return (bi * block + ti.clamp_(max=block - 1))[:, 0]


def sample_tokens(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, uniform: Tensor
) -> tuple[Tensor, Tensor]:
    """Sample one token per row by inverse CDF with the given uniforms in [0, 1).

    Returns (tokens [B] int64, logprobs [B] fp32 = log_softmax(logits / T) at the token, before
    truncation; T = 1 for greedy rows, whose token is the argmax).
    """
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits if bool((temp == 1).all()) else logits.float() / temp[:, None]
    logp = torch.log_softmax(scaled, dim=-1, dtype=torch.float32)  # bf16 logits: upcast inside, no extra copy
    filtered = filter_top_k_top_p(logp, top_k, top_p) if bool(((top_k > 0) | (top_p < 1)).any()) else logp
    tokens = inverse_cdf(filtered.exp(), uniform)
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]
