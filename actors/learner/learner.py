"""Learner: trains on each packed batch in step order, bumps the version, checkpoints, hands weights on.

Training math lives in policies.train.ppo; this shell only orders the steps, moves tensors, times things
and reports. It recomputes the proximal logprobs for the decoupled objective where the generator's
own logprobs are not the learner's: stale data, or other kernels or precision (`recompute_needed`).
TRAIN is acknowledged at once (a second copy is ignored). After each step it hands the new weights
to the broadcaster (PUBLISH_WEIGHTS, actors.weights) and waits for its answer before training on.
Every step's metrics are published and also recorded in RUN_DIR/trained.jsonl (actors.learner.trained_log:
the exactly-once record of the query ids, bounded in memory), so the launcher can fetch a record whose
publication a broker restart lost.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors.learner import checkpoint
from actors import protocol as P
from actors.base import Actor, handler
from actors.weights.broadcaster import snapshot
from actors.learner.trained_log import TrainedLog
from bus.errors import BusError
from policies.train.ppo import PPOConfig, recompute_logprobs, train_step
from policies.model.precision import AUTO
from policies.train.schedule import scheduled_lr

log = logging.getLogger("actors.learner")


def recompute_needed(setting, *, max_staleness: int, generator_backend: str, generator_dtype,
                     learner_dtype) -> tuple[bool, str]:
    """ppo.recompute_logprobs -> (whether the learner recomputes proximal logprobs, why).

    On-policy PPO takes the generator's logprobs as pi_old; that is exact only where the generator
    computes them as the learner would. On SmolLM2 our bf16 decode and the learner's bf16 packed
    forward differ by 0.036 in logprob on average and up to 0.42 (a ratio of 1.5, far outside PPO's
    clip), which the clip would read as policy change; both in fp32 they differ by 2e-5. So "auto"
    recomputes unless both sides are the torch code in fp32 (SGLang serves in bf16 with its own kernels).
    """
    if setting != AUTO:
        return bool(setting), f"ppo.recompute_logprobs={str(setting).lower()}"
    if max_staleness > 0:
        return True, f"max_staleness={max_staleness}: the decoupled objective needs the current policy's logprobs"
    if generator_backend != "torch":
        return True, f"the {generator_backend} generator's logprobs come from other kernels"
    if not generator_dtype == learner_dtype == torch.float32:
        return True, (f"generator {str(generator_dtype).removeprefix('torch.')}, learner "
                      f"{str(learner_dtype).removeprefix('torch.')}: their logprobs differ beyond rounding")
    return False, "the torch generator's fp32 logprobs are the learner's (same weights and precision)"


def train_ppo_batch(model, optimizer, batch, ppo: PPOConfig, *, lr: float, recompute: bool, ref_model=None,
                    world=None) -> dict:
    """One PPO batch: the proximal (and reference) logprobs where wanted, then policies.train.ppo.train_step;
    `world`: this process's place among the learner ranks (actors.learner.ranks)."""
    prox = ref = None
    if recompute:
        prox = recompute_logprobs(model, batch, ppo, loss_tokens_only=True, world=world)
    if ref_model is not None:
        ref = recompute_logprobs(ref_model, batch, ppo, loss_tokens_only=True, world=world)
    stats = train_step(model, optimizer, batch, ppo, proximal_logprobs=prox, ref_logprobs=ref, lr=lr, world=world)
    if prox is not None:  # how far the generator's logprobs were from the learner's
        mask = batch.loss_mask.bool()
        stats["behav_logprob_gap"] = float((prox.cpu() - batch.logprobs.float())[mask].abs().mean())
    return stats


@dataclass(frozen=True)
class LearnerSettings:
    """How one run's learner trains: which steps, how, and what it keeps (the launcher fills it from the
    config's train.*, rollout.* and ppo.* keys; `recompute` is decided once, by `recompute_needed`)."""
    run_dir: Path
    total_steps: int
    start_step: int
    recompute: bool  # recompute the proximal logprobs (else the generator's are taken as exact)
    checkpoint_every: int  # steps between checkpoints (0: only when asked)
    keep_checkpoints: int
    resumed: dict | None = None  # {checkpoint, step, digest} of the state loaded at start, if resumed
    transfer_timeout: float = 120.0  # a packed batch's transfer
    weights_timeout: float = 600.0  # the broadcaster's answer to PUBLISH_WEIGHTS (every generator reached or dropped)
    recent_steps: int = 16  # steps whose records stay in memory (8,192 qids a step add up)
    max_pending: int = 8  # TRAIN bodies held ahead of the step being trained; the packer offers later ones again


class Learner(Actor):
    role = P.LEARNER

    def __init__(self, bus_address: str, *, model, tokenizer, optimizer, ppo: PPOConfig, settings: LearnerSettings,
                 ref_model=None, periodic_eval=None, name: str = P.LEARNER, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.model, self.tokenizer, self.optimizer, self.ppo = model, tokenizer, optimizer, ppo
        self.settings = settings
        self.ref_model = ref_model  # frozen, for ppo.kl_coef > 0 (its logprobs are the KL's reference)
        self.periodic_eval = periodic_eval  # eval.every: .due(steps_done), (model) -> metrics
        self.run_dir = Path(settings.run_dir)
        self.total_steps, self.step = settings.total_steps, settings.start_step
        self.recompute = settings.recompute
        self.pending: dict[int, dict] = {}
        self.trained = TrainedLog(self.run_dir, settings.start_step, window=settings.recent_steps)
        self.resumed = settings.resumed
        self._training: int | None = None
        self._state_lock = asyncio.Lock()  # a checkpoint never sees a half-trained step
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None

    async def on_start(self) -> None:
        self._worker = asyncio.create_task(self._train_loop())

    async def on_stop(self) -> None:
        if self._worker:
            self._worker.cancel()

    @handler(P.TRAIN, from_roles=(P.PACKER,))
    async def on_train(self, body: dict, src: str) -> dict | None:
        step = int(body["step"])
        if step < self.step or step == self._training:
            log.info("ignoring step %d: already trained up to %d", step, self.step)
            return
        if step != self.step and step not in self.pending and len(self.pending) >= self.settings.max_pending:
            return {"later": True}  # bounded: the packer offers it again; the step trained next is always taken
        self.pending[step] = body
        self._wake.set()

    @handler(P.LEARNER_STATE)
    async def on_state(self, body: dict, src: str) -> dict:
        """Where training stands; the query ids of the recent steps only (the file has them all)."""
        t = self.trained
        reply = {"step": self.step, "version": self.step, "total_steps": self.total_steps,
                 "resumed": self.resumed, "trained_file": str(t.path), "trained_steps": [t.first_step, t.next_step],
                 "training": self._training, "pending": sorted(self.pending)}
        if (body or {}).get("qids", True):
            reply["trained_qids"] = {str(r["step"]): r["qids"] for r in t.recent}
        return reply

    @handler(P.LEARNER_METRICS)
    async def on_metrics(self, body: dict, src: str) -> dict:
        """Up to `limit` metrics records of steps >= since (for a launcher that missed a publication):
        a bounded reply, the caller asks again from where it got to."""
        since = int((body or {}).get("since", 0))
        limit = max(1, min(int((body or {}).get("limit", 4)), self.trained.recent.maxlen or 1))
        return {"step": self.step, "total_steps": self.total_steps, "records": self.trained.since(since, limit)}

    @handler(P.CHECKPOINT)
    async def on_checkpoint(self, body: dict, src: str) -> dict:
        async with self._state_lock:
            path = await self._checkpoint()
            return {"step": self.step, "path": str(path)}

    async def _checkpoint(self) -> Path:
        path = await asyncio.to_thread(checkpoint.save, self.run_dir, self.step, self.model, self.tokenizer,
                                       self.optimizer, keep=self.settings.keep_checkpoints)
        log.info("checkpoint written: %s", path)
        return path

    def weights(self) -> dict:
        """What the generators load: the model's full state dict, or a LoRA run's adapter only, by reference
        (`snapshot`; the seam the simulated learner replaces with a token payload)."""
        return snapshot(self.model)

    async def publish_weights(self, version: int) -> dict:
        """The weights as ``version`` to the broadcaster (by reference: it runs in this process) ->
        {updated, failed, seconds} once every generator has them or was dropped; until then nothing
        trains, so nothing overwrites the weights it reads."""
        timeout = self.settings.weights_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (broadcasters := await self._broadcasters()):  # registering (again, after a broker restart)
            if loop.time() > deadline:
                raise RuntimeError(f"no weight broadcaster registered on the bus within {timeout:g} s "
                                   f"to take the weights of version {version}")
            await asyncio.sleep(0.5)
        desc = await self.channels.send(self.weights(), broadcasters[:1], timeout=timeout)
        return await self.request_until(broadcasters[0].name, P.PUBLISH_WEIGHTS, {"version": version, "weights_ref": desc},
                                        within=max(1.0, deadline - loop.time()), attempt=min(30.0, timeout))

    async def _broadcasters(self) -> list:
        try:
            return await self.bus.actors(role=P.BROADCASTER)
        except BusError as exc:
            log.info("asking the broker for the broadcaster: %s", exc)
            return []

    def train_batch(self, batch, step: int) -> dict:
        """One PPO batch on the model (in a worker thread) -> its metrics; the seam that other
        trainers (learner ranks, the simulated learner) replace."""
        return train_ppo_batch(self.model, self.optimizer, batch, self.ppo, recompute=self.recompute,
                               ref_model=self.ref_model, lr=scheduled_lr(self.ppo, step, self.total_steps))

    async def _train_loop(self) -> None:
        try:
            while self.step < self.total_steps:
                await self._wake.wait()
                self._wake.clear()
                while self.step in self.pending:
                    await self._train_one(self.pending.pop(self.step))
        except Exception:  # a learner that cannot train must not sit on the bus looking alive
            log.exception("step %d failed; the learner leaves the bus", self.step)
            asyncio.ensure_future(self.stop())
            return
        await self.bus.publish(P.RUN_FINISHED, {"step": self.step})

    async def _train_one(self, body: dict) -> None:
        step, t0 = int(body["step"]), time.perf_counter()
        self._training = step
        batch = None
        if body["batch_ref"] is not None:
            batch = await self.channels.recv(body["batch_ref"], timeout=self.settings.transfer_timeout)
        t_recv = time.perf_counter()
        stats: dict = {}
        async with self._state_lock:
            if batch is not None and batch.num_seqs:
                stats = await asyncio.to_thread(self.train_batch, batch, step)
                qids = list(batch.meta.get("qids", []))
            else:
                log.warning("step %d: no group carried a learning signal; weights unchanged", step)
                qids = []
            t_train = time.perf_counter()
            self.step, self._training = step + 1, None
            tokens = batch.num_tokens if batch is not None else 0
            metrics = {
                "step": step, "version": self.step, **body.get("stats", {}),
                **{k: float(v) for k, v in stats.items() if isinstance(v, (int, float))},
                "train_tokens": tokens,
                "learner_tokens_per_s": tokens / max(1e-9, t_train - t_recv),
                "time_recv_s": t_recv - t0, "time_train_s": t_train - t_recv,
                "qids": qids,  # the exactly-once record: one entry per trained sequence
            }
            # on disk before a checkpoint that includes the step: a resume never lacks its record
            await asyncio.to_thread(self.trained.record, metrics)  # fsync: a slow filesystem must not stall the loop
            every = self.settings.checkpoint_every
            if every and (self.step % every == 0 or self.step == self.total_steps):
                await self._checkpoint()
        sync = await self.publish_weights(self.step)
        t_end = time.perf_counter()
        # the published record (and the in-memory copy) add the weight sync and any eval; the file line has not
        metrics.update({"time_sync_s": t_end - t_train, "generators_updated": sync["updated"],
                        "generators_failed": sync["failed"]})
        if self.periodic_eval is not None and self.periodic_eval.due(self.step):
            metrics.update(await asyncio.to_thread(self.periodic_eval, self.model))
        self.trained.complete(metrics)  # only now served to a launcher that missed the publication
        await self.bus.publish(P.METRICS, metrics)
        log.info("step %d done: reward %.3f acc %.3f loss %s (%.1f s train, %.1f s sync)", step,
                 metrics.get("reward_mean", float("nan")), metrics.get("accuracy", float("nan")),
                 f"{metrics['loss']:.4f}" if "loss" in metrics else "-", t_train - t_recv, t_end - t_train)
