"""Prompt sampler: admits training batches under the staleness bound and deals prompts to generators.

The batch of step s is the s-th batch of the data order (``policies.data.order``); it is admitted once
the generators run policy version >= s - max_staleness (version == steps trained, actors.protocol).
It owns the exactly-once guarantee on the sampling side: every prompt of an admitted batch stays
"owed" until the packer says ACCEPTED. A prompt held by a generator or verifier that leaves is dealt
again; the packer drops any duplicate that the dead peer had already sent on. Prompts are delivered
(acknowledged, sent again if lost), so a broker restart loses none, and after one the sampler asks
the broadcaster for the policy version it may have missed. A holder that died while the broker was
down never gets a `left` (the new broker never knew it): the sampler reconciles what it dealt with the
broker's actor list, and a holder missing from it for longer than a re-registration takes is treated
as gone (`_reconcile`). With rollout.workflow set it deals to rollout workers (actors.rollout), which take
the generators' place in all of the above, from the moment they register.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from actors import protocol as P
from actors.base import Actor, handler
from policies.data.order import batch_indices
from policies.data.dataset import Problem
from actors.sampler.load_book import LoadBook
from bus.errors import BusError

log = logging.getLogger("actors.sampler")
DEAL_SLICE = 64  # prompts dealt before the sampler lets other messages in (see _deal)


@dataclass(frozen=True)
class SamplerConfig:
    """What the sampler needs of the config (rollout.*, train.steps, seed), built by the launcher: no
    defaults here, so none can drift from the config's."""
    batch_prompts: int
    group_size: int
    max_staleness: int
    total_batches: int
    seed: int
    sampling: dict  # temperature, top_p, max_new_tokens, ...
    request_timeout: float  # a prompt held longer than this is dealt again
    deliver_timeout: float = 30.0  # how long a prompt is sent again to a generator that does not acknowledge
    report_every: float = 15.0  # seconds between "waiting for ..." progress lines
    max_refills: int = 0  # rollout.dynamic_sampling: prompts dealt per step in place of dropped groups, at most
    deal_to: str = P.GENERATOR  # rollout.workflow set: P.ROLLOUT, the rollout workers that run it (actors.rollout)


def refill_index(n_problems: int, seed: int, step: int, k: int) -> int:
    """The dataset index of step `step`'s k-th refill: a walk through a permutation of its own."""
    return int(np.random.default_rng([seed, 1 << 20, step]).permutation(n_problems)[k % n_problems])


@dataclass
class _Owed:
    body: dict
    holder: str | None = None  # the generator or verifier that has it now
    since: float = 0.0  # monotonic time it went to its holder


class PromptSampler(Actor):
    role = P.SAMPLER

    def __init__(self, bus_address: str, *, problems: list[Problem], prompt_ids: list[list[int]],
                 cfg: SamplerConfig, start_batch: int = 0, name: str = P.SAMPLER, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        if len(problems) != len(prompt_ids):
            raise ValueError("problems and prompt_ids differ in length")
        self.problems, self.prompt_ids, self.cfg = problems, prompt_ids, cfg
        self.next_step = start_batch  # the step whose prompts are admitted next (its batch of the data order)
        self.version = start_batch  # the policy version the generators run (== the learner's steps trained)
        self.owed: dict[tuple[int, str], _Owed] = {}
        self.queue: deque[tuple[int, str]] = deque()
        self.generators = LoadBook()  # name -> prompts in flight there (generators, or rollout workers: cfg.deal_to)
        # the job's incarnation (actors.protocol): one sampler lives exactly as long as one, and a restart
        # or --resume starts a new one; every prompt carries it, and replies of another are refused
        self.epoch = secrets.token_hex(8)
        self._watchdog: asyncio.Task | None = None
        self._refills: dict[int, int] = {}  # step -> prompts dealt in place of dropped groups
        self._reconciler: asyncio.Task | None = None
        self._absent_since: dict[str, float] = {}  # holder -> when the broker's list first lacked it
        # accepted prompts of steps not yet trained: the packer may still find one breaks its step
        self.accepted: dict[tuple[int, str], dict] = {}

    async def on_start(self) -> None:
        self.bus.subscribe(P.WEIGHTS_VERSION, self._on_version)
        self.bus.subscribe(P.LEFT, self._on_left)
        self.bus.subscribe(P.JOINED, self._on_joined)
        await self._ask_version()  # the broadcaster may have announced before we subscribed
        if self.cfg.deal_to == P.ROLLOUT:
            for a in await self.bus.actors(role=P.ROLLOUT):
                self._hold_book(a.name)
        await self._pump()
        self._watchdog = asyncio.create_task(self._watch())
        self._reconciler = asyncio.create_task(self._reconcile())

    async def _ask_version(self) -> None:
        try:
            state = await self.bus.request(P.BROADCASTER, P.BROADCASTER_STATE, {}, timeout=5.0)
        except Exception as exc:
            log.info("no answer from the broadcaster (%s); waiting for its announcement", exc)
            return
        await self._on_version(P.WEIGHTS_VERSION, state, P.BROADCASTER)

    async def _on_joined(self, topic: str, body: dict, src: str) -> None:
        """After a broker restart everyone joins again: an announcement made meanwhile may be lost."""
        if body.get("name") in (self.name, P.BROADCASTER):
            await self._ask_version()
        if self.cfg.deal_to == P.ROLLOUT and body.get("role") == P.ROLLOUT:
            self._hold_book(body["name"])
            await self._deal()

    def _hold_book(self, name: str) -> None:
        """Rollout workers are dealt to from the moment they register (they run no weights of their own: the
        generators they pick serve the announced version)."""
        if name not in self.generators:
            self.generators[name] = sum(o.holder == name for o in self.owed.values())
            log.info("rollout worker %s is dealt prompts", name)

    async def on_stop(self) -> None:
        for task in (self._watchdog, self._reconciler):
            if task:
                task.cancel()

    async def _reconcile(self) -> None:
        """Deal again the prompts of holders the broker no longer lists.

        Every live actor registers again within a heartbeat window or two of a broker restart, so
        a holder absent from the list for ``grace`` (two windows and a second) is dead: it died
        while the broker was down (no `left` will come) or its `left` was lost with the broker."""
        window = self.bus.heartbeat_interval * self.bus.heartbeat_liveness
        period, grace = max(0.5, window), 2 * window + 1.0
        while True:
            await asyncio.sleep(period)
            holders = {o.holder for o in self.owed.values() if o.holder}
            if not holders:
                self._absent_since.clear()
                continue
            try:
                live = {a.name for a in await self.bus.actors(timeout=max(1.0, window))}
            except BusError as exc:  # the broker is away: nothing to compare with yet
                log.debug("cannot list the actors to reconcile (%s)", exc)
                continue
            now = time.monotonic()
            self._absent_since = {h: self._absent_since.get(h, now) for h in holders - live}
            for name, since in list(self._absent_since.items()):
                if now - since >= grace:
                    del self._absent_since[name]
                    log.warning("%s holds prompts but is not on the bus (%.1f s): it died unseen", name,
                                now - since)
                    await self._on_left(P.LEFT, {"name": name, "reason": "unlisted"}, P.SAMPLER)

    async def _watch(self) -> None:
        """Say what we wait for, and deal again any prompt held past the request timeout."""
        while True:
            await asyncio.sleep(self.cfg.report_every)
            now = time.monotonic()
            late = [k for k, o in self.owed.items() if o.holder and now - o.since > self.cfg.request_timeout]
            for key in late:
                owed = self.owed[key]
                log.warning("%s held by %s for %.0f s (> request_timeout): dealing it again", key, owed.holder,
                            now - owed.since)
                self._release(key, owed.holder)
                owed.holder = None
                self.queue.appendleft(key)
            if late:
                await self._deal()
            if not self.admissible() and self.next_step < self.cfg.total_batches and not self.owed:
                await self._ask_version()  # waiting for a version: make sure we did not miss it
            if self.owed:
                holders: dict[str, int] = {}
                for o in self.owed.values():
                    holders[o.holder or "queued"] = holders.get(o.holder or "queued", 0) + 1
                oldest = max((now - o.since for o in self.owed.values() if o.holder), default=0.0)
                log.info("waiting for %d prompts (%s); oldest %.0f s; policy version %d, next batch %d",
                         len(self.owed), ", ".join(f"{h}: {n}" for h, n in sorted(holders.items())), oldest,
                         self.version, self.next_step)
            elif self.next_step < self.cfg.total_batches:
                log.info("batch %d waits for policy version >= %d (now %d)", self.next_step,
                         self.next_step - self.cfg.max_staleness, self.version)

    # --- admission -------------------------------------------------------------------------
    def admissible(self) -> bool:
        return (self.next_step < self.cfg.total_batches
                and self.next_step <= self.version + self.cfg.max_staleness)

    def _admit(self, step: int) -> None:
        idx = batch_indices(len(self.problems), self.cfg.batch_prompts, self.cfg.seed, step)
        for i in idx:
            prob = self.problems[i]
            key = (step, prob.id)
            if key in self.owed:  # the same problem twice in one batch (tiny datasets)
                key = (step, f"{prob.id}#{sum(k[0] == step for k in self.owed)}")
            self._owe(key, i)
        log.info("batch %d admitted (%d prompts, policy version %d, max_staleness %d)",
                 step, len(idx), self.version, self.cfg.max_staleness)

    def _owe(self, key: tuple[int, str], i: int) -> None:
        prob = self.problems[i]
        self.owed[key] = _Owed({
            "step": key[0], "qid": key[1], "epoch": self.epoch, "prompt_ids": self.prompt_ids[i],
            "n": self.cfg.group_size, "sampling": self.cfg.sampling, "answers": prob.answers,
            "problem": {"prompt": prob.prompt, "extra": prob.extra},   # for reward functions
        })
        self.queue.append(key)

    def _refill(self, step: int) -> None:
        """Dynamic sampling: the packer set a group of `step` apart; deal another prompt in its place (the
        k-th refill of a step is a pure function of seed, step and k, so a resumed run deals the same)."""
        k = self._refills.get(step, 0)
        if k >= self.cfg.max_refills:
            log.warning("step %d: %d prompts dealt in place of zero-variance groups (the most allowed); "
                        "it trains on what it kept", step, k)
            return
        self._refills[step] = k + 1
        i = refill_index(len(self.problems), self.cfg.seed, step, k)
        self._owe((step, f"{self.problems[i].id}#r{k}"), i)

    async def _pump(self) -> None:
        while self.admissible():
            self._admit(self.next_step)
            self.next_step += 1
        await self._deal()

    async def _deal(self) -> None:
        """Give queued prompts to the least-loaded live generator; among equals, the one dealt to least
        recently (by name, the first generators would take every prompt of a batch smaller than the pool).

        DEAL_SLICE prompts a turn of the event loop: an admission of thousands of prompts dealt in one
        turn held every message that arrived meanwhile (p99 control round trip 97 ms at 512 generators)."""
        dealt = 0
        while self.queue and self.generators:
            key = self.queue.popleft()
            owed = self.owed.get(key)
            if owed is None or owed.holder is not None:
                continue
            gen = self.generators.deal()
            owed.holder, owed.since = gen, time.monotonic()
            self.spawn(self._give(key, owed, gen))
            dealt += 1
            if dealt % DEAL_SLICE == 0:
                await asyncio.sleep(0)

    async def _give(self, key: tuple[int, str], owed: _Owed, gen: str) -> None:
        try:
            await self.deliver(gen, P.GENERATE, owed.body, within=self.cfg.deliver_timeout)
        except Exception as exc:
            if self.owed.get(key) is not owed or owed.holder != gen:  # dealt again meanwhile (gen left)
                return
            log.warning("could not give %s to %s: %s; dealing it again", key, gen, exc)
            self._release(key, gen)
            owed.holder = None
            await asyncio.sleep(1.0)  # a generator whose handler fails must not be hammered
            if self.owed.get(key) is owed and owed.holder is None:
                self.queue.appendleft(key)
                await self._deal()

    def _release(self, key: tuple[int, str], holder: str | None) -> None:
        if holder in self.generators:
            self.generators[holder] = max(0, self.generators[holder] - 1)

    # --- events ----------------------------------------------------------------------------
    async def _on_version(self, topic: str, body: dict, src: str) -> None:
        """Only generators that run the announced version get new prompts."""
        version = int(body["version"])
        if version < self.version:
            return
        self.version = version
        self.accepted = {k: b for k, b in self.accepted.items() if k[0] >= version}  # steps < version are trained
        current = set(body.get("generators", ()))
        if self.cfg.deal_to != P.GENERATOR:
            current = set(self.generators)  # the holders are rollout workers: JOINED and LEFT keep the book
        for gone in set(self.generators) - current:
            del self.generators[gone]  # prompts it holds stay with it; `left` re-deals them if it dies
        for name in current - set(self.generators):
            self.generators[name] = sum(o.holder == name for o in self.owed.values())
            log.info("generator %s serves version %d", name, version)
        await self._pump()

    async def _on_left(self, topic: str, body: dict, src: str) -> None:
        name = body.get("name")
        self.generators.pop(name, None)
        lost = [k for k, o in self.owed.items() if o.holder == name]
        for key in lost:
            self.owed[key].holder = None
        if lost:
            log.warning("%s left holding %d prompts: dealing them again", name, len(lost))
            self.queue.extendleft(sorted(lost, reverse=True))
            await self._deal()

    @handler(P.GENERATED, from_roles=(P.GENERATOR, P.ROLLOUT))
    async def on_generated(self, body: dict, src: str) -> None:
        """The prompt moves from generator ``src`` to the verifier it names, if that one is still there.

        A verifier that left before this arrived would hold the prompt until request_timeout (its
        ``left`` event came first and found nothing to re-deal): such a prompt is dealt again at once.
        """
        key, verifier = (int(body["step"]), body["qid"]), body["verifier"]
        if not self._this_epoch(body, src):
            return
        if self._owed_by(key, src) is not None:
            try:
                live = verifier in {a.name for a in await self.bus.actors(role=P.VERIFIER)}
            except BusError as exc:  # cannot tell: trust it (its `left`, or request_timeout, re-deals)
                log.warning("cannot list the verifiers (%s); assuming %s is there", exc, verifier)
                live = True
            owed = self._owed_by(key, src)
            if owed is not None:
                self._release(key, src)
                if live:
                    owed.holder, owed.since = verifier, time.monotonic()
                else:
                    log.warning("%s: %s gave it to verifier %r, which is not on the bus: dealing it again",
                                key, src, verifier)
                    owed.holder = None
                    self.queue.appendleft(key)
        await self._deal()

    def _this_epoch(self, body: dict, src: str) -> bool:
        """Whether a reply is about a prompt of this job incarnation (an attached generator outlives a
        restart, and reports on what the last one dealt it); a body without an epoch is a pre-epoch peer's."""
        epoch = body.get("epoch")
        if epoch is None or epoch == self.epoch:
            return True
        log.warning("%s from %s about (%s, %s) of another job incarnation (epoch %s, this one %s): ignored",
                    "reply", src, body.get("step"), body.get("qid"), epoch, self.epoch)
        return False

    def _owed_by(self, key: tuple[int, str], holder: str) -> _Owed | None:
        owed = self.owed.get(key)
        return owed if owed is not None and owed.holder == holder else None

    @handler(P.ACCEPTED, from_roles=(P.PACKER,))
    async def on_accepted(self, body: dict, src: str) -> None:
        key = (int(body["step"]), body["qid"])
        owed = self.owed.pop(key, None)
        if owed is not None:
            self.accepted[key] = owed.body
            if owed.holder in self.generators:
                self._release(key, owed.holder)
            if body.get("refill"):
                self._refill(key[0])
        await self._deal()

    @handler(P.REJECTED, from_roles=(P.PACKER, P.GENERATOR, P.VERIFIER, P.ROLLOUT))
    async def on_rejected(self, body: dict, src: str) -> None:
        key = (int(body["step"]), body["qid"])
        if not self._this_epoch(body, src):
            return
        owed = self.owed.get(key)
        if owed is None and src == P.PACKER and key in self.accepted:  # its step would not pack with it
            owed = self.owed[key] = _Owed(self.accepted.pop(key))
        if owed is None:
            return
        log.warning("%s rejected by %s (%s): dealing it again", key, src, body.get("reason"))
        self._release(key, owed.holder)
        owed.holder = None
        self.queue.appendleft(key)
        await self._deal()

    @handler(P.SAMPLER_STATE)
    async def on_state(self, body: dict, src: str) -> dict:
        return {"next_step": self.next_step, "version": self.version, "owed": len(self.owed), "epoch": self.epoch,
                "generators": dict(self.generators)}
