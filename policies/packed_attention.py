"""Attention for packed 1D batches without flash attention: each sequence attends only to itself.

Given only restarting position ids, transformers builds a block-diagonal [T, T] mask and runs SDPA
over the whole packed row: work grows with T^2 (a 1K-token micro-batch of 8 sequences does 8x the
attention it needs; on SmolLM2 that was 3.8 s of a 17.6 s PPO step on 2 CPU cores). With the
sequence boundaries (cu_seq_lens_q, as the flash varlen kernel takes them) the sequences become a
padded [S, H, L, D] batch, or one call each when their lengths are far apart. Without them
(ordinary padded batches, generation) this is plain SDPA with transformers' own mask, so the model
stays correct everywhere.

Importing this module registers the implementation under `PACKED_SDPA` with transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def _causal_padded_mask(lengths: list[int], device) -> Tensor:
    """[S, 1, L, L]: query i of sequence s sees keys j <= i that are real (j < its length)."""
    width = max(lengths)
    col = torch.arange(width, device=device)
    real = col[None] < torch.tensor(lengths, device=device)[:, None]  # [S, L]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return (causal[None] & real[:, None, :])[:, None]


def packed_sdpa_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[Tensor, None]:
    """query [1, H, T, D], key/value [1, Hkv, T, D] -> ([1, T, H, D], None).

    The sequences are laid out as a padded [S, H, L, D] batch for one SDPA call: many small calls
    cost more in overhead than padding to the longest sequence, unless lengths differ so much that
    the padded work exceeds twice the real work, in which case each sequence gets its own call."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    if len(lengths) * max(lengths) ** 2 > 2 * sum(n * n for n in lengths):
        out = torch.cat([
            F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=p,
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for a, b in zip(bounds[:-1], bounds[1:])
        ], dim=2)
        return out.transpose(1, 2).contiguous(), None
    width, num_seqs = max(lengths), len(lengths)
    # One gather in and one out: slicing every sequence from the packed row would make autograd
    # write a full-size zero tensor per sequence and layer in backward (~0.8 s of a PPO step).
    starts = cu[:-1].long()
    col = torch.arange(width, device=query.device)
    real = col[None] < (cu[1:] - cu[:-1]).long()[:, None]                       # [S, L]
    total = query.shape[2]
    src = torch.where(real, starts[:, None] + col[None], total).reshape(-1)     # pads read the zero row
    keep = (torch.arange(num_seqs, device=query.device)[:, None] * width + col[None])[real]  # [T]

    def padded(t: Tensor) -> Tensor:  # [1, H, T, D] -> [S, H, L, D]
        rows = F.pad(t[0].transpose(0, 1), (0, 0, 0, 0, 0, 1))                # [T + 1, H, D]
        return rows.index_select(0, src).view(num_seqs, width, t.shape[1], t.shape[3]).transpose(1, 2)

    # on a CPU the math kernel (batched matmuls) is ~2x the fused one for bf16 training, forward + backward
    backends = [SDPBackend.MATH] if query.device.type == "cpu" else list(SDPBackend)
    with sdpa_kernel(backends):
        o = F.scaled_dot_product_attention(padded(query), padded(key), padded(value),
                                           attn_mask=_causal_padded_mask(lengths, query.device), dropout_p=p,
                                           scale=scaling, enable_gqa=gqa)
    out = o.transpose(1, 2).reshape(num_seqs * width, o.shape[1], o.shape[3]).index_select(0, keep)  # [T, H, D]
    return out.unsqueeze(0), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # unpacked inputs get the usual SDPA mask
