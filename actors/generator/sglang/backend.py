"""The sglang generator backend: an SGLang server (launched here or already running) behind the
generator actor's Backend interface.

Weights reach the server one of three ways: the two of ``actors.generator.sglang_weights`` (both in
actors.weights), and in a LoRA job (``model.lora``) the adapter way, whatever sglang_weights says:
- distributed (default): the broadcaster, in the learner's process, broadcasts them over
  torch.distributed straight into the server (actors.weights.sglang_distributed); this backend only tells
  the bus where its server is (``capabilities``), and update_weights is never called;
- disk: tensors that arrive over a tensor channel are written as a checkpoint and loaded with
  /update_weights_from_disk (actors.weights.sglang_disk; it always flushes the radix cache);
- adapter: the server runs with --enable-lora; each update's adapter, which arrives as the disk way's
  tensors do (a few MB), is written in PEFT's layout and loaded with /load_lora_adapter under a
  versioned name that later requests name (actors.generator.sglang.adapters, which also says what
  becomes of the requests in flight). Merged weights over the weight group would move the whole
  model per update: a LoRA job does not take them.

``interrupt_on_update`` (rollout.interrupt_on_update) on the disk path: true aborts the requests in
flight (abort_all_requests) and generate_group resubmits prompt + tokens so far, recomputed under
the new weights; false lets SGLang's model_update_lock wait for them, holding new requests until
the update is applied. The distributed path always interrupts (pause_generation abort).
"""
from __future__ import annotations

import socket

import torch

from actors.generator.sglang.adapters import AdapterSwap
from actors.generator.sglang.client import SGLangClient
from actors.generator.sglang.protocol import SGLangError, SGLangLaunchError
from actors.generator.sglang.server import ServerProcess, SGLangLaunch
from actors.weights.sglang_disk import DiskWeights


class SGLangGeneratorBackend(SGLangClient):
    """The generator's Backend: a client of its server, and that server's supervisor when it
    launched it (`launch`; else `url` names a running one). start() returns once /health is 200."""

    def __init__(self, url: str | None = None, *, launch: SGLangLaunch | None = None, model_path: str,
                 weights: str = "distributed", tp_size: int = 1, interrupt_on_update: bool = True,
                 lora=None, adapter_dir: str | None = None, **kwargs):
        """``lora``: a LoRA job's policies.model.lora.LoraSettings; its server must run with --enable-lora
        and this rank and target modules (a launched one does: see make_sglang_backend) and read
        ``adapter_dir`` (where the adapters are written; None = the system's temporary directory)."""
        if (url is None) == (launch is None):
            raise ValueError("the sglang backend needs a url or a launch config (one of them)")
        if url is None:
            host = "127.0.0.1" if launch.host in ("0.0.0.0", "::") else launch.host
            url = f"http://[{host}]:{launch.port}" if ":" in host else f"http://{host}:{launch.port}"
            tp_size = launch.tp_size
        super().__init__(url, **kwargs)
        self._server = ServerProcess(launch) if launch else None
        if weights not in ("distributed", "disk"):
            raise ValueError(f"sglang weights {weights!r} must be distributed or disk")
        self.disk = DiskWeights(model_path)
        if not isinstance(interrupt_on_update, bool):
            raise ValueError(f"interrupt_on_update={interrupt_on_update!r}: must be true or false")
        if weights == "distributed" and not interrupt_on_update and lora is None:
            raise ValueError("interrupt_on_update=False needs weights='disk': a distributed update pauses "
                             "generation, which interrupts it")
        self.adapters = None
        if lora is not None:  # the adapter way: tensors over a channel (not "distributed"), loaded from files
            weights = "adapter"
            self.adapters = AdapterSwap(lora, parent=adapter_dir, base_model=model_path,
                                        retire_timeout=kwargs.get("request_timeout", 3600.0))
        self.weights_mode, self.tp_size = weights, tp_size
        self.interrupt_on_update = interrupt_on_update

    async def start(self, wait: bool = True) -> "SGLangGeneratorBackend":
        """Launch the server (if configured) and wait until it is healthy; on failure it is stopped."""
        try:
            if self._server and self._server.proc is None:
                await self._server.start()
            await super().start(wait)
        except BaseException:
            await self.close()
            raise
        return self

    async def _exited(self) -> SGLangError | None:
        if self._server and self._server.returncode is not None:
            await self._server.drain()
            return SGLangLaunchError(self.url, self._server.returncode, self._server.tail)
        return None

    def _log_tail(self) -> list[str]:
        return list(self._server.tail) if self._server else []

    @property
    def failed(self) -> str | None:
        """Why this backend can generate no more (its launched server exited), else None: the
        generator then leaves the bus, so its prompts go to the others and the broadcaster drops it."""
        rc = self.returncode
        return None if rc is None else f"its sglang server at {self.url} exited with code {rc}"

    @property
    def pid(self) -> int | None:
        """Process id of the launched server (None when connected by URL)."""
        return self._server.proc.pid if self._server and self._server.proc else None

    @property
    def returncode(self) -> int | None:
        """Exit code of the launched server once it has exited; None while it runs."""
        return self._server.returncode if self._server else None

    @property
    def capabilities(self) -> dict:
        """Registered on the bus: the broadcaster finds the server (and its GPUs) here."""
        return {"sglang_url": self.url, "sglang_tp_size": self.tp_size, "weights": self.weights_mode}

    async def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """The disk or the adapter way (the files are written in a thread, so the generator keeps answering)."""
        from policies.model.lora import is_adapter_state
        if is_adapter_state(weights) != (self.adapters is not None):
            got = "a LoRA adapter" if is_adapter_state(weights) else f"full weights ({next(iter(weights), '')!r}, ...)"
            want = "LoRA adapters (model.lora is set)" if self.adapters else "full weights (model.lora is not set)"
            raise ValueError(f"weights v{version} for the sglang server at {self.url}: got {got}, but it takes {want}")
        if self.adapters is not None:
            await self.adapters.load(self, weights, version, interrupt=self.interrupt_on_update)
        else:
            await self.disk.load(self, weights, version, abort_all_requests=self.interrupt_on_update)

    async def close(self) -> None:
        if self.adapters is not None:  # first: its retirements use the connection
            self.adapters.close()
        await super().close()
        if self._server is not None:
            await self._server.stop()
        self.disk.close()


def make_sglang_backend(settings, *, model_path: str, step: int, seed: int, request_timeout: float,
                        interrupt_on_update: bool, dtype: str | None = None, bind: str = "127.0.0.1",
                        api_key: str | None = None, lora=None) -> SGLangGeneratorBackend:
    """The backend the generator section's ``sglang_*`` settings describe (``settings``: that section,
    e.g. the launcher's actors.generator): a server at sglang_url, else one launched here serving
    ``model_path`` as version ``step`` in ``dtype``, listening on ``bind`` (beyond loopback only with
    ``api_key``), on the GPUs of this process's CUDA_VISIBLE_DEVICES (the launcher's placement).
    ``lora`` (model.lora): the adapter way, a launched server gets --enable-lora with its rank and modules."""
    kw = dict(model_path=model_path, request_timeout=request_timeout, health_timeout=settings.sglang_health_timeout,
              weights=settings.sglang_weights, tp_size=settings.sglang_tp_size,
              interrupt_on_update=interrupt_on_update, api_key=api_key, lora=lora,
              adapter_dir=settings.sglang_adapter_dir if lora is not None else None)
    if settings.sglang_url:
        return SGLangGeneratorBackend(settings.sglang_url, **kw)
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as s:
        s.bind((bind, 0))
        port = s.getsockname()[1]
    launch = SGLangLaunch(model_path=model_path, port=port, random_seed=seed, tp_size=settings.sglang_tp_size,
                          initial_version=step, extra_args=list(settings.sglang_args), command=settings.sglang_command,
                          dtype=dtype, host=bind, api_key=api_key,
                          mem_fraction_static=settings.sglang_mem_fraction_static,
                          lora_rank=lora.r if lora is not None else None,
                          lora_target_modules=tuple(lora.target_modules) if lora is not None else ())
    return SGLangGeneratorBackend(launch=launch, **kw)
