"""Which floating-point precision to compute in, decided by the hardware at hand.

bf16 halves the bytes every matmul reads and, where the hardware has bf16 units (CUDA GPUs, CPUs with
AMX or AVX512-BF16), runs 3-6x faster than fp32. Where it has none (AVX2 CPUs, e.g. AMD EPYC Milan)
oneDNN emulates it and a SmolLM2-sized matmul runs ~6x *slower* than fp32 (17 vs 105 GFLOPS on two
EPYC cores). So every precision setting takes "auto": bf16 where it is native, fp32 elsewhere.
"""
from __future__ import annotations

import torch

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bf16_is_fast(device: str | torch.device) -> bool:
    """True where bf16 matmuls run on bf16 hardware rather than emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """"float32" | "bfloat16" | "auto" -> the dtype to load weights in on `device`."""
    if name == AUTO:
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: must be one of {', '.join(map(repr, [*DTYPES, AUTO]))}")
    return DTYPES[name]


def is_bool_or_auto(value) -> bool:
    """True, False or "auto" (not 1, not "true"): a switch that "auto" leaves to what is at hand."""
    return isinstance(value, bool) or value == AUTO


def resolve_bf16(setting: bool | str, device: str | torch.device) -> bool:
    """A bf16-training setting (True, False or "auto") -> whether to train in bf16 on `device`."""
    if not is_bool_or_auto(setting):
        raise ValueError(f"bf16={setting!r}: must be true, false or {AUTO!r}")
    return bf16_is_fast(device) if setting == AUTO else setting
