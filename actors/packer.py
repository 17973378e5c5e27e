"""Packer: gathers scored groups into the training batch of step s and ships it to the learner.

Each group's tensors are pulled the moment its score arrives, so a generator that dies later
cannot take an accepted group with it; a group seen twice (a re-dealt prompt) is dropped.
Batches leave in step order, packed into one PackedBatch with no padding. SCORED is acknowledged at
once; ACCEPTED, REJECTED and TRAIN are delivered (sent again until acknowledged), so a broker restart
loses no group and no step. A packed step is never dropped: TRAIN is delivered until the learner takes
it (however long its current step takes), or the packer stops naming the learner and the step.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

import torch

from actors import protocol as P
from actors.base import Actor, handler
from bus.errors import RemoteError
from tensors.packed import PackedBatch

log = logging.getLogger("actors.packer")


@dataclass
class ScoredGroup:
    """One prompt's G responses as the packer holds them, each part from the actor that made it."""
    qid: str
    rollout: PackedBatch | None  # the generator's tensors (actors.generator.generator.rollout_batch); None: a
    # rollout worker's group whose every workflow failed (actors.rollout.trajectory), accepted with no sequences
    rewards: list[float]  # the verifier's, one per response
    correct: list[bool]  # the verifier's verdicts
    stats: dict  # the generator's (actors.generator.generator.rollout_stats)
    reward_errors: int = 0  # responses on which a user's reward function failed (verifier)
    generator: str = "?"

    def __post_init__(self) -> None:
        n = self.rollout.num_seqs if self.rollout is not None else 0
        if len(self.rewards) != n or len(self.correct) != n:
            raise ValueError(f"group {self.qid!r}: {len(self.rewards)} rewards and {len(self.correct)} verdicts "
                             f"for {n} responses")


def batch_stats(step: int, groups: list[ScoredGroup], dropped: int) -> dict:
    """What the release reports per step: reward, accuracy, truncation, staleness, interruptions."""
    rewards = [float(r) for g in groups for r in g.rewards]
    correct = [c for g in groups for c in g.correct]
    truncated = [t for g in groups for t in g.stats["truncated"]]
    lengths = [n for g in groups for n in g.stats["response_tokens"]]
    oldest = min((g.stats["version_min"] for g in groups), default=step)
    return {
        "reward_mean": sum(rewards) / max(1, len(rewards)),
        "accuracy": sum(correct) / max(1, len(correct)),
        "truncation_rate": sum(truncated) / max(1, len(truncated)),
        "response_len_mean": sum(lengths) / max(1, len(lengths)),
        "response_tokens": sum(lengths),
        "groups": len(groups),
        "groups_dropped": dropped,
        "reward_errors": sum(g.reward_errors for g in groups),  # users' reward functions
        "max_staleness_seen": step - oldest,
        # sequences a weight update reached mid-generation (rollout.interrupt_on_update), and the most
        # versions one sequence mixed
        "interrupted_seqs": sum(int(g.stats.get("interrupted", 0)) for g in groups),
        "versions_per_seq_max": max((int(g.stats.get("versions_per_seq", 1)) for g in groups), default=1),
        "groups_by_generator": dict(collections.Counter(g.generator for g in groups)),
        **workflow_stats(groups),
    }


def workflow_stats(groups: list[ScoredGroup]) -> dict:
    """Of rollout workers' groups (rollout.workflow; {} without): trajectories trained, samples whose workflow
    failed (left out), model calls per trajectory, and sequences (segments) per trajectory."""
    ours = [g for g in groups if "trajectories" in g.stats]
    if not ours:
        return {}
    turns = [t for g in ours for t in g.stats["turns"]]
    trajectories = sum(int(g.stats["trajectories"]) for g in ours)
    return {"trajectories": trajectories, "workflow_errors": sum(int(g.stats["workflow_errors"]) for g in ours),
            "turns_mean": sum(turns) / max(1, len(turns)), "turns_max": max(turns, default=0),
            "segments_per_trajectory": sum(int(g.stats["segments"]) for g in ours) / max(1, trajectories)}


def pack_step(step: int, groups: list[ScoredGroup], *, drop_uniform: bool) -> tuple[PackedBatch | None, dict]:
    """A step's groups -> (its training batch, its stats): in qid order, each sequence given its
    reward, its group's index and its qid. With ``drop_uniform`` a group whose rewards are all equal is
    left out (its samples did equally well: nothing to learn between them); None where no group is kept."""
    groups = sorted(groups, key=lambda g: g.qid)
    kept = [g for g in groups if not (drop_uniform and len(set(g.rewards)) == 1)]
    empty = sum(g.rollout is None for g in kept)  # all its workflows failed: it trains nothing, and is no drop
    kept = [g for g in kept if g.rollout is not None]
    parts = []
    weights = [seq_weights(g) for g in kept]
    several = any(w is not None for w in weights)  # a trajectory of several sequences: weigh them (advantages)
    for gid, (g, w) in enumerate(zip(kept, weights)):
        n = g.rollout.num_seqs
        seqs = {"rewards": torch.tensor(g.rewards, dtype=torch.float32),
                "group_ids": torch.full((n,), gid, dtype=torch.int64)}
        if several:
            seqs["seq_weights"] = torch.tensor(w or [1.0] * n, dtype=torch.float32)
        b = g.rollout.with_fields(seqs=seqs)
        parts.append(PackedBatch(b.cu_seqlens, b.tokens, b.seqs, {"qids": [g.qid] * n}, frozenset({"qids"})))
    packed = PackedBatch.concat(parts) if parts else None
    stats = batch_stats(step, groups, dropped=len(groups) - len(kept) - empty)
    if drop_uniform:
        stats["dropped_qids"] = sorted({g.qid for g in groups if g.rollout is not None} - {g.qid for g in kept})
    return packed, stats


def seq_weights(group: ScoredGroup) -> list[float] | None:
    """Each sequence's share of its trajectory (1 / the trajectory's sequences) where a rollout worker's
    trajectory spans several (a rewritten history, actors.rollout.trajectory), so that group advantages
    count trajectories, not segments (policies.train.advantages); None where every sample is one sequence."""
    traj_of = group.stats.get("traj_of")
    if not traj_of or len(set(traj_of)) == len(traj_of):
        return None
    counts = collections.Counter(traj_of)
    return [1.0 / counts[t] for t in traj_of]


ROLLOUT_TOKENS = {"input_ids": torch.int64, "loss_mask": torch.bool, "logprobs": torch.float32,
                  "versions": torch.int32}  # actors.generator.generator.rollout_batch


def check_group(step: int, group: ScoredGroup) -> None:
    """ValueError naming the group and what is wrong with it, for a group that would break its step.

    Its tensors must be those of ``rollout_batch`` (a generator of another code version sends other
    fields), it must pack on its own, and no token may come from a policy version the step cannot
    have seen: step s's data is generated by versions <= s (version s + 1 needs step s trained)."""
    if group.rollout is None:
        return
    fields = {k: v.dtype for k, v in group.rollout.tokens.items()}
    if fields != ROLLOUT_TOKENS:
        raise ValueError(f"group {group.qid!r} of step {step}: token fields {sorted(map(str, fields.items()))}, "
                         f"expected {sorted(map(str, ROLLOUT_TOKENS.items()))}")
    versions = group.rollout.tokens["versions"]
    newest = int(versions.max()) if versions.numel() else -1
    if newest > step:
        raise ValueError(f"group {group.qid!r} of step {step}: tokens of policy version {newest}, newer than the "
                         f"step (version skew: another job's or another incarnation's generator?)")
    try:
        pack_step(step, [group], drop_uniform=False)
    except Exception as exc:
        raise ValueError(f"group {group.qid!r} of step {step} does not pack: {type(exc).__name__}: {exc}") from exc


def _signature(group: ScoredGroup) -> tuple:
    b = group.rollout
    if b is None:
        return ((), (), tuple(sorted(group.stats)))
    return (tuple(sorted((k, str(v.dtype)) for k, v in b.tokens.items())),
            tuple(sorted((k, str(v.dtype)) for k, v in b.seqs.items())), tuple(sorted(group.stats)))


class Packer(Actor):
    role = P.PACKER

    def __init__(self, bus_address: str, *, batch_prompts: int, drop_uniform_groups: bool = False,
                 dynamic_sampling: bool = False, max_refills: int = 0, start_step: int = 0, transfer_timeout: float = 60.0, batch_ttl: float = 3600.0,
                 deliver_timeout: float = 30.0, name: str = P.PACKER, **bus_kwargs):
        super().__init__(name, self.role, bus_address, **bus_kwargs)
        self.batch_prompts = batch_prompts
        self.drop_uniform = drop_uniform_groups
        # rollout.dynamic_sampling: a zero-variance group is held apart and the sampler deals another prompt;
        # a step is full at batch_prompts kept groups, or once all batch_prompts + max_refills dealt are back
        self.dynamic, self.max_refills = dynamic_sampling, max_refills
        self.zero_var: dict[int, dict[str, ScoredGroup]] = {}
        self.next_step = start_step
        self.transfer_timeout = transfer_timeout
        self.batch_ttl = batch_ttl  # a packed step may wait behind the learner's current one
        self.deliver_timeout = deliver_timeout
        self.groups: dict[int, dict[str, ScoredGroup]] = {}
        self.dropped: dict[int, int] = {}
        self.ready: dict[int, tuple[PackedBatch | None, dict, dict]] = {}  # step -> (batch, descriptor, stats)
        self._fetching: set[tuple[int, str]] = set()
        self._pack_lock = asyncio.Lock()
        self.epoch: str | None = None  # the job's incarnation (actors.protocol), the sampler's: asked once

    async def _job_epoch(self) -> str:
        if self.epoch is None:
            reply = await self.request_until(P.SAMPLER, P.SAMPLER_STATE, {}, within=self.deliver_timeout)
            self.epoch = reply["epoch"]
        return self.epoch

    @handler(P.SCORED, from_roles=(P.VERIFIER,))
    async def on_scored(self, body: dict, src: str) -> None:
        step, qid = int(body["step"]), body["qid"]
        epoch = body.get("epoch")
        if epoch is not None and epoch != await self._job_epoch():  # made with weights that are no more
            log.warning("refusing %s of step %d from %s: a rollout of another job incarnation (epoch %s, this "
                        "job's %s)", qid, step, body.get("generator"), epoch, self.epoch)
            return
        if (step, qid) in self._fetching:  # its twin is being fetched and will answer for both
            return
        if step < self.next_step or qid in self.groups.get(step, {}) or qid in self.zero_var.get(step, {}):
            log.info("dropping a duplicate of %s in step %d", qid, step)
            self.spawn(self._tell_sampler(P.ACCEPTED, {"step": step, "qid": qid}))
            return
        self._fetching.add((step, qid))
        self.spawn(self._take(step, qid, body))

    async def _take(self, step: int, qid: str, body: dict) -> None:
        try:
            ref = body["rollout_ref"]
            rollout = None if ref is None else await self.channels.recv(ref, timeout=self.transfer_timeout)
            group = ScoredGroup(qid, rollout, [float(r) for r in body["rewards"]], list(body["correct"]),
                                body["stats"], int(body["reward_errors"]), body["generator"])
            check_group(step, group)
        except Exception as exc:
            self._fetching.discard((step, qid))
            log.warning("could not fetch %s from %s: %s", qid, body["generator"], exc)
            await self._tell_sampler(P.REJECTED, {"step": step, "qid": qid, "reason": str(exc)})
            return
        refill = self._hold(step, qid, group)
        self._fetching.discard((step, qid))
        self.spawn(self._tell_sampler(P.ACCEPTED, {"step": step, "qid": qid, **({"refill": True} if refill else {})}))
        await self._pack_ready()

    async def _tell_sampler(self, type: str, body: dict) -> None:
        try:
            await self.deliver(P.SAMPLER, type, body, within=self.deliver_timeout)
        except Exception as exc:  # a lost ACCEPTED costs a needless re-deal; a lost REJECTED, request_timeout
            log.error("could not tell the sampler %s %s: %s", type, body, exc)

    async def _pack_ready(self) -> None:
        async with self._pack_lock:
            while self._step_full(self.next_step):
                step = self.next_step
                kept, apart = self.groups.get(step, {}), self.zero_var.get(step, {})
                groups = list(kept.values()) + list(apart.values())
                try:  # before the step counter moves: a group that breaks the step is dealt again, not the step lost
                    packed, stats = pack_step(step, groups, drop_uniform=self.drop_uniform or self.dynamic)
                except Exception as exc:
                    await self._reject_odd(step, groups, exc)
                    return
                self.groups.pop(step, None)
                self.zero_var.pop(step, None)
                self.next_step += 1  # from here on a late copy of one of its groups is a duplicate
                try:
                    desc = await self._offer(packed) if packed is not None else None
                except Exception as exc:  # keep the groups: the step is packed again, never lost
                    self.groups[step], self.zero_var[step] = kept, apart
                    self.next_step = step
                    log.error("step %d could not be packed (%s: %s); trying again in 1 s", step,
                              type(exc).__name__, exc)
                    self.spawn(self._pack_later(1.0))
                    return
                self.ready[step] = (packed, desc, stats)
                self.spawn(self._send_train(step))
                log.info("step %d packed: %d groups (%d dropped), %d tokens", step,
                         stats["groups"] - stats["groups_dropped"], stats["groups_dropped"],
                         packed.num_tokens if packed is not None else 0)

    def _hold(self, step: int, qid: str, group: ScoredGroup) -> bool:
        """Keep an accepted group for its step; True where dynamic sampling sets it apart (all its rewards
        equal: nothing to learn between its samples) and another prompt should be dealt in its place."""
        if self.dynamic and len(set(group.rewards)) == 1:
            self.zero_var.setdefault(step, {})[qid] = group
            return True
        self.groups.setdefault(step, {})[qid] = group
        return False

    def _step_full(self, step: int) -> bool:
        kept, apart = len(self.groups.get(step, {})), len(self.zero_var.get(step, {}))
        return kept >= self.batch_prompts or (self.dynamic and kept + apart >= self.batch_prompts + self.max_refills)

    async def _reject_odd(self, step: int, groups: list[ScoredGroup], exc: Exception) -> None:
        """The step's groups do not pack together though each packs alone (``check_group``): those
        unlike the most common kind are rejected (dealt again), or all of them where none stands out."""
        kinds = collections.Counter(_signature(g) for g in groups)
        common, n = kinds.most_common(1)[0]
        odd = [g for g in groups if _signature(g) != common] if n > len(groups) / 2 else groups
        log.error("step %d does not pack (%s: %s): dealing %d group(s) again: %s", step, type(exc).__name__, exc,
                  len(odd), ", ".join(g.qid for g in odd))
        for g in odd:
            self.groups.get(step, {}).pop(g.qid, None)
            self.zero_var.get(step, {}).pop(g.qid, None)
            self.spawn(self._tell_sampler(P.REJECTED, {"step": step, "qid": g.qid,
                                                       "reason": f"step {step} does not pack with it: {exc}"}))

    async def _pack_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._pack_ready()

    async def _offer(self, packed: PackedBatch) -> dict:
        """Make a step's batch available to the learner, over the channel its locality calls for."""
        learners = await self.bus.actors(role=P.LEARNER, timeout=self.deliver_timeout)
        if not learners:
            raise RuntimeError("no learner is registered on the bus")
        return await self.channels.send(packed, learners, timeout=self.batch_ttl)

    async def _send_train(self, step: int) -> None:
        """Deliver TRAIN for ``step`` until the learner takes it.

        The learner may sit on an earlier step, or be restarting, for longer than ``batch_ttl``; each
        round that ends unanswered offers the batch again on the channel (its descriptor has expired)
        and tries again, so the step waits, never vanishes. A learner that refuses it (its handler
        raised) will refuse every copy: the packer then stops with an error naming the learner and the
        step, and the launcher ends the run instead of leaving it waiting forever.
        """
        rounds, offered = 0, time.monotonic()
        while self._stopping is None:
            packed, desc, stats = self.ready[step]
            try:
                reply = await self.request_until(P.LEARNER, P.TRAIN, {"step": step, "batch_ref": desc, "stats": stats},
                                                 within=self.batch_ttl, gone_grace=self.batch_ttl)
                if isinstance(reply, dict) and reply.get("later"):  # the learner holds enough steps ahead
                    await asyncio.sleep(1.0)
                    if time.monotonic() - offered < self.batch_ttl / 2:
                        continue
                    raise TimeoutError(f"held back by the learner for over batch_ttl/2={self.batch_ttl / 2:g}s")
                del self.ready[step]
                return
            except RemoteError as exc:
                log.error("%r refused step %d (%s); the step cannot be trained: the packer stops", P.LEARNER, step, exc)
                asyncio.ensure_future(self.stop())
                return
            except Exception as exc:
                if self._stopping is not None:
                    return
                rounds += 1
                log.error("step %d not taken by %r within batch_ttl=%gs (round %d: %s); offering it again",
                          step, P.LEARNER, self.batch_ttl, rounds, exc)
            try:
                if packed is not None:
                    desc = await self._offer(packed)
                self.ready[step], offered = (packed, desc, stats), time.monotonic()
            except Exception as exc:
                log.error("step %d could not be offered again (%s: %s); trying again in 1 s", step,
                          type(exc).__name__, exc)
                await asyncio.sleep(1.0)
