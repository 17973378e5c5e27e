"""Rollout worker: runs rollout.workflow for the prompts the sampler deals it, each of the G samples in a
session of its own on a generator, and hands the group on as a generator hands on its rollouts.

A group's trip: GENERATE arrives (acknowledged at once, a second copy ignored); one generator of the
version last announced is picked for the group (its G sessions share the prompt's prefill where the
engine caches prefixes), OPEN_SESSION for each sample, the workflow runs in a worker process (pool.py)
with a client bound to the session, CLOSE_SESSION returns what the policy sampled. The group's tensors go
to the packer over a tensor channel, SCORE (with the workflows' rewards) to a verifier, GENERATED to the
sampler. A session's tokens come back over a tensor channel, the rest of its reply over the bus. A
workflow's failure fails its sample only (trajectory.py); a session the generator cannot open or close
fails the group (REJECTED: the sampler deals it again), since the environment, not the user's code, failed.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from dataclasses import dataclass

from actors import protocol as P
from actors.base import Actor, handler
from actors.rollout.pool import WorkflowPool
from actors.rollout.trajectory import Trajectory, check_segments, group_batch, group_report

log = logging.getLogger("actors.rollout")


@dataclass(frozen=True)
class RolloutSettings:
    """What a rollout worker needs of the config (rollout.*, data.*), built by the launcher."""
    max_turns: int
    max_trajectory_tokens: int
    workflow_timeout: float
    directive: str = ""  # data.prompt_directive: problem["messages"] is the single-turn recipe's chat
    system_prompt: str | None = None
    deliver_timeout: float = 30.0
    rollout_ttl: float = 900.0  # how long a finished group waits for the packer to pull it


def problem_for(body: dict, s: RolloutSettings) -> dict:
    """The ``problem`` a workflow gets (actors.rollout.workflow) from a GENERATE body."""
    prob = body.get("problem") or {}
    prompt = prob.get("prompt", "")
    content = f"{prompt} {s.directive}" if s.directive else prompt
    messages = ([{"role": "system", "content": s.system_prompt}] if s.system_prompt else []) + \
        [{"role": "user", "content": content}]
    return {"id": body["qid"], "prompt": prompt, "answers": list(body["answers"]), "extra": prob.get("extra") or {},
            "messages": messages}


class SessionFailed(RuntimeError):
    """A generator could not open or close a session: the group is dealt again."""


class RolloutWorker(Actor):
    role = P.ROLLOUT

    def __init__(self, name: str, bus_address: str, *, pool: WorkflowPool, settings: RolloutSettings, **bus_kwargs):
        super().__init__(name, self.role, bus_address, capabilities={"workflow": pool.spec}, **bus_kwargs)
        self.pool, self.settings = pool, settings
        self._active: set[str] = set()
        self._generators: list[str] = []  # those serving the last announced version
        self._turn = itertools.count()
        self._verifiers = itertools.count()
        self.workflow_errors = 0
        self._reported: set[str] = set()  # the failures' causes logged so far

    async def on_start(self) -> None:
        await self.pool.start()
        self.bus.subscribe(P.WEIGHTS_VERSION, self._on_version)
        try:
            await self._on_version(P.WEIGHTS_VERSION, await self.bus.request(
                P.BROADCASTER, P.BROADCASTER_STATE, {}, timeout=5.0), P.BROADCASTER)
        except Exception as exc:  # it announces to us later; meanwhile the bus's list serves
            log.info("no answer from the broadcaster (%s); waiting for its announcement", exc)

    async def on_stop(self) -> None:
        for task in list(self._background):  # groups cut short are the sampler's to deal again, never scored
            task.cancel()
        self.pool.close()

    async def _on_version(self, topic: str, body: dict, src: str) -> None:
        self._generators = sorted(body.get("generators") or ())

    async def _generator(self) -> str:
        names = self._generators or sorted(a.name for a in await self.bus.actors(role=P.GENERATOR))
        if not names:
            raise SessionFailed("no generator is registered on the bus")
        return names[next(self._turn) % len(names)]

    @handler(P.GENERATE, from_roles=(P.SAMPLER,))
    async def on_generate(self, body: dict, src: str) -> None:
        rid = f"{body['step']}:{body['qid']}@{body.get('epoch')}"
        if rid not in self._active:
            self._active.add(rid)
            self.spawn(self._group(rid, body, src))

    async def _group(self, rid: str, body: dict, sampler: str) -> None:
        s = self.settings
        try:
            gen = await self._generator()
            problem = problem_for(body, s)
            got = await asyncio.gather(*(self._sample(gen, body, problem) for _ in range(int(body["n"]))),
                                       return_exceptions=True)  # every session closed before the group fails
            trajs = [t for t in got if isinstance(t, Trajectory)]
            failed = next((e for e in got if not isinstance(e, Trajectory)), None)
            if failed is not None:
                raise failed
            for t in trajs:
                if t.error is not None:
                    self._report(rid, t.error)
            batch, report = group_batch(trajs), group_report(trajs, version=int(body["step"]))
            desc = None
            if batch is not None:
                packers = await self.bus.actors(role=P.PACKER)
                if not packers:
                    raise RuntimeError("no packer is registered on the bus")
                desc = await self.channels.send(batch, packers[:1], timeout=s.rollout_ttl)
            verifiers = sorted(a.name for a in await self.bus.actors(role=P.VERIFIER))
            if not verifiers:
                raise RuntimeError("no verifier is registered on the bus")
            verifier = verifiers[next(self._verifiers) % len(verifiers)]
            await self.deliver(verifier, P.SCORE, {
                "step": body["step"], "qid": body["qid"], "texts": report["texts"], "rewards": report["rewards"],
                "answers": body["answers"], "problem": body.get("problem"), "rollout_ref": desc,
                "generator": gen, "stats": report["stats"], "epoch": body.get("epoch")}, within=s.deliver_timeout)
            await self.deliver(sampler, P.GENERATED, {"step": body["step"], "qid": body["qid"], "verifier": verifier,
                                                      "epoch": body.get("epoch")}, within=s.deliver_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s: group %s failed (%s: %s); the sampler deals it again", self.name, rid,
                        type(exc).__name__, exc)
            self._active.discard(rid)
            try:
                await self.deliver(sampler, P.REJECTED, {"step": body["step"], "qid": body["qid"],
                                                         "epoch": body.get("epoch"), "reason": f"{self.name}: {exc}"},
                                   within=s.deliver_timeout)
            except Exception as exc2:  # the sampler deals it again after rollout.request_timeout
                log.error("could not tell %s that %s failed: %s", sampler, rid, exc2)
        finally:
            self._active.discard(rid)

    def _report(self, rid: str, error: str) -> None:
        """Count a failed sample; log each kind of failure (its traceback's last line) once, in full."""
        self.workflow_errors += 1
        cause = error.strip().splitlines()[-1] if error.strip() else "?"
        if cause not in self._reported and len(self._reported) < 100:
            self._reported.add(cause)
            log.warning("%s: a workflow sample of %s failed (%d failed so far; this cause is logged once, every "
                        "failure counted in the step's workflow_errors):\n%s", self.name, rid, self.workflow_errors, error)

    async def _sample(self, gen: str, body: dict, problem: dict) -> Trajectory:
        """One sample: its session opened, its workflow run, the session closed. A workflow's failure is
        the Trajectory's ``error``; a session's raises SessionFailed."""
        s = self.settings
        sid = secrets.token_hex(12)
        try:
            opened = await self.request_until(gen, P.OPEN_SESSION, {  # a second copy gets the same session
                "sid": sid, "sampling": body["sampling"], "max_tokens": s.max_trajectory_tokens,
                "max_turns": s.max_turns, "deadline_s": s.workflow_timeout, "epoch": body.get("epoch")},
                within=s.deliver_timeout)
        except Exception as exc:
            raise SessionFailed(f"{gen} opened no session: {exc}") from exc
        outcome = await self.pool.run(problem, opened["base_url"], opened["api_key"])
        try:
            closed = await self.request_until(gen, P.CLOSE_SESSION, {"sid": sid}, within=s.deliver_timeout)
            ref = closed.get("segments_ref")
            got = None if ref is None else await self.channels.recv(ref, timeout=s.deliver_timeout)
            segments = check_segments([] if got is None else got.sequences(), closed.get("sequences", 0))
        except Exception as exc:
            raise SessionFailed(f"{gen} did not close session {sid}: {exc}") from exc
        error = outcome.error
        if error is None and not segments:
            error = "the workflow asked the policy for nothing (no completion in its session)"
        return Trajectory(segments, outcome.reward, error, int(closed.get("turns", 0)), closed.get("last_text"),
                          str(closed.get("finish", "stop")))
