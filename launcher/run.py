"""The training job: start the broker and every actor process, watch them, record metrics, stop cleanly.

The launcher is itself a bus client named "launcher": it serves the run's config to actors that
attach later, records every step's metrics (JSONL + TensorBoard), prints progress, and decides what a
death means (a generator may die; the learner's death stops or restarts the run, as configured).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from actors import protocol as P
from bus.client import BusClient
from launcher.config import ExperimentConfig, config_to_yaml, describe_mode, dump_config
from launcher.hosts import Host, place
from launcher.metrics import MetricsWriter
from launcher.progress import Progress
from launcher.roles import Start, resolve_start, run_dir
from launcher.spawn import Process, ProcessSpec, start as start_process

log = logging.getLogger("launcher")

ROLE_ORDER = ("learner", "packer", "verifier", "sampler", "generator")  # broadcaster rides with the learner
CRITICAL = {"learner", "packer", "sampler"}
PROJECT_DIR = str(Path(__file__).resolve().parent.parent)


class RunFailed(RuntimeError):
    pass


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bus_kwargs(cfg: ExperimentConfig) -> dict:
    kw = {"heartbeat_interval": cfg.bus.heartbeat_interval}
    if cfg.bus.keys_dir:
        from bus.keys import load_keys
        keys = load_keys(cfg.bus.keys_dir)
        kw.update(curve_server_key=keys.server_public, curve_client_keys=keys.client_keys)
    return kw


def process_specs(cfg: ExperimentConfig, config_path: Path, address: str, start: Start,
                  hosts: list[Host] | None) -> list[ProcessSpec]:
    counts = {role: getattr(cfg.actors, role).count for role in ROLE_ORDER}
    pinned = {role: getattr(cfg.actors, role).hosts for role in ROLE_ORDER if getattr(cfg.actors, role).hosts}
    specs = []
    for role, index, host in place(counts, hosts, pinned):
        name = f"{role}-{index}" if role in ("generator", "verifier") else role
        argv = [sys.executable, "-m", "launcher", "actor", role, "--name", name, "--bus", address,
                "--config", str(config_path), "--start-step", str(start.step), "--model-path", start.model_path]
        if start.checkpoint:
            argv += ["--checkpoint", start.checkpoint]
        specs.append(ProcessSpec(name, role, argv, host))
    return specs


def broker_spec(cfg: ExperimentConfig, bind: str) -> ProcessSpec:
    argv = [sys.executable, "-m", "bus.broker", "--bind", bind,
            "--heartbeat-interval", str(cfg.bus.heartbeat_interval),
            "--heartbeat-liveness", str(cfg.bus.heartbeat_liveness),
            "--max-message-bytes", str(cfg.bus.max_message_bytes)]
    if cfg.bus.keys_dir:
        argv += ["--keys", cfg.bus.keys_dir]
    return ProcessSpec("broker", "broker", argv)


class Job:
    def __init__(self, cfg: ExperimentConfig, *, hosts: list[Host] | None, echo: bool = True):
        self.cfg, self.hosts, self.echo = cfg, hosts, echo
        self.rd = run_dir(cfg)
        self.procs: list[Process] = []
        self.broker: Process | None = None
        self.client: BusClient | None = None
        self.finished = asyncio.Event()
        self.failure: str | None = None
        self.last_metrics: dict = {}

    def _fail(self, why: str) -> None:
        if self.failure is None and not self.finished.is_set():
            self.failure = why
            log.error(why)
            self.finished.set()

    async def run(self, start: Start) -> dict:
        cfg, rd = self.cfg, self.rd
        rd.mkdir(parents=True, exist_ok=True)
        config_path = rd / "config.yaml"
        config_path.write_text(config_to_yaml(cfg))
        port = cfg.bus.port or free_port(cfg.bus.host)
        address = f"tcp://{cfg.bus.host}:{port}"
        progress = Progress(cfg.train.steps, start.step, describe_mode(cfg))
        metrics = MetricsWriter(rd)
        print(f"[launcher] mode: {describe_mode(cfg)}; steps {start.step}..{cfg.train.steps}; bus {address}; "
              f"run dir {rd}", flush=True)
        try:
            self.broker = await start_process(broker_spec(cfg, address), log_dir=rd / "logs", cwd=PROJECT_DIR,
                                              echo=self.echo)
            self.client = BusClient(address, P.LAUNCHER, "launcher", **bus_kwargs(cfg))
            await self._connect(address)
            self.client.on(P.CONFIG, self._serve_config(start))
            self.client.subscribe(P.METRICS, self._on_metrics(metrics, progress))
            self.client.subscribe(P.RUN_FINISHED, self._on_finished)
            self.client.subscribe(P.LEFT, self._on_left)
            for spec in process_specs(cfg, config_path, address, start, self.hosts):
                self.procs.append(await start_process(spec, log_dir=rd / "logs", cwd=PROJECT_DIR, echo=self.echo))
            watchers = [asyncio.create_task(self._watch(p)) for p in self.procs]
            await self.finished.wait()
            for w in watchers:
                w.cancel()
        finally:
            await self.shutdown()
            metrics.close()
        if self.failure:
            raise RunFailed(self.failure)
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

    def _on_metrics(self, writer: MetricsWriter, progress: Progress):
        async def on_metrics(topic: str, body: dict, src: str) -> None:
            body = dict(body)
            body["tokens_per_s"] = progress.tokens_per_s(body)
            self.last_metrics = body
            writer.write(int(body["step"]), {k: v for k, v in body.items() if k not in ("step", "time")})
            print(f"[progress] {progress.line(body)}", flush=True)
        return on_metrics

    async def _on_finished(self, topic: str, body: dict, src: str) -> None:
        print(f"[launcher] training finished at step {body.get('step')}", flush=True)
        self.finished.set()

    async def _on_left(self, topic: str, body: dict, src: str) -> None:
        role = body.get("role")
        if role in CRITICAL:
            self._fail(f"{body.get('name')} ({role}) left the bus (missed heartbeats or exited)")
        else:
            print(f"[launcher] {body.get('name')} ({role}) left the bus", flush=True)

    async def _watch(self, proc: Process) -> None:
        rc = await proc.wait()
        if self.finished.is_set():
            return
        msg = f"{proc.name} exited with code {rc}; last lines: " + " / ".join(proc.tail[-3:])
        if proc.spec.role in CRITICAL or not any(p.returncode is None for p in self.procs
                                                 if p.spec.role == proc.spec.role):
            self._fail(msg)
        else:
            print(f"[launcher] {msg}", flush=True)

    async def checkpoint_now(self, timeout: float = 120.0) -> None:
        if self.client is None:
            return
        try:
            reply = await self.client.request(P.LEARNER, P.CHECKPOINT, {}, timeout=timeout)
            print(f"[launcher] checkpoint written at step {reply['step']}: {reply['path']}", flush=True)
        except Exception as exc:
            print(f"[launcher] could not write a checkpoint before stopping: {exc}", flush=True)

    async def shutdown(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.procs), return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.broker is not None:
            await self.broker.stop()


async def run_job(cfg: ExperimentConfig, *, hosts: list[Host] | None, resume: bool, echo: bool = True,
                  deadline: float | None = None) -> dict:
    """Run to the configured number of steps; restart from the last checkpoint on a death if asked to.

    With ``deadline`` (seconds), a run still going then writes a checkpoint and stops as a success.
    """
    restarts = 0
    while True:
        start = resolve_start(cfg, resume)
        if start.step >= cfg.train.steps:
            print(f"[launcher] nothing to do: the last checkpoint is at step {start.step} of {cfg.train.steps}")
            return {}
        job = Job(cfg, hosts=hosts, echo=echo)
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()

        def on_sigint() -> None:
            if not interrupted.is_set():
                interrupted.set()
                print("\n[launcher] interrupted: writing a checkpoint, then stopping (Ctrl-C again to abort)",
                      flush=True)
                asyncio.ensure_future(_interrupt(job))
            else:
                for p in job.procs:
                    p.kill()
                os._exit(130)

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigint)
        timer = loop.call_later(deadline, lambda: asyncio.ensure_future(_time_up(job))) if deadline else None
        try:
            return await job.run(start)
        except RunFailed as exc:
            if interrupted.is_set():
                raise
            if cfg.train.on_learner_death == "restart" and restarts < 3:
                restarts += 1
                resume = True
                print(f"[launcher] {exc}; restarting from the last checkpoint ({restarts}/3)", flush=True)
                continue
            raise
        finally:
            if timer:
                timer.cancel()
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)


async def _interrupt(job: Job) -> None:
    await job.checkpoint_now()
    job.failure = job.failure or "interrupted"
    job.finished.set()


async def _time_up(job: Job) -> None:
    print("[launcher] time budget reached: writing a checkpoint and stopping", flush=True)
    await job.checkpoint_now()
    job.finished.set()


def dry_run(cfg: ExperimentConfig, hosts: list[Host] | None) -> list[str]:
    """The command lines the launcher would run, without running anything."""
    import shlex
    address = f"tcp://{cfg.bus.host}:{cfg.bus.port or 5555}"
    start = Start(0, cfg.model.path)
    lines = [shlex.join(broker_spec(cfg, address).command(PROJECT_DIR))]
    for spec in process_specs(cfg, run_dir(cfg) / "config.yaml", address, start, hosts):
        lines.append(f"# {spec.name} on {spec.host.name if spec.host else 'localhost'}\n"
                     + shlex.join(spec.command(PROJECT_DIR)))
    return lines
