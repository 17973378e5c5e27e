"""Generator actor: turns prompts into scored-to-be rollouts with one of two backends (torch | sglang).

The backend does the generating; this shell takes GENERATE messages, ships each finished group's
tensors over a tensor channel (chosen by the packer's locality: shared memory on our host, zmq otherwise), hands
the texts to a verifier, and applies weight updates between decode steps. Its messages are delivered
(acknowledged, sent again if lost); a second copy of a prompt or a weight update is ignored.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from actors import protocol as P
from actors.base import Actor, handler
from tensors.packed import PackedBatch

log = logging.getLogger("actors.generator")


@dataclass
class Sample:
    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # stop | length | abort


class Backend(Protocol):
    version: int

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def generate_group(self, rid: str, prompt_ids: list[int], n: int, sampling: dict) -> list[Sample]: ...
    async def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None: ...


def rollout_batch(prompt_ids: list[int], samples: list[Sample]) -> PackedBatch:
    """One group as a PackedBatch: prompt + response per sample, loss on the response only."""
    seqs = []
    for s in samples:
        p, r = len(prompt_ids), len(s.output_ids)
        seqs.append({
            "input_ids": torch.tensor(prompt_ids + s.output_ids, dtype=torch.int64),
            "loss_mask": torch.tensor([False] * p + [True] * r),
            "logprobs": torch.tensor([0.0] * p + list(s.logprobs), dtype=torch.float32),
            "versions": torch.tensor([-1] * p + list(s.versions), dtype=torch.int32),
            "rewards": 0.0,
            "group_ids": 0,
        })
    return PackedBatch.from_sequences(seqs)


class Generator(Actor):
    role = "generator"

    def __init__(self, name: str, bus_address: str, *, backend: Backend, tokenizer,
                 transfer_timeout: float = 60.0, rollout_ttl: float = 900.0, deliver_timeout: float = 30.0,
                 **bus_kwargs):
        caps = {"backend": type(backend).__name__}
        super().__init__(name, self.role, bus_address, capabilities=caps, **bus_kwargs)
        self.backend, self.tokenizer = backend, tokenizer
        self.transfer_timeout = transfer_timeout
        self.rollout_ttl = rollout_ttl  # how long a finished group waits for the packer to pull it
        self.deliver_timeout = deliver_timeout
        self._active: set[str] = set()  # prompts being generated (a second copy is ignored)
        self._update_lock = asyncio.Lock()
        self._updated_to: int | None = None  # version of the last weight update applied
        self._verifiers = itertools.count()
        self._tasks: set[asyncio.Task] = set()

    async def on_start(self) -> None:
        await self.backend.start()

    async def on_stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.backend.close()

    @handler(P.GENERATE)
    async def on_generate(self, body: dict, src: str) -> None:
        rid = f"{body['batch']}:{body['qid']}"
        if rid in self._active:
            return
        self._active.add(rid)
        task = asyncio.create_task(self._rollout(rid, body, src))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rollout(self, rid: str, body: dict, sampler: str) -> None:
        try:
            samples = await self.backend.generate_group(rid, body["prompt_ids"], body["n"], body["sampling"])
            batch = rollout_batch(body["prompt_ids"], samples)
            packers = await self.bus.actors(role="packer")
            if not packers:
                raise RuntimeError("no packer is registered on the bus")
            desc = await self.channels.send(batch, packers[:1], timeout=self.rollout_ttl)
            verifiers = sorted(a.name for a in await self.bus.actors(role="verifier"))
            if not verifiers:
                raise RuntimeError("no verifier is registered on the bus")
            verifier = verifiers[next(self._verifiers) % len(verifiers)]
            texts = [self.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in samples]
            versions = [v for s in samples for v in s.versions]
            stats = {
                "truncated": [s.finish_reason == "length" for s in samples],
                "response_tokens": [len(s.output_ids) for s in samples],
                "version_min": min(versions, default=self.backend.version),
                "version_max": max(versions, default=self.backend.version),
            }
            await self.deliver(verifier, P.SCORE, {
                "batch": body["batch"], "qid": body["qid"], "texts": texts, "answers": body["answers"],
                "rollout": desc, "generator": self.name, "stats": stats}, within=self.deliver_timeout)
            await self.deliver(sampler, P.GENERATED, {"batch": body["batch"], "qid": body["qid"],
                                                      "verifier": verifier}, within=self.deliver_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("rollout %s failed", rid)
            # over now: the sampler may deal it to us again while we report, and that copy must run
            self._active.discard(rid)
            try:
                await self.deliver(sampler, P.REJECTED, {"batch": body["batch"], "qid": body["qid"],
                                                         "reason": f"{self.name}: {exc}"}, within=self.deliver_timeout)
            except Exception as exc2:  # the sampler deals it again after rollout.request_timeout
                log.error("could not tell %s that %s failed: %s", sampler, rid, exc2)
        finally:
            self._active.discard(rid)

    @handler(P.UPDATE_WEIGHTS)
    async def on_update_weights(self, body: dict, src: str) -> dict:
        version = int(body["version"])
        async with self._update_lock:  # a second copy (its first answer was lost) waits, then is answered
            if self._updated_to == version and self.backend.version == version:
                return {"version": version}
            weights = await self.channels.recv(body["weights"], timeout=self.transfer_timeout)
            await self.backend.update_weights(weights, version)
            self._updated_to = version
        log.info("weights updated to version %d", self.backend.version)
        return {"version": self.backend.version}
