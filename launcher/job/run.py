"""The training job: start the broker and every actor process, watch them, record metrics, stop cleanly.

The launcher is itself a bus client named "launcher": it serves the run's config to actors that
attach later, records every step's metrics (JSONL + TensorBoard), prints progress, and decides what a
death means (a generator may die; the learner's death stops or restarts the run, as configured; a
dead broker is started again on the same address and the actors register with it again). Metrics
arrive by publication and, for any a broker restart lost, by asking the learner.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import time
from pathlib import Path

from actors import protocol as P
from bus.client import BusClient
from bus.errors import BusError
from launcher.config import ExperimentConfig, config_to_yaml, describe_mode, describe_recipe, dump_config
from launcher.config.schema import wandb_options
from launcher.job.hosts import Host
from launcher.job.plan import (PROJECT_DIR, broker_spec, bus_kwargs, check_nccl_parity, job_roles, process_specs,
                               write_sglang_key)
from launcher.job.metrics import MetricsWriter
from launcher.job.progress import Progress
from launcher.job.start import Start, resolve_start, run_dir
from launcher.job.engines import check_hosts, where
from launcher.job.keyship import ship_keys
from launcher.job.spawn import Process, ProcessSpec, start as start_process
from tensors.channels.shm import sweep_orphans

log = logging.getLogger("launcher")

CRITICAL = {"learner", "packer", "sampler"}
BROKER_RESTARTS = 5  # per run; a broker that keeps dying is a failure, not a hiccup


class RunFailed(RuntimeError):
    """The run stopped short; ``role`` is the role whose death stopped it, if one did."""

    def __init__(self, message: str, role: str | None = None):
        super().__init__(message)
        self.role = role


LOCK_FILE = ".lock"


def lock_run_dir(rd: Path):
    """An exclusive flock on RUN_DIR/.lock, held (by the returned open file) for the job's life.

    Two launchers on one run directory (a second job, or --resume while the first still runs)
    would train over each other's checkpoints and metrics.  The lock is released by the kernel
    when the launcher dies however it dies; the file holds the holder's pid for the message.
    """
    rd.mkdir(parents=True, exist_ok=True)
    f = open(rd / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunFailed(f"run dir {rd} is in use by a live launcher (pid {holder}, lock {rd / LOCK_FILE}): "
                        f"stop that job first, or choose another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Job:
    def __init__(self, cfg: ExperimentConfig, *, hosts: list[Host] | None, echo: bool = True,
                 ends_at: float | None = None):
        self.cfg, self.hosts, self.echo, self.ends_at = cfg, hosts, echo, ends_at
        self.rd = run_dir(cfg)
        self.procs: list[Process] = []
        self.broker: Process | None = None
        self.client: BusClient | None = None
        self.finished = asyncio.Event()
        self.failure: str | None = None
        self.failed_role: str | None = None
        self.last_metrics: dict = {}
        self.recorded: set[int] = set()  # steps whose metrics are written
        self.steps: range = range(0)
        self.joined_roles: set[str] = set()  # the roles of every actor that registered (arms the watchdog)

    def _fail(self, why: str, role: str | None = None) -> None:
        if self.failure is None and not self.finished.is_set():
            self.failure, self.failed_role = why, role
            log.error(why)
            self.finished.set()

    async def run(self, start: Start) -> dict:
        cfg, rd = self.cfg, self.rd
        rd.mkdir(parents=True, exist_ok=True)
        config_path = rd / "config.yaml"
        config_path.write_text(config_to_yaml(cfg))
        write_sglang_key(cfg)  # the job's SGLang API key, beside its config (plan.sglang_key_file)
        try:
            check_nccl_parity(cfg)
        except ValueError as exc:  # gpu_env.ParityError: one line naming both NCCL versions
            raise RunFailed(str(exc)) from None
        port = cfg.bus.port or free_port(cfg.bus.host)
        address = f"tcp://{cfg.bus.host}:{port}"
        print(f"[launcher] mode: {describe_mode(cfg)}; steps {start.step}..{cfg.train.steps}; bus {address}; "
              f"run dir {rd}", flush=True)
        print(f"[launcher] recipe: {describe_recipe(cfg)}", flush=True)
        self.steps = range(start.step, cfg.train.steps)
        dist_port = cfg.actors.learner.dist_port or (free_port(cfg.bus.host) if cfg.actors.learner.ranks > 1 else 0)
        specs = process_specs(cfg, config_path, address, start, self.hosts, dist_port)
        await check_hosts(sorted({s.host for s in specs if s.host is not None and not s.host.is_local},
                                 key=lambda h: h.name))
        if cfg.bus.keys_dir:  # each remote host gets its own roles' keys only
            specs = await ship_keys(cfg.bus.keys_dir, specs)
        progress = Progress(cfg.train.steps, start.step, describe_mode(cfg), ends_at=self.ends_at)
        metrics = MetricsWriter(rd, wandb=wandb_options(cfg))
        tasks: list[asyncio.Task] = []
        try:
            self.broker = await start_process(broker_spec(cfg, address), log_dir=rd / "logs", cwd=PROJECT_DIR,
                                              echo=self.echo, run_dir=rd)
            self.client = BusClient(address, P.LAUNCHER, "launcher", **bus_kwargs(cfg, P.LAUNCHER))
            await self._connect(address)
            self.client.on(P.CONFIG, self._serve_config(start))
            self.client.subscribe(P.METRICS, self._on_metrics(metrics, progress))
            self.client.subscribe(P.RUN_FINISHED, self._on_finished)
            self.client.subscribe(P.LEFT, self._on_left)
            self.client.subscribe(P.JOINED, self._on_joined)
            tasks.append(asyncio.create_task(self._keep_broker(broker_spec(cfg, address), address)))
            for spec in specs:
                self.procs.append(await start_process(spec, log_dir=rd / "logs", cwd=PROJECT_DIR, echo=self.echo,
                                                      run_dir=rd))
            tasks += [asyncio.create_task(self._watch(p)) for p in self.procs]
            tasks.append(asyncio.create_task(self._follow_learner(metrics, progress)))
            tasks.append(asyncio.create_task(self._watchdog()))
            await self.finished.wait()
            if not self.failure:  # records whose publication was lost (a broker restart)
                await self._fetch_metrics(metrics, progress)
        finally:
            for t in tasks:
                t.cancel()
            await self.shutdown()
            metrics.close()
        if self.failure:
            raise RunFailed(self.failure, self.failed_role)
        return self.last_metrics

    async def _connect(self, address: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.client.connect()
                return
            except Exception as exc:
                if self.broker.returncode is not None:
                    raise RunFailed(f"the broker exited ({self.broker.returncode}): "
                                    + " / ".join(self.broker.tail[-5:])) from exc
                if time.monotonic() > deadline:
                    raise RunFailed(f"the broker at {address} did not answer within {timeout:.0f} s: {exc}") from exc
                await asyncio.sleep(0.2)

    def _serve_config(self, start: Start):
        async def serve(body: dict, src: str) -> dict:
            return {"config": dump_config(self.cfg), "model_path": start.model_path, "step": start.step}
        return serve

    def _record(self, writer: MetricsWriter, progress: Progress, body: dict) -> None:
        step = int(body["step"])
        if step in self.recorded:  # a publication and a fetch of the same step
            return
        self.recorded.add(step)
        body = dict(body)
        body["tokens_per_s"] = progress.tokens_per_s(body)
        self.last_metrics = body
        writer.write(step, {k: v for k, v in body.items() if k not in ("step", "time")})
        print(f"[progress] {progress.line(body)}", flush=True)

    def _on_metrics(self, writer: MetricsWriter, progress: Progress):
        async def on_metrics(topic: str, body: dict, src: str) -> None:
            self._record(writer, progress, body)
        return on_metrics

    async def _fetch_metrics(self, writer: MetricsWriter, progress: Progress, timeout: float = 10.0) -> None:
        """Ask the learner for the records of steps not yet written; finish when all are."""
        while missing := [s for s in self.steps if s not in self.recorded]:
            try:  # a reply holds a few records (each carries a step's query ids): ask until none is new
                reply = await self.client.request(P.LEARNER, P.LEARNER_METRICS, {"since": missing[0]},
                                                  timeout=timeout)
            except BusError as exc:
                log.debug("no metrics from the learner: %s", exc)
                return
            new = [r for r in sorted(reply["records"], key=lambda r: r["step"]) if r["step"] not in self.recorded]
            if not new:
                break
            for rec in new:
                log.info("step %d: metrics fetched from the learner (their publication was lost)", rec["step"])
                self._record(writer, progress, rec)
        if all(s in self.recorded for s in self.steps) and not self.finished.is_set():
            print(f"[launcher] training finished at step {self.steps.stop}", flush=True)
            self.finished.set()

    async def _follow_learner(self, writer: MetricsWriter, progress: Progress) -> None:
        """A lost publication (broker restart) must neither lose a record nor leave us waiting forever."""
        every = max(1.0, 5 * self.cfg.bus.heartbeat_interval)
        while not self.finished.is_set():
            await asyncio.sleep(every)
            await self._fetch_metrics(writer, progress)

    async def _watchdog(self, poll: float = 1.0) -> None:
        """Stop a run whose learner finishes no step within the limit, naming the stage that is stuck.

        A hang (a generator frozen with its prompts, a batch that never reaches the learner) otherwise
        shows only as silence.  The limit is max(train.step_timeout, 5x the slowest step so far), so a
        slow but moving run is never stopped.  It is armed once an actor of every role is on the bus
        (each registers when loaded), so the job's first step is watched too, in every incarnation (a
        restart or --resume makes a new Job): a stall before step 0 (the only generator frozen as it
        joins) stops the run as one after step 100 does; loading before registering runs at a pace of
        its own.
        """
        floor = self.cfg.train.step_timeout
        if not floor:
            return
        await self._every_role_registered(min(poll, floor / 4))
        seen, last, slowest = len(self.recorded), time.monotonic(), 0.0
        while not self.finished.is_set():
            await asyncio.sleep(min(poll, floor / 4))
            now = time.monotonic()
            if len(self.recorded) != seen:
                if last is not None:
                    slowest = max(slowest, (now - last) / (len(self.recorded) - seen))
                seen, last = len(self.recorded), now
                continue
            limit = max(floor, 5 * slowest)
            if now - last > limit:
                stage = await self._stuck_stage()
                self._fail(f"no learner step within {limit:.0f} s (train.step_timeout={floor:g}, slowest step "
                           f"so far {slowest:.1f} s): {stage}")
                return

    async def _every_role_registered(self, poll: float) -> None:
        """Return once an actor of every role (sampler, generator, verifier, packer, learner) has registered,
        though it may have frozen or left since (a generator frozen as it joins is what must be caught)."""
        while not self.finished.is_set() and not set(job_roles(self.cfg)) <= self.joined_roles:
            await asyncio.sleep(poll)

    async def _on_joined(self, topic: str, body: dict, src: str) -> None:
        self.joined_roles.add(body.get("role"))

    async def _stuck_stage(self) -> str:
        """Which stage holds the next step, from what the learner and the sampler say over the bus."""
        async def ask(dst: str, type_: str, body: dict) -> dict:
            try:
                return await self.client.request(dst, type_, body, timeout=5.0)
            except BusError as exc:
                return {"error": str(exc)}

        learner = await ask(P.LEARNER, P.LEARNER_STATE, {"qids": False})
        sampler = await ask(P.SAMPLER, P.SAMPLER_STATE, {})
        step = learner.get("step")
        seen = (f"learner at step {step}, training {learner.get('training')}, batches waiting "
                f"{learner.get('pending')}; sampler next step {sampler.get('next_step')}, policy version "
                f"{sampler.get('version')}, {sampler.get('owed')} prompt(s) owed, in flight per generator "
                f"{sampler.get('generators')}")
        if "error" in learner:
            return f"the learner does not answer ({learner['error']})"
        if learner.get("training") is not None:
            return f"the learner is stuck training step {learner['training']} ({seen})"
        if "error" in sampler:
            return f"the sampler does not answer ({sampler['error']}); {seen}"
        if sampler.get("owed"):
            held = [f"{g} holds {n}" for g, n in sorted(sampler.get("generators", {}).items()) if n]
            return (f"rollout: {sampler['owed']} prompt(s) not yet generated, scored and accepted "
                    f"({', '.join(held) if held else 'no generator holds any: none on the bus?'}); {seen}")
        if sampler.get("next_step", 0) <= (step or 0):
            return f"the sampler has not admitted batch {step} ({seen})"
        return f"the packer: batch {step} was accepted whole but never reached the learner ({seen})"

    async def _on_finished(self, topic: str, body: dict, src: str) -> None:
        print(f"[launcher] training finished at step {body.get('step')}", flush=True)
        self.finished.set()

    async def _on_left(self, topic: str, body: dict, src: str) -> None:
        name, role = body.get("name"), body.get("role")
        if role not in CRITICAL:
            print(f"[launcher] {name} ({role}) left the bus", flush=True)
            return
        proc = next((p for p in self.procs if p.name == name), None)
        if body.get("reason") == "expired" and proc is not None and proc.returncode is None:
            # its process lives: a stall (a loaded machine) may have cost it heartbeats; it registers again
            await self._await_rejoin(name, role, proc)
        else:
            how = "missed heartbeats" if body.get("reason") == "expired" else "left"
            self._fail(f"{name} ({role}) left the bus ({how})", role)

    async def _await_rejoin(self, name: str, role: str, proc: Process) -> None:
        hb = self.cfg.bus.heartbeat_interval
        grace = max(2.0, 3 * hb * self.cfg.bus.heartbeat_liveness)
        print(f"[launcher] {name} ({role}) missed heartbeats; its process {proc.proc.pid} is alive: waiting "
              f"{grace:.1f} s for it to register again", flush=True)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self.finished.is_set():
            await asyncio.sleep(hb)
            try:
                if any(a.name == name for a in await self.client.actors(timeout=max(hb, 1.0))):
                    print(f"[launcher] {name} ({role}) registered again", flush=True)
                    return
            except BusError:
                pass
        self._fail(f"{name} ({role}) missed heartbeats and did not register again within {grace:.1f} s "
                   f"(its process {proc.proc.pid} is alive but unresponsive: hung?)", role)

    async def _watch(self, proc: Process) -> None:
        rc = await proc.wait()
        if self.finished.is_set():
            return
        msg = f"{proc.name}{where(proc.log_path)} exited with code {rc}; last lines: " + " / ".join(proc.tail[-3:])
        role = proc.spec.role
        if role not in CRITICAL and any(p.returncode is None for p in self.procs if p.spec.role == role):
            print(f"[launcher] {msg}", flush=True)
            return
        if role not in CRITICAL:
            try:  # the last one we launched, but generators attached later may still serve
                others = [a for a in await self.client.actors(role=role) if a.name != proc.name]
            except Exception:
                others = []
            if others:
                print(f"[launcher] {msg}; {len(others)} attached {role}(s) carry on", flush=True)
                return
        self._fail(msg, role)

    async def _keep_broker(self, spec: ProcessSpec, address: str) -> None:
        """Start the broker again on the same address when it dies; the actors register with it again."""
        for restart in range(1, BROKER_RESTARTS + 1):
            rc = await self.broker.wait()
            if self.finished.is_set():
                return
            print(f"[launcher] the broker exited with code {rc}; starting it again on {address} "
                  f"({restart}/{BROKER_RESTARTS})", flush=True)
            await asyncio.sleep(0.2 * (restart - 1))
            try:
                self.broker = await start_process(spec, log_dir=self.rd / "logs", cwd=PROJECT_DIR, echo=self.echo,
                                                  run_dir=self.rd)
            except OSError as exc:
                return self._fail(f"could not start the broker again: {exc}", "broker")
        rc = await self.broker.wait()
        if not self.finished.is_set():
            self._fail(f"the broker exited ({rc}) {BROKER_RESTARTS + 1} times: " + " / ".join(self.broker.tail[-3:]),
                       "broker")

    async def checkpoint_now(self, timeout: float = 120.0) -> bool:
        """Whether the learner wrote a checkpoint (a stop after one is clean: --resume continues there)."""
        if self.client is None:
            return False
        try:
            reply = await self.client.request(P.LEARNER, P.CHECKPOINT, {}, timeout=timeout)
            print(f"[launcher] checkpoint written at step {reply['step']}: {reply['path']}", flush=True)
            return True
        except Exception as exc:
            print(f"[launcher] could not write a checkpoint before stopping: {exc}", flush=True)
            return False

    async def shutdown(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.broker is not None:
            await self.broker.stop()
        # a killed actor could not unlink its shm segments; no later channel of this job will sweep them
        for path in sweep_orphans():
            log.info("removed the shm segment of a dead process: %s", path)


async def run_job(cfg: ExperimentConfig, *, hosts: list[Host] | None, resume: bool, echo: bool = True,
                  deadline: float | None = None) -> dict:
    """Run to the configured number of steps; restart from the last checkpoint on a death if asked to.

    With ``deadline`` (seconds from now, restarts included), a run still going then writes a checkpoint
    and stops as a success.
    """
    ends_at = None if deadline is None else time.monotonic() + deadline
    lock = lock_run_dir(run_dir(cfg))  # before resolve_start: a live job's checkpoints are not ours to take
    try:
        return await _run_locked(cfg, hosts=hosts, resume=resume, echo=echo, ends_at=ends_at)
    finally:
        lock.close()


async def _run_locked(cfg: ExperimentConfig, *, hosts: list[Host] | None, resume: bool, echo: bool,
                      ends_at: float | None) -> dict:
    restarts = 0
    while True:
        start = resolve_start(cfg, resume)
        if start.step >= cfg.train.steps:
            print(f"[launcher] nothing to do: the last checkpoint is at step {start.step} of {cfg.train.steps}")
            return {}
        job = Job(cfg, hosts=hosts, echo=echo, ends_at=ends_at)
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()

        def on_sigint() -> None:
            if not interrupted.is_set():
                interrupted.set()
                print("\n[launcher] interrupted: writing a checkpoint, then stopping (Ctrl-C again to abort)",
                      flush=True)
                asyncio.ensure_future(_interrupt(job))
            else:  # the second Ctrl-C: everything now, the broker too
                for p in [*job.procs, *([job.broker] if job.broker else [])]:
                    p.kill()
                os._exit(130)

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigint)
        timer = None if ends_at is None else loop.call_later(max(0.0, ends_at - time.monotonic()),
                                                             lambda: asyncio.ensure_future(_time_up(job)))
        try:
            return await job.run(start)
        except RunFailed as exc:
            if interrupted.is_set():
                raise
            if exc.role == "learner" and cfg.train.on_learner_death == "restart" and restarts < 3:
                restarts += 1
                resume = True
                print(f"[launcher] {exc}; restarting from the last checkpoint ({restarts}/3)", flush=True)
                continue
            if exc.role == "learner":
                raise RunFailed(f"{exc} (train.on_learner_death={cfg.train.on_learner_death})", exc.role) from None
            raise
        finally:
            if timer:
                timer.cancel()
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)


async def _interrupt(job: Job) -> None:
    """Ctrl-C: a stop after a written checkpoint is what the user asked for, not a failure (exit 0)."""
    if await job.checkpoint_now():
        print("[launcher] stopped at your request; --resume continues from that checkpoint", flush=True)
    else:
        job.failure = job.failure or "interrupted before a checkpoint could be written"
    job.finished.set()


async def _time_up(job: Job) -> None:
    print("[launcher] time budget reached: writing a checkpoint and stopping", flush=True)
    await job.checkpoint_now()
    job.finished.set()
