"""Where a run starts: its directory, its base model as a directory every process loads, and the step
(0, or with --resume the newest whole checkpoint's) that every actor of the job starts from."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from actors.learner import checkpoint
from launcher.config.schema import ExperimentConfig

log = logging.getLogger("launcher.job.start")


@dataclass
class Start:
    """Where a (possibly resumed) run starts: one step number for every actor, one set of weights."""
    step: int
    model_path: str
    checkpoint: str | None = None


def run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run_dir or f"runs/{cfg.name}")


def base_model_path(cfg: ExperimentConfig, *, create: bool = True) -> str:
    """The base model as a directory every process can load, made once by the launcher
    (``create=False``: only where it will be, e.g. for --dry-run)."""
    from policies.model.loading import SMOLLM2_NAME, cache_root, save_checkpoint, smollm2_dir, tiny_model
    if cfg.model.path == "smollm2":
        return str(smollm2_dir()) if create else str(cache_root() / SMOLLM2_NAME)
    if cfg.model.path == "tiny":
        out = run_dir(cfg) / "base-model"
        if create and not (out / "config.json").exists():
            from policies.model.loading import load_tokenizer
            save_checkpoint(tiny_model(seed=cfg.seed), load_tokenizer(smollm2_dir()), out)
        return str(out)
    return cfg.model.path


def check_model_path(cfg: ExperimentConfig) -> None:
    """Fail before any process starts when model.path is not a model (ModelPathError names it)."""
    if cfg.model.path in ("smollm2", "tiny"):
        return
    from policies.infer.llama_infer import SUPPORTED_MODEL_TYPES
    from policies.model.loading import ModelPathError, check_causal_lm, check_model_dir
    path = Path(cfg.model.path).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelPathError(f"model.path: GGUF file {str(path)!r} does not exist")
        return
    try:
        check_model_dir(path)
        model_type = check_causal_lm(path)
    except ModelPathError as exc:
        raise ModelPathError(f"model.path: {exc}") from None
    if model_type not in SUPPORTED_MODEL_TYPES and cfg.actors.generator.backend == "torch":
        log.warning("model.path: model_type %r generates on HF's forward, slower than the torch engine "
                    "(which runs %s)", model_type, ", ".join(SUPPORTED_MODEL_TYPES))
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelPathError(f"model.path: {str(path)!r} has no tokenizer (missing tokenizer.json)")


def resolve_start(cfg: ExperimentConfig, resume: bool) -> Start:
    """Step 0, or with ``resume`` the newest checkpoint that is whole (a damaged one is skipped, named).

    Raises CheckpointError when there are checkpoints but none is usable: starting over from step 0
    would silently throw the run's progress away.
    """
    if resume:
        found = checkpoint.list_checkpoints(run_dir(cfg))
        damaged = []
        for ckpt in reversed(found):
            try:
                state = checkpoint.verify(ckpt)
            except checkpoint.CheckpointError as exc:
                log.warning("--resume: skipping a damaged checkpoint: %s", exc)
                damaged.append(str(exc))
                continue
            if damaged:
                log.warning("--resume: falling back to %s", ckpt)
            # a LoRA checkpoint holds the adapter only: every process loads the base (the learner adds the adapter)
            model = base_model_path(cfg) if state.get("lora") else str(ckpt / "model")
            return Start(int(state["step"]), model, str(ckpt))
        if damaged:
            raise checkpoint.CheckpointError("--resume: no usable checkpoint under "
                                             f"{run_dir(cfg) / 'checkpoints'}: " + "; ".join(damaged))
        log.warning("--resume: no checkpoint under %s, starting from step 0", run_dir(cfg))
    return Start(0, base_model_path(cfg))
