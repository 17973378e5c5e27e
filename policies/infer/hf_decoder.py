"""The fallback decoder for architectures the compact forward does not reproduce: HF's own forward.

policies.infer.llama_infer runs Llama / Qwen2 / Qwen3 math on the model's tensors. Any other
AutoModelForCausalLM (Mistral, Gemma, Phi, ...) still has to generate, evaluate and filter with
exactly the weights the learner trains, so `GenerationEngine` falls back to this decoder: the same
prefill / decode / cache interface, computed by the model's own forward over each row's whole
sequence (right-padded, so padding never reaches a real token through causal attention). There is
no KV cache, so a step costs a forward over every row's tokens: correct for any model, and slower
(the engine says so once in the log).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from policies.infer.llama_infer import CompactDecoder, UnsupportedModelError

log = logging.getLogger(__name__)


class TokenCache:
    """Each row's tokens so far (prompt, then generated), in the shape of `KVCache`'s interface:
    rows x positions of token ids that grow by doubling and compact like the KV cache."""

    def __init__(self, device):
        self.device = device
        self.ids = torch.zeros(0, 0, dtype=torch.long, device=device)

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def positions(self) -> int:
        return self.ids.shape[1]

    def reserve(self, rows: int, positions: int, *, used_rows: int, used_positions: int) -> None:
        if rows <= self.rows and positions <= self.positions:
            return
        new_rows = max(rows, self.rows if rows <= self.rows else 2 * self.rows)
        new_pos = self.positions if positions <= self.positions else max(positions, 2 * self.positions, 64)
        fresh = torch.zeros(new_rows, new_pos, dtype=torch.long, device=self.device)
        fresh[:used_rows, :used_positions] = self.ids[:used_rows, :used_positions]
        self.ids = fresh

    def write_prompt(self, first_row: int, n_rows: int, keys: list[Tensor], values: list[Tensor],
                     start: int = 0, stop: int | None = None) -> None:
        """`keys[0]` is the packed prompts' token ids (what `HFDecoder.prefill` returns)."""
        ids = keys[0]
        stop = ids.shape[0] if stop is None else stop
        self.ids[first_row:first_row + n_rows, :stop - start] = ids[start:stop]

    def move_rows(self, src: list[int], dst: list[int], positions: int) -> None:
        if src:
            self.ids[torch.tensor(dst), :positions] = self.ids[torch.tensor(src), :positions]

    def clear(self) -> None:
        self.ids = torch.zeros(0, 0, dtype=torch.long, device=self.device)


class HFDecoder:
    """`CompactDecoder`'s interface over the model's own forward (no KV cache)."""

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = model.config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", None) or 1 << 20)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def new_cache(self) -> TokenCache:
        return TokenCache(self.device)

    def _last_logits(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Logits [B, V] at each row's last real token of right-padded ids [B, L]."""
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        out = self.model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
        return out.logits[torch.arange(ids.shape[0], device=ids.device), lengths - 1].float()

    def prefill(self, prompts: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        lengths = torch.tensor([int(p.shape[0]) for p in prompts], device=self.device)
        padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            padded[i, :p.shape[0]] = p
        return self._last_logits(padded, lengths), [torch.cat(prompts)], []

    def decode(self, tokens: Tensor, positions: Tensor, cache: TokenCache) -> Tensor:
        b = tokens.shape[0]
        rows = torch.arange(b, device=tokens.device)
        cache.ids[rows, positions] = tokens
        lengths = positions + 1
        return self._last_logits(cache.ids[:b, :int(lengths.max())], lengths)


_FALLBACK_SAID: set[str] = set()   # model classes already reported as running on the HF fallback


def make_decoder(model: nn.Module, *, fuse: bool = True, hf_fallback: bool = True):
    """The compact decoder where it reproduces the model's math, else (with hf_fallback) HF's forward
    (policies.infer.hf_decoder: any causal LM, slower; said once per model class in the log)."""
    try:
        return CompactDecoder(model, fuse=fuse)
    except UnsupportedModelError as e:
        if not hf_fallback:
            raise
        name = type(model).__name__
        if name not in _FALLBACK_SAID:
            _FALLBACK_SAID.add(name)
            log.warning("%s runs on the HF forward without a KV cache (slower than the torch engine): %s", name, e)
        return HFDecoder(model)
