"""What the `eval`, `filter` and `sft` commands share: their model and data flags, and loading them.

The flags are derived from the config's own fields (`launcher.config.flags`), so `--answer-format`
means and defaults to what `data.answer_format` does. A bad flag, a missing file or a model that is
not one is a ValueError or OSError naming it, which `failed` prints as the command's one-line error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import torch

from launcher.config.flags import add_flags, settings_from
from launcher.config.schema import DataConfig, ModelConfig

LAYOUT_FLAGS = ("prompt_key", "answer_key", "id_key", "answer_format", "split")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny (a random tiny model: smoke runs) | an HF directory | a .gguf file")
    add_flags(p, ModelConfig, "device")


def add_problem_flags(p: argparse.ArgumentParser) -> None:
    """The data.* keys that say how rows are read and prompted (configs/example.yaml explains them)."""
    add_flags(p, DataConfig, *LAYOUT_FLAGS, "system_prompt")


def device(name: str) -> str:
    """auto = cuda when present."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    return name


def problems(args: argparse.Namespace):
    """--data read through the layout flags."""
    from policies.data.dataset import load_problems
    data = settings_from(args, DataConfig, *LAYOUT_FLAGS, "system_prompt")
    return load_problems(args.data, layout=data.layout())


def load_inputs(args: argparse.Namespace, read: Callable[[argparse.Namespace], Any], dtype: str = "float32"):
    """(model path, model, tokenizer, read(args)): the data is read before the model loads, so a bad
    file is named at once; raises ValueError / OSError naming the bad input."""
    from policies.model.loading import load_model, load_tokenizer, model_path
    from policies.model.precision import resolve_dtype
    path = model_path(args.model)
    data = read(args)
    on = device(args.device)
    model = load_model(path, dtype=resolve_dtype(dtype, on), device=on)
    return path, model, load_tokenizer(path), data


def failed(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2
