"""Attention for packed 1D batches without flash attention: each sequence attends only to itself.

Given only restarting position ids, transformers builds a block-diagonal [T, T] mask and runs SDPA
over the whole packed row: work grows with T^2 (a 1K-token micro-batch of 8 sequences does 8x the
attention it needs; on SmolLM2 that was 3.8 s of a 17.6 s PPO step on 2 CPU cores). With a
`PackedLayout` (or the sequence boundaries, cu_seq_lens_q, as the flash varlen kernel takes them)
the sequences become a padded batch for two batched matmuls, or one SDPA call each when their
lengths are far apart. Without them (ordinary padded batches, generation) this is plain SDPA with
transformers' own mask, so the model stays correct everywhere.

Importing this module registers the implementation under `PACKED_SDPA` with transformers.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_SDPA = "packed_sdpa"


class PackedLayout(NamedTuple):
    """The sequences of a packed batch as the rows of a padded [S, L] grid of packed token indices.

    Sequences may share tokens: with a shared prompt (`policies.model.shared_prompts`) the G samples of a
    prompt all point at one copy of its tokens, so the layers run over that copy once while every
    sample still attends to it. Built once per micro-batch and passed to every layer.
    """
    token: Tensor     # [S, L] long: the packed index of sequence s's l-th token; T (a zero row) past its end
    home: Tensor      # [T] long: the grid cell (s * L + l) whose attention output packed token t takes
    per_sequence: bool  # lengths far apart: one SDPA call per sequence beats the padded grid


def packed_layout(cu_seqlens: Tensor, compact_of: Tensor | None = None) -> PackedLayout:
    """The layout of sequences `cu_seqlens` over the packed tokens; `compact_of` [cu[-1]] maps each
    token of the sequences to its packed index when some are shared (default: the identity)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    host = lengths.tolist()
    width, n = max(host), int(cu[-1])
    compact = torch.arange(n, device=cu.device) if compact_of is None else compact_of.long()
    total = int(compact.max()) + 1
    col = torch.arange(width, device=cu.device)
    real = col[None] < lengths[:, None]                                                     # [S, L]
    token = torch.where(real, compact[(cu[:-1, None] + col[None]).clamp(max=n - 1)], total)
    # a shared token's home is its first cell in grid order (its canonical copy's sequence)
    cells = real.reshape(-1).nonzero()[:, 0]
    home = torch.full((total,), -1, dtype=torch.long, device=cu.device)
    home.scatter_reduce_(0, token.reshape(-1)[cells], cells, reduce="amin", include_self=False)
    per_sequence = len(host) * width ** 2 > 2 * sum(k * k for k in host)
    return PackedLayout(token, home, per_sequence)


def packed_sdpa_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        packed_layout: PackedLayout | None = None, **kwargs) -> tuple[Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None).

    With a `packed_layout` (or the flash-style cu_seq_lens_q, turned into one) each sequence attends
    only to itself: as one padded batch (`padded_attention`), since many small calls cost more in
    overhead than padding to the longest sequence, unless lengths differ so much that the padded work
    exceeds twice the real work, or attention dropout is on: then one SDPA call per sequence."""
    if packed_layout is None and kwargs.get("cu_seq_lens_q") is not None and query.shape[0] == 1:
        packed_layout = packed_layout_for_call(kwargs["cu_seq_lens_q"])
    if packed_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p = dropout if module.training else 0.0
    if p > 0 or packed_layout.per_sequence:
        return per_sequence_attention(query, key, value, packed_layout, scaling, p), None
    return padded_attention(query, key, value, packed_layout, scaling), None


@torch.compiler.disable
def packed_layout_for_call(cu_seqlens: Tensor) -> PackedLayout:
    return packed_layout(cu_seqlens)


@torch.compiler.disable
def per_sequence_attention(query: Tensor, key: Tensor, value: Tensor, layout: PackedLayout,
                           scaling: float | None, dropout: float) -> Tensor:
    """One causal SDPA call per sequence over its gathered tokens; each token's output from its home."""
    total = query.shape[2]
    lengths = (layout.token < total).sum(1)
    outs = []
    for row, n in zip(layout.token, lengths.tolist()):
        idx = row[:n]
        outs.append(F.scaled_dot_product_attention(query[:, :, idx], key[:, :, idx], value[:, :, idx],
                                                   dropout_p=dropout, is_causal=True, scale=scaling,
                                                   enable_gqa=query.shape[1] != key.shape[1]))
    width = layout.token.shape[1]
    starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
    rows = starts[layout.home // width] + layout.home % width                               # cell -> concat row
    return torch.cat(outs, dim=2).index_select(2, rows).transpose(1, 2).contiguous()


def padded_attention(query: Tensor, key: Tensor, value: Tensor, layout: PackedLayout,
                     scaling: float | None) -> Tensor:
    """Causal attention of each sequence to itself as two batched matmuls over the layout's grid.

    query [1, H, T, D], key/value [1, Hkv, T, D] -> [1, T, H, D]. The query heads that share a
    key/value head are stacked along the rows ([Hkv * S, G * L, D] against [Hkv * S, L, D]), so keys
    and values are never repeated per head; one gather brings each operand into that layout and one
    takes the output back. Only the causal mask is needed: a real query sees no key past itself, so
    no pad; the pads' own rows are dropped. Against SDPA's math kernel over a padded [S, H, L, D]
    batch with a padding mask this took a compiled PPO step on SmolLM2 from 8.1 to 7.0 s (2 CPU cores).
    """
    _, heads, total, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    num_seqs, width = layout.token.shape
    device = query.device
    kv = torch.arange(kv_heads, device=device)[:, None, None]
    kv_rows = (layout.token[None] * kv_heads + kv).reshape(-1)                             # (kv, s, l)
    head = (kv * group + torch.arange(group, device=device)[None, :, None])[:, None]      # [Hkv, 1, G, 1]
    q_rows = (layout.token[None, :, None, :] * heads + head).reshape(-1)                   # (kv, s, g, l)

    def gather(t: Tensor, rows: Tensor) -> Tensor:  # [1, heads, T, D] -> rows of [(T + 1) * heads, D]
        flat = F.pad(t[0].transpose(0, 1), (0, 0, 0, 0, 0, 1)).reshape(-1, dim)            # pad token T: zeros
        return flat.index_select(0, rows)

    q = gather(query, q_rows).view(kv_heads * num_seqs, group * width, dim)
    k = gather(key, kv_rows).view(kv_heads * num_seqs, width, dim)
    v = gather(value, kv_rows).view(kv_heads * num_seqs, width, dim)
    causal = torch.full((width, width), float("-inf"), dtype=query.dtype, device=device).triu(1).repeat(group, 1)
    scores = torch.baddbmm(causal, q, k.transpose(1, 2), alpha=dim**-0.5 if scaling is None else scaling)
    o = torch.bmm(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), v)   # [Hkv * S, G * L, D]
    # the output of cell (s, l), head kv * G + g, is row ((kv * S + s) * G + g) * L + l
    s_idx, l_idx = (layout.home // width)[:, None, None], (layout.home % width)[:, None, None]
    out_rows = ((kv.view(1, kv_heads, 1) * num_seqs + s_idx) * group
                + torch.arange(group, device=device)) * width + l_idx                      # [T, Hkv, G]
    return o.reshape(-1, dim).index_select(0, out_rows.reshape(-1)).view(1, total, heads, dim)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # unpacked inputs get the usual SDPA mask
