"""Shared prompts: the G samples of a prompt run the prompt's tokens through the model once.

A PPO batch holds each prompt G times, once per sample. Under causal attention a prompt's hidden
states do not depend on what follows it, so one copy is enough: its keys and values are gathered
into every sample's attention row (`policies.model.packed_attention.PackedLayout`) and the first response
token reads its last hidden state; backward then sums into the copy the gradients of all G samples,
which is what G copies would have received. The prompt's layer compute drops to 1/G: with SmolLM2,
8 prompts x 4 samples x 64 new tokens, prompts are over half of the batch's tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor


def prompt_lengths(loss_mask: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Tokens before the first loss token of each sequence (all of it when it has none)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    offset = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][seq]
    first = lengths.clone()
    mask = loss_mask.bool()
    return first.scatter_reduce_(0, seq[mask], offset[mask], reduce="amin")


def share_prompts(input_ids: Tensor, cu_seqlens: Tensor, prompt_lens: Tensor) -> Tensor | None:
    """For each token, its index among the tokens that remain when every prompt that several
    sequences begin with is kept once (at its first sequence); None when no prompt repeats."""
    n = input_ids.numel()
    canonical = torch.arange(n)
    ids = input_ids.cpu().numpy()
    first: dict[tuple[int, bytes], int] = {}
    for start, p in zip(cu_seqlens[:-1].tolist(), prompt_lens.tolist()):
        if p == 0:
            continue
        owner = first.setdefault((p, ids[start:start + p].tobytes()), start)
        if owner != start:
            canonical[start:start + p] = torch.arange(owner, owner + p)
    kept = canonical == torch.arange(n)
    if bool(kept.all()):
        return None
    return (kept.cumsum(0) - 1)[canonical].to(input_ids.device)
