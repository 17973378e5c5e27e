"""The experiment config's sections: what each key means, its default and its range, declared once.

Every section is a `policies.settings.Checked` dataclass; the sections of the math (`ppo`, `sft`,
`eval`, `reward`, `sim`) are declared beside their code in `policies` and nested here. Reading YAML
and overrides is `launcher.config.yaml_io`; checks that need the file system are `check_trainable`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from actors.protocol import ROLES, SCALABLE_ROLES
from bus.broker import is_loopback_host
from policies.cost_model import CostModel
from policies.data.prompts import DIRECTIVE
from policies.infer.evaluate import EvalConfig
from policies.model.lora import LoraSettings
from policies.settings import (Checked, ConfigError, FieldError, at_least_one, non_negative, opt, positive,
                               to_dict, unit_interval)
from policies.train.ppo import PPOConfig, SFTConfig
from policies.verify.reward import RewardConfig


@dataclass
class ModelConfig(Checked):
    path: str = opt("smollm2", check=bool, expect="(non-empty)",
                    doc='"smollm2", "tiny", or a Hugging Face model directory')
    dtype: Literal["float32", "bfloat16", "auto"] = opt(
        "float32", doc="the learner's weights (its optimizer state follows); auto = bfloat16 where it is native")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", doc="auto = cuda when present")
    lora: LoraSettings | None = opt(None, doc="{r, alpha, target_modules, dropout}: train a LoRA adapter "
                                              "(PEFT) instead of every weight; null = full fine-tuning")


def _key_or_none(v) -> bool: return v is None or (isinstance(v, str) and bool(v.strip()))


@dataclass
class DataConfig(Checked):
    train: str | None = opt(None, doc="problems: JSONL, .json, .parquet, .arrow or a save_to_disk directory; "
                                      "required to train")
    test: str | None = None
    prompt_directive: str = DIRECTIVE
    skip_malformed: bool = False
    max_prompt_tokens: int = opt(1024, check=at_least_one, expect=">= 1")
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

    def layout(self):
        """How rows of the data files are read (policies.data.dataset.Layout)."""
        from policies.data.dataset import Layout
        return Layout(prompt_key=self.prompt_key, answer_key=self.answer_key, id_key=self.id_key,
                      answer_format=self.answer_format, split=self.split)


@dataclass
class RolloutConfig(Checked):
    batch_prompts: int = opt(8, check=at_least_one, expect=">= 1")
    group_size: int = opt(4, check=at_least_one, expect=">= 1")
    max_new_tokens: int = opt(256, check=at_least_one, expect=">= 1")
    temperature: float = opt(1.0, check=positive, expect="> 0")
    top_p: float = opt(1.0, check=unit_interval, expect="in (0, 1]")
    max_staleness: int = opt(0, check=non_negative, expect=">= 0")
    force_newline: bool = False
    drop_uniform_groups: bool = False
    request_timeout: float = opt(600.0, check=positive, expect="> 0 (seconds)",
                                 doc="a prompt held longer (generating or being scored) is dealt again; a "
                                     "generator gives a group up after as long (its generate timeout)")
    interrupt_on_update: bool = opt(
        True, doc="with max_staleness > 0 a weight update reaches generators mid-sequence. true: running "
                  "sequences continue under the new weights at once, their KV cache recomputed (prompt + tokens "
                  "so far; SGLang: aborted and resubmitted), later tokens carry the new version; false: the update "
                  "waits until they end (no new group starts meanwhile), so no sequence mixes versions")
    dynamic_sampling: bool | None = opt(
        None, doc="DAPO's dynamic sampling: a group whose rewards are all equal is dropped (counted in "
                  "groups_dropped) and another prompt is dealt in its place until the batch is full; null = "
                  "ppo.recipe's (dapo: true)")
    dynamic_sampling_max_rounds: int = opt(
        10, check=at_least_one, expect=">= 1",
        doc="at most this many times batch_prompts prompts are dealt for one step; past it the step trains on "
            "what it kept (verl's max_num_gen_batches)")
    workflow: str | None = opt(
        None, check=lambda v: v is None or (":" in v and bool(v.rpartition(":")[2])),
        expect="'package.module:function' or 'path/to/file.py:function'",
        doc="an async def workflow(problem: dict, client: openai.AsyncOpenAI) -> float | None run by rollout "
            "workers (actors.rollout) for each of the G samples, in a session of its own on a generator; it returns "
            "the reward, or None for the verifier to score the last assistant text. null = the single-turn path "
            "(actors.rollout.builtin:boba is the same recipe as a workflow)")
    max_turns: int = opt(8, check=at_least_one, expect=">= 1", doc="a workflow's model calls per session, at most")
    max_trajectory_tokens: int = opt(
        4096, check=at_least_one, expect=">= 1",
        doc="tokens a workflow's session may sample in all its turns (prompts and tool output not counted)")
    workflow_timeout: float = opt(
        300.0, check=positive, expect="> 0 (seconds)",
        doc="one sample's deadline: a workflow past it fails that sample (its worker process is killed if it "
            "does not give way), never the job")


@dataclass
class TrainConfig(Checked):
    steps: int = opt(10, check=at_least_one, expect=">= 1")
    checkpoint_every: int = opt(5, check=non_negative, expect=">= 0 (0 = only at the end)")
    keep_checkpoints: int = opt(2, check=at_least_one, expect=">= 1")
    on_learner_death: Literal["stop", "restart"] = "stop"
    step_timeout: float = opt(3600.0, check=non_negative, expect=">= 0 (0 = off)",
                              doc="seconds without a learner step before the run stops naming the stage that "
                                  "has not moved; the limit is max(this, 5x the slowest step so far), armed "
                                  "once an actor of every role is registered (step 0 and every restart or "
                                  "--resume are watched too); 0 = off")


@dataclass
class RoleConfig(Checked):
    count: int = opt(1, check=at_least_one, expect=">= 1")
    hosts: list[str] | None = opt(None, doc="host names from the hostfile; null = localhost")


@dataclass
class GeneratorConfig(RoleConfig):
    backend: Literal["torch", "sglang", "sim"] = opt(
        "torch", doc="sim: simulated compute (the sim.* cost model), for scale runs of the real control plane")
    per_process: int = opt(1, check=at_least_one, expect=">= 1",
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
    sglang_tp_size: int = opt(1, check=at_least_one, expect=">= 1")
    sglang_health_timeout: float = opt(600.0, check=positive, expect="> 0 (seconds)",
                                       doc="how long a launched server may take to answer /health")
    sglang_weights: Literal["distributed", "disk"] = opt(
        "distributed", doc="distributed: the learner broadcasts over torch.distributed (nccl on GPU, gloo on "
                           "CPU) into every server; disk: safetensors + /update_weights_from_disk")
    sglang_share_learner_gpu: bool = opt(
        False, doc="a GPU job may put one SGLang server (tp 1) on learner rank 0's GPU, e.g. on a one-GPU "
                   "machine; needs sglang_mem_fraction_static")
    sglang_mem_fraction_static: float | None = opt(
        None, check=lambda v: v is None or 0 < v < 1, expect="in (0, 1) or null",
        doc="SGLang's --mem-fraction-static: the share of its GPU's memory it takes; null = SGLang's default")
    openai_port: int = opt(0, check=lambda v: 0 <= v <= 65535, expect="in [0, 65535] (0 = pick a free port)",
                           doc="the port of each generator's OpenAI-compatible endpoint (multi-turn sessions of "
                               "rollout workers) on its host; a fixed port fits one generator per host")
    sglang_adapter_dir: str | None = opt(
        None, doc="a LoRA job's (model.lora): where each generator writes the adapters its server loads, in a "
                  "directory of its own; null = a temporary directory on the generator's host. A server at "
                  "sglang_url on another host needs a directory both see")
    sglang_master_address: str | None = opt(
        None, doc="the learner's address the servers reach for the weight-update rendezvous; null = its "
                  "address on the route to the first server")


@dataclass
class LearnerConfig(RoleConfig):
    ranks: int = opt(1, check=at_least_one, expect=">= 1",
                     doc="learner processes training one model as a torch.distributed group (FSDP2: gloo on "
                         "CPU, nccl on GPU); rank r runs on hosts[r % len(hosts)], in its host's next slot")
    dist_port: int = opt(0, check=lambda v: 0 <= v <= 65535, expect="in [0, 65535] (0 = pick a free port)",
                         doc="the learner group's rendezvous port on rank 0's host")
    collective_timeout: float = opt(300.0, check=positive, expect="> 0 (seconds)",
                                    doc="how long a learner rank waits in a collective (joining, sharing a "
                                        "batch, summing gradients) before it fails naming its rank")
    mode: Literal["train", "sim"] = opt("train", doc="sim: sleep the sim.* cost model's time instead of training "
                                                     "(needs actors.generator.backend: sim)")


@dataclass
class RolloutWorkerConfig(RoleConfig):
    workers: int = opt(2, check=at_least_one, expect=">= 1",
                       doc="processes per rollout worker that run the workflows (each runs many sessions on one "
                           "event loop)")
    memory_limit_mb: int | None = opt(4096, check=lambda v: v is None or v >= 64, expect=">= 64 or null",
                                      doc="address-space limit of each workflow process (like the verifier's)")


@dataclass
class ActorsConfig(Checked):
    """One entry per role of `actors.protocol.ROLES` (the broadcaster runs in the learner's process)."""
    sampler: RoleConfig = field(default_factory=RoleConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    verifier: RoleConfig = field(default_factory=RoleConfig)
    packer: RoleConfig = field(default_factory=RoleConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rollout: RolloutWorkerConfig = field(default_factory=RolloutWorkerConfig)  # placed only with rollout.workflow
    gpus_per_host: int | None = opt(None, check=lambda v: v is None or v >= 0, expect=">= 0 or null",
                                    doc="GPUs of each host without a hostfile gpus=; null = detected on this "
                                        "machine (CUDA_VISIBLE_DEVICES, nvidia-smi), a remote host's slots")

    def check(self) -> None:
        for role in ROLES:
            n = getattr(self, role).count
            if role not in SCALABLE_ROLES and n != 1:
                raise FieldError(f"{role}.count", "1 (only generator, verifier and rollout may run several)", n)
        if self.generator.per_process > 1 and self.generator.backend != "sim":
            raise FieldError("generator.per_process", "1 unless generator.backend is sim",
                             self.generator.per_process)
        if self.learner.mode == "sim" and self.generator.backend != "sim":
            raise FieldError("learner.mode", "'train' unless generator.backend is sim (its weights are "
                             "simulated)", self.learner.mode)
        g = self.generator
        if g.sglang_share_learner_gpu and g.sglang_mem_fraction_static is None:
            raise FieldError("generator.sglang_mem_fraction_static", "a fraction in (0, 1) (e.g. 0.5) when "
                             "generator.sglang_share_learner_gpu is true: the server and the learner share a GPU",
                             None)
        if self.learner.mode == "sim" and self.learner.ranks > 1:
            raise FieldError("learner.ranks", "1 with learner.mode sim (the simulated learner is one process)",
                             self.learner.ranks)

@dataclass
class BusConfig(Checked):
    host: str = opt("127.0.0.1", check=bool, expect="(non-empty)")
    port: int = opt(0, check=lambda v: 0 <= v <= 65535, expect="in [0, 65535] (0 = pick a free port)")
    heartbeat_interval: float = opt(1.0, check=positive, expect="> 0 (seconds)")
    heartbeat_liveness: int = opt(3, check=at_least_one, expect=">= 1")
    keys_dir: str | None = opt(None, doc="CurveZMQ keys; null = no encryption")
    max_message_bytes: int = opt(16 * 1024 * 1024, check=lambda v: v >= 1024, expect=">= 1024")
    stats_every: float = opt(0.0, check=non_negative, expect=">= 0 (seconds, 0 = never)",
                             doc="the broker logs its message counters this often (bench/scale.py reads them)")


@dataclass
class TensorsConfig(Checked):
    bind: str | None = opt(None, check=lambda v: v is None or bool(v), expect="an interface address or null",
                           doc="interface of the zmq tensor sockets; null = the host's address on the route "
                               "to bus.host (also the address peers dial)")
    max_frame_bytes: int = opt(4 << 30, check=lambda v: v >= 1024, expect=">= 1024")


@dataclass
class VerifierConfig(Checked):
    workers: int = opt(2, check=at_least_one, expect=">= 1")
    timeout: float = opt(5.0, check=positive, expect="> 0 (seconds)")


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
            "config": to_dict(cfg)}


@dataclass
class ExperimentConfig(Checked):
    name: str = opt("exp", check=lambda v: bool(re.fullmatch(r"[A-Za-z0-9._-]+", v)),
                    expect="made of letters, digits, '.', '_', '-'")
    run_dir: str | None = opt(None, doc='default "runs/<name>"')
    seed: int = opt(1, doc="seeds data order, sampling and model init")
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

    def check(self) -> None:
        if self.run_dir is None:
            self.run_dir = f"runs/{self.name}"
        self._fill_recipe()
        g = self.actors.generator
        if (not self.rollout.interrupt_on_update and g.backend == "sglang" and g.sglang_weights == "distributed"
                and self.model.lora is None):  # a LoRA job's adapters need no pause
            # SGLang's model_update_lock holds requests off one update call, and lets them in between the
            # buckets of a distributed update: only the pause keeps them out, and it interrupts them
            raise ConfigError("rollout.interrupt_on_update: false with actors.generator.backend sglang needs "
                              "actors.generator.sglang_weights disk (a distributed update pauses generation, "
                              "interrupting it), got distributed")
        r = self.rollout
        if r.workflow is not None and r.workflow_timeout >= r.request_timeout:
            raise ConfigError(f"rollout.workflow_timeout: expected less than rollout.request_timeout "
                              f"({r.request_timeout:g} s: the sampler deals a prompt held longer again), "
                              f"got {r.workflow_timeout:g}")
        if self.actors.learner.ranks > 1 and self.ppo.bf16 is True:
            raise ConfigError(RANKS_BF16.format(ranks=self.actors.learner.ranks, bf16=self.ppo.bf16))
        if self.tensors.bind is not None and not self.bus.keys_dir and not is_loopback_host(self.tensors.bind):
            raise ConfigError(f"tensors.bind: {self.tensors.bind!r} listens beyond loopback, and without bus.keys_dir "
                              "the tensor sockets would be plaintext and open to anyone who reaches them: set "
                              "bus.keys_dir (python -m launcher keys DIR) or bind tensors to 127.0.0.1")


    def _fill_recipe(self) -> None:
        """ppo.recipe's keys outside ppo (left null by the user), and the lengths they take from rollout.*."""
        import dataclasses
        from policies.train import recipes
        from policies.verify.reward import OverlongConfig
        recipe, r = self.ppo.recipe, self.rollout
        if r.dynamic_sampling is None:
            r.dynamic_sampling = recipes.dynamic_sampling(recipe)
        overlong = self.reward.overlong
        if overlong is None:
            buffer = recipes.overlong_buffer(recipe, r.max_new_tokens)
            if not buffer:
                return self._fill_loss_agg_norm()
            overlong = OverlongConfig(buffer=buffer)
        if overlong.max_len is None:
            if overlong.buffer > r.max_new_tokens:
                raise ConfigError(f"reward.overlong.buffer: expected at most rollout.max_new_tokens "
                                  f"({r.max_new_tokens}), got {overlong.buffer}")
            overlong = dataclasses.replace(overlong, max_len=r.max_new_tokens)
        self.reward = dataclasses.replace(self.reward, overlong=overlong)
        self._fill_loss_agg_norm()

    def _fill_loss_agg_norm(self) -> None:
        if self.ppo.loss_agg == "seq_mean_token_sum_norm" and self.ppo.loss_agg_norm is None:
            self.ppo.loss_agg_norm = self.rollout.max_new_tokens


def describe_recipe(cfg: ExperimentConfig) -> str:
    """The recipe's effective values in one line (printed at start: a preset sets keys the user did not)."""
    ppo = cfg.ppo.effective()
    name = ppo.pop("recipe")
    o = cfg.reward.overlong
    parts = [f"{k}={v}" for k, v in ppo.items()]
    parts.append(f"dynamic_sampling={str(cfg.rollout.dynamic_sampling).lower()}")
    parts.append(f"overlong={'off' if o is None or not o.buffer else f'last {o.buffer} of {o.max_len} tokens'}")
    return f"{name} ({', '.join(parts)})"


def max_refills(cfg: ExperimentConfig) -> int:
    """Prompts dealt per step in place of zero-variance groups (rollout.dynamic_sampling), at most."""
    if not cfg.rollout.dynamic_sampling:
        return 0
    return (cfg.rollout.dynamic_sampling_max_rounds - 1) * cfg.rollout.batch_prompts


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
    check_workflow(cfg)
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


def check_workflow(cfg: ExperimentConfig) -> None:
    """rollout.workflow imports and is an async function of (problem, client); raises `ConfigError`."""
    if cfg.rollout.workflow is None:
        return
    from actors.rollout.workflow import WorkflowError, load_workflow
    try:
        load_workflow(cfg.rollout.workflow)
    except WorkflowError as e:
        raise ConfigError(f"rollout.workflow: {e}") from None


def describe_mode(cfg: ExperimentConfig) -> str:
    """The effective asynchrony mode in words (printed at start: users confuse the settings)."""
    k = cfg.rollout.max_staleness
    return f"synchronous (max_staleness={k})" if k == 0 else f"asynchronous (max_staleness={k})"
