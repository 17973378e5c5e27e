"""Start actor processes on local hosts (subprocess) or remote ones (ssh, srun), and stream their logs.

Every process's output is prefixed with its name on our stdout and kept in run_dir/logs/NAME.log,
so one terminal shows the whole job and a post-mortem has each actor's full log.

Every process dies with the launcher, even a SIGKILLed one: local processes (ssh and srun included)
are started with PR_SET_PDEATHSIG = SIGKILL, and a remote process ends with its ssh (-tt gives it a
terminal, so it gets SIGHUP) or its Slurm step (launcher.job.engines).  Each also carries RUN_DIR_ENV = the run directory in its
environment, so a process of a job can be found by its run directory.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from actors.children import die_with_parent
from launcher.job.engines import engine_for
from launcher.job.hosts import Host

RUN_DIR_ENV = "BOBA_RUN_DIR"  # in every process's environment: the run directory of its job


@dataclass
class ProcessSpec:
    name: str
    role: str
    argv: list[str]  # the python -m ... command, run in the project directory
    host: Host | None = None  # None = this machine
    env: dict[str, str] = field(default_factory=dict)

    def command(self, cwd: str) -> list[str]:
        """The full command line, wrapped by the host's engine (ssh, srun) for a remote host (what --dry-run prints)."""
        if self.host is None or self.host.is_local:
            return list(self.argv)
        return engine_for(self.host).command(self.host, self.argv, self.env, cwd)


class Process:
    """One running actor process with its log pump."""

    def __init__(self, spec: ProcessSpec, proc: asyncio.subprocess.Process, log_path: Path, echo: bool):
        self.spec, self.proc, self.log_path, self.echo = spec, proc, log_path, echo
        self.tail: list[str] = []
        self._pump = asyncio.create_task(self._read())

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def _read(self) -> None:
        with open(self.log_path, "ab") as log:
            assert self.proc.stdout is not None
            async for line in self.proc.stdout:
                log.write(line)
                log.flush()
                text = line.decode(errors="replace").rstrip()
                self.tail = (self.tail + [text])[-20:]
                if self.echo:
                    sys.stdout.write(f"[{self.name}] {text}\n")
                    sys.stdout.flush()

    async def wait(self) -> int:
        rc = await self.proc.wait()
        await self._pump
        return rc

    async def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.send_signal(signal.SIGCONT)  # a stopped (frozen) process acts on SIGTERM only when resumed
                await asyncio.wait_for(self.proc.wait(), grace)
            except (asyncio.TimeoutError, ProcessLookupError):
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
                await self.proc.wait()
        try:
            await asyncio.wait_for(self._pump, 5)
        except asyncio.TimeoutError:
            self._pump.cancel()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def start(spec: ProcessSpec, *, log_dir: Path, cwd: str, echo: bool = True,
                run_dir: Path | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    if run_dir is not None:
        env[RUN_DIR_ENV] = str(run_dir)
    proc = await asyncio.create_subprocess_exec(
        *spec.command(cwd), cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        preexec_fn=die_with_parent(os.getpid()))
    return Process(spec, proc, log_dir / f"{spec.name}.log", echo)
