"""LoRA RL (`model.lora`): the learner trains a PEFT adapter, generators run base + adapter.

A LoRA run's learner model is the Hugging Face model with PEFT's LoRA layers injected in place
(`wrap`, through `get_peft_model`): the same module tree and forward, so packed logprobs, FSDP2 and
activation checkpointing see an ordinary model whose only trainable parameters are the adapter's.
What leaves the learner is `adapter_state(model)`: PEFT's own key names as
`get_peft_model_state_dict` gives them on a PeftModel
(``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), a few MB instead of the model;
`is_adapter_state` recognises such a dict, so a generator can tell an adapter update from full weights.
`save_adapter` writes PEFT's layout (adapter_model.safetensors + adapter_config.json), which
`PeftModel.from_pretrained(base, dir)` and SGLang's /load_lora_adapter load; `load_adapter` reads it.
`merged_weights` is the effective weights, base + (alpha / r) * B @ A per target, in the base's names:
what a generator without adapter kernels loads. Imports nothing of ours above policies.settings.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from policies.settings import Checked, opt

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model: PEFT's saved key names start so
_A, _B = ".lora_A.weight", ".lora_B.weight"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraError(ValueError):
    """A bad adapter or LoRA setting; the message names the key, file or tensor."""


def _names(v) -> bool: return len(v) > 0 and all(isinstance(s, str) and s.strip() for s in v)


@dataclass
class LoraSettings(Checked):
    """`model.lora`: absent (null) = full fine-tuning."""
    r: int = opt(16, check=lambda v: v >= 1, expect=">= 1", doc="the adapter's rank")
    alpha: float = opt(32.0, check=lambda v: v > 0, expect="> 0", doc="scale = alpha / r")
    target_modules: tuple[str, ...] = opt(ALL_LINEAR, check=_names, expect="(non-empty module names)",
                                          doc="linear layers (by their last name) that get an adapter")
    dropout: float = opt(0.0, check=lambda v: 0 <= v < 1, expect="in [0, 1)",
                         doc="on the adapter's input while training (>0 makes the learner's logprobs random)")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def peft_config(lora: LoraSettings, base_model: str | None = None):
    from peft import LoraConfig
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                      lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model)


# ----------------------------------------------------------------------------- the learner's model

def wrap(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Inject LoRA layers into `model` in place (PEFT's `get_peft_model`) and return it: every base
    weight frozen, only lora_A / lora_B train (B starts at zero, so the model's outputs are unchanged)."""
    from peft import get_peft_model
    try:
        get_peft_model(model, peft_config(lora))
    except ValueError as exc:
        raise LoraError(f"model.lora.target_modules: {list(lora.target_modules)}: {exc}") from None
    return model


def has_adapter(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and any(".lora_A." in n for n, _ in model.named_parameters())


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's saved names (detached, by reference; unsharded `model` only)."""
    from peft.utils import get_peft_model_state_dict
    state = get_peft_model_state_dict(model)  # a PeftModel's keys carry the prefix, its inner model's not
    return {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v.detach() for k, v in state.items()}


def set_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy an adapter (PEFT's saved names) into a `wrap`ped model's LoRA parameters, all or nothing."""
    params = dict(model.named_parameters())
    targets = {}
    for key, value in state.items():
        inner = key.removeprefix(PEFT_PREFIX)
        for part in (_A, _B):
            if inner.endswith(part):
                inner = inner[: -len(".weight")] + ".default.weight"
        p = params.get(inner)
        if p is None:
            raise LoraError(f"adapter tensor {key!r}: the model has no such LoRA parameter (another target_modules "
                            f"or model?)")
        if tuple(p.shape) != tuple(value.shape):
            raise LoraError(f"adapter tensor {key!r}: shape {tuple(value.shape)}, the model's is {tuple(p.shape)} "
                            f"(another r?)")
        targets[inner] = (p, value)
    missing = [n for n in params if ".lora_" in n and n not in targets]
    if missing:
        raise LoraError(f"adapter: no tensor for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for p, value in targets.values():
            p.copy_(value)


def settings_of(model: nn.Module) -> LoraSettings:
    """The LoraSettings a `wrap`ped model was made with."""
    c = model.peft_config["default"]
    targets = c.target_modules if isinstance(c.target_modules, str) else sorted(c.target_modules)
    return LoraSettings(r=c.r, alpha=float(c.lora_alpha), target_modules=tuple([targets] if isinstance(targets, str)
                                                                               else targets), dropout=c.lora_dropout)


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A `wrap`ped model's state dict -> (the plain model's weights under their own names, the adapter
    under PEFT's saved names)."""
    plain, adapter = {}, {}
    for name, t in state.items():
        if ".lora_" in name:
            adapter[PEFT_PREFIX + name.replace(".default.", ".")] = t
        else:
            plain[name.replace(".base_layer.", ".")] = t
    return plain, adapter


def effective_state(model: nn.Module) -> dict[str, Tensor]:
    """A `wrap`ped model's weights as the plain model's state dict (base + scale * B @ A merged)."""
    plain, adapter = split_state(model.state_dict())
    return {**plain, **merged_weights(plain, adapter, settings_of(model))}


# ----------------------------------------------------------------------------- adapters as data

def is_adapter_state(weights: dict) -> bool:
    """Whether a published weights dict is an adapter (`adapter_state`) rather than full weights."""
    return bool(weights) and all(k.startswith(PEFT_PREFIX) and (k.endswith(_A) or k.endswith(_B)) for k in weights)


def target_name(adapter_key: str) -> str:
    """The base weight an adapter tensor modifies: base_model.model.X.lora_A.weight -> X.weight."""
    inner = adapter_key.removeprefix(PEFT_PREFIX)
    for part in (_A, _B):
        if inner.endswith(part):
            return inner[: -len(part)] + ".weight"
    raise LoraError(f"adapter tensor {adapter_key!r}: not a lora_A / lora_B weight")


def target_weight_names(model: nn.Module, lora: LoraSettings) -> list[str]:
    """The plain model's weights that `lora.target_modules` name (PEFT's rule: the module's last name)."""
    wanted = set(lora.target_modules)
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted]
    if not names:
        raise LoraError(f"model.lora.target_modules: {list(lora.target_modules)} names no linear layer of the model")
    return names


def merged_weights(base_state: dict[str, Tensor], adapter: dict[str, Tensor], lora: LoraSettings) -> dict[str, Tensor]:
    """Per target weight of `adapter`: base + (alpha / r) * B @ A, computed in fp32, in the base's dtype
    and device. Only the targets: the other weights are the base's."""
    out = {}
    for key in adapter:
        if not key.endswith(_A):
            continue
        name, b_key = target_name(key), key[: -len(_A)] + _B
        if b_key not in adapter:
            raise LoraError(f"adapter: {key!r} has no {b_key!r}")
        if name not in base_state:
            raise LoraError(f"adapter tensor {key!r}: the base has no weight {name!r}")
        base = base_state[name]
        a, b = adapter[key].to(base.device, torch.float32), adapter[b_key].to(base.device, torch.float32)
        if a.shape[0] != lora.r:  # the scale is alpha / r: another r would scale it wrongly
            raise LoraError(f"adapter {key!r}: rank {a.shape[0]}, model.lora.r is {lora.r}")
        if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(base.shape):
            raise LoraError(f"adapter {key!r}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit {name!r} "
                            f"{tuple(base.shape)}")
        # one fused op (a tenth of the time of base + scale * (b @ a) on SmolLM2)
        out[name] = torch.addmm(base if base.dtype == torch.float32 else base.float(), b, a, alpha=lora.scale
                                ).to(base.dtype)
    if len(out) * 2 != len(adapter):
        raise LoraError(f"adapter: {len(adapter)} tensors are not lora_A / lora_B pairs")
    return out


class BaseCopy:
    """A copy of the base weights that `lora` targets (a generator's, taken before anything changes them):
    `merged(adapter)` is their effective weights under an adapter, in their dtype."""

    def __init__(self, model: nn.Module, lora: LoraSettings):
        targets = set(target_weight_names(model, lora))
        self.lora = lora
        self.base = {n: t.detach().clone() for n, t in model.state_dict().items() if n in targets}

    def merged(self, adapter: dict[str, Tensor]) -> dict[str, Tensor]:
        return merged_weights(self.base, adapter, self.lora)


# ----------------------------------------------------------------------------- PEFT's layout on disk

def save_adapter(out_dir: str | os.PathLike, state: dict[str, Tensor], lora_cfg: LoraSettings, *,
                 base_model: str | None = None) -> Path:
    """PEFT's layout in `out_dir` (adapter_model.safetensors + adapter_config.json), each file replaced
    atomically: a reader sees the old or the new file, never half of one."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    config = peft_config(lora_cfg, base_model).to_dict()
    config["peft_type"], config["task_type"] = "LORA", "CAUSAL_LM"
    for name, write in ((ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                        (ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(_plain(config), indent=2)))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return sorted(_plain(x) for x in v) if isinstance(v, (set, frozenset)) else [_plain(x) for x in v]
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], LoraSettings, str | None]:
    """(tensors, settings, base_model_name_or_path) of an adapter directory in PEFT's layout."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        state = load_file(path / ADAPTER_WEIGHTS)
    except (OSError, ValueError) as exc:
        raise LoraError(f"adapter {str(path)!r}: cannot read {ADAPTER_CONFIG} / {ADAPTER_WEIGHTS}: {exc}") from None
    if config.get("peft_type") not in ("LORA", None) or config.get("use_dora") or config.get("use_rslora"):
        raise LoraError(f"adapter {str(path)!r}: a plain LoRA adapter is expected (no DoRA / rsLoRA), got "
                        f"peft_type {config.get('peft_type')!r}")
    targets = config.get("target_modules")
    targets = sorted(targets) if isinstance(targets, (list, tuple)) else [targets]
    lora = LoraSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]), target_modules=tuple(targets),
                        dropout=float(config.get("lora_dropout") or 0.0))
    if not is_adapter_state(state):
        raise LoraError(f"adapter {str(path)!r}: {ADAPTER_WEIGHTS} holds tensors other than lora_A / lora_B")
    return state, lora, config.get("base_model_name_or_path")
