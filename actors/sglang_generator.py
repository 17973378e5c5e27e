"""The sglang generator backend: an SGLang server (launched here or already running) behind the
generator actor's Backend interface.

Weights that arrive over a tensor channel are written as a safetensors checkpoint next to the
base model's config and loaded with /update_weights_from_disk (which always flushes the radix
cache, so generation stays on-policy). On GPU clusters the NCCL path of SGLangBackend
(init_weights_group + update_weights_distributed) avoids the disk round trip.
"""
from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from actors.sglang_backend import SGLangBackend, SGLangLaunch

_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json")


class SGLangGeneratorBackend(SGLangBackend):
    def __init__(self, *args, model_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_path = Path(model_path)
        self._weights_dir = Path(tempfile.mkdtemp(prefix="sglang-weights-"))

    async def update_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        for name in _COPY:
            if (self.model_path / name).exists():
                shutil.copy2(self.model_path / name, self._weights_dir / name)
        tensors = {k: v.contiguous() for k, v in weights.items()}
        # safetensors refuses shared storage (tied embeddings): keep one copy of each buffer
        seen: dict[int, str] = {}
        for k in list(tensors):
            ptr = tensors[k].data_ptr()
            if ptr in seen:
                tensors[k] = tensors[k].clone()
            seen[ptr] = k
        save_file(tensors, str(self._weights_dir / "model.safetensors"))
        await self.update_weights_from_disk(str(self._weights_dir), version)

    async def close(self) -> None:
        await super().close()
        shutil.rmtree(self._weights_dir, ignore_errors=True)


def make_sglang_backend(cfg, start) -> SGLangGeneratorBackend:
    g = cfg.actors.generator
    timeout = cfg.rollout.request_timeout
    if g.sglang_url:
        return SGLangGeneratorBackend(g.sglang_url, model_path=start.model_path, request_timeout=timeout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = SGLangLaunch(model_path=start.model_path, port=port, random_seed=cfg.seed,
                          initial_version=start.step, extra_args=list(g.sglang_args))
    return SGLangGeneratorBackend(launch=launch, model_path=start.model_path, request_timeout=timeout)
