"""SGLang's disk way: the weights a generator received over a tensor channel, written as a
safetensors checkpoint and loaded by its server with /update_weights_from_disk.

It runs in the generator's process (actors.generator.sglang.backend, ``sglang_weights: disk``): the
broadcaster sends these generators tensors as it sends torch ones (actors.weights.channel_push).
The checkpoint is the base model's config and tokenizer files next to one model.safetensors, in a
temporary directory rewritten on every update and removed on close. The load always flushes
SGLang's radix cache.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json")


def write_checkpoint(weights: dict[str, torch.Tensor], model_path: Path, out: Path) -> str:
    """``weights`` as a checkpoint directory SGLang can load (the base model's files beside them)."""
    for name in _COPY:
        if (model_path / name).exists():
            shutil.copy2(model_path / name, out / name)
    tensors = {k: v.contiguous() for k, v in weights.items()}
    # safetensors refuses shared storage (tied embeddings): keep one copy of each buffer
    seen: dict[int, str] = {}
    for k in list(tensors):
        ptr = tensors[k].data_ptr()
        if ptr in seen:
            tensors[k] = tensors[k].clone()
        seen[ptr] = k
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


class DiskWeights:
    """One generator's disk updates: write (off the event loop), then ask its server to load."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        self._dir: Path | None = None

    async def load(self, client, weights: dict[str, torch.Tensor], version: int, *, abort_all_requests: bool) -> None:
        """``client``: the server's actors.generator.sglang.client.SGLangClient."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="sglang-weights-"))
        path = await asyncio.to_thread(write_checkpoint, weights, self.model_path, self._dir)
        await client.update_weights_from_disk(path, version, abort_all_requests=abort_all_requests)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
