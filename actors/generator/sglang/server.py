"""Supervisor of one launched SGLang server process: its command line, its log tail, its stop.

The server may run from another environment (``SGLangLaunch.command``, e.g. SGLang's own venv:
its torch/transformers pins differ from ours); we only start it, keep its last log lines for
error messages, and stop its whole process group (SGLang forks a scheduler per TP rank).

The server dies with its generator even when that is SIGKILLed (PR_SET_PDEATHSIG: it holds a GPU).
Its environment carries `NCCL_ENV`, the NCCL settings the learner's processes get too (the launcher's
plan): SGLang would set NCCL_CUMEM_ENABLE=0 for itself where unset, and a weight group whose two
sides disagree on it can hang; TORCH_NCCL_ASYNC_ERROR_HANDLING=2 aborts a failed communicator
without tearing the process down, so a dead member is dropped and the rest go on.
The API key (`--api-key`) is never written to a log: `redacted` hides it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field

from actors.children import die_with_parent
from actors.generator.sglang.protocol import LORA_TARGET_MODULES

log = logging.getLogger("actors.generator.sglang.server")
# set in the server's and in the learner's environment before any process group is built
NCCL_ENV = {"NCCL_CUMEM_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
SGLANG_DTYPES = ("auto", "float32", "bfloat16", "float16")

@dataclass
class SGLangLaunch:
    """How to start a server: `python -m sglang.launch_server --model-path M --port P ...`."""

    model_path: str
    port: int
    tp_size: int = 1
    mem_fraction_static: float | None = None
    random_seed: int | None = None
    dtype: str | None = None  # --dtype: the learner's (else SGLang picks float16 for fp32 checkpoints)
    api_key: str | None = None  # --api-key: every call but /health needs it (Authorization: Bearer)
    env: dict[str, str] = field(default_factory=dict)  # over ours: the planner's CUDA_VISIBLE_DEVICES
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    initial_version: int = 0  # sent as --weight-version so replies carry an integer version
    lora_rank: int | None = None  # a LoRA job: --enable-lora --max-lora-rank R --lora-target-modules M..
    lora_target_modules: tuple[str, ...] = ()
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
        if self.dtype is not None and self.dtype not in SGLANG_DTYPES:
            raise ValueError(f"SGLangLaunch.dtype={self.dtype!r} must be one of {', '.join(SGLANG_DTYPES)}")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.api_key:
            raise ValueError(f"SGLangLaunch.host={self.host!r}: a server reachable beyond loopback needs an "
                             "api_key (its HTTP port has endpoints that unpickle)")
        if self.lora_rank is not None:
            if self.lora_rank < 1 or not self.lora_target_modules:
                raise ValueError(f"SGLangLaunch: LoRA needs a rank >= 1 and target modules, got rank "
                                 f"{self.lora_rank} and {list(self.lora_target_modules)}")
            bad = sorted(set(self.lora_target_modules) - LORA_TARGET_MODULES)
            if bad:
                raise ValueError(f"model.lora.target_modules: SGLang 0.5.23 serves no adapter on {bad} "
                                 f"(--lora-target-modules takes {', '.join(sorted(LORA_TARGET_MODULES))})")
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
    if cfg.dtype is not None and "--dtype" not in cfg.extra_args:
        argv += ["--dtype", cfg.dtype]
    if cfg.api_key:
        argv += ["--api-key", cfg.api_key]
    if cfg.lora_rank is not None:  # sizes the adapter memory pool; no adapter at start (each update loads one)
        argv += ["--enable-lora", "--max-lora-rank", str(cfg.lora_rank),
                 "--lora-target-modules", *cfg.lora_target_modules]
    return argv + list(cfg.extra_args)


def launch_env(cfg: SGLangLaunch, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ours, NCCL_ENV (an operator's own values win), then cfg.env."""
    env = dict(os.environ if base is None else base)
    for k, v in NCCL_ENV.items():
        env.setdefault(k, v)
    return env | cfg.env


def redacted(argv: list[str]) -> list[str]:
    """argv with the value after --api-key hidden, for logs."""
    return [("***" if i and argv[i - 1] == "--api-key" else a) for i, a in enumerate(argv)]


def address_towards(peer: str) -> str:
    """This host's address on the route to `peer` (the bus host): where a server of a job that spans
    hosts binds and what it registers. Loopback for a loopback peer (a one-host job)."""
    try:
        infos = socket.getaddrinfo(peer, 9, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"bus host {peer!r}: cannot resolve it ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)  # UDP: picks the route, sends nothing
        own = s.getsockname()[0]
    return "127.0.0.1" if own.startswith("127.") or own == "::1" else own


class ServerProcess:
    """A launched server: its process group, and a pump that keeps its last log lines."""

    def __init__(self, cfg: SGLangLaunch):
        self.cfg = cfg
        self.tail: deque[str] = deque(maxlen=cfg.log_lines)
        self.proc: asyncio.subprocess.Process | None = None
        self._pump_task: asyncio.Task | None = None

    async def start(self) -> None:
        argv = launch_argv(self.cfg)
        log.info("starting sglang: %s", " ".join(redacted(argv)))
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, limit=1 << 20, env=launch_env(self.cfg),
            preexec_fn=die_with_parent(os.getpid()))
        self._pump_task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        sink = open(self.cfg.log_file, "a", encoding="utf-8") if self.cfg.log_file else None
        try:
            while raw := await self.proc.stdout.readline():
                line = raw.decode("utf-8", "replace").rstrip()
                if self.cfg.api_key:  # SGLang prints its ServerArgs, key included
                    line = line.replace(self.cfg.api_key, "***")
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
