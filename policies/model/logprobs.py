"""Per-token logprobs and entropy for sequences packed in one 1D tensor.

Convention (shared with the generators): logprobs[i] = log p(token i | tokens < i of its own sequence),
computed from logits / temperature; 0 at the first token of each sequence. entropy[i] is the entropy of
the distribution that token i was drawn from (0 at the first token).

Attention never crosses a sequence boundary: position ids restart at 0 for every sequence. With SDPA or
eager attention transformers (5.x) turns those resets into a block-diagonal causal mask when no 2D
attention mask and no KV cache are given; with flash attention we pass cu_seqlens, and with
policies.model.packed_attention (the default off CUDA) a PackedLayout, so each sequence attends only to itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.model.loading import COMPILED_ATTR
from policies.model.packed_attention import PACKED_SDPA, packed_layout
from policies.model.shared_prompts import share_prompts

HEAD_CHUNK_BYTES = 16 << 20  # fp32 logits per lm-head chunk: bounds what is held at once, and stays in
# glibc's reusable heap (its mmap threshold grows to at most 32 MB)


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
    """log_softmax(hidden @ W^T / T)[targets] and the entropy, a chunk of tokens at a time.

    `stats` does each chunk's math (`_softmax_stats`, compiled or not). Chunks stay small: a fresh
    buffer past glibc's 32 MB mmap threshold is fresh pages from the kernel on every call, which on a
    CPU cost as much as the math. When a gradient is wanted the softmax is kept for all tokens in the
    weights' dtype (bf16 in training, what the gradient is rounded to anyway): backward turns it into
    -g * (softmax - onehot) in place and makes two matmuls over all tokens. Autograd through log_softmax would keep
    the fp32 logits twice; recomputing them would cost another head matmul.
    Entropy is reported, not trained on: it carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                with_entropy: bool, chunk: int, stats) -> tuple[Tensor, Tensor]:
        n, vocab = hidden.shape[0], weight.shape[0]
        picked = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        keep = any(ctx.needs_input_grad[:3])
        probs = torch.empty(n, vocab, dtype=hidden.dtype, device=hidden.device) if keep else None
        for s in range(0, n, chunk):
            rows = slice(s, min(s + chunk, n))
            logits = F.linear(hidden[rows], weight, bias)
            picked[rows], entropy[rows], chunk_probs = stats(logits, targets[rows], temperature, with_entropy, keep)
            if keep:
                probs[rows] = chunk_probs
        ctx.save_for_backward(hidden, weight, bias, targets, probs)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad_picked: Tensor, _grad_entropy: Tensor):
        hidden, weight, bias, targets, probs = ctx.saved_tensors
        g = grad_picked.to(probs.dtype)
        if ctx.temperature != 1.0:
            g = g / ctx.temperature
        grad = probs.mul_(-g[:, None])  # d picked / d z = onehot - softmax; the saved buffer is not needed again
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, targets] += g  # not scatter_add_: on a CPU it copies all of a bf16 `grad` to fp32 and back
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        # contiguous, not (h^T g)^T: autograd adds a tied embedding's gradient to it and the optimiser
        # reads it, and on a CPU both passes over a transposed [vocab, hidden] cost ~3x (0.7 s of a PPO step)
        grad_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _softmax_stats(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, with_probs: bool
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The head's math for one chunk: logprob of the target, entropy, and (with_probs) the softmax in
    the logits' dtype. In place where it can be: eager, each pass is a sweep over the chunk's logits;
    compiled, inductor fuses them into two."""
    z = logits - logits.amax(dim=-1, keepdim=True).float()  # fp32 (by type promotion) in one pass
    if temperature != 1.0:
        z.div_(temperature)
    e = torch.exp(z)
    total = e.sum(-1)
    log_total = total.log()
    picked = z.gather(-1, targets[:, None])[:, 0] - log_total
    if with_entropy:  # H = log sum e^z - E_p[z]
        entropy = log_total - torch.einsum("ij,ij->i", e, z) / total
    else:
        entropy = torch.zeros_like(picked)
    return picked, entropy, e.div_(total[:, None]).to(logits.dtype) if with_probs else None


_compiled_softmax_stats = torch.compile(_softmax_stats, dynamic=True)  # compiles on its first call


def head_chunk(vocab: int) -> int:
    """Tokens per head chunk: its fp32 logits stay under HEAD_CHUNK_BYTES."""
    return max(16, HEAD_CHUNK_BYTES // (4 * vocab))


def head_logprobs(hidden: Tensor, lm_head: nn.Linear, targets: Tensor, *, temperature: float = 1.0,
                  with_entropy: bool = False, chunk: int | None = None, compiled: bool = False
                  ) -> tuple[Tensor, Tensor]:
    """log_softmax(lm_head(hidden) / T)[targets] and entropy, `chunk` tokens at a time, so the fp32
    logits held at once are one chunk's instead of T x vocab (training also keeps the softmax in the
    weights' dtype until backward). Under autocast the head runs in the autocast dtype. `compiled`
    runs the per-chunk math through torch.compile."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lm_head.weight.dtype
    weight = lm_head.weight.to(dtype)
    bias = None if lm_head.bias is None else lm_head.bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return _HeadLogprobs.apply(hidden.to(dtype), weight, bias, targets, float(temperature), with_entropy,
                                   chunk or head_chunk(weight.shape[0]),
                                   _compiled_softmax_stats if compiled else _softmax_stats)


def _uses_flash_attention(model: nn.Module) -> bool:
    return "flash" in str(getattr(model.config, "_attn_implementation", "") or "")


def packed_hidden_states(model: nn.Module, input_ids: Tensor, cu_seqlens: Tensor,
                         compact_of: Tensor | None = None) -> Tensor:
    """Final hidden states [T, H] of a packed batch, attention confined to each sequence. With
    `compact_of` (policies.model.shared_prompts: token -> its index once shared prompts are kept once)
    the states of those compact tokens, [max(compact_of) + 1, H]."""
    attn = model.config._attn_implementation
    position_ids = position_ids_for(cu_seqlens)
    if compact_of is not None:
        if attn != PACKED_SDPA:
            raise ValueError(f"compact_of: shared prompts need the {PACKED_SDPA} attention, not {attn!r}")
        size = int(compact_of.max()) + 1
        input_ids = input_ids.new_empty(size).scatter_(0, compact_of, input_ids)  # the copies agree
        position_ids = position_ids.new_empty(size).scatter_(0, compact_of, position_ids)
    kwargs = {}
    if attn == PACKED_SDPA:
        kwargs = dict(packed_layout=packed_layout(cu_seqlens.to(input_ids.device), compact_of))
    elif _uses_flash_attention(model):
        cu = cu_seqlens.to(device=input_ids.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    out = model.base_model(input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0),
                           attention_mask=None, use_cache=False, **kwargs)
    return out.last_hidden_state[0]


def packed_logprobs(model: nn.Module, input_ids: Tensor, cu_seqlens: Tensor, *, temperature: float = 1.0,
                    with_entropy: bool = False, only: Tensor | None = None,
                    prompt_lens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-token logprobs [T] (and entropy [T]) of a packed batch; differentiable when grad is enabled.

    `only` (bool [T]) computes just those tokens' values, 0 elsewhere: PPO and SFT need the response
    tokens', and skipping the prompts skips their share of the lm head (a fifth of SmolLM2's flops).
    `prompt_lens` ([S], e.g. policies.model.shared_prompts.prompt_lengths of the loss mask): sequences that
    begin with the same prompt run it through the model once (packed_sdpa attention only; others
    ignore it). Same values and gradients, up to float rounding."""
    check_packed(input_ids, cu_seqlens)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Linear):
        raise TypeError(f"{type(model).__name__}: expected a Linear output embedding, got {type(lm_head).__name__}")
    num_tokens = input_ids.numel()
    wanted = ~sequence_starts(cu_seqlens, num_tokens)  # a sequence's first token has no logprob (0)
    if only is not None:
        if only.shape != (num_tokens,):
            raise ValueError(f"only: expected shape ({num_tokens},), got {tuple(only.shape)}")
        wanted &= only.to(device=wanted.device, dtype=torch.bool)
    tokens = wanted.nonzero()[:, 0]
    compact_of = None
    if prompt_lens is not None and model.config._attn_implementation == PACKED_SDPA:
        if prompt_lens.shape != (cu_seqlens.numel() - 1,):
            raise ValueError(f"prompt_lens: expected shape ({cu_seqlens.numel() - 1},), got {tuple(prompt_lens.shape)}")
        compact_of = share_prompts(input_ids, cu_seqlens, prompt_lens)
    hidden = packed_hidden_states(model, input_ids, cu_seqlens, compact_of)
    # hidden state j predicts token j + 1
    rows = tokens - 1 if compact_of is None else compact_of[tokens - 1]
    picked, entropy = head_logprobs(hidden[rows], lm_head, input_ids[tokens], temperature=temperature,
                                    with_entropy=with_entropy, compiled=getattr(model, COMPILED_ATTR, False))
    logprobs = picked.new_zeros(num_tokens).index_add(0, tokens, picked)
    if not with_entropy:
        return logprobs, None
    return logprobs, entropy.new_zeros(num_tokens).index_add(0, tokens, entropy)
