"""SGLang's adapter way (LoRA jobs): the learner's adapter into a server launched with --enable-lora.

SGLang 0.5.23 has no distributed adapter endpoint (/load_lora_adapter_from_tensors unpickles and stays
unused), so each update's adapter, which came over a tensor channel as any generator's weights do
(actors.weights.channel_push; a few MB), goes:

  written in PEFT's layout (policies.model.lora.save_adapter) to <root>/adapter-v{N}
  -> POST /load_lora_adapter {lora_name: adapter-v{N}, lora_path: that directory}
  -> every later /generate of ours names it (lora_path), resubmissions of interrupted ones too
  -> POST /update_weight_version {new_version: N, abort_all_requests: rollout.interrupt_on_update}
  -> in the background, once no request of ours names the previous adapter: POST /unload_lora_adapter,
     then its directory is removed.

In-flight requests: SGLang fixes a request's adapter when it admits it, so a request keeps the adapter
it named to its end and its tokens are that adapter's version (the client labels them so; SGLang's own
weight_version spans would call the tail of a request outliving the swap N). interrupt_on_update true
(default): the version call aborts the requests in flight, which come back with their partial output
and are resubmitted as prompt + tokens so far under the new adapter (as the disk and distributed ways
do); false: they run to their end on the old adapter while new requests start on the new one, nobody
waits. The radix cache needs no flush: its keys include the adapter's lora_id, so the old adapter's
prefixes are never matched again (LRU evicts them).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from actors.generator.sglang.protocol import SGLangRefused

log = logging.getLogger("actors.generator.sglang.adapters")
PREFIX = "adapter-v"


def adapter_name(version: int) -> str:
    """The lora_name of version ``version``'s adapter on the server."""
    return f"{PREFIX}{version}"


class AdapterSwap:
    """One generator's adapters on its server: write, load, switch, retire.

    ``lora``: the job's policies.model.lora.LoraSettings (r, alpha, target_modules), which the server
    was launched with; the adapter directories go to a new directory of this generator's own (removed on
    close) in ``parent`` (the server must read it; default the system's temporary directory, on the host
    where a launched server runs); ``retire_timeout``: how long an old adapter waits for our requests
    that name it before it is unloaded anyway."""

    def __init__(self, lora, *, parent: str | Path | None = None, base_model: str | None = None,
                 retire_timeout: float = 3600.0):
        self.lora, self.base_model, self.retire_timeout = lora, base_model, retire_timeout
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="sglang-adapters-", dir=parent))
        self.applied: int | None = None  # the version whose adapter every request names now
        self._old: list[str] = []  # adapters switched away from, retired once the version call went through
        self._retiring: set[asyncio.Task] = set()

    async def load(self, client, adapter: dict[str, torch.Tensor], version: int, *, interrupt: bool) -> None:
        """``client``: the server's SGLangClient. Raises (naming the server and the phase) when the server
        refuses the adapter; generation then goes on with the adapter it had."""
        from policies.model.lora import save_adapter
        name = adapter_name(version)
        if client.lora_name != name:
            ranks = {a.shape[0] for k, a in adapter.items() if k.endswith(".lora_A.weight")}
            if ranks != {self.lora.r}:
                raise ValueError(f"adapter v{version}: rank {sorted(ranks)}, but model.lora.r is {self.lora.r} "
                                 "(what its server was launched with)")
            path = self.root / name
            await asyncio.to_thread(save_adapter, path, adapter, self.lora, base_model=self.base_model)
            try:
                try:
                    await client.load_lora_adapter(name, str(path))
                except SGLangRefused as e:
                    if "already loaded" not in e.message:
                        raise
                    # a server given by URL may hold this name from an earlier run of the job: replace it
                    log.warning("sglang at %s already had an adapter named %s; replacing it", client.url, name)
                    await client.unload_lora_adapter(name)
                    await client.load_lora_adapter(name, str(path))
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            old = client.use_adapter(name, version)
            if old is not None:
                self._old.append(old)
        if self.applied != version:  # (a second copy of the update finds it done)
            await client.update_weight_version(version, abort_all_requests=interrupt)
            self.applied = version
            log.info("sglang at %s serves adapter %s (%s)", client.url, name,
                     "any request in flight was interrupted and resumes on it" if interrupt else
                     "any request in flight finishes on the adapter it named")
        while self._old:
            task = asyncio.ensure_future(self._retire(client, self._old.pop()))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, client, name: str) -> None:
        """Unload ``name`` once no request of ours names it, then remove its directory (never raises)."""
        try:
            if not await client.until_unused(name, self.retire_timeout):
                log.warning("adapter %s still named by requests after %g s; unloading it anyway", name,
                            self.retire_timeout)
            await client.unload_lora_adapter(name)
            client.forget_adapter(name)
            await asyncio.to_thread(shutil.rmtree, self.root / name, True)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the server may be gone; its adapters went with it
            log.warning("could not retire adapter %s at %s: %s", name, client.url, e)

    async def settle(self) -> None:
        """Wait for the retirements under way (tests, and close)."""
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        shutil.rmtree(self.root, ignore_errors=True)
