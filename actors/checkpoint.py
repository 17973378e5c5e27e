"""Training checkpoints: model (HF dir), optimizer, step, RNG, sampler position.

A checkpoint directory is written under a temporary name and renamed into place only when complete,
so a crash mid-save leaves the previous checkpoint as the latest usable one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from policies.models import save_checkpoint

_PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:06d}"


def save(run_dir: str | Path, step: int, model, tokenizer, optimizer: torch.optim.Optimizer,
         *, extra: dict | None = None, keep: int = 2) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(model, tokenizer, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               tmp / "rng.pt")
    meta = {"step": step, "version": step, "sampler": {"next_batch": step}, **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and not p.name.endswith(".tmp")
            and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def latest(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {ckpt}: state.json is unreadable ({exc})") from exc


def restore_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))


def restore_rng(ckpt: Path) -> None:
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
