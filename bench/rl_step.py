"""Seconds per RL step on SmolLM2-135M-Instruct: this system vs a naive synchronous loop, same run.

One step = generate P prompts x G samples x N new tokens, score them with the boxed-answer verifier,
then one PPO training batch (`--minibatches` optimiser steps). Both sides sample at temperature 1 with
no top-k / top-p and exactly N tokens per sample (eos ignored), start from the same weights, use the
same rewards, AdamW settings, clipped token-level PPO loss and the same number of torch threads.

- baseline: HF `model.generate(do_sample=True, num_return_sequences=G, left padding, output_logits)`
  for the behaviour logprobs, then per minibatch an HF forward/backward on the padded [rows, W + N]
  batch with its attention mask, log_softmax over the full padded logits, optimiser step.
- ours (in-process): actors.rl_step.rl_step, what the actors run, back to back: policies.infer.sampling.GenerationEngine
  (KV cache, one prefill per group shared by its G samples) on the generator's own copy of the weights in
  `--gen-dtype` (auto by default: bf16, as SGLang serves, where the CPU has bf16 units, else fp32, where it shares
  the learner's module), the verifier's check, the packer's pack_step (no padding), the learner's recompute of the
  proximal logprobs where it makes one (bf16 on either side: actors.learner.recompute_needed),
  policies.train.ppo.train_step (packed micro-batches, chunked lm-head; bf16 weights and compute with fp32 master
  weights in AdamW where bf16 is native, unless --no-bf16; decoder layers and head math torch.compiled unless
  --no-compile, compiled during the warm-up), then the weight copy into the generator (what the broadcaster
  does), timed as part of the step.
- ours (system, `--system-steps S`, 0 = skip): the whole job through the launcher, six actors in
  their own processes; steady-state seconds per step from the metrics timestamps of steps 2..S
  (start-up left out, and the last step too where it wrote a final checkpoint), for each
  `--staleness` value (with staleness > 0 the generator and learner processes get --threads / 2
  threads each, as they compute at the same time). The launcher cannot ignore eos, so its samples
  may stop before N tokens: the last lines show its mean response length.

The baseline stays fp32 (a plain loop's default); `--gen-dtype float32 --no-bf16` gives the
same-precision comparison; `--no-compile` the eager one. The table also counts each side's matmul
work (linear layers and lm head, from the model's shapes and the tokens each side runs) and the rate
it ran at: the step ratio is the product of the two. Baseline and in-process runs alternate (`--repeats` each) so a shared
machine's contention hits both alike; the table shows medians. Learner tokens/s counts real
(non-pad) prompt + response tokens.

    .venv/bin/python bench/rl_step.py [--prompts 8 --samples 4 --new-tokens 64 --minibatches 4
                                       --repeats 2 --threads 2 --system-steps 4 --staleness 0 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cli import bench_parser  # noqa: E402
from policies.data.dataset import load_problems  # noqa: E402

from policies.data.prompts import build_prompt
from actors.learner.learner import recompute_needed  # noqa: E402
from actors.rl_step import rl_step  # noqa: E402
from launcher.mathdata import make_dataset  # noqa: E402
from launcher.job.metrics import read_metrics  # noqa: E402
from policies.model.loading import compile_layers, load_model, load_tokenizer, smollm2_dir  # noqa: E402
from policies.train.ppo import (PPOConfig, gather_sequences, make_optimizer, micro_batches,  # noqa: E402
                          split_minibatches)
from policies.model.precision import resolve_bf16, resolve_dtype  # noqa: E402
from policies.verify.reward import reward  # noqa: E402
from policies.infer.sampling import GenerationEngine, SamplingParams  # noqa: E402
from policies.model.shared_prompts import prompt_lengths, share_prompts  # noqa: E402
from policies.verify.verifier import is_correct  # noqa: E402

DIRECTIVE = "Please reason step by step, and enclose your final answer in \\boxed{}."


@dataclass
class StepTimes:
    gen_s: float
    score_s: float  # verifier (+ baseline: behaviour logprobs from the generate logits; ours: packing)
    train_s: float
    gen_tokens: int
    train_tokens: int  # real prompt + response tokens the learner saw
    reward_mean: float
    tflop: float  # matmul work of the step's linear layers and lm head (see linear_flops)

    @property
    def total_s(self) -> float:
        return self.gen_s + self.score_s + self.train_s


def rewards_for(texts: list[str], answers: list[list[str]]) -> list[float]:
    return [reward(is_correct(t, a)) for t, a in zip(texts, answers)]


def linear_flops(model) -> tuple[int, int]:
    """Multiply-add flops per token of the decoder layers' linear weights and of the lm head.
    Attention scores and elementwise work are left out: a few percent here."""
    layers = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return 2 * layers, 2 * model.lm_head.weight.numel()


def step_tflop(model, gen_layer_tokens: int, gen_head_rows: int, learn_layer_tokens: int,
               learn_head_rows: int, learn_forwards: int = 3) -> float:
    """Generation is forward only; training is forward + backward (3 forwards' worth), plus one
    forward where the learner recomputes the proximal logprobs."""
    body, head = linear_flops(model)
    return (gen_layer_tokens * body + gen_head_rows * head
            + learn_forwards * (learn_layer_tokens * body + learn_head_rows * head)) / 1e12


def learner_rows(batch, cfg: PPOConfig) -> tuple[int, int]:
    """(tokens through the layers, rows through the head) of one train_step: micro-batches as it plans
    them, each repeated prompt once where cfg.share_prompts, the head on loss tokens only."""
    cu = batch.cu_seqlens
    lengths = (cu[1:] - cu[:-1]).tolist()
    layer_tokens = head_rows = 0
    for seqs in split_minibatches(len(lengths), cfg.minibatches):
        for mb in micro_batches([lengths[i] for i in seqs], cfg.max_tokens_per_micro_batch):
            pos, mb_cu = gather_sequences(cu, [seqs[i] for i in mb])
            mask = batch.loss_mask[pos].bool()
            kept = (share_prompts(batch.input_ids[pos], mb_cu, prompt_lengths(mask, mb_cu))
                    if cfg.share_prompts else None)
            layer_tokens += pos.numel() if kept is None else int(kept.max()) + 1
            head_rows += int(mask.sum())
    return layer_tokens, head_rows


# ----------------------------------------------------------------------------- ours (in-process)

def ours_step(env: dict, problems, prompts, args, step: int) -> StepTimes:
    """One actors.rl_step.rl_step: what the actors run, back to back in this process."""
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True)
    res = rl_step(step, problems, prompts, sampling=sampling, group_size=args.samples, recompute=args.recompute,
                  **env)
    m = res.metrics
    # generation: one prefill per prompt (its last row through the head), then one row per later token
    prefill = sum(len(p) for p in prompts)
    decoded = sum(len(f.output_ids) - 1 for f in res.samples)
    tflop = step_tflop(env["model"], prefill + decoded, len(prompts) + decoded, *learner_rows(res.batch, env["ppo"]),
                       learn_forwards=4 if args.recompute else 3)
    return StepTimes(m["time_generate_s"], m["time_score_s"] + m["time_pack_s"], m["time_train_s"] + m["time_sync_s"],
                     m["response_tokens"], m["train_tokens"], m["reward_mean"], tflop)


# ----------------------------------------------------------------------------- baseline (naive HF loop)

def baseline_step(model, opt, tokenizer, prompts, answers, args, cfg: PPOConfig) -> StepTimes:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    G, N = args.samples, args.new_tokens
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=N, min_new_tokens=N, num_return_sequences=G,
                             pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
    t1 = time.perf_counter()
    seqs, gen = out.sequences, out.sequences[:, width:]  # [P*G, W+N], [P*G, N]
    with torch.no_grad():
        old_lp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, gen[..., None])[..., 0]
    eos = torch.zeros_like(gen, dtype=torch.bool)
    for t in {tokenizer.eos_token_id, pad}:
        eos |= gen == t
    resp_mask = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including the first eos
    texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
    rewards = torch.tensor(rewards_for(texts, [a for a in answers for _ in range(G)]))
    attn = torch.cat([mask.repeat_interleave(G, 0), resp_mask.long()], 1)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    adv = rewards[:, None].expand_as(gen).float()
    if cfg.normalize_advantages:
        vals = adv[resp_mask]
        adv = (adv - vals.mean()) / (vals.std(unbiased=False) + 1e-5)
    t2 = time.perf_counter()
    model.train()
    for rows in torch.arange(seqs.shape[0]).tensor_split(min(cfg.minibatches, seqs.shape[0])):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=seqs[rows], attention_mask=attn[rows], position_ids=position_ids[rows]).logits
        logp = torch.log_softmax(logits.float(), -1)[:, width - 1:-1]  # position j predicts token j+1
        lp = logp.gather(-1, gen[rows][..., None])[..., 0]
        ratio = torch.exp(lp - old_lp[rows])
        a, m = adv[rows], resp_mask[rows]
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.eps_clip, 1 + cfg.eps_clip))
        loss = (pg * m).sum() / m.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    # generate: every row prefills the padded prompt (the head on its last position), then one token per
    # step; training: every padded position through the layers and the head
    rows, decoded = seqs.shape[0], gen.numel() - seqs.shape[0]
    tflop = step_tflop(model, rows * width + decoded, rows + decoded, seqs.numel(), seqs.numel())
    return StepTimes(t1 - t0, t2 - t1, t3 - t2, gen.numel(), int(attn.sum()), float(rewards.mean()), tflop)


# ----------------------------------------------------------------------------- ours (the whole system)

@dataclass
class SystemRun:
    staleness: int
    s_per_step: float
    response_len: float  # mean tokens per sample
    learner_tok_s: float
    train_s: float
    sync_s: float


def system_run(data: Path, run_dir: Path, staleness: int, args) -> SystemRun:
    sets = {"run_dir": run_dir, "data.train": data, "data.test": "null", "model.path": "smollm2",
            "rollout.batch_prompts": args.prompts, "rollout.group_size": args.samples,
            "rollout.max_new_tokens": args.new_tokens, "rollout.max_staleness": staleness,
            "rollout.request_timeout": 900, "ppo.minibatches": args.minibatches, "ppo.lr": 2e-5,
            "ppo.max_tokens_per_micro_batch": 8192, "train.steps": args.system_steps,
            "train.checkpoint_every": 0, "verifier.workers": 1,
            # the same precision choices as the in-process run
            "actors.generator.dtype": args.gen_dtype, "ppo.bf16": "false" if args.no_bf16 else "auto",
            "ppo.compile": str(not args.no_compile).lower()}
    argv = [sys.executable, "-m", "launcher", "--quiet", "--config", str(ROOT / "configs/tiny.yaml")]
    for k, v in sets.items():
        argv += ["-o", f"{k}={v}"]
    # Asynchronous runs train and generate at once: split the threads so the total stays --threads.
    threads = args.threads if staleness == 0 else max(1, args.threads // 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BOBA_TORCH_THREADS": str(threads)}
    # its own session, so a timeout can stop the launcher together with every actor process it started
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=args.system_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise RuntimeError(f"launcher (max_staleness={staleness}) did not finish {args.system_steps} steps within "
                           f"--system-timeout={args.system_timeout:.0f} s; logs in {run_dir / 'logs'}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"launcher (max_staleness={staleness}) exited {proc.returncode}:\n{out[-3000:]}")
    recs = read_metrics(run_dir)
    if len(recs) != args.system_steps:
        raise RuntimeError(f"{run_dir}: expected {args.system_steps} metrics records, got {len(recs)}")
    # step 0 carries the start-up; a final checkpoint, where one is written, lands in the last step
    steady = recs[:-1] if (run_dir / "checkpoints").exists() else recs
    per_step = (steady[-1]["time"] - steady[0]["time"]) / (len(steady) - 1)
    mid = steady[1:]
    return SystemRun(staleness, per_step,
                     statistics.mean(m["response_tokens"] / len(m["qids"]) for m in mid),
                     statistics.median(m["learner_tokens_per_s"] for m in mid),
                     statistics.median(m["time_train_s"] for m in mid),
                     statistics.median(m["time_sync_s"] for m in mid))


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = bench_parser(__doc__, samples=4, repeats=2, threads=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--minibatches", type=int, default=4, help="PPO minibatches (optimiser steps) per step, both sides")
    ap.add_argument("--gen-dtype", choices=["float32", "bfloat16", "auto"], default="auto",
                    help="our generator's weights (the baseline stays fp32); auto = bfloat16 where it is native")
    ap.add_argument("--no-bf16", action="store_true",
                    help="our learner in fp32 even where bf16 is native (no bf16 weights and compute)")
    ap.add_argument("--no-compile", action="store_true", help="our learner eager (no torch.compile)")
    ap.add_argument("--system-steps", type=int, default=4, help="steps per launcher run (>= 4), 0 = skip")
    ap.add_argument("--staleness", type=int, nargs="*", default=[0, 1], help="max_staleness values to run")
    ap.add_argument("--system-timeout", type=float, default=1800.0, help="seconds per launcher run")
    args = ap.parse_args()
    if args.system_steps and args.system_steps < 4:
        ap.error("--system-steps must be 0 or >= 4 (start-up and the last step are left out)")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = smollm2_dir()
    tok = load_tokenizer(path)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rl-step-"))
    data = make_dataset(tmp / "data", n_train=max(64, args.prompts * (args.system_steps + 1)), n_test=0, n_sft=0,
                        seed=0)["train"]
    problems = load_problems(data)[:args.prompts]
    prompts = [build_prompt(tok, p.prompt, DIRECTIVE) for p in problems]
    answers = [p.answers for p in problems]
    # the recipe: lr 2e-5, Adam eps 1e-5, clip 0.2, normalised advantages
    base_cfg = PPOConfig(minibatches=args.minibatches)
    cfg = PPOConfig(minibatches=args.minibatches, bf16=False if args.no_bf16 else resolve_bf16("auto", "cpu"),
                    compile=not args.no_compile)
    gen_dtype = resolve_dtype(args.gen_dtype, "cpu")
    # as the learner actor decides it (synchronous recipe, torch generator)
    args.recompute, why = recompute_needed(cfg.recompute_logprobs, max_staleness=0, generator_backend="torch",
                                           generator_dtype=gen_dtype,
                                           learner_dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    ours_model = load_model(path, dtype=torch.float32)
    base_model = load_model(path, dtype=torch.float32)
    ours_opt, base_opt = make_optimizer(ours_model, cfg), make_optimizer(base_model, base_cfg)
    if cfg.compile:
        compile_layers(ours_model)
    # in fp32 the generator runs on the learner's own module (its weight update is then a no-op)
    gen_model = ours_model if gen_dtype == torch.float32 else load_model(path, dtype=gen_dtype)
    # everything actors.rl_step.rl_step takes but the sampling; steps: 2 warm-ups, then the repeats
    env = dict(engine=GenerationEngine(gen_model.eval(), seed=0), tokenizer=tok, model=ours_model, optimizer=ours_opt,
               ppo=cfg, total_steps=2 + args.repeats)
    print(f"SmolLM2-135M-Instruct fp32, {args.prompts} prompts (len {min(map(len, prompts))}-"
          f"{max(map(len, prompts))}) x {args.samples} samples x {args.new_tokens} new tokens, "
          f"{args.minibatches} PPO minibatches, {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
          f"ours: generator {str(gen_dtype).removeprefix('torch.')}, learner "
          f"{'bf16 on fp32 masters' if cfg.bf16 else 'fp32'}{'' if args.no_compile else ', compiled'}, proximal "
          f"logprobs {'recomputed' if args.recompute else 'from the generator'} ({why}); baseline fp32", flush=True)

    # warm-up: allocator, kernels, the optimiser states of both sides and the compilation
    small = argparse.Namespace(samples=2, new_tokens=4, recompute=args.recompute)
    baseline_step(base_model, base_opt, tok, prompts[:2], answers[:2], small, base_cfg)
    ours_step(env, problems[:2], prompts[:2], small, step=0)
    if cfg.compile:  # a full-size step too: dynamo specialises on what it sees first (e.g. mask or none)
        t = time.perf_counter()
        ours_step(env, problems, prompts, args, step=1)
        print(f"  warm-up with compilation: {time.perf_counter() - t:.0f} s", flush=True)

    jobs = list(args.staleness) if args.system_steps else []
    base, ours, systems = [], [], []
    for r in range(args.repeats):
        b = baseline_step(base_model, base_opt, tok, prompts, answers, args, base_cfg)
        base.append(b)
        print(f"  repeat {r}: baseline {b.total_s:6.2f} s/step (generate {b.gen_s:.2f}, score {b.score_s:.2f}, "
              f"train {b.train_s:.2f})", flush=True)
        o = ours_step(env, problems, prompts, args, step=2 + r)
        ours.append(o)
        print(f"  repeat {r}: ours     {o.total_s:6.2f} s/step (generate {o.gen_s:.2f}, score+pack {o.score_s:.2f}, "
              f"train + weight copy {o.train_s:.2f})", flush=True)
        for k in jobs[r::args.repeats]:
            s = system_run(data, tmp / f"run-s{k}", k, args)
            systems.append(s)
            print(f"  system max_staleness={k}: {s.s_per_step:.2f} s/step steady state", flush=True)

    def med(xs, f):
        return statistics.median(f(x) for x in xs)

    b_step, o_step = med(base, lambda s: s.total_s), med(ours, lambda s: s.total_s)
    b_gen = med(base, lambda s: s.gen_tokens / s.gen_s)
    o_gen = med(ours, lambda s: s.gen_tokens / s.gen_s)
    b_learn = med(base, lambda s: s.train_tokens / s.train_s)
    o_learn = med(ours, lambda s: s.train_tokens / s.train_s)
    rows = [("seconds / RL step", f"{b_step:.2f}", f"{o_step:.2f}", f"{b_step / o_step:.2f}x", ">= 3x"),
            ("generated tokens / s", f"{b_gen:.0f}", f"{o_gen:.0f}", f"{o_gen / b_gen:.2f}x", ">= 2x"),
            ("learner tokens / s", f"{b_learn:.0f}", f"{o_learn:.0f}", f"{o_learn / b_learn:.2f}x", ""),
            ("matmul TFLOP / step (fewer)", f"{base[0].tflop:.2f}", f"{ours[0].tflop:.2f}",
             f"{base[0].tflop / ours[0].tflop:.2f}x", ""),
            ("matmul GFLOP/s achieved", f"{base[0].tflop * 1e3 / b_step:.0f}", f"{ours[0].tflop * 1e3 / o_step:.0f}",
             f"{(ours[0].tflop / o_step) / (base[0].tflop / b_step):.2f}x", "")]
    for s in systems:
        rows.append((f"s/step, system, staleness {s.staleness}", f"{b_step:.2f}", f"{s.s_per_step:.2f}",
                     f"{b_step / s.s_per_step:.2f}x", ">= 3x"))
    head = ("median of %d" % args.repeats, "baseline", "ours", "ratio", "goal")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    print()
    for r in [head] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\nbaseline: HF generate (left-padded, {args.samples} return sequences) + padded HF forward/backward; "
          f"ours: GenerationEngine + packed train_step (in-process)")
    print(f"learner tokens: baseline {base[0].train_tokens} real of "
          f"{args.prompts * args.samples * (max(map(len, prompts)) + args.new_tokens)} padded; ours {ours[0].train_tokens} "
          f"packed")
    for s in systems:
        print(f"system staleness {s.staleness}: mean response {s.response_len:.1f} tokens/sample (eos not ignored), "
              f"learner {s.learner_tok_s:.0f} tok/s, train {s.train_s:.2f} s + weight sync {s.sync_s:.2f} s per step")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when a run fails: its error names the logs in there


if __name__ == "__main__":
    main()
