"""A compact inference forward for HF Llama / Qwen2 / Qwen3 causal LMs, with a per-row KV cache.

Why not the HF forward: HF's DynamicCache concatenates the whole cache every step and a batch of
samples must share one padded layout, so on a small CPU most of a decode step is copying. This
module runs the same math (RMSNorm, rotary, GQA attention, SwiGLU, tied or untied head) straight on
the HF model's own parameter tensors, so an in-place weight update of the HF model is seen at the
next call, and keeps keys/values in a preallocated cache whose rows have their own lengths.
Qwen3 adds an RMSNorm over each head's queries and keys (`q_norm` / `k_norm`) before the rotary.

Only architectures whose math is reproduced exactly are accepted (`check_supported`); anything
else raises `UnsupportedModelError` rather than silently generating from a different model.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Rope types whose frequencies do not depend on the sequence length, so one table serves all positions.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the compact forward reproduces exactly."""


def check_supported(model: nn.Module) -> None:
    cfg = model.config
    model_type = getattr(cfg, "model_type", None)
    problems = []
    if model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(f"model_type={model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (only 'silu')")
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        problems.append(f"rope_type={rope_type!r} (supported: {', '.join(STATIC_ROPE_TYPES)})")
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={sorted(set(layer_types))} (only full attention; no sliding window)")
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        problems.append(f"pretraining_tp={cfg.pretraining_tp} (only 1)")
    if not hasattr(model, "model") or not hasattr(model.model, "layers") or not hasattr(model, "lm_head"):
        problems.append(f"{type(model).__name__} lacks .model.layers / .lm_head")
    if problems:
        raise UnsupportedModelError(
            f"GenerationEngine cannot run {type(model).__name__}: " + "; ".join(problems)
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's RMSNorm: normalise in fp32, cast back, then scale."""
    if x.dtype == torch.float32:  # the fused kernel gives the same numbers in fp32
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def col_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """rms_norm over dim 0 of column-major activations [hidden, B]."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + eps)
    return weight[:, None] * h.to(x.dtype)


def head_rms_norm_col(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Qwen3's per-head q/k RMSNorm on column-major heads x [heads, D, B] (over D); identity without weight."""
    if weight is None:
        return x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + eps)
    return weight[None, :, None] * h.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """HF's apply_rotary_pos_emb for one tensor: x*cos + rotate_half(x)*sin, with rotate_half's
    sign folded into signed_sin = cat(-sin[:half], sin[half:]) so that it is a plain roll."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), signed_sin)


def rotate_col(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """`rotate` for column-major heads: x [heads, D, B], cos / signed_sin [D, B]."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[1] // 2, 1), signed_sin)


def col_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A linear layer on column-major activations: x [in, B] -> [out, B]."""
    return torch.mm(weight, x) if bias is None else torch.addmm(bias[:, None], weight, x)


def project(x: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...], sizes: list[int],
            col: bool) -> list[Tensor]:
    """Several projections of x ([N, in], or [in, B] when col): one matmul when `weights` is a single
    fused buffer whose outputs split by `sizes`, else one each."""
    if len(weights) == 1:
        y = col_linear(x, weights[0], biases[0]) if col else F.linear(x, weights[0], biases[0])
        return list(y.split(sizes, dim=0 if col else -1))
    return [col_linear(x, w, b) if col else F.linear(x, w, b) for w, b in zip(weights, biases)]


class LayerWeights(NamedTuple):
    """One decoder layer's tensors, the model's own parameters (or their fused buffers)."""
    input_norm: Tensor
    qkv: tuple[Tensor, ...]  # the fused q|k|v weight, or q, k, v
    qkv_bias: tuple[Tensor | None, ...]
    o: Tensor
    o_bias: Tensor | None
    post_norm: Tensor
    gate_up: tuple[Tensor, ...]  # the fused gate|up weight, or gate, up
    gate_up_bias: tuple[Tensor | None, ...]
    down: Tensor
    down_bias: Tensor | None
    q_norm: Tensor | None = None  # Qwen3: RMSNorm weight [head_dim] over each query head
    k_norm: Tensor | None = None  # ... and each key head


class KVCache:
    """Keys and values of the active samples, per layer: keys [rows, kv_heads, head_dim, T] (stored
    transposed, so a step's q @ K^T reads the cache as it lies instead of copying it into the
    layout a batched matmul wants) and values [rows, kv_heads, T, head_dim].

    Rows are samples (their order is the engine's); each row holds its own number of valid
    positions. Buffers grow by doubling, so a long generation reallocates O(log T) times.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, dtype, device):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.rows = 0  # allocated rows
        self.positions = 0  # allocated positions per row

    def reserve(self, rows: int, positions: int, *, used_rows: int, used_positions: int) -> None:
        """Make room for `rows` x `positions`, keeping the first used_rows x used_positions entries."""
        if rows <= self.rows and positions <= self.positions:
            return
        new_rows = max(rows, self.rows) if rows <= self.rows else max(rows, 2 * self.rows)
        new_pos = self.positions if positions <= self.positions else max(positions, 2 * self.positions, 64)
        r, p, kv, d = used_rows, used_positions, self.n_kv_heads, self.head_dim
        for store, shape, keep in ((self.k, (new_rows, kv, d, new_pos), (slice(r), slice(None), slice(None), slice(p))),
                                   (self.v, (new_rows, kv, new_pos, d), (slice(r), slice(None), slice(p)))):
            for layer in range(self.n_layers):
                # zeros, not empty: masked positions still enter p @ V with weight 0, and 0 * NaN = NaN
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer < len(store):
                    fresh[keep] = store[layer][keep]
                    store[layer] = fresh
                else:
                    store.append(fresh)
        self.rows, self.positions = new_rows, new_pos

    def write_prompt(self, first_row: int, n_rows: int, keys: list[Tensor], values: list[Tensor],
                     start: int = 0, stop: int | None = None) -> None:
        """Copy one prompt's keys/values (columns start:stop of [kv_heads, N, head_dim] per layer,
        as returned by a packed prefill) into n_rows rows."""
        stop = keys[0].shape[1] if stop is None else stop
        rows, n = slice(first_row, first_row + n_rows), stop - start
        for buf, t in zip(self.k, keys):
            buf[rows, :, :, :n] = t[:, start:stop].transpose(1, 2)
        for buf, t in zip(self.v, values):
            buf[rows, :, :n] = t[:, start:stop]

    def move_rows(self, src: list[int], dst: list[int], positions: int) -> None:
        """Copy rows src -> dst (the first `positions` entries), used to compact finished rows away."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for buf in self.k:
            buf[d, :, :, :positions] = buf[s, :, :, :positions]
        for buf in self.v:
            buf[d, :, :positions] = buf[s, :, :positions]

    def clear(self) -> None:
        self.k, self.v, self.rows, self.positions = [], [], 0, 0


def _rehome(params: list[nn.Parameter]) -> Tensor:
    """Move same-shaped-row parameters into one buffer (stacked along dim 0) and point each
    Parameter's .data at its slice: the Parameter objects, their values and requires_grad stay."""
    fused = torch.cat([p.data for p in params], dim=0)
    offset = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[offset : offset + n]
        offset += n
    return fused


class FusedLayer:
    """One layer's q|k|v (and biases) and gate|up weights as single tensors that *are* the
    model's parameters (re-homed once, see `_rehome`), so one matmul reads the live weights and
    any in-place update of the parameters, through .data or not, is seen. If a parameter is later
    replaced (new storage, e.g. load_state_dict(assign=True)) the layer is fused again."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self._fuse()

    def _groups(self) -> tuple[list[nn.Parameter], list | None, list[nn.Parameter], list | None]:
        """(q|k|v weights, their biases, gate|up weights, their biases), read from the modules
        each time since load_state_dict(assign=True) swaps in new Parameter objects."""
        attn, mlp = self.layer.self_attn, self.layer.mlp

        def biases(mods, what):
            found = [m.bias for m in mods]
            if all(b is None for b in found):
                return None
            if any(b is None for b in found):
                raise UnsupportedModelError(f"{what} projections must all have biases or none")
            return found

        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        return ([m.weight for m in qkv], biases(qkv, "q/k/v"), [m.weight for m in gate_up], biases(gate_up, "gate/up"))

    def _fuse(self) -> None:
        qkv, qkv_bias, gate_up, gate_up_bias = self._groups()
        with torch.no_grad():
            self.qkv = _rehome(qkv)
            self.qkv_bias = _rehome(qkv_bias) if qkv_bias else None
            self.gate_up = _rehome(gate_up)
            self.gate_up_bias = _rehome(gate_up_bias) if gate_up_bias else None
        self._ptrs = self._pointers()

    def _pointers(self) -> list[int]:
        return [p.data_ptr() for group in self._groups() for p in group or []]

    def check(self) -> None:
        if self._pointers() != self._ptrs:
            self._fuse()


class CompactDecoder:
    """Prefill and batched decode for a HF Llama/Qwen2 model, reading its parameters in place.

    With fuse=True (default) each layer's q/k/v and gate/up weights are re-homed into one buffer
    each (`FusedLayer`): 4 matmuls per layer instead of 7. On a busy CPU every multi-threaded op
    may wait milliseconds for its second thread, so the number of ops matters as much as flops.
    """

    def __init__(self, model: nn.Module, *, fuse: bool = True):
        check_supported(model)
        cfg = model.config
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.qkv_sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        self.gate_up_sizes = [cfg.intermediate_size] * 2
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.max_positions = cfg.max_position_embeddings
        self.fused = [FusedLayer(layer) for layer in self.layers] if fuse else None
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    @property
    def layers(self):
        return self.model.model.layers

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), self.n_kv_heads, self.head_dim, dtype=self.dtype, device=self.device)

    def rope(self, n: int) -> tuple[Tensor, Tensor]:
        """cos and signed sin (see `rotate`) [n, head_dim] for positions 0..n-1, computed by the
        model's own rotary module so every rope variant and scaling matches HF."""
        if self._cos is None or self._cos.shape[0] < n or self._cos.dtype != self.dtype:
            size = min(max(n, 2 * (0 if self._cos is None else self._cos.shape[0]), 256), max(n, self.max_positions))
            x = torch.empty(1, dtype=self.dtype, device=self.device)
            pos = torch.arange(size, device=self.device)[None]
            cos, sin = self.model.model.rotary_emb(x, pos)
            half = self.head_dim // 2
            self._cos, self._sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        return self._cos, self._sin

    def _weights(self) -> list[LayerWeights]:
        """Per layer the tensors to read, re-fusing layers whose parameters were replaced."""
        out = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if self.fused is None:
                qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
                qkv_w, qkv_b = tuple(m.weight for m in qkv), tuple(m.bias for m in qkv)
                gate_up_w, gate_up_b = tuple(m.weight for m in gate_up), tuple(m.bias for m in gate_up)
            else:
                fused = self.fused[i]
                fused.check()
                qkv_w, qkv_b = (fused.qkv,), (fused.qkv_bias,)
                gate_up_w, gate_up_b = (fused.gate_up,), (fused.gate_up_bias,)
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            out.append(LayerWeights(layer.input_layernorm.weight, qkv_w, qkv_b, attn.o_proj.weight, attn.o_proj.bias,
                                    layer.post_attention_layernorm.weight, gate_up_w, gate_up_b,
                                    mlp.down_proj.weight, mlp.down_proj.bias,
                                    None if q_norm is None else q_norm.weight,
                                    None if k_norm is None else k_norm.weight))
        return out

    def logits(self, h: Tensor) -> Tensor:
        norm = self.model.model.norm
        return F.linear(rms_norm(h, norm.weight, self.eps), self.model.lm_head.weight, self.model.lm_head.bias)

    def prefill(self, prompts: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Run several prompts packed into one sequence (linear layers over all tokens at once,
        causal attention within each prompt). Returns (last-position logits [n_prompts, V], keys
        and values per layer as [kv_heads, total_tokens, head_dim]; prompt i owns the columns
        offsets[i]:offsets[i+1] where offsets are the cumulative prompt lengths)."""
        lengths = [int(p.shape[0]) for p in prompts]
        ids = torch.cat(prompts)
        pos = torch.cat([torch.arange(n, device=ids.device) for n in lengths])
        cos, sin = self.rope(max(lengths))
        cos, sin = cos[pos][:, None], sin[pos][:, None]  # [N, 1, D] broadcast over heads
        bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
        h = self.model.model.embed_tokens(ids)
        keys, values = [], []
        for w in self._weights():
            q, k, v = project(rms_norm(h, w.input_norm, self.eps), w.qkv, w.qkv_bias, self.qkv_sizes, col=False)
            q, k = q.unflatten(-1, (self.n_heads, self.head_dim)), k.unflatten(-1, (self.n_kv_heads, self.head_dim))
            if w.q_norm is not None:
                q, k = rms_norm(q, w.q_norm, self.eps), rms_norm(k, w.k_norm, self.eps)
            q = rotate(q, cos, sin).transpose(0, 1)
            k = rotate(k, cos, sin).transpose(0, 1)
            v = v.unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(0, 1)  # [heads, N, D]
            keys.append(k)
            values.append(v)
            o = torch.cat([
                F.scaled_dot_product_attention(q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], is_causal=True,
                                               scale=self.scale, enable_gqa=True)[0]
                for a, b in zip(bounds[:-1], bounds[1:])
            ], dim=1)  # [heads, N, D]
            h = h + F.linear(o.transpose(0, 1).flatten(-2), w.o, w.o_bias)
            gate, up = project(rms_norm(h, w.post_norm, self.eps), w.gate_up, w.gate_up_bias, self.gate_up_sizes,
                               col=False)
            h = h + F.linear(F.silu(gate) * up, w.down, w.down_bias)
        return self.logits(h[[b - 1 for b in bounds[1:]]]), keys, values

    def decode(self, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """One token per row: tokens [B] at positions [B] (= the row's cached length); writes their
        keys/values into cache rows 0..B-1 and returns logits [B, V].

        Activations are kept column-major ([features, B]) so every projection is W @ X: for the
        skinny batches of decoding MKL runs that layout ~20% faster than X @ W^T."""
        b = tokens.shape[0]
        span = int(positions.max()) + 1
        cos, sin = self.rope(span)
        cos, sin = cos[positions].t().contiguous(), sin[positions].t().contiguous()  # [D, B]
        # additive mask per (row, kv head), broadcast over the group's query heads: [B * Hkv, 1, span]
        hidden = torch.arange(span, device=tokens.device)[None] > positions[:, None]
        mask = torch.zeros(b, span, dtype=self.dtype, device=tokens.device).masked_fill_(hidden, float("-inf"))
        mask = mask.repeat_interleave(self.n_kv_heads, dim=0)[:, None]
        # the rows' first `span` positions with rows and heads merged, as the batched matmuls read them (views)
        n = b * self.n_kv_heads
        keys = [k.flatten(0, 1)[:n, :, :span] for k in cache.k]
        values = [v.flatten(0, 1)[:n, :span] for v in cache.v]
        h = self.model.model.embed_tokens(tokens).t().contiguous()  # [hidden, B]
        h = self._decode_layers(h, cos, sin, mask, positions, keys, values)
        # row-major logits [B, V]: sampling reads rows, and transposing [V, B] costs more than this mm layout
        head = self.model.lm_head
        return F.linear(col_rms_norm(h, self.model.model.norm.weight, self.eps).t(), head.weight, head.bias)

    def _decode_layers(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor,
                       keys: list[Tensor], values: list[Tensor]) -> Tensor:
        """The layers of `decode` over column-major h [hidden, B]. keys / values: per layer the cache's
        rows 0..B-1, positions < span, as [B * kv_heads, D, span] / [B * kv_heads, span, D]; the new
        keys/values go in at `positions`."""
        b = h.shape[1]
        hd, n_kv, group = self.head_dim, self.n_kv_heads, self.n_heads // self.n_kv_heads
        rows = torch.arange(b * n_kv, device=h.device).view(b, n_kv)  # row r, head j: r * n_kv + j
        at = positions[:, None]
        for w, key, value in zip(self._weights(), keys, values):
            q, k, v = project(col_rms_norm(h, w.input_norm, self.eps), w.qkv, w.qkv_bias, self.qkv_sizes, col=True)
            q = rotate_col(head_rms_norm_col(q.reshape(self.n_heads, hd, b), w.q_norm, self.eps), cos, sin)
            k = rotate_col(head_rms_norm_col(k.reshape(n_kv, hd, b), w.k_norm, self.eps), cos, sin)
            key[rows, :, at] = k.permute(2, 0, 1)
            value[rows, at] = v.reshape(n_kv, hd, b).permute(2, 0, 1)
            q = q.view(n_kv, group, hd, b).permute(3, 0, 1, 2).reshape(b * n_kv, group, hd)
            scores = torch.softmax(torch.baddbmm(mask, q, key, alpha=self.scale), dim=-1, dtype=torch.float32)
            o = torch.bmm(scores.to(h.dtype), value)  # [B * Hkv, G, D]
            h = h + col_linear(o.view(b, -1).t(), w.o, w.o_bias)
            gate, up = project(col_rms_norm(h, w.post_norm, self.eps), w.gate_up, w.gate_up_bias,
                               self.gate_up_sizes, col=True)
            h = h + col_linear(F.silu(gate) * up, w.down, w.down_bias)
        return h
