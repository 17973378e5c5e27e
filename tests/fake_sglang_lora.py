"""The fake SGLang server's LoRA serving (sglang 0.5.23 launched with --enable-lora), for tests/fake_sglang.py.

What it mimics, read in sglang/srt: `--enable-lora --max-lora-rank R --lora-target-modules M..` (lora_hook:
without --lora-paths both are required); POST /load_lora_adapter {lora_name, lora_path, pinned} reads a PEFT
directory (LoRAConfig: adapter_config.json; a path that is not a directory goes to the hub) and answers
LoRAUpdateOutput {rid, http_worker_ipc, success, error_message, loaded_adapters {name: path}} with 200 or 400;
a second load of a name, a rank over --max-lora-rank or a module outside --lora-target-modules (after
q/k/v -> qkv_proj, gate/up -> gate_up_proj) is refused; POST /unload_lora_adapter {lora_name} unregisters
the name (new requests can no longer acquire it), waits until no running request uses the adapter, then
drops it; /generate's `lora_path` names an adapter: a name never loaded is a 400, a name unloaded since is
loaded again from its path (TokenizerManager._resolve_lora_path), and a request keeps the adapter it was
admitted with (its lora_id) to its end.

Effective weights: the base model's safetensors at --model-path, and per target base + (lora_alpha / r) *
B @ A (sglang/srt/lora/lora.py: scaling = alpha / r), computed in float32, in the base's dtype. A request
with an adapter "generates" from a hash of those weights (`weights_key`), so two adapters (or an adapter and
the base) give different tokens and a test can predict them. With --dump-weights each loaded adapter's
effective target weights are also written to DIR/<lora_name>.safetensors.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

NORMALIZED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}  # sglang.srt.lora.utils.get_normalized_target_modules
PEFT_PREFIX = "base_model.model."


def weights_key(tensors: dict) -> str:
    """A short hash of effective weights: what a request with this adapter generates from."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].float().contiguous().numpy().tobytes())
    return "lora:" + h.hexdigest()


def _normalized(mods) -> set[str]:
    return {NORMALIZED.get(m, m) for m in mods}


def _reply(success: bool, error: str | None, loaded: dict) -> tuple[int, dict]:
    return (200 if success else 400), {"rid": None, "http_worker_ipc": None, "success": success,
                                       "error_message": error, "loaded_adapters": dict(loaded)}


class FakeLoras:
    """The adapters of one fake server: registry, ref cache (name -> path, kept after unload), weights."""

    def __init__(self, fake, *, enabled: bool, max_rank: int | None, target_modules: list[str] | None):
        if enabled and not (max_rank and target_modules):
            raise SystemExit("When no initial --lora-paths is provided, you need to specify both --max-lora-rank "
                             "and --lora-target-modules for LoRA initialization.")
        self.fake, self.enabled, self.max_rank = fake, enabled, max_rank
        self._m = sys.modules[type(fake).__module__]  # fake_sglang (or __main__): its BadRequest and _fields
        self.targets = set(target_modules or ())
        self.loaded: dict[str, dict] = {}  # name -> {id, path, key, effective}
        self.ref_cache: dict[str, str] = {}  # every name ever loaded -> its path
        self.pending_unloads: set[str] = set()
        self._base: dict | None = None

    # ---- loading

    def base(self) -> dict:
        if self._base is None:
            from safetensors.torch import load_file
            self._base = {}
            for f in sorted(Path(self.fake.model_path).glob("*.safetensors")):
                self._base.update(load_file(f))
        return self._base

    def _read(self, name: str, path: str) -> dict:
        """The adapter's effective target weights; ValueError with SGLang's message when it cannot load."""
        import torch
        from safetensors.torch import load_file
        if not os.path.isdir(path):  # LoRAConfig asks the hub for anything else
            raise ValueError(f"Repo id must be in the form 'repo_name' or 'namespace/repo_name': '{path}'. "
                             "Use `repo_type` argument if needed.")
        config = json.loads(Path(path, "adapter_config.json").read_text())
        r, alpha, mods = config["r"], config["lora_alpha"], config["target_modules"]
        mods = [mods] if isinstance(mods, str) else mods
        if config.get("use_dora"):
            raise ValueError(f"Failed to load {name} because LoRA serving currently doesn't support DoRA adapters")
        if name in self.loaded:
            raise ValueError(f"Failed to load LoRA adapter {name} because it is already loaded")
        fits = "all" in self.targets or _normalized(mods) <= _normalized(self.targets)
        if r > self.max_rank or not fits:
            raise ValueError(
                f"LoRA adapter {name} with rank {r} is incompatible with the current LoRA memory pool configuration. "
                "Please ensure that the LoRA adapter's rank is within the configured `--max-lora-rank` and that "
                "the target modules are included in `--lora-target-modules`.")
        tensors = load_file(Path(path, "adapter_model.safetensors"))
        base, out = self.base(), {}
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            target = key.removeprefix(PEFT_PREFIX)[: -len(".lora_A.weight")] + ".weight"
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            w = base[target]
            out[target] = (w.float() + (alpha / r) * (b.float() @ a.float())).to(w.dtype)
        return out

    async def h_load(self, body) -> tuple[int, dict]:
        self._m._fields(body, {"lora_name": (str, True), "lora_path": (str, True), "pinned": (bool, False),
                       "lora_id": (str, False)})
        name, path = body["lora_name"], body["lora_path"]
        if not self.enabled:
            return _reply(False, "LoRA is not enabled. Please set `--enable-lora` to enable LoRA.", {})
        if name in self.pending_unloads:
            return _reply(False, f"LoRA adapter '{name}' has an incomplete unload. Retry the unload before "
                                 "loading it again.", self._names())
        try:
            effective = await asyncio.to_thread(self._read, name, path)
        except Exception as e:  # LoRAManager._load_lora_adapter: any failure is the reply's error_message
            return _reply(False, str(e), self._names())
        self.loaded[name] = {"id": uuid.uuid4().hex, "path": path, "key": weights_key(effective),
                             "effective": effective}
        self.ref_cache[name] = path
        if self.fake.dump_weights:
            await asyncio.to_thread(self._dump, name, effective)
        return _reply(True, None, self._names())

    def _dump(self, name: str, effective: dict) -> None:
        from safetensors.torch import save_file
        os.makedirs(self.fake.dump_weights, exist_ok=True)
        tmp = os.path.join(self.fake.dump_weights, f".{name}.tmp")
        save_file({k: v.contiguous() for k, v in effective.items()}, tmp)
        os.replace(tmp, os.path.join(self.fake.dump_weights, f"{name}.safetensors"))

    def _names(self) -> dict:
        return {n: a["path"] for n, a in self.loaded.items()}

    async def h_unload(self, body) -> tuple[int, dict]:
        self._m._fields(body, {"lora_name": (str, True), "lora_id": (str, False)})
        name = body["lora_name"]
        if not self.enabled:
            return _reply(False, "LoRA is not enabled. Please set `--enable-lora` to enable LoRA.", {})
        adapter = self.loaded.get(name)
        if adapter is None:
            return _reply(False, f"LoRA with name {name} does not exist. Loaded LoRAs: "
                                 f"dict_keys({list(self.loaded)!r})", self._names())
        self.pending_unloads.add(name)  # unregistered: no new request acquires it
        while any(r.lora_id == adapter["id"] for r in self.fake.running.values()):
            await asyncio.sleep(0.005)  # LoRARegistry.wait_for_unload
        del self.loaded[name]
        self.pending_unloads.discard(name)
        return _reply(True, None, self._names())

    # ---- generation

    async def resolve(self, lora_path, n_prompts: int, n: int) -> list[tuple[str | None, str | None]]:
        """Per request (index i*n + j): (lora_id, weights key) of the adapter it names (a string for all,
        or one per prompt); raises fake_sglang.BadRequest as SGLang's /generate answers."""
        BadRequest = self._m.BadRequest
        if lora_path is None:
            return [(None, None)] * (n_prompts * n)
        if isinstance(lora_path, str):
            lora_path = [lora_path] * n_prompts
        if not isinstance(lora_path, list) or len(lora_path) != n_prompts:
            raise BadRequest({"error": {"message": "lora_path should be a list or a string."}})
        names = [lora_path[k // n] for k in range(n_prompts * n)]
        if not self.enabled:
            first = next((a for a in names if a), None)
            raise BadRequest({"error": {"message": f"LoRA adapter '{first}' was requested, but LoRA is not "
                                                   "enabled. Please launch the server with --enable-lora flag and "
                                                   "preload adapters using --lora-paths or /load_lora_adapter "
                                                   "endpoint."}})
        for name in dict.fromkeys(n for n in names if n is not None):
            if name in self.loaded and name not in self.pending_unloads:
                continue
            if name not in self.ref_cache:
                raise BadRequest({"error": {"message": f"Got LoRA adapter that has never been loaded: {name}\n"
                                                       f"All loaded adapters: dict_keys({list(self.ref_cache)!r})."}})
            status, reply = await self.h_load({"lora_name": name, "lora_path": self.ref_cache[name]})
            if status != 200 and "already loaded" not in reply["error_message"]:
                raise BadRequest({"error": {"message": f"Failed to implicitly load LoRA adapter {name}: "
                                                       f"{reply['error_message']}"}})
        return [(self.loaded[n]["id"], self.loaded[n]["key"]) if n else (None, None) for n in names]
