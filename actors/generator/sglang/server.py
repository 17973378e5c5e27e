"""Supervisor of one launched SGLang server process: its command line, its log tail, its stop.

The server may run from another environment (``SGLangLaunch.command``, e.g. SGLang's own venv:
its torch/transformers pins differ from ours); we only start it, keep its last log lines for
error messages, and stop its whole process group (SGLang forks a scheduler per TP rank).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field

log = logging.getLogger("actors.generator.sglang.server")

@dataclass
class SGLangLaunch:
    """How to start a server: `python -m sglang.launch_server --model-path M --port P ...`."""

    model_path: str
    port: int
    tp_size: int = 1
    mem_fraction_static: float | None = None
    random_seed: int | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    initial_version: int = 0  # sent as --weight-version so replies carry an integer version
    command: list[str] | None = None  # default [python, -m, sglang.launch_server]
    log_file: str | None = None  # also append the server's output here
    log_lines: int = 40  # how many last lines an error quotes
    stop_timeout: float = 15.0  # SIGTERM grace before SIGKILL

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("SGLangLaunch.model_path is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"SGLangLaunch.port={self.port} is not a TCP port")
        if self.tp_size < 1:
            raise ValueError(f"SGLangLaunch.tp_size={self.tp_size} must be >= 1")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"SGLangLaunch.mem_fraction_static={self.mem_fraction_static} "
                             "must be in (0, 1)")
        if self.initial_version < 0:
            raise ValueError(f"SGLangLaunch.initial_version={self.initial_version} must be >= 0")
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ValueError(f"SGLangLaunch.extra_args must be strings, got {self.extra_args!r}")


def launch_argv(cfg: SGLangLaunch) -> list[str]:
    """The command line that starts the server (0.5.23 also accepts `sglang serve`)."""
    argv = list(cfg.command) if cfg.command else [sys.executable, "-m", "sglang.launch_server"]
    argv += ["--model-path", cfg.model_path, "--host", cfg.host, "--port", str(cfg.port),
             "--tp-size", str(cfg.tp_size), "--weight-version", str(cfg.initial_version)]
    if cfg.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.random_seed is not None:
        argv += ["--random-seed", str(cfg.random_seed)]
    return argv + list(cfg.extra_args)



class ServerProcess:
    """A launched server: its process group, and a pump that keeps its last log lines."""

    def __init__(self, cfg: SGLangLaunch):
        self.cfg = cfg
        self.tail: deque[str] = deque(maxlen=cfg.log_lines)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump_task: asyncio.Task | None = None

    async def start(self) -> None:
        argv = launch_argv(self.cfg)
        log.info("starting sglang: %s", " ".join(argv))
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20)
        self._pump_task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        sink = open(self.cfg.log_file, "a", encoding="utf-8") if self.cfg.log_file else None
        try:
            while raw := await self.proc.stdout.readline():
                line = raw.decode("utf-8", "replace").rstrip()
                self.tail.append(line)
                log.debug("[sglang:%d] %s", self.cfg.port, line)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
        except (ValueError, ConnectionError):  # an over-long line or a closed pipe
            pass
        finally:
            if sink:
                sink.close()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def drain(self, timeout: float = 2.0) -> None:
        """Let the pump read what the dead process last wrote."""
        if self._pump_task:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump_task), timeout)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), self.cfg.stop_timeout)
            except asyncio.TimeoutError:
                log.warning("sglang on port %d ignored SIGTERM for %g s; killing it",
                            self.cfg.port, self.cfg.stop_timeout)
                self._signal(signal.SIGKILL)
                await self.proc.wait()
        else:  # the leader is gone; its workers may not be
            self._signal(signal.SIGKILL)
        await self.drain()
        if self._pump_task and not self._pump_task.done():
            self._pump_task.cancel()

    def _signal(self, sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session
