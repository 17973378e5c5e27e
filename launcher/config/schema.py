"""Experiment configuration: YAML in, validated dataclasses out.

Everything is checked once, here at the edge, so the actors can trust their config. Every bad value
is a `ConfigError` that names the dotted key, what was expected and what was given, e.g.
``rollout.top_p: expected a number in (0, 1], got 'abc'``; an unknown key names the closest known one.

`from_dict` is generic over dataclasses (nested dataclasses, Optional/unions, Literal, bool, int,
float, str, list[X], tuple[X, Y], tuple[X, ...], dict[str, X]). Range checks live in field metadata
(`check`, `expect`) and run in `__post_init__` (via `Checked`), so direct construction is checked too.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from policies.cost_model import CostModel
from policies.data.prompts import DIRECTIVE
from policies.train.ppo import PPOConfig, SFTConfig
from policies.verify.reward import RewardConfig

ROLES = ("sampler", "generator", "verifier", "packer", "learner", "broadcaster")
SCALABLE_ROLES = ("generator", "verifier")   # the only roles that may run more than one instance


class ConfigError(ValueError):
    """A bad configuration value; the message names the dotted key."""


class FieldError(ValueError):
    """Raised inside `__post_init__` for one field; `from_dict` prefixes the dotted path."""

    def __init__(self, key: str, expected: str, value: Any):
        self.key, self.expected, self.value = key, expected, value
        super().__init__(f"{key}: expected {expected}, got {value!r}")


# ----------------------------------------------------------------------------- field helpers

def opt(default: Any = dataclasses.MISSING, *, check: Callable[[Any], bool] | None = None,
        expect: str = "", factory: Callable[[], Any] | None = None, doc: str = "") -> Any:
    """A dataclass field with an optional range check; `expect` completes "expected <type> ...". """
    meta = {"check": check, "expect": expect, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v) -> bool: return v is None or v > 0
def _non_negative(v) -> bool: return v is None or v >= 0
def _at_least_one(v) -> bool: return v is None or v >= 1
def _unit_interval(v) -> bool: return v is None or 0 < v <= 1


class Checked:
    """Mixin: runs the metadata range checks of every field after construction."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not _safe(check, value):
                raise FieldError(f.name, _expected(hints[f.name], f), value)


def _safe(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except TypeError:       # a wrongly typed value built directly in Python, not through from_dict
        return False


# ----------------------------------------------------------------------------- generic conversion

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(tp: Any) -> str:
    """The expected type in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        s = " or ".join(parts)
        return s + " or null" if type(None) in args else s
    if origin is list:
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
    if origin is dict:
        return f"a mapping of {_plural(args[1])}" if args else "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(tp: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(tp, describe(tp))


def _expected(tp: Any, f: dataclasses.Field | None) -> str:
    extra = f.metadata.get("expect", "") if f is not None else ""
    return f"{describe(tp)} {extra}".strip()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# the messages of the policies.* configs' own checks, re-keyed with the dotted path
_POST_INIT_MSG = re.compile(r"^(\w+)=(.*?): (.*)$", re.S)          # "lr=-1.0: must be > 0"
_QUALIFIED_MSG = re.compile(r"^(\w+)\.(\w+) (.*)$", re.S)         # "RewardConfig.wrong must be ..."


def from_dict(cls: Any, data: Any, path: str = "") -> Any:
    """Convert plain data (from YAML) into `cls`, checking every value; raises `ConfigError`."""
    return _convert(cls, data, path, None)


def _fail(path: str, tp: Any, f: dataclasses.Field | None, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path or '<config>'}: expected {_expected(tp, f)}, got {value!r}")


def _convert(tp: Any, value: Any, path: str, f: dataclasses.Field | None, shown: Any = None) -> Any:
    """`shown` is the type named in an error (the whole union when converting one of its members)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    shown = tp if shown is None else shown
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            _fail(path, shown, f, value)
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _convert(members[0], value, path, f, shown)
        for a in members:
            try:
                return _convert(a, value, path, f)
            except ConfigError:
                pass
        _fail(path, shown, f, value)
    if origin is Literal:
        # type(...) is type(...) so that True does not pass for 1 nor 1 for 1.0
        if any(value == a and type(value) is type(a) for a in args):
            return value
        _fail(path, shown, f, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(path, shown, f, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(path, shown, f, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(path, shown, f, value)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(path, shown, f, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, shown, f, value)
        return [_convert(args[0] if args else Any, v, f"{path}[{i}]", None) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(path, shown, f, value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]", None) for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(path, shown, f, value)
        return tuple(_convert(a, v, f"{path}[{i}]", None) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, shown, f, value)
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            out[_convert(kt, k, path, None)] = _convert(vt, v, _join(path, str(k)), None)
        return out
    raise TypeError(f"{path}: unsupported config type {tp!r}")   # a programming error, not a user error


def _convert_dataclass(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}       # an empty YAML section ("ppo:") means all defaults
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<config>'}: expected {describe(cls)}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {_join(path, close[0])!r}?" if close else \
                f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{_join(path, str(key))}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name), f)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required, expected {_expected(hints[name], f)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except FieldError as e:
        raise ConfigError(f"{_join(path, e.key)}: expected {e.expected}, got {e.value!r}") from None
    except (ValueError, TypeError) as e:
        m = _POST_INIT_MSG.match(str(e))
        if m and m.group(1) in fields:     # policies.* style: "field=value: must be ..."
            key = m.group(1)
            raise ConfigError(f"{_join(path, key)}: {m.group(3)}, got {kwargs.get(key)!r}") from None
        m = _QUALIFIED_MSG.match(str(e))
        if m and m.group(1) == cls.__name__ and m.group(2) in fields:   # "RewardConfig.wrong must be ..."
            raise ConfigError(f"{_join(path, m.group(2))}: {m.group(3)}") from None
        msg = str(e).removeprefix(f"{cls.__name__}: ")
        raise ConfigError(f"{path or '<config>'}: {msg}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a config dataclass; tuples become lists for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- the experiment config

@dataclass
class ModelConfig(Checked):
    path: str = opt("smollm2", check=bool, expect="(non-empty)",
                    doc='"smollm2", "tiny", or a Hugging Face model directory')
    dtype: Literal["float32", "bfloat16", "auto"] = opt(
        "float32", doc="the learner's weights (its optimizer state follows); auto = bfloat16 where it is native")
    device: Literal["auto", "cpu", "cuda"] = "auto"


def _key_or_none(v) -> bool: return v is None or (isinstance(v, str) and bool(v.strip()))


@dataclass
class DataConfig(Checked):
    train: str | None = opt(None, doc="problems: JSONL, .json, .parquet, .arrow or a save_to_disk directory; "
                                      "required to train")
    test: str | None = None
    prompt_directive: str = DIRECTIVE
    skip_malformed: bool = False
    max_prompt_tokens: int = opt(1024, check=_at_least_one, expect=">= 1")
    prompt_key: str | None = opt(None, check=_key_or_none, expect="(a column name) or null",
                                 doc="the column holding the prompt; null = prompt / question / problem")
    answer_key: str | None = opt(None, check=_key_or_none, expect="(a column name) or null",
                                 doc="the column holding the reference answer; null = solutions / answer")
    id_key: str | None = opt(None, check=_key_or_none, expect="(a column name) or null",
                             doc="the column holding a unique id; null = query_id / id, else FILE:ROW")
    answer_format: Literal["raw", "boxed", "gsm8k"] = opt(
        "raw", doc="raw: as is; boxed: the last \\boxed{} (MATH solutions); gsm8k: the text after ####")
    split: str = opt("train", check=bool, expect="(non-empty)", doc="the split of a saved DatasetDict directory")
    system_prompt: str | None = opt(None, doc="a system turn before the problem in the chat template; null = none")


@dataclass
class RolloutConfig(Checked):
    batch_prompts: int = opt(8, check=_at_least_one, expect=">= 1")
    group_size: int = opt(4, check=_at_least_one, expect=">= 1")
    max_new_tokens: int = opt(256, check=_at_least_one, expect=">= 1")
    temperature: float = opt(1.0, check=_positive, expect="> 0")
    top_p: float = opt(1.0, check=_unit_interval, expect="in (0, 1]")
    max_staleness: int = opt(0, check=_non_negative, expect=">= 0")
    force_newline: bool = False
    drop_uniform_groups: bool = False
    request_timeout: float = opt(600.0, check=_positive, expect="> 0 (seconds)")
    interrupt_on_update: bool = opt(
        True, doc="with max_staleness > 0 a weight update reaches generators mid-sequence. true: running "
                  "sequences continue under the new weights at once, their KV cache recomputed (prompt + tokens "
                  "so far; SGLang: aborted and resubmitted), later tokens carry the new version; false: the update "
                  "waits until they end (no new group starts meanwhile), so no sequence mixes versions")


@dataclass
class TrainConfig(Checked):
    steps: int = opt(10, check=_at_least_one, expect=">= 1")
    checkpoint_every: int = opt(5, check=_non_negative, expect=">= 0 (0 = only at the end)")
    keep_checkpoints: int = opt(2, check=_at_least_one, expect=">= 1")
    on_learner_death: Literal["stop", "restart"] = "stop"
    step_timeout: float = opt(3600.0, check=_non_negative, expect=">= 0 (0 = off)",
                              doc="seconds without a learner step before the run stops naming the stage that "
                                  "has not moved; the limit is max(this, 5x the slowest step so far), armed "
                                  "after the job's first step; 0 = off")


@dataclass
class RoleConfig(Checked):
    count: int = opt(1, check=_at_least_one, expect=">= 1")
    hosts: list[str] | None = opt(None, doc="host names from the hostfile; null = localhost")


@dataclass
class GeneratorConfig(RoleConfig):
    backend: Literal["torch", "sglang", "sim"] = opt(
        "torch", doc="sim: simulated compute (the sim.* cost model), for scale runs of the real control plane")
    per_process: int = opt(1, check=_at_least_one, expect=">= 1",
                           doc="generators per process (sim only: hundreds do not fit a process each)")
    dtype: Literal["float32", "bfloat16", "auto"] | None = opt(
        None, doc="the torch generator's weights; null = model.dtype. bfloat16 is what SGLang serves and runs "
                  "~1.8x faster on CPUs with AMX / AVX512-BF16 (~6x slower on AVX2 CPUs, which emulate it); "
                  "auto = bfloat16 where it is native; updates are cast on arrival")
    sglang_url: str | None = opt(None, doc="an already running SGLang server; null = launch one")
    sglang_args: list[str] = opt(factory=list)
    sglang_command: list[str] | None = opt(
        None, doc="what starts a server, before --model-path; null = [this python, -m, sglang.launch_server]. "
                  "Point it at SGLang's own environment (./run.sh setup-sglang) since its pins differ from ours")
    sglang_tp_size: int = opt(1, check=_at_least_one, expect=">= 1")
    sglang_health_timeout: float = opt(600.0, check=_positive, expect="> 0 (seconds)",
                                       doc="how long a launched server may take to answer /health")
    sglang_weights: Literal["distributed", "disk"] = opt(
        "distributed", doc="distributed: the learner broadcasts over torch.distributed (nccl on GPU, gloo on "
                           "CPU) into every server; disk: safetensors + /update_weights_from_disk")
    sglang_master_address: str | None = opt(
        None, doc="the learner's address the servers reach for the weight-update rendezvous; null = its "
                  "address on the route to the first server")


@dataclass
class LearnerConfig(RoleConfig):
    ranks: int = opt(1, check=_at_least_one, expect=">= 1",
                     doc="learner processes training one model as a torch.distributed group (FSDP2: gloo on "
                         "CPU, nccl on GPU); rank r runs on hosts[r % len(hosts)], in its host's next slot")
    dist_port: int = opt(0, check=lambda v: 0 <= v <= 65535, expect="in [0, 65535] (0 = pick a free port)",
                         doc="the learner group's rendezvous port on rank 0's host")
    collective_timeout: float = opt(300.0, check=_positive, expect="> 0 (seconds)",
                                    doc="how long a learner rank waits in a collective (joining, sharing a "
                                        "batch, summing gradients) before it fails naming its rank")
    mode: Literal["train", "sim"] = opt("train", doc="sim: sleep the sim.* cost model's time instead of training "
                                                     "(needs actors.generator.backend: sim)")


@dataclass
class ActorsConfig:
    sampler: RoleConfig = field(default_factory=RoleConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    verifier: RoleConfig = field(default_factory=RoleConfig)
    packer: RoleConfig = field(default_factory=RoleConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    broadcaster: RoleConfig = field(default_factory=RoleConfig)

    def __post_init__(self) -> None:
        for role in ROLES:
            n = getattr(self, role).count
            if role not in SCALABLE_ROLES and n != 1:
                raise FieldError(f"{role}.count", "1 (only generator and verifier may run several)", n)
        if self.generator.per_process > 1 and self.generator.backend != "sim":
            raise FieldError("generator.per_process", "1 unless generator.backend is sim",
                             self.generator.per_process)
        if self.learner.mode == "sim" and self.generator.backend != "sim":
            raise FieldError("learner.mode", "'train' unless generator.backend is sim (its weights are "
                             "simulated)", self.learner.mode)
        if self.learner.mode == "sim" and self.learner.ranks > 1:
            raise FieldError("learner.ranks", "1 with learner.mode sim (the simulated learner is one process)",
                             self.learner.ranks)

    def role(self, name: str) -> RoleConfig:
        return getattr(self, name)


@dataclass
class BusConfig(Checked):
    host: str = opt("127.0.0.1", check=bool, expect="(non-empty)")
    port: int = opt(0, check=lambda v: 0 <= v <= 65535, expect="in [0, 65535] (0 = pick a free port)")
    heartbeat_interval: float = opt(1.0, check=_positive, expect="> 0 (seconds)")
    heartbeat_liveness: int = opt(3, check=_at_least_one, expect=">= 1")
    keys_dir: str | None = opt(None, doc="CurveZMQ keys; null = no encryption")
    max_message_bytes: int = opt(16 * 1024 * 1024, check=lambda v: v >= 1024, expect=">= 1024")
    stats_every: float = opt(0.0, check=_non_negative, expect=">= 0 (seconds, 0 = never)",
                             doc="the broker logs its message counters this often (bench/scale.py reads them)")


@dataclass
class TensorsConfig(Checked):
    bind: str | None = opt(None, check=lambda v: v is None or bool(v), expect="an interface address or null",
                           doc="interface of the zmq tensor sockets; null = the host's address on the route "
                               "to bus.host (also the address peers dial)")
    max_frame_bytes: int = opt(4 << 30, check=lambda v: v >= 1024, expect=">= 1024")


@dataclass
class VerifierConfig(Checked):
    workers: int = opt(2, check=_at_least_one, expect=">= 1")
    timeout: float = opt(5.0, check=_positive, expect="> 0 (seconds)")


@dataclass
class EvalConfig(Checked):
    k: int = opt(32, check=_at_least_one, expect=">= 1")
    temperature: float = opt(1.0, check=_positive, expect="> 0")
    top_p: float = opt(1.0, check=_unit_interval, expect="in (0, 1]")
    max_new_tokens: int = opt(512, check=_at_least_one, expect=">= 1")
    force_newline: bool = False
    dtype: Literal["float32", "bfloat16", "auto"] = opt(
        "float32", doc="the sampling model's weights; auto = bfloat16 where it is native")
    every: int = opt(0, check=_non_negative, expect=">= 0 (0 = never)",
                     doc="during an RL run, pass@1 on data.test every K steps, in the step's metrics")


@dataclass
class LoggingConfig(Checked):
    wandb: bool = opt(False, doc="also log each step's scalars to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = opt("boba-actors", check=bool, expect="(non-empty)")
    wandb_mode: Literal["online", "offline"] = opt("offline", doc="offline: written under RUN_DIR/wandb, no "
                                                              "network (`wandb sync` uploads it later)")


def wandb_options(cfg: "ExperimentConfig") -> dict | None:
    """launcher.job.metrics.MetricsWriter's `wandb` options from logging.*; None when off."""
    if not cfg.logging.wandb:
        return None
    return {"project": cfg.logging.wandb_project, "name": cfg.name, "mode": cfg.logging.wandb_mode,
            "config": dump_config(cfg)}


@dataclass
class ExperimentConfig(Checked):
    name: str = opt("exp", check=lambda v: bool(re.fullmatch(r"[A-Za-z0-9._-]+", v)),
                    expect="made of letters, digits, '.', '_', '-'")
    run_dir: str | None = opt(None, doc='default "runs/<name>"')
    seed: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)  # the main job's SFT stage
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    tensors: TensorsConfig = field(default_factory=TensorsConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sim: CostModel = field(default_factory=CostModel)  # simulated compute (generator backend / learner mode sim)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"
        g = self.actors.generator
        if not self.rollout.interrupt_on_update and g.backend == "sglang" and g.sglang_weights == "distributed":
            # SGLang's model_update_lock holds requests off one update call, and lets them in between the
            # buckets of a distributed update: only the pause keeps them out, and it interrupts them
            raise ConfigError("rollout.interrupt_on_update: false with actors.generator.backend sglang needs "
                              "actors.generator.sglang_weights disk (a distributed update pauses generation, "
                              "interrupting it), got distributed")
        if self.actors.learner.ranks > 1 and self.ppo.bf16 is True:
            raise ConfigError(RANKS_BF16.format(ranks=self.actors.learner.ranks, bf16=self.ppo.bf16))


# the bf16 path keeps fp32 masters of its own beside the model, which FSDP2 does not shard
RANKS_BF16 = ("actors.learner.ranks: {ranks} learner ranks train in fp32 only, but ppo.bf16 is {bf16} "
              "(set ppo.bf16: false)")


def check_trainable(cfg: ExperimentConfig) -> None:
    """What training needs beyond a well-formed config; raises `ConfigError`."""
    if cfg.data.train is None:
        raise ConfigError("data.train: required to train, expected a path to a JSONL of problems, got None")
    if not Path(cfg.data.train).exists():
        raise ConfigError(f"data.train: no such file {cfg.data.train!r}")
    if cfg.data.test is not None and not Path(cfg.data.test).exists():
        raise ConfigError(f"data.test: no such file {cfg.data.test!r}")
    if cfg.eval.every and cfg.data.test is None:
        raise ConfigError(f"eval.every: {cfg.eval.every} needs data.test (the problems to evaluate on), got None")
    check_reward_fns(cfg)
    if cfg.logging.wandb:
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb: true needs the wandb package, which is not installed (pip install wandb)")


def check_reward_fns(cfg: ExperimentConfig) -> None:
    """Every reward.fns[i].fn imports and takes (prompt, response, reference, extra); raises `ConfigError`."""
    from policies.verify.reward_fns import RewardFnError, load_reward_fn
    for i, f in enumerate(cfg.reward.fns):
        try:
            load_reward_fn(f.fn)
        except RewardFnError as e:
            raise ConfigError(f"reward.fns[{i}].fn: {e}") from None


def describe_mode(cfg: ExperimentConfig) -> str:
    """The effective asynchrony mode in words (printed at start: users confuse the settings)."""
    k = cfg.rollout.max_staleness
    return f"synchronous (max_staleness={k})" if k == 0 else f"asynchronous (max_staleness={k})"


# ----------------------------------------------------------------------------- YAML in and out

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 needs a dot) and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class _DuplicateKey(Exception):
    """Line and message; `parse_yaml` adds the source name."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(f"{key_node.start_mark.line + 1}: duplicate key {key!r} "
                                f"(first at line {seen[key] + 1})")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else None
    except _DuplicateKey as e:
        raise ConfigError(f"{source}:{e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is read as YAML (so 3, true, null, [a, b])."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    value = parse_yaml(raw, f"override {override!r}") if raw.strip() else None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Read the YAML at `path` (None = all defaults), apply the overrides, validate."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
        data = parse_yaml(text, str(p))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {data!r}")
    for o in overrides:
        apply_override(data, o)
    return from_dict(ExperimentConfig, data)


def dump_config(cfg: ExperimentConfig) -> dict:
    """Plain data that `from_dict(ExperimentConfig, ...)` turns back into an equal config."""
    return to_dict(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline ([0.9, 0.999]): reads like configs/example.yaml."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.dump(dump_config(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.config [config.yaml] [key=value ...]``: print the effective config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        cfg = load_config(path, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"# mode: {describe_mode(cfg)}")
    print(config_to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
