"""Verify many answers in worker processes, each answer under a deadline.

One dispatcher thread owns the workers. It extracts and guards every answer
itself (a linear scan: megabyte strings never cross a pipe), hands workers
chunks of (answer, golds) tasks, and hears back one result per answer, so it
always knows which answer a worker is on and since when. A worker past the
deadline is SIGKILLed and replaced; its answer is wrong and counted in
``timeouts``. A worker that dies (segfault, OOM kill, someone's ``kill -9``)
is replaced; its current answer is wrong (``crashes``) and the rest of its
chunk goes back to the front of the queue: nothing is lost or answered twice.

Inside a worker a SIGALRM at 80% of the deadline interrupts slow pure-Python
sympy work, which saves a respawn; C-level work (a huge integer power) does
not see the signal, and the kill at 100% handles it.

The same workers run users' reward functions (``reward_fns``, see
policies.verify.reward_fns): ``rewards()`` hands each worker (prompt, response,
reference, extra) tasks under the same deadline, memory limit and kill, and
hears back the weighted sum, or why it failed (the function raised, returned
no number, ran past the deadline, or took its worker down).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait

from policies.verify.answer_guard import GuardConfig
from policies.verify.math_equal import Reference, final_answer, gold_answers
from policies.verify.worker_limits import limit_worker, pick_start_method

OK, WRONG, TIMEOUT, ERROR = 1, 0, 2, 3
_MAX_START_FAILURES = 3  # workers dying before they are ready, in a row, before we give up


@dataclass(frozen=True)
class VerifierStats:
    answered: int = 0  # answers graded, by any route
    correct: int = 0
    refused: int = 0  # no box / unbalanced / too costly: wrong without a worker
    timeouts: int = 0  # past the deadline (worker interrupted or killed)
    crashes: int = 0  # the worker died under this answer
    errors: int = 0  # the comparison raised (RecursionError, MemoryError, ...)
    respawns: int = 0


@dataclass(frozen=True)
class RewardOutcome:
    """One response's reward from the users' functions: ``value``, or None and the ``error``."""
    value: float | None
    error: str | None = None


MATCH, REWARD = "m", "r"  # the two kinds of task a worker runs


@dataclass
class _Job:
    results: list
    left: int
    future: cf.Future
    kind: str = MATCH


@dataclass
class _Task:
    job: _Job
    index: int
    payload: tuple  # MATCH: (answer, golds); REWARD: (prompt, response, reference, extra)


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    spawned_at: float = field(default_factory=time.monotonic)
    inflight: deque = field(default_factory=deque)  # _Task, in the order the worker runs them
    started: float = 0.0  # when the worker began inflight[0]


class VerifierPool:
    """``score`` many (response, reference) pairs on ``workers`` processes.

    ``timeout`` bounds the seconds spent on one answer. A worker interrupts its
    own answer at ``interrupt_at * timeout`` (None: never, rely on the kill).
    Use as a (async) context manager or call ``close()``.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = 2.0,
        *,
        guard: GuardConfig = GuardConfig(),
        chunk_size: int = 32,
        interrupt_at: float | None = 0.8,
        start_timeout: float = 60.0,
        memory_limit_mb: int | None = 4096,
        start_method: str | None = None,
        reward_fns: Sequence[tuple[str, float]] = (),
    ) -> None:
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"VerifierPool: workers must be an int >= 1, got {workers!r}")
        if not timeout > 0:
            raise ValueError(f"VerifierPool: timeout must be > 0 seconds, got {timeout!r}")
        if interrupt_at is not None and not 0 < interrupt_at < 1:
            raise ValueError(f"VerifierPool: interrupt_at must be in (0, 1) or None, got {interrupt_at!r}")
        if chunk_size < 1:
            raise ValueError(f"VerifierPool: chunk_size must be >= 1, got {chunk_size!r}")
        try:
            method = pick_start_method(start_method)
        except ValueError as e:
            raise ValueError(f"VerifierPool: {e}") from None
        self.workers, self.timeout, self.guard = workers, float(timeout), guard
        self.reward_fns = tuple((str(spec), float(w)) for spec, w in reward_fns)
        self._chunk, self._start_timeout, self._mem_mb = chunk_size, start_timeout, memory_limit_mb
        self._soft = interrupt_at * self.timeout if interrupt_at else 0.0
        self._ctx = mp.get_context(method)
        if method == "forkserver":
            # workers fork from a server that already imported sympy: a respawn costs ms
            self._ctx.set_forkserver_preload(["policies.verify.math_equal"])
        self._stats = VerifierStats()
        self._requests: deque = deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closed = False
        self._start_failures = 0
        self._outstanding = 0  # answers submitted and not yet graded
        self._pool: list[_Worker] = [self._spawn() for _ in range(workers)]
        self._thread = threading.Thread(target=self._run, name="verifier-dispatch", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------
    async def score(self, responses: Sequence[str], references: Sequence[Reference]) -> list[bool]:
        """Correctness of each response against its reference, in order."""
        fut, limit = self._submit(responses, references)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=limit)
        except asyncio.TimeoutError:
            raise self._late(len(responses), limit) from None

    async def rewards(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str],
                      extras: Sequence[dict]) -> list[RewardOutcome]:
        """The weighted sum of ``reward_fns`` for each response, in order; never raises for a user's fault."""
        if not self.reward_fns:
            raise RuntimeError("VerifierPool.rewards: the pool was made without reward_fns")
        n = len(responses)
        if not (len(prompts) == len(references) == len(extras) == n):
            raise ValueError(f"VerifierPool.rewards: {len(prompts)} prompts, {n} responses, "
                             f"{len(references)} references, {len(extras)} extras: expected equal lengths")
        items = [(str(p), str(r), ref, dict(e)) for p, r, ref, e in zip(prompts, responses, references, extras)]
        fut, limit = self._enqueue(REWARD, items)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=limit)
        except asyncio.TimeoutError:
            raise self._late(n, limit) from None

    def score_sync(self, responses: Sequence[str], references: Sequence[Reference]) -> list[bool]:
        fut, limit = self._submit(responses, references)
        try:
            return fut.result(timeout=limit)
        except cf.TimeoutError:
            raise self._late(len(responses), limit) from None

    def _late(self, n: int, limit: float) -> TimeoutError:
        # only reachable through a bug or a machine too loaded to run the workers
        return TimeoutError(
            f"VerifierPool: {n} answers not graded within {limit:.0f} s (phase: scoring; {self.stats})"
        )

    @property
    def stats(self) -> VerifierStats:
        return self._stats

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has imported math_verify and said so."""
        limit = self._start_timeout if timeout is None else timeout
        end = time.monotonic() + limit
        while not all(w.ready for w in list(self._pool)):
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("VerifierPool: closed or failed while waiting for workers")
            if time.monotonic() > end:
                raise TimeoutError(
                    f"VerifierPool: workers not ready within {limit:.0f} s (phase: importing math_verify)"
                )
            time.sleep(0.01)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in list(self._pool) if w.proc.pid is not None]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> VerifierPool:
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)

    # ---- submission (caller's thread) -------------------------------------
    def _submit(
        self, responses: Sequence[str], references: Sequence[Reference]
    ) -> tuple[cf.Future, float]:
        """Queue a batch; returns its future and how long it may take at worst."""
        if self._closed:
            raise RuntimeError("VerifierPool: score() on a closed pool")
        if isinstance(responses, str) or isinstance(references, str):
            raise TypeError("VerifierPool.score: responses and references must be lists, not a single str")
        if len(responses) != len(references):
            raise ValueError(
                f"VerifierPool.score: {len(responses)} responses but {len(references)} references"
            )
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise TypeError(f"VerifierPool.score: responses[{i}] must be str, got {type(r).__name__}")
        golds = []
        for i, ref in enumerate(references):
            try:
                golds.append(gold_answers(ref))
            except TypeError as e:
                raise TypeError(f"VerifierPool.score: references[{i}]: {e}") from None
        return self._enqueue(MATCH, list(zip(responses, golds)))

    def _enqueue(self, kind: str, items: list[tuple]) -> tuple[cf.Future, float]:
        if self._closed:
            raise RuntimeError("VerifierPool: scoring on a closed pool")
        fut: cf.Future = cf.Future()
        if not items:
            fut.set_result([])
            return fut, self._start_timeout
        with self._lock:
            self._requests.append((kind, items, fut))
            self._outstanding += len(items)
            ahead = self._outstanding  # this batch and every answer queued before it
        self._wake()
        # each answer ends or is killed within `timeout`; allow a respawn each, and start-up
        return fut, self._start_timeout + (ahead / self.workers + 2) * (self.timeout + 1.0)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or closed

    # ---- dispatcher thread ------------------------------------------------
    def _run(self) -> None:
        pending: deque[_Task] = deque()
        try:
            while not self._closed:
                self._take_requests(pending)
                self._assign(pending)
                self._wait_and_collect(pending)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            err = RuntimeError(f"VerifierPool dispatcher failed: {e!r}")
            self._fail_all(pending, err)
            raise
        finally:
            self._fail_all(pending, RuntimeError("VerifierPool closed before these answers were graded"))
            for w in self._pool:
                self._stop(w)

    def _take_requests(self, pending: deque[_Task]) -> None:
        with self._lock:
            batches, self._requests = list(self._requests), deque()
        for kind, items, fut in batches:
            job = _Job([None] * len(items), len(items), fut, kind)
            if kind == REWARD:
                pending.extend(_Task(job, i, item) for i, item in enumerate(items))
                continue
            for i, (resp, g) in enumerate(items):
                ans = final_answer(resp, self.guard)
                if ans is None or not g:
                    self._count(refused=1)
                    self._finish(job, i, False)
                else:
                    pending.append(_Task(job, i, (ans, g)))

    def _assign(self, pending: deque[_Task]) -> None:
        idle = [w for w in self._pool if w.ready and not w.inflight]
        for w in idle:
            if not pending:
                return
            size = max(1, min(self._chunk, -(-len(pending) // (2 * len(self._pool)))))
            chunk = [pending.popleft() for _ in range(min(size, len(pending)))]
            try:
                w.conn.send([(id(t), t.job.kind, t.payload) for t in chunk])
            except (OSError, EOFError):
                pending.extendleft(reversed(chunk))
                self._replace(w, pending, reason="crash")
                continue
            w.inflight.extend(chunk)
            w.started = time.monotonic()

    def _wait_and_collect(self, pending: deque[_Task]) -> None:
        now = time.monotonic()
        deadlines = [w.started + self.timeout for w in self._pool if w.inflight]
        deadlines += [w.spawned_at + self._start_timeout for w in self._pool if not w.ready]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else None
        conns = {w.conn: w for w in self._pool}
        ready = wait([self._wake_r, *conns], timeout=wait_s)
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        for c in ready:
            if c is not self._wake_r:
                self._drain(conns[c], pending)
        now = time.monotonic()
        for w in list(self._pool):
            if w.inflight and now - w.started > self.timeout:
                self._replace(w, pending, reason="timeout")
            elif not w.ready and now - w.spawned_at > self._start_timeout:
                raise TimeoutError(
                    f"verifier worker pid {w.proc.pid} not ready after {self._start_timeout:.0f} s "
                    "(phase: importing math_verify)"
                )

    def _drain(self, w: _Worker, pending: deque[_Task]) -> None:
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg == "ready":
                    w.ready = True
                    self._start_failures = 0
                    continue
                tid, code, value = msg
                task = w.inflight.popleft()
                assert id(task) == tid, "verifier worker answered out of order"
                w.started = time.monotonic()
                self._count(timeouts=code == TIMEOUT, errors=code == ERROR)
                if task.job.kind == MATCH:
                    self._finish(task.job, task.index, code == OK)
                elif code == OK:
                    self._finish(task.job, task.index, RewardOutcome(value))
                else:
                    why = value if code == ERROR else f"interrupted at {self._soft:.1f} s (reward timeout)"
                    self._finish(task.job, task.index, RewardOutcome(None, why))
        except (EOFError, OSError):
            if not w.ready:
                self._start_failures += 1
                if self._start_failures >= _MAX_START_FAILURES:
                    w.proc.join(timeout=1.0)
                    raise RuntimeError(
                        f"verifier worker pid {w.proc.pid} exited with code {w.proc.exitcode} before it "
                        f"was ready, {self._start_failures} starts in a row (phase: importing math_verify)"
                    ) from None
            self._replace(w, pending, reason="crash")

    def _replace(self, w: _Worker, pending: deque[_Task], reason: str) -> None:
        """Kill ``w``; its current answer is wrong, the rest of its chunk is re-queued."""
        self._stop(w, kill=True)
        if w.inflight:
            lost = w.inflight.popleft()
            self._count(timeouts=reason == "timeout", crashes=reason == "crash")
            if lost.job.kind == MATCH:
                self._finish(lost.job, lost.index, False)
            else:
                why = (f"killed after the {self.timeout:g} s timeout" if reason == "timeout" else
                       f"its worker process died (exit code {w.proc.exitcode}; a crash or the memory limit)")
                self._finish(lost.job, lost.index, RewardOutcome(None, why))
            pending.extendleft(reversed(w.inflight))
        i = self._pool.index(w)
        self._pool[i] = self._spawn()
        self._count(respawns=1)

    def _spawn(self) -> _Worker:
        ours, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(theirs, self._soft, self._mem_mb, self.reward_fns), name="verifier-worker",
            daemon=True
        )
        proc.start()
        theirs.close()
        return _Worker(proc, ours)

    def _stop(self, w: _Worker, kill: bool = False) -> None:
        if not kill:
            try:
                w.conn.send(None)
            except (OSError, EOFError):
                pass
            w.proc.join(timeout=1.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5.0)
        w.conn.close()

    def _finish(self, job: _Job, index: int, result) -> None:
        job.results[index] = result
        job.left -= 1
        with self._lock:
            self._outstanding -= 1
        self._count(answered=1, correct=result is True)
        if job.left == 0 and not job.future.done():
            try:
                job.future.set_result(job.results)
            except cf.InvalidStateError:
                pass  # the caller cancelled

    def _count(self, **inc: int) -> None:
        s = self._stats
        self._stats = replace(s, **{k: getattr(s, k) + int(v) for k, v in inc.items()})

    def _fail_all(self, pending: deque[_Task], err: Exception) -> None:
        futs = [t.job.future for t in pending] + [t.job.future for w in self._pool for t in w.inflight]
        with self._lock:
            futs += [f for _, _, f in self._requests]
            self._requests = deque()
        pending.clear()
        for f in futs:
            if not f.done():
                try:
                    f.set_exception(err)
                except cf.InvalidStateError:
                    pass


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker; BaseException so library code can't swallow it."""


def _worker_main(conn: Connection, soft_timeout: float, memory_limit_mb: int | None,
                 reward_fns: tuple[tuple[str, float], ...] = ()) -> None:
    limit_worker(memory_limit_mb)
    from policies.verify.math_equal import match_answer

    match_answer("\\frac{1}{2}", ["x^2"])  # warm up the LaTeX parser and sympy
    if reward_fns:
        from policies.verify.reward_fns import load_reward_fn, weighted_reward
        fns = [(load_reward_fn(spec), weight) for spec, weight in reward_fns]

    def on_alarm(signum, frame):
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for tid, kind, payload in chunk:
            value = None
            try:
                try:
                    if soft_timeout:
                        signal.setitimer(signal.ITIMER_REAL, soft_timeout)
                    if kind == MATCH:
                        code = OK if match_answer(*payload) else WRONG
                    else:
                        value, code = weighted_reward(fns, *payload), OK
                finally:
                    if soft_timeout:
                        signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                code = TIMEOUT
            except Exception as e:  # RecursionError, MemoryError, a sympy bug, a user's bug: keep serving
                code, value = ERROR, f"{type(e).__name__}: {e}"[:500]
            conn.send((tid, code, value))

