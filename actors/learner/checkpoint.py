"""Training checkpoints: model (HF dir), optimizer, step, RNG, sampler position.

A LoRA run (model.lora) writes its adapter in PEFT's layout (adapter/: adapter_model.safetensors +
adapter_config.json naming the base, loadable with `PeftModel.from_pretrained(base, dir)`) in place of
model/, and state.json says `lora: true`: the base is the run's, unchanged.

A checkpoint directory is written under a temporary name and renamed into place only when complete,
so a crash mid-save leaves the previous checkpoint as the latest usable one. Saving a step that is
already on disk (keep 1: the only checkpoint there is) moves the old copy aside under a name of its
own (`step-N.old`, renamed, not removed) before the new one takes its place, so a kill between the two
renames leaves it, and `list_checkpoints` counts it as that step's checkpoint. state.json lists every
file's size and a digest of the model and optimizer state: `verify` finds a checkpoint that was
damaged on disk later (truncated, a file missing), and a resumed learner can prove it holds exactly
what was saved.

Resuming never unpickles: the run directory often sits on a shared filesystem, and a pickle there is
code anyone who can write the file runs in the learner.  optimizer.pt and rng.pt hold only tensors,
numbers, strings and lists (the RNG states are converted to those), so both load with
`torch.load(weights_only=True)`; a file that needs more (a checkpoint written before this format, or
a planted pickle) is refused with a CheckpointError naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from policies.model import lora
from policies.model.loading import save_checkpoint
from policies.train.optim import full_precision_state

_PREFIX = "step-"
_OLD = ".old"  # a step's last good copy while the same step is saved again


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """sha256 of the model's and the optimizer's state (tensors and hyper-parameters): equal iff they are."""
    h = hashlib.sha256()

    def feed(name: str, value) -> None:
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(f"{name}.{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{name}[{i}]", v)
        else:
            h.update(repr(value).encode())

    feed("model", model.state_dict())
    feed("optimizer", optimizer.state_dict())
    return h.hexdigest()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:06d}"


def save(run_dir: str | Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer,
         *, extra: dict | None = None, keep: int = 2) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter = lora.has_adapter(model)
    if adapter:
        _save_adapter(model, optimizer, tmp / "adapter")
    else:
        save_checkpoint(model, tokenizer, tmp / "model", state_dict=full_precision_state(model, optimizer))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    meta = {"step": step, "version": step, "sampler": {"next_batch": step},
            "digest": state_digest(model, optimizer), "files": files, **({"lora": True} if adapter else {}),
            **(extra or {})}
    _write_synced(tmp / "state.json", json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    old = final.with_name(final.name + _OLD)
    if final.exists():  # the same step again: its last good copy is moved aside, never removed first
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    for gone in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(gone, ignore_errors=True)
    for stale in final.parent.glob(f"{_PREFIX}*{_OLD}"):  # left by a save killed after its rename
        if stale.with_name(stale.name.removesuffix(_OLD)).exists():
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _save_adapter(model, optimizer, out: Path) -> None:
    """The adapter in PEFT's layout, in full precision (the optimizer's fp32 masters under bf16)."""
    full = full_precision_state(model, optimizer)
    state = lora.split_state(full)[1] if full is not None else lora.adapter_state(model)
    base = getattr(model.config, "_name_or_path", None) or None
    if base and Path(base).exists():  # a directory relative to the launch: absolute, for PEFT and `eval`
        base = str(Path(base).resolve())
    lora.save_adapter(out, state, lora.settings_of(model), base_model=base)


def restore_adapter(ckpt: Path, model) -> None:
    """A LoRA checkpoint's adapter into the `wrap`ped model (nothing for a full model's checkpoint)."""
    if not load_state(Path(ckpt)).get("lora"):
        return
    if not lora.has_adapter(model):
        raise CheckpointError(f"checkpoint {ckpt}: holds a LoRA adapter, but model.lora is not set")
    try:
        state, saved, _ = lora.load_adapter(Path(ckpt) / "adapter")
        if saved.r != lora.settings_of(model).r:
            raise lora.LoraError(f"its r is {saved.r}, model.lora.r is {lora.settings_of(model).r}")
        lora.set_adapter_state(model, state)
    except lora.LoraError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: adapter: {exc}") from None


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored).

    A step's copy moved aside (`step-N.old`) counts where a save died before its new copy took its
    place; it has no side effects, so a lister never races the learner's save."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = {}
    for p in root.iterdir():
        name = p.name.removesuffix(_OLD)
        if p.name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() and (p / "state.json").is_file():
            if p.name == name or name not in done:  # the step's own copy wins over the one moved aside
                done[name] = p
    return sorted(done.values(), key=lambda p: int(p.name.removesuffix(_OLD)[len(_PREFIX):]))


def latest(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: state.json is unreadable ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {ckpt}: state.json has no integer 'step'")
    return state


def verify(ckpt: Path) -> dict:
    """The checkpoint's state.json if every file is whole; else CheckpointError naming the file.

    Cheap (sizes and headers, no full read): it catches what a crash or a full disk does to files
    after the atomic rename, e.g. a truncated model.safetensors or optimizer.pt.
    """
    ckpt = Path(ckpt)
    state = load_state(ckpt)
    files = state.get("files")
    if isinstance(files, dict):  # checkpoints written since sizes were recorded
        for rel, size in files.items():
            path = ckpt / rel
            if not path.is_file():
                raise CheckpointError(f"checkpoint {ckpt}: {rel} is missing")
            actual = path.stat().st_size
            if actual != size:
                raise CheckpointError(f"checkpoint {ckpt}: {rel} is {actual} bytes, {size} were written "
                                      f"({'truncated' if actual < size else 'changed'} on disk)")
    weights = "adapter" if state.get("lora") else "model"
    first = f"adapter/{lora.ADAPTER_CONFIG}" if state.get("lora") else "model/config.json"
    for rel in (first, "optimizer.pt", "rng.pt"):
        if not (ckpt / rel).is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {rel} is missing")
    shards = sorted((ckpt / weights).glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {ckpt}: {weights}/ holds no .safetensors weights")
    for shard in shards:
        _check_safetensors(shard, ckpt)
    for rel in ("optimizer.pt", "rng.pt"):
        _check_torch_zip(ckpt / rel, ckpt)
    return state


def _check_safetensors(path: Path, ckpt: Path) -> None:
    """The header's tensor extents must end exactly at the end of the file."""
    where = f"checkpoint {ckpt}: {path.relative_to(ckpt)}"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise CheckpointError(f"{where} is truncated ({size} bytes, header says more)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{where} has an unreadable header ({exc})") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{where} is {size} bytes but its header describes {8 + n + end} (truncated?)")


def _check_torch_zip(path: Path, ckpt: Path) -> None:
    """torch.save writes a zip: a truncated one has lost its central directory at the end."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {path.name} is damaged or truncated ({exc})") from exc


_RNG_FORMAT = 2  # 1 (unversioned) pickled numpy's state tuple with its ndarray


def rng_state() -> dict:
    """The torch, numpy and python RNG states as tensors, numbers and lists (loadable weights_only)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "format": _RNG_FORMAT,
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
    }


def set_rng_state(rng: dict) -> None:
    n, p = rng["numpy"], rng["python"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def _load_tensors_only(path: Path):
    """torch.load without unpickling arbitrary objects; CheckpointError naming the file otherwise."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path.parent}: {path.name} holds pickled objects that are not plain tensors or "
            f"numbers, refused rather than executed (a checkpoint written by an older version, or a "
            f"tampered file): {str(exc).splitlines()[0]}"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is unreadable ({exc})") from exc


def restore_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(_load_tensors_only(Path(ckpt) / "optimizer.pt"))


def restore_rng(ckpt: Path) -> None:
    path = Path(ckpt) / "rng.pt"
    rng = _load_tensors_only(path)
    if not isinstance(rng, dict) or rng.get("format") != _RNG_FORMAT:
        raise CheckpointError(f"checkpoint {ckpt}: rng.pt is not an RNG state of format {_RNG_FORMAT}")
    set_rng_state(rng)
