from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from launcher.config import (ConfigError, ExperimentConfig, check_trainable, config_to_yaml, describe_mode,
                             dump_config, load_config)
from launcher.config.printer import main
from launcher.config.yaml_io import apply_override
from policies.settings import from_dict

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


# --- the generic converter ----------------------------------------------------------------

@dataclass
class Inner:
    x: int = 0


@dataclass
class Sample:
    flag: bool = False
    n: int = 1
    f: float = 1.0
    s: str = "a"
    opt: int | None = None
    mode: Literal["a", "b"] = "a"
    num: Literal[1, 2] = 1
    items: list[int] = field(default_factory=list)
    pair: tuple[int, str] = (0, "z")
    many: tuple[float, ...] = ()
    table: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    either: int | str = 0


@dataclass
class Required:
    must: str


def test_from_dict_converts_every_kind():
    got = from_dict(Sample, {
        "flag": True, "n": 3, "f": 2, "s": "x", "opt": 4, "mode": "b", "num": 2, "items": [1, 2],
        "pair": [5, "y"], "many": [1, 2.5], "table": {"k": 3}, "inner": {"x": 7}, "either": "w"})
    assert got == Sample(True, 3, 2.0, "x", 4, "b", 2, [1, 2], (5, "y"), (1.0, 2.5), {"k": 3.0}, Inner(7), "w")
    assert isinstance(got.f, float) and isinstance(got.table["k"], float)
    assert from_dict(Sample, {"opt": None}).opt is None
    assert from_dict(Sample, {}) == Sample()


@pytest.mark.parametrize("data, message", [
    ({"flag": 1}, "flag: expected true or false, got 1"),
    ({"flag": "yes"}, "flag: expected true or false, got 'yes'"),
    ({"n": True}, "n: expected an integer, got True"),
    ({"n": 1.5}, "n: expected an integer, got 1.5"),
    ({"f": "abc"}, "f: expected a number, got 'abc'"),
    ({"f": False}, "f: expected a number, got False"),
    ({"s": 3}, "s: expected a string, got 3"),
    ({"opt": "x"}, "opt: expected an integer or null, got 'x'"),
    ({"mode": "c"}, "mode: expected one of 'a', 'b', got 'c'"),
    ({"num": True}, "num: expected one of 1, 2, got True"),
    ({"num": 1.0}, "num: expected one of 1, 2, got 1.0"),
    ({"items": [1, "2"]}, "items[1]: expected an integer, got '2'"),
    ({"items": 5}, "items: expected a list of integers, got 5"),
    ({"pair": [1]}, "pair: expected a list of 2 items (an integer, a string), got [1]"),
    ({"pair": ["1", "y"]}, "pair[0]: expected an integer, got '1'"),
    ({"many": [1, None]}, "many[1]: expected a number, got None"),
    ({"table": {"k": "v"}}, "table.k: expected a number, got 'v'"),
    ({"inner": {"x": "1"}}, "inner.x: expected an integer, got '1'"),
    ({"inner": 3}, "inner: expected a mapping (Inner), got 3"),
    ({"inner": {"y": 1}}, "inner.y: unknown key"),
    ({"either": 1.5}, "either: expected an integer or a string, got 1.5"),
    ({"nn": 1}, "nn: unknown key; did you mean 'top.n'?"),
])
def test_from_dict_errors_name_key_expected_and_given(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Sample, data, "top")
    assert str(e.value).startswith("top." + message)


def test_missing_required_field_and_top_level_type():
    with pytest.raises(ConfigError, match=r"^must: required, expected a string$"):
        from_dict(Required, {})
    with pytest.raises(ConfigError, match=r"expected a mapping \(Required\), got \[1\]"):
        from_dict(Required, [1])


# --- the experiment config -------------------------------------------------------------------

@pytest.mark.parametrize("yaml_text, message", [
    ("ppo:\n  lr: abc\n", "ppo.lr: expected a number > 0, got 'abc'"),
    ("ppo:\n  lr: -1\n", "ppo.lr: expected a number > 0, got -1.0"),
    ("ppo:\n  kl_estimator: k2\n", "ppo.kl_estimator: expected one of 'k1', 'k3', got 'k2'"),
    ("ppo:\n  adam_betas: [0.9]\n", "ppo.adam_betas: expected a list of 2 items (a number, a number) in [0, 1), got [0.9]"),
    ("ppo:\n  minibatchs: 2\n", "ppo.minibatchs: unknown key; did you mean 'ppo.minibatches'?"),
    ("rollout:\n  group_sise: 2\n", "rollout.group_sise: unknown key; did you mean 'rollout.group_size'?"),
    ("rollout:\n  top_p: 1.5\n", "rollout.top_p: expected a number in (0, 1], got 1.5"),
    ("rollout:\n  top_p: abc\n", "rollout.top_p: expected a number in (0, 1], got 'abc'"),
    ("rollout:\n  max_staleness: -1\n", "rollout.max_staleness: expected an integer >= 0, got -1"),
    ("rollout:\n  group_size: 0\n", "rollout.group_size: expected an integer >= 1, got 0"),
    ("rollout:\n  force_newline: 1\n", "rollout.force_newline: expected true or false, got 1"),
    ("rollout:\n  force_newline: 'yes'\n", "rollout.force_newline: expected true or false, got 'yes'"),
    ("rollout:\n  batch_prompts: true\n", "rollout.batch_prompts: expected an integer >= 1, got True"),
    ("rollout:\n  batch_prompts: 2.0\n", "rollout.batch_prompts: expected an integer >= 1, got 2.0"),
    ("model:\n  dtype: float16\n", "model.dtype: expected one of 'float32', 'bfloat16', 'auto', got 'float16'"),
    ("model:\n  device: gpu\n", "model.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'"),
    ("train:\n  on_learner_death: retry\n", "train.on_learner_death: expected one of 'stop', 'restart', got 'retry'"),
    ("actors:\n  learner:\n    count: 2\n",
     "actors.learner.count: expected 1 (only generator, verifier and rollout may run several), got 2"),
    ("actors:\n  learner:\n    ranks: 0\n", "actors.learner.ranks: expected an integer >= 1, got 0"),
    ("actors:\n  learner:\n    ranks: two\n", "actors.learner.ranks: expected an integer >= 1, got 'two'"),
    ("actors:\n  learner:\n    dist_port: 70000\n",
     "actors.learner.dist_port: expected an integer in [0, 65535] (0 = pick a free port), got 70000"),
    ("actors:\n  learner:\n    collective_timeout: 0\n",
     "actors.learner.collective_timeout: expected a number > 0 (seconds), got 0.0"),
    ("actors:\n  learner:\n    ranks: 2\nppo:\n  bf16: true\n",
     "actors.learner.ranks: 2 learner ranks train in fp32 only, but ppo.bf16 is True"),
    ("actors:\n  generator:\n    backend: vllm\n",
     "actors.generator.backend: expected one of 'torch', 'sglang', 'sim', got 'vllm'"),
    ("actors:\n  generator:\n    dtype: fp16\n",
     "actors.generator.dtype: expected one of 'float32', 'bfloat16', 'auto' or null, got 'fp16'"),
    ("eval:\n  dtype: half\n", "eval.dtype: expected one of 'float32', 'bfloat16', 'auto', got 'half'"),
    ("sft:\n  epochs: 0\n", "sft.epochs: expected an integer >= 1, got 0"),
    ("ppo:\n  bf16: fast\n", "ppo.bf16: expected true or false or one of 'auto', got 'fast'"),
    ("sft:\n  bf16: 1\n", "sft.bf16: expected true or false or one of 'auto', got 1"),
    ("ppo:\n  recompute_logprobs: sometimes\n",
     "ppo.recompute_logprobs: expected true or false or one of 'auto', got 'sometimes'"),
    ("actors:\n  generator:\n    hosts: node-1\n",
     "actors.generator.hosts: expected a list of strings or null, got 'node-1'"),
    ("actors:\n  genrator:\n    count: 2\n", "actors.genrator: unknown key; did you mean 'actors.generator'?"),
    ("bus:\n  port: 70000\n", "bus.port: expected an integer in [0, 65535] (0 = pick a free port), got 70000"),
    ("name: 'a b'\n", "name: expected a string made of letters, digits, '.', '_', '-', got 'a b'"),
    ("eval:\n  k: 0\n", "eval.k: expected an integer >= 1, got 0"),
    ("verifier:\n  timeout: 0\n", "verifier.timeout: expected a number > 0 (seconds), got 0.0"),
    ("reward:\n  correct: .inf\n", "reward.correct: expected a number (finite), got inf"),
    ("reward:\n  wrong: 6\n", "reward.wrong: expected a number below correct (5.0), got 6.0"),
    ("reward:\n  wrong: '-5'\n", "reward.wrong: expected a number (finite), got '-5'"),
    ("zzz: 1\n", "zzz: unknown key; known keys: name, run_dir"),
])
def test_config_errors(tmp_path, yaml_text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, yaml_text))
    assert str(e.value).startswith(message), str(e.value)


def test_generator_dtype_defaults_to_the_model_dtype(tmp_path):
    import torch
    from launcher.job.compute import dtype_for
    cfg = load_config(write(tmp_path, "model: {dtype: bfloat16}\n"))
    assert dtype_for(cfg, "generator") == dtype_for(cfg, "learner") == torch.bfloat16
    cfg = load_config(write(tmp_path, "actors: {generator: {dtype: bfloat16}}\n"))
    assert (dtype_for(cfg, "generator"), dtype_for(cfg, "learner")) == (torch.bfloat16, torch.float32)


def test_auto_precision_is_bf16_exactly_where_bf16_is_native(tmp_path, monkeypatch):
    import torch
    from launcher.job.compute import dtype_for
    from policies.model import precision
    cfg = load_config(write(tmp_path, "model: {dtype: auto, device: cpu}\nppo: {bf16: auto}\n"))
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda device, native=native: native)
        assert dtype_for(cfg, "generator") == dtype_for(cfg, "learner") == dtype
        assert precision.resolve_bf16(cfg.ppo.bf16, "cpu") is native
    assert precision.resolve_dtype("float32", "cpu") == torch.float32  # explicit settings are kept as given
    assert precision.resolve_bf16(True, "cpu") is True


@pytest.mark.parametrize("yaml_text, recompute", [
    ("", False),                                                         # torch generator, fp32 both sides
    ("rollout: {max_staleness: 1}\n", True),                             # stale data: the decoupled objective
    ("actors: {generator: {backend: sglang}}\n", True),                  # another engine's kernels
    ("actors: {generator: {dtype: bfloat16}}\n", True),                  # bf16 sampling, fp32 learner
    ("ppo: {bf16: true}\n", True),                                       # fp32 sampling, bf16 learner
    ("ppo: {bf16: true, recompute_logprobs: false}\n", False),           # the user's word stands
    ("ppo: {recompute_logprobs: true}\n", True),
])
def test_the_learner_recomputes_logprobs_unless_the_generator_computed_them_its_way(tmp_path, yaml_text, recompute):
    from launcher.job.compute import learner_recomputes
    cfg = load_config(write(tmp_path, "model: {dtype: float32, device: cpu}\n" + yaml_text))
    got, why = learner_recomputes(cfg)
    assert got is recompute, why
    assert why


def test_auto_recompute_follows_auto_precision(tmp_path, monkeypatch):
    from launcher.job.compute import learner_recomputes
    from policies.model import precision
    cfg = load_config(write(tmp_path, "model: {dtype: auto, device: cpu}\nppo: {bf16: auto}\n"))
    for native in (True, False):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda device, native=native: native)
        assert learner_recomputes(cfg)[0] is native  # bf16 where native, and bf16 logprobs differ


def test_defaults_and_derived_run_dir():
    cfg = load_config()
    assert cfg.name == "exp" and cfg.run_dir == "runs/exp" and cfg.seed == 1
    assert cfg.model.path == "smollm2" and cfg.rollout.group_size == 4 and cfg.ppo.lr == 2e-5
    assert cfg.reward.correct == 5.0 and cfg.reward.wrong == -5.0
    assert cfg.actors.generator.backend == "torch" and cfg.actors.generator.sglang_args == []
    assert cfg.bus.max_message_bytes == 16 * 1024 * 1024
    assert load_config(overrides=["name=abc"]).run_dir == "runs/abc"


def test_scientific_notation_without_dot_is_a_float(tmp_path):
    # plain YAML 1.1 reads 2e-5 as a string; a config user means a number
    cfg = load_config(write(tmp_path, "ppo:\n  lr: 3e-5\n  adam_eps: 1E-8\n"))
    assert cfg.ppo.lr == 3e-5 and cfg.ppo.adam_eps == 1e-8


def test_yaml_problems_name_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml:3: duplicate key 'lr' \(first at line 2\)"):
        load_config(write(tmp_path, "ppo:\n  lr: 1.0\n  lr: 2.0\n"))
    with pytest.raises(ConfigError, match=r"exp\.yaml:2:\d+: invalid YAML: mapping values are not allowed"):
        load_config(write(tmp_path, "name: x\nppo: lr: 1\n"))
    with pytest.raises(ConfigError, match=r"expected a mapping of sections at the top level, got \[1, 2\]"):
        load_config(write(tmp_path, "[1, 2]\n"))
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")
    assert load_config(write(tmp_path, "# only a comment\n")) == load_config()


def test_overrides(tmp_path):
    p = write(tmp_path, "rollout:\n  group_size: 8\n")
    cfg = load_config(p, ["rollout.group_size=2", "ppo.adam_betas=[0.8, 0.9]", "data.test=null",
                          "actors.generator.hosts=[a, b]", "rollout.force_newline=true", "eval.top_p=0.95"])
    assert cfg.rollout.group_size == 2 and cfg.ppo.adam_betas == (0.8, 0.9)
    assert cfg.data.test is None and cfg.actors.generator.hosts == ["a", "b"]
    assert cfg.rollout.force_newline is True and cfg.eval.top_p == 0.95
    with pytest.raises(ConfigError, match=r"rollout\.max_stalenes: unknown key; did you mean 'rollout\.max_staleness'"):
        load_config(p, ["rollout.max_stalenes=1"])
    with pytest.raises(ConfigError, match=r"rollout\.group_size: expected an integer >= 1, got 'two'"):
        load_config(p, ["rollout.group_size=two"])
    for bad in ["rollout.group_size", "=3", "a..b=1"]:
        with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
            load_config(p, [bad])
    with pytest.raises(ConfigError, match=r"override 'seed\.x=1': seed is not a section"):
        apply_override({"seed": 3}, "seed.x=1")


def test_dump_round_trips_through_yaml(tmp_path):
    cfg = load_config(overrides=["name=rt", "rollout.max_staleness=2", "ppo.dual_clip=3",
                                 "actors.generator.count=3", "actors.generator.sglang_args=[--tp, '2']",
                                 "data.train=x.jsonl"])
    data = dump_config(cfg)
    assert data["ppo"]["adam_betas"] == [0.9, 0.999]           # tuples become YAML lists
    assert from_dict(ExperimentConfig, data) == cfg
    p = tmp_path / "dumped.yaml"
    p.write_text(config_to_yaml(cfg))
    assert load_config(p) == cfg


def leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_example_yaml_documents_every_key_and_tiny_yaml_loads():
    example = yaml.safe_load((REPO / "configs/example.yaml").read_text())
    assert leaves(example) == leaves(dump_config(load_config()))
    cfg = load_config(REPO / "configs/example.yaml")
    defaults = dump_config(load_config(overrides=["name=example", "data.train=data/arith/train.jsonl",
                                                  "data.test=data/arith/test.jsonl"]))
    assert dump_config(cfg) == defaults          # the documented values are the defaults
    tiny = load_config(REPO / "configs/tiny.yaml")
    assert tiny.model.path == "tiny" and tiny.rollout.max_new_tokens <= 32


def test_describe_mode():
    assert describe_mode(load_config()) == "synchronous (max_staleness=0)"
    assert describe_mode(load_config(overrides=["rollout.max_staleness=2"])) == "asynchronous (max_staleness=2)"


def test_check_trainable(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train: required to train"):
        check_trainable(load_config())
    with pytest.raises(ConfigError, match=r"data\.train: no such file"):
        check_trainable(load_config(overrides=[f"data.train={tmp_path}/missing.jsonl"]))
    (tmp_path / "t.jsonl").write_text("{}\n")
    check_trainable(load_config(overrides=[f"data.train={tmp_path}/t.jsonl"]))


def test_direct_construction_is_range_checked_too():
    from launcher.config.schema import FieldError, RolloutConfig
    with pytest.raises(FieldError, match=r"group_size: expected an integer >= 1, got 0"):
        RolloutConfig(group_size=0)


def test_cli_prints_effective_config(tmp_path, capsys):
    assert main([str(write(tmp_path, "name: cli\n")), "rollout.max_staleness=1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# mode: asynchronous (max_staleness=1)")
    assert yaml.safe_load(out)["name"] == "cli"
    assert main(["ppo.lr=abc"]) == 2
    assert "config error: ppo.lr: expected a number > 0, got 'abc'" in capsys.readouterr().err


def test_command_flags_are_the_config_fields_with_their_defaults():
    from launcher.__main__ import parser
    from policies.infer.evaluate import EvalConfig
    from policies.train.ppo import SFTConfig
    ev = parser("eval").parse_args(["eval", "--data", "d.jsonl"])
    assert EvalConfig(**{k: getattr(ev, k) for k in ("k", "temperature", "top_p", "max_new_tokens",
                                                       "force_newline", "dtype")}) == EvalConfig()
    assert (ev.answer_format, ev.split, ev.device, ev.seed) == ("raw", "train", "auto", 1)   # data.*, model.*, seed
    sft = parser("sft").parse_args(["sft", "--data", "d.jsonl", "--out", "o"])
    assert (sft.epochs, sft.lr, sft.batch_size, sft.bf16) == (SFTConfig().epochs, SFTConfig().lr,
                                                              SFTConfig().batch_size, SFTConfig().bf16)
    flt = parser("filter").parse_args(["filter", "--data", "d.jsonl", "--out", "o", "--temperature", "0.5"])
    assert (flt.k, flt.temperature) == (8, 0.5)    # the filter samples 8 per problem (the release's), not eval.k
    assert parser("eval").parse_args(["eval", "--data", "d", "--force-newline"]).force_newline is True


def test_settings_convert_and_check_direct_construction():
    from policies.settings import FieldError
    from policies.train.ppo import PPOConfig
    assert PPOConfig(lr=1).lr == 1.0 and isinstance(PPOConfig(lr=1).lr, float)
    for bad in ({"minibatches": 1.5}, {"compile": 1}, {"adam_betas": (0.9, 1.0)}, {"kl_estimator": "k2"}):
        with pytest.raises(FieldError, match=f"^{next(iter(bad))}: expected"):
            PPOConfig(**bad)
