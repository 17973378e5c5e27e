"""Step-wise batched generation with a KV cache: the engine behind the `torch` generator backend.

The actor drives it one step at a time (in a worker thread) and may swap weights between steps;
every generated token records the policy version whose weights produced it.

Conventions
- Logprobs: the logprob recorded for a sampled token is log_softmax(logits / temperature) at that
  token, i.e. the tempered distribution *before* top-k/top-p truncation. That is what the learner
  recomputes (log p(token | prefix) from logits / temperature, no top-p), so importance ratios are
  1 on-policy. With temperature 0 (greedy) the logprob is log_softmax(logits) (temperature 1).
- Stop tokens: a sample ends at the first token in `stop_token_ids` or the engine's eos ids
  (unless `ignore_eos`); that token is kept in `output_ids`. Reaching max_new_tokens is
  finish_reason "length" (truncated).
- Seeds: each group draws from its own generator, seeded from (params.seed, rid) or, without a
  seed, from the engine's seeder; so a group's samples do not depend on other groups' draws, and
  with a fixed seed and the same batch composition results are identical run to run (other
  compositions change the batched matmuls only at the level of float rounding).
- Weight updates interrupt in-flight samples: at the next step the engine recomputes the cached
  keys/values of every running row (prompt + tokens so far) under the new weights (a re-prefill,
  AReaL's interrupt-and-continue), so no token is sampled from a cache of older weights; tokens
  sampled from then on carry the new version. A caller that wants no sequence to mix versions
  waits for the running rows to end before updating (`step(admit=False)` starts no new group).
- LoRA (`lora=`): the engine keeps a copy of the base weights that the adapter targets, and an update
  that is an adapter (policies.model.lora.is_adapter_state) sets each target to base + (alpha / r) * B @ A
  (`BaseCopy.merged`) through the same in-place copy as full weights: the fused decoder reads them as ever.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from torch import Tensor, nn

from policies.infer.hf_decoder import make_decoder
from policies.infer.llama_infer import KVCache
from policies.infer.token_draw import sample_tokens
from policies.model.lora import BaseCopy, LoraSettings, is_adapter_state

log = logging.getLogger(__name__)
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    stop_token_ids: tuple[int, ...] = ()  # in addition to the engine's eos ids
    seed: int | None = None
    ignore_eos: bool = False  # do not stop at the engine's eos ids (benchmarks)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an int >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an int >= 0")
        stops = self.stop_token_ids
        if isinstance(stops, int) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stops):
            bad("stop_token_ids", "must be a sequence of non-negative ints")
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an int or None")


@dataclass
class Sample:
    """One generated response, whichever backend made it (this engine, an SGLang server): the
    tokens, the behaviour logprob and policy version of each, and why it ended. `rid`/`index`
    place it in its request (sample j of the group); `resumes` counts how often a weight update
    interrupted it mid-sequence (SGLang: its partial rollout resubmitted; this engine: its cache
    recomputed under the new weights)."""
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]  # policy version that produced each output token
    finish_reason: FinishReason  # stop | length | abort
    rid: str = ""
    index: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    resumes: int = 0

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class EngineStats:
    prefills: int = 0  # prompt forwards (one per group, shared by its samples)
    prefill_tokens: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    interrupted: int = 0  # running rows whose cache a weight update made stale (counted once per update)
    reprefill_tokens: int = 0  # tokens recomputed under new weights for them


# ---------------------------------------------------------------- engine bookkeeping


@dataclass(eq=False)
class _Group:
    rid: str
    prompt_ids: list[int]
    n: int
    params: SamplingParams
    stop: frozenset[int]
    generator: torch.Generator
    live: int = 0  # samples still generating


@dataclass(eq=False)
class _Sample:
    group: _Group
    index: int
    pending: int = -1  # last sampled token, not yet fed to the model
    length: int = 0  # tokens in the KV cache for this sample
    kv_version: int = 0  # the weights its cached keys/values were computed with
    resumes: int = 0  # weight updates that interrupted it
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def finished(self, reason: FinishReason) -> Sample:
        g = self.group
        return Sample(self.output_ids, self.logprobs, self.versions, reason, rid=g.rid, index=self.index,
                      prompt_ids=list(g.prompt_ids), resumes=self.resumes)


def _eos_ids(model: nn.Module) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None)
        for t in [eos] if isinstance(eos, int) else (eos or []):
            if t not in ids:
                ids.append(int(t))
    return tuple(ids)


class GenerationEngine:
    """Continuous-batching sampler over a HF causal LM (Llama / Qwen2 / Qwen3 run the compact decoder).

    Shares the model's parameters (no copy): an in-place update of the model, or
    `update_weights`, is seen at the next step. Thread-safe: `step`, `abort` and `update_weights`
    share one lock, so an update from another thread lands between two steps; `add` and
    `has_work` never wait for a running step (an event loop may call them directly).

    Admission (FIFO) keeps at most `max_batch_size` samples active and the sum over active samples
    of prompt + max_new_tokens within `max_batch_tokens`. The KV cache holds
    rows x longest-row positions x (2 x layers x kv_heads x head_dim) values, grown on demand
    (46 KiB per position for SmolLM2-135M in fp32) and freed when the engine goes idle.
    Models of other architectures run on HF's forward (`policies.infer.hf_decoder`, slower, logged once);
    with hf_fallback=False they raise `UnsupportedModelError`.
    fuse_projections re-homes each layer's q/k/v and gate/up weights into one buffer each (same
    Parameter objects and values; see `policies.infer.llama_infer.FusedLayer`) for fewer, larger matmuls.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_tokens: int = 131072,
        max_batch_size: int = 64,
        max_prefill_tokens: int = 8192,
        fuse_projections: bool = True,
        device: torch.device | str | None = None,
        eos_token_ids: tuple[int, ...] | None = None,
        seed: int | None = None,
        version: int = 0,
        hf_fallback: bool = True,
        lora: LoraSettings | None = None,
    ):
        for name, value in (("max_batch_tokens", max_batch_tokens), ("max_batch_size", max_batch_size),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationEngine {name}={value!r}: must be an int >= 1")
        self._lora_base = BaseCopy(model, lora) if lora is not None else None  # before the decoder re-homes
        self.decoder = make_decoder(model, fuse=fuse_projections, hf_fallback=hf_fallback)
        here = self.decoder.device
        if device is not None:
            want = torch.device(device)
            same_index = want.index is None or here.index is None or want.index == here.index
            if want.type != here.type or not same_index:
                raise ValueError(f"device={device!r} but the model's parameters are on {here}; move the model first")
        self.model = model
        self.device = self.decoder.device
        self.vocab_size = model.config.vocab_size
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = tuple(eos_token_ids) if eos_token_ids is not None else _eos_ids(model)
        self.version = version
        self.stats = EngineStats()
        self._seeder = torch.Generator()
        self._seeder.manual_seed(seed) if seed is not None else self._seeder.seed()
        self._queue: deque[_Group] = deque()
        self._groups: dict[str, _Group] = {}  # queued or active, by rid
        self._rows: list[_Sample] = []  # active samples; row i of the KV cache
        self._reserved_tokens = 0  # sum over active samples of prompt + max_new_tokens
        self._cache: KVCache = self.decoder.new_cache()
        self._lock = threading.Lock()  # the model, KV cache and rows: held for a whole step
        self._qlock = threading.Lock()  # the queue and rid table: held briefly (taken after _lock)

    # ------------------------------------------------------------ public API

    def add(self, rid: str, prompt_ids: list[int], n: int, params: SamplingParams) -> None:
        """Queue a group of n samples of one prompt (admitted at the next step with room)."""
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"rid={rid!r}: must be a non-empty str")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"request {rid}: n={n!r} must be an int >= 1")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"request {rid}: params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_ids)
        if not ids:
            raise ValueError(f"request {rid}: prompt_ids is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            bad = next(t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size))
            raise ValueError(f"request {rid}: prompt_ids contains {bad!r}, not a token id in [0, {self.vocab_size})")
        total = len(ids) + params.max_new_tokens
        if total > self.decoder.max_positions:
            raise ValueError(
                f"request {rid}: prompt ({len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"exceeds the model's max_position_embeddings={self.decoder.max_positions}"
            )
        if n > self.max_batch_size or n * total > self.max_batch_tokens:
            raise ValueError(
                f"request {rid}: n={n} samples x {total} tokens does not fit max_batch_size={self.max_batch_size} "
                f"/ max_batch_tokens={self.max_batch_tokens}"
            )
        with self._qlock:  # never waits for a running step
            if rid in self._groups:
                raise ValueError(f"request {rid}: a group with this rid is already queued or running")
            gen = torch.Generator()
            gen.manual_seed(self._group_seed(rid, params.seed))
            stop = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            group = _Group(rid, ids, n, params, frozenset(stop), gen)
            self._groups[rid] = group
            self._queue.append(group)

    def _group_seed(self, rid: str, seed: int | None) -> int:
        """The group's generator seed: from (seed, rid) when seeded, so groups sharing one seed
        still get independent streams, else a fresh draw from the engine's seeder."""
        if seed is None:
            return int(torch.randint(2**62, (1,), generator=self._seeder))
        digest = hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2

    def has_work(self) -> bool:
        return bool(self._queue) or bool(self._rows)  # plain reads: never waits for a running step

    @property
    def num_active(self) -> int:
        return len(self._rows)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def step(self, admit: bool = True) -> list[Sample]:
        """Admit queued groups that fit (unless admit=False), recompute the cache of rows a weight
        update made stale, decode one token for every active sample, and return the samples that
        finished during this step."""
        with self._lock, torch.inference_mode():
            done: list[Sample] = []
            if admit:
                self._admit(done)
            if self._rows:
                self._reprefill()
                self._decode(done)
            return done

    def abort(self, rid: str) -> list[Sample]:
        """Stop a group: its unfinished samples come back with finish_reason "abort" and their
        partial output. An unknown (or already finished) rid returns []."""
        with self._lock:
            with self._qlock:
                group = self._groups.pop(rid, None)
                if group is None:
                    return []
                queued = group in self._queue
                if queued:
                    self._queue.remove(group)
            if queued:
                return [_Sample(group, j).finished("abort") for j in range(group.n)]
            dead = [i for i, s in enumerate(self._rows) if s.group is group]
            out = [self._rows[i].finished("abort") for i in dead]
            self._remove_rows(dead)
            return sorted(out, key=lambda f: f.index)

    def abort_all(self) -> list[Sample]:
        out: list[Sample] = []
        with self._qlock:
            rids = list(self._groups)
        for rid in rids:
            out += self.abort(rid)
        return out

    def update_weights(self, named_tensors: Mapping[str, Tensor], version: int) -> None:
        """Copy new values into the model's parameters in place (no reallocation); running rows are
        re-prefilled under them at the next step and tokens sampled from then on carry `version`.
        Everything is checked before anything is copied. An adapter (LoRA engines only) sets its targets
        to their merged weights, base + scale * B @ A."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version={version!r} must be an int")
        if is_adapter_state(named_tensors):
            if self._lora_base is None:
                raise ValueError("update_weights: got a LoRA adapter, but this engine was made without lora= "
                                 "(model.lora unset on the generator's side?)")
            named_tensors = self._lora_base.merged(named_tensors)  # a LoraError (ValueError) names a bad tensor
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(dict(self.model.named_buffers()))
        unknown = [k for k in named_tensors if k not in targets]
        if unknown:
            raise ValueError(f"update_weights: unknown tensor names {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        wrong = [f"{k}: {tuple(v.shape)} != {tuple(targets[k].shape)}"
                 for k, v in named_tensors.items() if v.shape != targets[k].shape]
        if wrong:
            raise ValueError(f"update_weights: shape mismatch {wrong[:5]}")
        with self._lock:
            if version < self.version:
                raise ValueError(f"update_weights: version {version} is older than the current version {self.version}")
            with torch.no_grad():
                for k, v in named_tensors.items():
                    targets[k].copy_(v)
            self.version = version

    # ------------------------------------------------------------ internals

    def _admit(self, done: list[Sample]) -> None:
        """Move queued groups that fit into the batch, prefilling their prompts packed together
        (in chunks of at most max_prefill_tokens) and sampling each sample's first token."""
        while True:
            chunk: list[_Group] = []
            chunk_tokens = 0
            rows = len(self._rows)
            with self._qlock:
                while self._queue:
                    group = self._queue[0]
                    p = len(group.prompt_ids)
                    need = group.n * (p + group.params.max_new_tokens)
                    if rows + group.n > self.max_batch_size or self._reserved_tokens + need > self.max_batch_tokens:
                        break  # FIFO: later groups wait too, so none starves
                    if chunk and chunk_tokens + p > self.max_prefill_tokens:
                        break
                    self._queue.popleft()
                    self._reserved_tokens += need
                    rows += group.n
                    chunk_tokens += p
                    chunk.append(group)
            if not chunk:
                return
            self._prefill(chunk, done)

    def _prefill(self, groups: list[_Group], done: list[Sample]) -> None:
        prompts = [torch.tensor(g.prompt_ids, device=self.device) for g in groups]
        logits, keys, values = self.decoder.prefill(prompts)
        self.stats.prefills += len(groups)
        self.stats.prefill_tokens += sum(len(g.prompt_ids) for g in groups)
        first = len(self._rows)
        n_new = sum(g.n for g in groups)
        longest = max([s.length for s in self._rows], default=0)
        longest_prompt = max(len(g.prompt_ids) for g in groups)
        self._cache.reserve(first + n_new, max(longest_prompt, longest) + 1, used_rows=first, used_positions=longest)
        row, col = first, 0
        for g in groups:
            p = len(g.prompt_ids)
            self._cache.write_prompt(row, g.n, keys, values, col, col + p)
            self._rows.extend(_Sample(g, j, length=p, kv_version=self.version) for j in range(g.n))
            g.live = g.n
            row, col = row + g.n, col + p
        counts = torch.tensor([g.n for g in groups], device=self.device)
        self._sample(logits.repeat_interleave(counts, dim=0), first, done)

    def _reprefill(self) -> None:
        """Recompute the keys/values of rows cached under older weights: each row's prompt and its
        tokens so far but the pending one (`length` tokens), packed in chunks of max_prefill_tokens."""
        stale = [i for i, s in enumerate(self._rows) if s.kv_version != self.version]
        while stale:
            chunk, tokens = [], 0
            while stale and (not chunk or tokens + self._rows[stale[0]].length <= self.max_prefill_tokens):
                i = stale.pop(0)
                chunk.append(i)
                tokens += self._rows[i].length
            rows = [self._rows[i] for i in chunk]
            seqs = [torch.tensor(s.group.prompt_ids + s.output_ids[:-1], device=self.device) for s in rows]
            _, keys, values = self.decoder.prefill(seqs)
            col = 0
            for i, s in zip(chunk, rows):
                self._cache.write_prompt(i, 1, keys, values, col, col + s.length)
                col += s.length
                s.kv_version = self.version
                s.resumes += 1
            self.stats.interrupted += len(rows)
            self.stats.reprefill_tokens += tokens

    def _decode(self, done: list[Sample]) -> None:
        rows = self._rows
        tokens = torch.tensor([s.pending for s in rows], device=self.device)
        positions = torch.tensor([s.length for s in rows], device=self.device)
        longest = max(s.length for s in rows)
        self._cache.reserve(len(rows), longest + 1, used_rows=len(rows), used_positions=longest)
        logits = self.decoder.decode(tokens, positions, self._cache)
        for s in rows:
            s.length += 1
        self.stats.decode_steps += 1
        self._sample(logits, 0, done)

    def _sample(self, logits: Tensor, first: int, done: list[Sample]) -> None:
        """Sample the next token of rows first.. from logits [B', V]; record; retire finished rows."""
        rows = self._rows[first:]
        uniform = self._uniforms(rows)
        params = [s.group.params for s in rows]
        temp = torch.tensor([p.temperature for p in params], device=self.device)
        top_k = torch.tensor([p.top_k for p in params], device=self.device)
        top_p = torch.tensor([p.top_p for p in params], device=self.device)
        tokens, logprobs = sample_tokens(logits, temp, top_k, top_p, uniform.to(self.device))
        finished: list[int] = []
        for i, (s, t, lp) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist())):
            s.output_ids.append(t)
            s.logprobs.append(lp)
            s.versions.append(self.version)
            s.pending = t
            if t in s.group.stop:
                done.append(s.finished("stop"))
            elif len(s.output_ids) >= s.group.params.max_new_tokens:
                done.append(s.finished("length"))
            else:
                continue
            finished.append(first + i)
        self.stats.generated_tokens += len(rows)
        for f in finished:
            g = self._rows[f].group
            g.live -= 1
            if g.live == 0:
                with self._qlock:
                    self._groups.pop(g.rid, None)
        self._remove_rows(finished)

    def _uniforms(self, rows: list[_Sample]) -> Tensor:
        """One uniform per row, drawn from its group's generator in sample order."""
        by_group: dict[int, list[int]] = {}
        for i, s in enumerate(rows):
            by_group.setdefault(id(s.group), []).append(i)
        u = [0.0] * len(rows)
        for idx in by_group.values():
            draws = torch.rand(len(idx), generator=rows[idx[0]].group.generator, dtype=torch.float64).tolist()
            for i, x in zip(sorted(idx, key=lambda i: rows[i].index), draws):
                u[i] = x
        return torch.tensor(u, dtype=torch.float64)

    def _remove_rows(self, dead: list[int]) -> None:
        """Drop rows, filling holes with rows from the end (copies only the moved rows' KV)."""
        if not dead:
            return
        for i in dead:
            s = self._rows[i]
            self._reserved_tokens -= len(s.group.prompt_ids) + s.group.params.max_new_tokens
        keep = len(self._rows) - len(dead)
        dead_set = set(dead)
        holes = [i for i in sorted(dead_set) if i < keep]
        movers = [i for i in range(keep, len(self._rows)) if i not in dead_set]
        if holes:
            span = max(self._rows[i].length for i in movers)
            self._cache.move_rows(movers, holes, span)
            for h, m in zip(holes, movers):
                self._rows[h] = self._rows[m]
        del self._rows[keep:]
        if not self._rows:  # idle: give the cache memory back
            self._reserved_tokens = 0
            self._cache.clear()


def generate(
    model: nn.Module, prompts: list[list[int]], n: int, params: SamplingParams, **engine_kwargs
) -> list[list[Sample]]:
    """Run prompts x n samples to completion; result[i][j] is sample j of prompt i."""
    engine = GenerationEngine(model, **engine_kwargs)
    for i, p in enumerate(prompts):
        engine.add(str(i), p, n, params)
    results: list[list[Sample | None]] = [[None] * n for _ in prompts]
    while engine.has_work():
        for f in engine.step():
            results[int(f.rid)][f.index] = f
    return results  # type: ignore[return-value]
