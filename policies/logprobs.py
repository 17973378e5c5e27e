"""Per-token logprobs and entropy for sequences packed in one 1D tensor.

Convention (shared with the generators): logprobs[i] = log p(token i | tokens < i of its own sequence),
computed from logits / temperature; 0 at the first token of each sequence. entropy[i] is the entropy of
the distribution that token i was drawn from (0 at the first token).

Attention never crosses a sequence boundary: position ids restart at 0 for every sequence. With SDPA or
eager attention transformers (5.x) turns those resets into a block-diagonal causal mask when no 2D
attention mask and no KV cache are given; with flash attention, and with policies.packed_attention (the
default off CUDA), we pass cu_seqlens so each sequence attends only to itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.packed_attention import PACKED_SDPA

HEAD_CHUNK = 1024  # tokens per lm-head chunk: bounds the [tokens x vocab] logits held at once


def check_packed(input_ids: Tensor, cu_seqlens: Tensor) -> None:
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids: expected a 1D packed tensor, got shape {tuple(input_ids.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected 1D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != input_ids.numel():
        raise ValueError(f"cu_seqlens: must start at 0 and end at len(input_ids)={input_ids.numel()}, "
                         f"got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens: every sequence must have at least one token (strictly increasing)")


def position_ids_for(cu_seqlens: Tensor) -> Tensor:
    """Positions restarting at 0 at every sequence start: [0..n0-1, 0..n1-1, ...]."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(int(cu[-1]), device=cu.device) - starts


def sequence_starts(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Boolean [T], True at the first token of each sequence."""
    is_start = torch.zeros(num_tokens, dtype=torch.bool, device=cu_seqlens.device)
    is_start[cu_seqlens[:-1].long()] = True
    return is_start


class _HeadLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ W^T / T)[targets] and the entropy, for one chunk of tokens.

    Forward keeps only the inputs and the log-sum-exp; backward recomputes the logits and writes the
    gradient (softmax - onehot) / T straight into that buffer. Autograd through log_softmax would
    hold the chunk's [tokens x vocab] logits twice and make ~8 passes over them; this makes 4.
    Entropy is reported, not trained on: it carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        z = F.linear(hidden, weight, bias).float()
        if temperature != 1.0:
            z.div_(temperature)
        lse = torch.logsumexp(z, dim=-1)
        picked = z.gather(-1, targets[:, None])[:, 0] - lse
        if with_entropy:  # H = lse - sum(p * z)
            entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        else:
            entropy = torch.zeros_like(picked)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked: Tensor, _grad_entropy: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        t = ctx.temperature
        g = grad_picked.float()
        z = F.linear(hidden, weight, bias).float()
        if t != 1.0:
            z.div_(t)
        grad = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # d picked / d z = onehot - softmax
        grad.scatter_add_(-1, targets[:, None], g[:, None])
        if t != 1.0:
            grad.div_(t)
        grad = grad.to(hidden.dtype)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def head_logprobs(hidden: Tensor, lm_head: nn.Linear, targets: Tensor, *, temperature: float = 1.0,
                  with_entropy: bool = False, chunk: int = HEAD_CHUNK) -> tuple[Tensor, Tensor]:
    """log_softmax(lm_head(hidden) / T)[targets] and entropy, in chunks of tokens, so peak memory is
    one chunk's logits instead of T x vocab. Under autocast the head runs in the autocast dtype (its
    weight cast once per call, not per chunk)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lm_head.weight.dtype
    weight = lm_head.weight.to(dtype)
    bias = None if lm_head.bias is None else lm_head.bias.to(dtype)
    hidden = hidden.to(dtype)
    picked, entropies = [], []
    with torch.autocast(device, enabled=False):
        for s in range(0, hidden.shape[0], chunk):
            p, e = _HeadLogprobs.apply(hidden[s:s + chunk], weight, bias, targets[s:s + chunk], float(temperature),
                                       with_entropy)
            picked.append(p)
            entropies.append(e)
    return torch.cat(picked), torch.cat(entropies)


def _uses_flash_attention(model: nn.Module) -> bool:
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def packed_hidden_states(model: nn.Module, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Final hidden states [T, H] of a packed batch, attention confined to each sequence."""
    position_ids = position_ids_for(cu_seqlens).unsqueeze(0)
    kwargs = {}
    if _uses_flash_attention(model) or model.config._attn_implementation == PACKED_SDPA:
        cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    out = model.base_model(input_ids=input_ids.unsqueeze(0), position_ids=position_ids,
                           attention_mask=None, use_cache=False, **kwargs)
    return out.last_hidden_state[0]


def packed_logprobs(model: nn.Module, input_ids: Tensor, cu_seqlens: Tensor, *, temperature: float = 1.0,
                    with_entropy: bool = False, bf16: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per-token logprobs [T] (and entropy [T]) of a packed batch; differentiable when grad is enabled."""
    check_packed(input_ids, cu_seqlens)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"{type(model).__name__}: expected a Linear output embedding, got {type(lm_head).__name__}")
    device = input_ids.device
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = packed_hidden_states(model, input_ids, cu_seqlens)
        # hidden state j predicts token j+1; the last position of a sequence predicts nothing we keep
        targets = torch.roll(input_ids, -1)
        picked, entropy = head_logprobs(hidden, lm_head, targets, temperature=temperature,
                                        with_entropy=with_entropy)
    is_start = sequence_starts(cu_seqlens, input_ids.numel())
    zero = picked.new_zeros(1)
    logprobs = torch.where(is_start, 0.0, torch.cat([zero, picked[:-1]]))
    if not with_entropy:
        return logprobs, None
    return logprobs, torch.where(is_start, 0.0, torch.cat([zero, entropy[:-1]]))
