"""Runs workflows in worker processes under limits, as the verifier runs users' reward functions
(policies.verify.verifier_pool: its memory limit and start method): a user's code never runs in the
rollout worker's own process, and a workflow that crashes, leaks or blocks its process fails only the
samples on it.

Each process serves many samples at once on one event loop (actors.rollout.worker). A sample whose answer
has not come within ``timeout`` + ``grace`` means its process is blocked (a busy loop, a C call): the process
is killed, every sample on it fails, and a new one takes its place; a process that dies does the same.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field

from actors.rollout.worker import FATAL, READY, worker_main
from policies.verify.worker_limits import pick_start_method

log = logging.getLogger("actors.rollout.pool")


@dataclass(frozen=True)
class Outcome:
    """One sample's workflow result: ``reward`` (None: the verifier scores), or ``error`` (it failed)."""
    reward: float | None = None
    error: str | None = None


@dataclass
class _Proc:
    proc: mp.process.BaseProcess
    conn: object
    ready: asyncio.Future
    jobs: dict[int, asyncio.Future] = field(default_factory=dict)


class WorkflowPool:
    def __init__(self, spec: str, *, workers: int = 2, timeout: float = 300.0, memory_limit_mb: int | None = 4096,
                 grace: float = 5.0, start_timeout: float = 60.0, start_method: str | None = None):
        if workers < 1:
            raise ValueError(f"WorkflowPool: workers must be >= 1, got {workers!r}")
        self.spec, self.timeout, self.grace = spec, float(timeout), grace
        self.memory_limit_mb, self.start_timeout = memory_limit_mb, start_timeout
        self._ctx = mp.get_context(pick_start_method(start_method))
        self._procs: list[_Proc | None] = [None] * workers
        self._ids = itertools.count()
        self.killed = 0  # processes killed or lost under a workflow (a blocked loop, a crash, the memory limit)

    async def start(self) -> None:
        """Every process up with the workflow imported, within start_timeout; raises saying why not."""
        for i in range(len(self._procs)):
            self._spawn(i)
        await asyncio.gather(*(self._ready(p) for p in self._procs))

    async def _ready(self, p: _Proc) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(p.ready), self.start_timeout)
        except TimeoutError:
            raise RuntimeError(f"workflow process {p.proc.pid} not ready within {self.start_timeout:g}s "
                               f"(importing {self.spec})") from None

    def _spawn(self, i: int) -> _Proc:
        loop = asyncio.get_running_loop()
        ours, theirs = self._ctx.Pipe(duplex=True)
        # the environment of now, not the forkserver's (started by whoever used one first in this process)
        proc = self._ctx.Process(target=worker_main, args=(theirs, self.spec, self.memory_limit_mb, self.timeout,
                                                           dict(os.environ)),
                                 name="rollout-workflow", daemon=True)
        proc.start()
        theirs.close()
        p = self._procs[i] = _Proc(proc, ours, loop.create_future())
        loop.add_reader(ours.fileno(), self._readable, p)
        return p

    def _readable(self, p: _Proc) -> None:
        try:
            while p.conn.poll():
                kind_or_jid, a, *rest = p.conn.recv()
                if kind_or_jid == READY:
                    p.ready.done() or p.ready.set_result(None)
                elif kind_or_jid == FATAL:
                    p.ready.done() or p.ready.set_exception(RuntimeError(f"rollout.workflow: {a}"))
                else:
                    fut = p.jobs.pop(kind_or_jid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(Outcome(rest[0]) if a == "ok" else Outcome(error=rest[0]))
        except (EOFError, OSError):
            p.proc.join(0.5)
            self._lose(p, f"the workflow process {p.proc.pid} died (exit code {p.proc.exitcode}; "
                          f"actors.rollout.memory_limit_mb={self.memory_limit_mb}?)")

    def _lose(self, p: _Proc, why: str) -> None:
        """Fail every sample on ``p``, end it and start another in its place."""
        if p not in self._procs:
            return
        i = self._procs.index(p)
        asyncio.get_running_loop().remove_reader(p.conn.fileno())
        if p.proc.is_alive():
            p.proc.kill()
        p.proc.join(1.0)
        p.conn.close()
        self.killed += 1
        if not p.ready.done():
            p.ready.set_exception(RuntimeError(why))
        for fut in p.jobs.values():
            if not fut.done():
                fut.set_result(Outcome(error=why))
        log.warning("%s; %d samples on it failed; starting another", why, len(p.jobs))
        self._procs[i] = None
        if self._ctx is not None:
            self._spawn(i)

    async def run(self, problem: dict, base_url: str, api_key: str) -> Outcome:
        """One sample's workflow; never raises for the workflow's fault (its Outcome says what went wrong)."""
        p = min((q for q in self._procs if q is not None), key=lambda q: len(q.jobs))
        await self._ready(p)
        jid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        p.jobs[jid] = fut
        try:
            p.conn.send((jid, problem, base_url, api_key))
        except (OSError, EOFError, ValueError) as e:
            p.jobs.pop(jid, None)
            return Outcome(error=f"could not hand the sample to its workflow process: {e}")
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout + self.grace)
        except TimeoutError:
            self._lose(p, f"a workflow blocked its process {p.proc.pid} past rollout.workflow_timeout="
                          f"{self.timeout:g}s (+{self.grace:g}s): killed")
            return fut.result()

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        for p in self._procs:
            if p is None:
                continue
            try:
                asyncio.get_running_loop().remove_reader(p.conn.fileno())
            except (RuntimeError, ValueError, OSError):
                pass
            try:
                p.conn.send(None)
            except (OSError, EOFError, ValueError):
                pass
            p.proc.join(1.0)
            if p.proc.is_alive():
                p.proc.kill()
                p.proc.join(1.0)
            p.conn.close()
            for fut in p.jobs.values():
                if not fut.done():
                    fut.set_result(Outcome(error="the rollout worker stopped"))
