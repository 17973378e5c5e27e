"""A simulated generator backend: the cost model's time, random tokens, real answers at a set accuracy.

It stands in for an inference engine so the real control plane can be run at cluster scale on one
machine (bench/scale.py). One engine task per backend runs continuous batching by events, not by
token: it sleeps until the next sequence finishes (or a group arrives, or an update), then advances
every running sequence by the tokens that time bought at the step time of that many sequences.

Weight updates honour ``interrupt_on_update``: True applies an update to running sequences at once
(their remaining tokens carry the new version; the sync pause plus a re-prefill of every running
prefix is charged), False holds new groups and applies it once the running sequences end (each
sequence one version). Responses are random plain words; with probability ``accuracy`` one ends in
``\\boxed{reference}`` (the reference comes from the GENERATE body, see SimGenerator), so the real
verifier scores it correct.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from actors import protocol as P
from actors.base import handler
from actors.generator.generator import Generator, request_id
from policies.cost_model import CostModel
from policies.infer.sampling import Sample

log = logging.getLogger("actors.generator.sim")


@functools.lru_cache(maxsize=4)
def plain_word_ids(tokenizer, first: int = 1000, count: int = 4000) -> tuple[int, ...]:
    """Token ids that decode to plain letters: random text made of them never holds a \\boxed{}."""
    ids = range(first, min(first + count, len(tokenizer)))
    return tuple(i for i, t in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)))
                 if t and t.lstrip("Ġ▁").isalpha())


@dataclass(eq=False)
class _Seq:
    target: int                   # simulated tokens
    prompt_len: int
    done: float = 0.0
    segments: list = field(default_factory=list)  # [version, simulated tokens] in order

    def advance(self, tokens: float, version: int) -> None:
        tokens = min(tokens, self.target - self.done)
        if tokens <= 0:
            return
        if self.segments and self.segments[-1][0] == version:
            self.segments[-1][1] += tokens
        else:
            self.segments.append([version, tokens])
        self.done += tokens

    @property
    def finished(self) -> bool:
        return self.done >= self.target - 1e-6


@dataclass(eq=False)
class _Group:
    rid: str
    prompt_len: int
    seqs: list[_Seq]
    answers: list
    future: asyncio.Future


class SimBackend:
    """The Backend protocol of actors.generator over the cost model (see the module docstring)."""

    def __init__(self, cost: CostModel, tokenizer, *, name: str = "sim", version: int = 0, seed: int = 0,
                 interrupt_on_update: bool = True, report_dir: str | Path | None = None):
        self.cost, self.tokenizer, self.name = cost, tokenizer, name
        self.version = version
        self.interrupt = interrupt_on_update
        self.report_dir = Path(report_dir) if report_dir else None
        self.capabilities = {"sim": True, "interrupt_on_update": interrupt_on_update}
        self.answers: dict[str, list] = {}  # rid -> references, set by SimGenerator before generate_group
        self._rng = random.Random(seed)
        self._words = plain_word_ids(tokenizer)
        self._boxed: dict[str, list[int]] = {}
        self._waiting: list[_Group] = []
        self._running: list[tuple[_Seq, _Group]] = []
        self._update: tuple[int, asyncio.Future] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.busy_s = 0.0  # seconds with work (running sequences, a prefill, a sync)
        self._samples: list[tuple[float, float, int]] = []  # (wall time, busy_s, version) at each update
        self.mixed = 0     # finished sequences whose tokens carry more than one version
        self.finished = 0

    async def start(self) -> None:
        if self._task is None:
            self._samples.append((time.time(), 0.0, self.version))
            self._task = asyncio.create_task(self._engine(), name=f"sim-engine-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for g in self._waiting + [g for _, g in self._running]:
            if not g.future.done():
                g.future.set_exception(RuntimeError(f"{self.name}: backend closed"))
        if self.report_dir is not None:
            self._samples.append((time.time(), self.busy_s, self.version))
            self.report_dir.mkdir(parents=True, exist_ok=True)
            (self.report_dir / f"{self.name}.json").write_text(json.dumps(
                {"name": self.name, "samples": self._samples, "mixed": self.mixed, "finished": self.finished}))

    async def generate_group(self, rid: str, prompt_ids: list[int], n: int, sampling: dict) -> list[Sample]:
        if self._task is None:
            raise RuntimeError(f"{self.name}: generate_group before start()")
        fut = asyncio.get_running_loop().create_future()
        seqs = [_Seq(self.cost.response_length(self._rng), len(prompt_ids)) for _ in range(n)]
        self._waiting.append(_Group(rid, len(prompt_ids), seqs, self.answers.pop(rid, []), fut))
        self._wake.set()
        return await fut

    async def update_weights(self, weights: dict, version: int) -> None:
        """Applied by the engine between steps: at once (interrupt) or when the running sequences end."""
        if self._update is not None:  # a newer version supersedes one not yet applied
            old = self._update[1]
            self._update = None
            if not old.done():
                old.set_result(None)
        fut = asyncio.get_running_loop().create_future()
        self._update = (int(version), fut)
        self._wake.set()
        await fut

    # ---- the engine ---------------------------------------------------------------------------
    async def _busy_sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
            self.busy_s += seconds

    async def _engine(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._update is not None and (self.interrupt or not self._running):
                await self._apply_update()
                continue
            if self._waiting and (self._update is None or self.interrupt):
                groups, self._waiting = self._waiting, []
                await self._busy_sleep(self.cost.prefill_seconds(sum(g.prompt_len for g in groups)))
                self._running += [(s, g) for g in groups for s in g.seqs]
            if not self._running:
                self._wake.clear()
                if self._waiting or self._update is not None:
                    continue
                await self._wake.wait()
                continue
            step = self.cost.decode_step_seconds(len(self._running))
            left = min(s.target - s.done for s, _ in self._running)
            self._wake.clear()
            t0 = loop.time()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, left * step))
            except TimeoutError:
                pass
            dt = loop.time() - t0
            self.busy_s += dt
            tokens = dt / step
            still, ended = [], {}
            for s, g in self._running:
                s.advance(tokens, self.version)
                if s.finished:
                    ended[id(g)] = g
                else:
                    still.append((s, g))
            self._running = still
            for g in ended.values():
                if all(s.finished for s in g.seqs) and not g.future.done():
                    g.future.set_result(self._samples_of(g))

    async def _apply_update(self) -> None:
        version, fut = self._update
        await self._busy_sleep(self.cost.sync_seconds())
        if self._running:  # interrupted: the running prefixes are read again under the new weights
            await self._busy_sleep(self.cost.prefill_seconds(sum(s.prompt_len + s.done for s, _ in self._running)))
        if self._update is not None and self._update[1] is fut:
            self._update = None
        self.version = version
        self._samples.append((time.time(), self.busy_s, version))
        if not fut.done():
            fut.set_result(None)

    # ---- the tokens ---------------------------------------------------------------------------
    def _answer_ids(self, answer: str) -> list[int]:
        if answer not in self._boxed:
            self._boxed[answer] = self.tokenizer.encode(f" \\boxed{{{answer}}}", add_special_tokens=False)
        return self._boxed[answer]

    def _samples_of(self, g: _Group) -> list[Sample]:
        out = []
        for i, s in enumerate(g.seqs):
            n = self.cost.emitted(s.target)
            versions = _spread(s.segments, n)
            ids = self._rng.choices(self._words, k=n)
            if g.answers and self._rng.random() < self.cost.accuracy:
                tail = self._answer_ids(str(g.answers[0]))
                ids = ids[:max(0, n - len(tail))] + tail
                versions = (versions + [versions[-1]] * len(tail))[:len(ids)]
            self.finished += 1
            self.mixed += len(s.segments) > 1
            out.append(Sample(ids, [-1.0] * len(ids), versions,
                              "length" if s.target >= self.cost.max_response_tokens else "stop", g.rid, i))
        return out


def _spread(segments: list, n: int) -> list[int]:
    """The version of each of ``n`` emitted tokens standing for the simulated ``segments``."""
    total = sum(t for _, t in segments) or 1.0
    out, bound, k = [], segments[0][1], 0
    for i in range(n):
        at = (i + 0.5) * total / n
        while at > bound and k + 1 < len(segments):
            k += 1
            bound += segments[k][1]
        out.append(int(segments[k][0]))
    return out


class SimGenerator(Generator):
    """The generator actor over a SimBackend, which it tells each prompt's reference answer."""

    @handler(P.GENERATE, from_roles=(P.SAMPLER,))
    async def on_generate(self, body: dict, src: str) -> None:
        rid = request_id(body)
        if rid not in self._active:
            self.backend.answers[rid] = list(body.get("answers") or [])
        await super().on_generate(body, src)
